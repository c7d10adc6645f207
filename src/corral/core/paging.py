"""Opaque pagination cursors: the last id of a page, encoded."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any

from corral.core.errors import BadRequest

_ID = re.compile(r"^[a-z]+_[0-9a-z]{1,64}$")


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def next_cursor(rows: Sequence[Any], limit: int) -> str | None:
    """The cursor after a page of `limit` rows, read with one row more than the page (an `id`
    each, newest first): None when that extra row is not there."""
    return encode_cursor(rows[limit - 1].id) if len(rows) > limit else None


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode("ascii"))
        value = raw.decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise BadRequest("invalid cursor") from None
    if not _ID.match(value) or encode_cursor(value) != cursor:
        raise BadRequest("invalid cursor")
    return value
