"""Webhooks on the wire, shared by the server and the SDK: the API's models, and the signature
that every delivery carries (and that receivers check with `verify`)."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Literal

from pydantic import BaseModel, Field

from corral.core.models import Strict, Timestamp

EventType = Literal["command.finished", "sandbox.state"]
SIGNATURE_HEADER = "Corral-Signature"
EVENT_ID_HEADER = "Corral-Event-Id"


class WebhookCreate(Strict):
    url: str = Field(min_length=1, max_length=2000)
    events: list[EventType] = Field(min_length=1, max_length=2)
    sandbox: str | None = Field(default=None, max_length=64, description="Only its events")
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="The signing secret; default: a random one, shown in this answer only",
    )


class Webhook(BaseModel):
    id: str
    url: str
    events: list[EventType]
    sandbox: str | None = None
    created_at: Timestamp
    secret: str | None = Field(default=None, description="In the create answer only")


class WebhookAttempt(BaseModel):
    """One attempt at delivering one event."""

    id: str
    delivery_id: str
    event_id: str
    event_type: EventType
    attempt: int
    at: Timestamp
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    next_retry_at: Timestamp | None = Field(
        default=None, description="When the next attempt is due; none after a 2xx or the last"
    )


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return mac.hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance: float = 300.0, now: float | None = None
) -> bool:
    """Whether `header` (Corral-Signature) signs `body` with `secret`, made within `tolerance`
    seconds of `now`."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))
