"""Opaque pagination cursors."""

from __future__ import annotations

import base64
import binascii

from corral.core.errors import BadRequest


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("invalid cursor") from None
