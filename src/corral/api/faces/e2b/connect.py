"""The Connect protocol (https://connectrpc.com/docs/protocol), server side, as far as the e2b
SDK uses it: unary calls and server streams with the JSON codec, and client streams.

Messages are protobuf classes generated from the .proto files in `pb/` and read and written
with protobuf's own JSON mapping (`google.protobuf.json_format`), so field names in either
spelling, enums by name or number, bytes as base64 and 64-bit integers as strings all parse
as a Connect client sends them, and unknown fields are ignored, as Connect asks.

- Unary: the body is one JSON message (`application/json`); the answer is one JSON message,
  or an error as `{"code", "message"}` with the HTTP status of its code.
- Streams (`application/connect+json`): each message is an envelope, one flags byte, a
  4-byte big-endian length, the JSON; the last envelope has flag 0x02 and carries
  `{"error": {...}}` or `{}`. A server stream's errors always come in that last envelope with
  status 200, once the stream has begun.
- Binary protobuf (`application/proto`, `application/connect+proto`) is answered too: the
  SDK does not send it, but a Connect client may.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from corral.api.errors import Problem

M = TypeVar("M", bound=Message)

END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 32 << 20

# Connect's codes and the HTTP status each is answered with on a unary call.
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
# Corral's HTTP statuses as Connect codes (for core errors).
CODE_OF_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "already_exists",
    410: "not_found",
    413: "resource_exhausted",
    422: "invalid_argument",
    429: "resource_exhausted",
    499: "canceled",
    501: "unimplemented",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}


class ConnectError(Exception):
    """An RPC error, in Connect's terms (`status`: an HTTP status other than its code's)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    @classmethod
    def of_status(cls, status: int, message: str) -> ConnectError:
        return cls(CODE_OF_STATUS.get(status, "internal" if status >= 500 else "unknown"), message)

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def as_connect_error(exc: Exception) -> ConnectError | None:
    """The Connect error an exception stands for (a core error, a validation error); None for
    one that is a bug."""
    if isinstance(exc, ConnectError):
        return exc
    problem = Problem.of(exc)
    if problem is None:
        return None
    return ConnectError.of_status(problem.status, problem.message)


@dataclass(frozen=True)
class Codec:
    binary: bool

    def decode(self, data: bytes, cls: type[M]) -> M:
        message = cls()
        try:
            if self.binary:
                message.ParseFromString(data)
            else:
                json_format.Parse(data or b"{}", message, ignore_unknown_fields=True)
        except (json_format.ParseError, DecodeError, UnicodeDecodeError, ValueError) as exc:
            message_text = f"the request is not a valid message: {exc}"
            raise ConnectError("invalid_argument", message_text) from None
        return message

    def encode(self, message: Message) -> bytes:
        if self.binary:
            return message.SerializeToString()
        return json.dumps(
            json_format.MessageToDict(message, preserving_proto_field_name=False),
            separators=(",", ":"),
        ).encode()


def unary_codec(request: Request) -> Codec:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind in ("application/json", ""):
        return Codec(binary=False)
    if kind == "application/proto":
        return Codec(binary=True)
    # Connect answers a content type it does not speak with 415.
    raise ConnectError("unimplemented", f"content type {kind!r} is not supported", 415)


def stream_codec(request: Request) -> Codec:
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind == "application/connect+json":
        return Codec(binary=False)
    if kind == "application/connect+proto":
        return Codec(binary=True)
    raise ConnectError("unimplemented", f"content type {kind!r} is not supported on a stream", 415)


def error_response(error: ConnectError) -> JSONResponse:
    status = error.status or HTTP_STATUS.get(error.code, 500)
    return JSONResponse(error.body(), status_code=status)


def envelope(data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def end_stream(error: ConnectError | None = None) -> bytes:
    body: dict[str, Any] = {} if error is None else {"error": error.body()}
    return envelope(json.dumps(body, separators=(",", ":")).encode(), END_STREAM)


async def read_envelopes(request: Request) -> AsyncIterator[bytes]:
    """The messages of an enveloped request body, as they arrive."""
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        while len(buffer) >= 5:
            flags, length = struct.unpack(">BI", buffer[:5])
            if length > MAX_MESSAGE:
                raise ConnectError("resource_exhausted", "a message exceeds 32 MiB")
            if len(buffer) < 5 + length:
                break
            data = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            if flags & COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if flags & END_STREAM:
                return
            yield data
    if buffer:
        raise ConnectError("invalid_argument", "the request ends inside a message")


async def unary(
    request: Request,
    cls: type[M],
    handler: Callable[[M], Awaitable[Message]],
) -> Response:
    """Serve one unary call: errors raised by `handler` become Connect errors."""
    try:
        codec = unary_codec(request)
        message = codec.decode(await request.body(), cls)
        answer = await handler(message)
    except Exception as exc:
        error = as_connect_error(exc)
        if error is None:
            raise
        return error_response(error)
    media = "application/proto" if codec.binary else "application/json"
    return Response(codec.encode(answer), media_type=media)


def first_message(body: bytes, codec: Codec, cls: type[M]) -> M:
    """The one message a server stream's request carries (its body is read before the
    response starts: the response then listens on the connection for a disconnect)."""
    if len(body) < 5:
        raise ConnectError("invalid_argument", "the request carries no message")
    flags, length = struct.unpack(">BI", body[:5])
    if flags & COMPRESSED:
        raise ConnectError("unimplemented", "compressed messages are not supported")
    if len(body) < 5 + length:
        raise ConnectError("invalid_argument", "the request ends inside a message")
    return codec.decode(body[5 : 5 + length], cls)


async def client_stream(
    request: Request, codec: Codec, handler: Callable[[AsyncIterator[bytes]], Awaitable[Message]]
) -> Response:
    """Serve a client stream: the request's messages go to `handler` as they arrive, and its
    answer (or error) is sent once the request has ended."""
    try:
        answer = await handler(read_envelopes(request))
        body = envelope(codec.encode(answer)) + end_stream()
    except Exception as exc:
        error = as_connect_error(exc)
        if error is None:
            raise
        body = end_stream(error)
    media = "application/connect+proto" if codec.binary else "application/connect+json"
    return Response(body, media_type=media)


def server_stream(codec: Codec, messages: AsyncIterator[Message]) -> StreamingResponse:
    """A server stream's response: its messages, then the end of the stream, with the error
    that ended it, if any."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for message in messages:
                yield envelope(codec.encode(message))
        except Exception as exc:
            error = as_connect_error(exc)
            if error is None:
                raise
            yield end_stream(error)
            return
        yield end_stream()

    media = "application/connect+proto" if codec.binary else "application/connect+json"
    return StreamingResponse(body(), media_type=media)
