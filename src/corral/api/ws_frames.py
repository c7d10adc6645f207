"""What every WebSocket route shares, whatever its face: the start-frame deadline, the frame size
limit, the reading of a JSON frame, and the close codes.

The server in front (uvicorn's `ws_max_size`) may refuse a frame before a route sees it; the
routes check again, so that the limit holds the same on every route under any server, and a
frame over it ends the session with close code 1009. Each face turns a `FrameError` into an
error frame of its own shape, then closes with the error's `close_code`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_TOKEN_ENDED = 4001  # the token was revoked or expired (4000 + HTTP 401)
REASON_BYTES = 120  # a close reason must fit in a control frame (123 bytes)


class FrameError(Exception):
    """A client frame the session cannot take: too large, late, or unreadable."""

    def __init__(self, message: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True)
class FrameLimits:
    start_timeout: float  # seconds from the upgrade to the first frame
    max_bytes: int  # of one client frame

    @classmethod
    def of(cls, websocket: WebSocket) -> FrameLimits:
        settings = websocket.app.state.services.settings
        return cls(settings.ws_start_timeout_seconds, settings.ws_max_frame_bytes)


def close_reason(message: str) -> str:
    """`message` cut to what a close frame carries (whole UTF-8 characters)."""
    return message.encode()[:REASON_BYTES].decode(errors="ignore")


async def receive(
    websocket: WebSocket, limits: FrameLimits, *, timeout: float | None = None
) -> str | bytes | None:
    """The next client frame (text or bytes); None once the client has gone."""
    try:
        if timeout is None:
            message = await websocket.receive()
        else:
            message = await asyncio.wait_for(websocket.receive(), timeout)
    except TimeoutError:
        raise FrameError(f"no start frame within {timeout:g} seconds") from None
    except RuntimeError:  # the socket is already closed
        return None
    if message["type"] == "websocket.disconnect":
        return None
    data: str | bytes | None = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    size = len(data)
    if isinstance(data, str) and size * 4 > limits.max_bytes:
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise FrameError(f"the frame is larger than {limits.max_bytes} bytes", CLOSE_TOO_BIG)
    return data


async def receive_start(websocket: WebSocket, limits: FrameLimits) -> str | bytes | None:
    """The first client frame, within the start deadline."""
    return await receive(websocket, limits, timeout=limits.start_timeout)


def parse_json(data: str | bytes) -> Any:
    """A frame's JSON; FrameError when it is not JSON (or nests past what a parser can hold)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise FrameError("the frame is not JSON a server can read: it nests too deeply") from None
    except ValueError:
        raise FrameError("the frame is not JSON") from None
