"""WebSocket sessions on a command for the SDK: the exec protocol, and attach.

`ExecSession` (blocking) and `AsyncExecSession` (asyncio) send input (stdin, close_stdin,
resize, signal) and receive the command's events: output, heartbeats, then exactly one `exit` or
`error`. Iterate a session for its events; `result` holds the terminal one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from corral.client._exceptions import (
    _CLASS_BY_CODE,
    _CODE_BY_STATUS,
    APIError,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    TransportError,
    _class_for_status,
)
from corral.client._streams import OutputGatherer, StreamOutput, Terminal, parse_event
from corral.core.models import ErrorEvent, ExitEvent, StartedEvent

MAX_FRAME = 64 << 20  # bytes of one server frame (1 MiB of output is 1.4 MiB as base64)
_STATUS_BY_CODE = {code: status for status, code in _CODE_BY_STATUS.items()}
_STATUS_BY_CODE.update({"sandbox_not_running": 409, "invalid_frame": 400, "internal": 500})


def error_from_frame(event: ErrorEvent) -> APIError:
    """An `error` frame that ended a session before it started, as the SDK's exception."""
    status = _STATUS_BY_CODE.get(event.code, 400)
    error_class = _CLASS_BY_CODE.get(event.code) or _class_for_status(status)
    return error_class(event.message, status_code=status, code=event.code)


def _handshake_error(exc: BaseException, url: str) -> Exception:
    if isinstance(exc, InvalidStatus):
        response = exc.response
        body = response.body or b""
        headers = {k: v for k, v in response.headers.raw_items()}
        return APIError.from_response(
            httpx.Response(response.status_code, headers=headers, content=bytes(body))
        )
    if isinstance(exc, InvalidURI):
        return ConfigError(f"invalid WebSocket URL {url!r}: {exc}")
    if isinstance(exc, TimeoutError):
        return ConnectTimeout(f"connect timeout on {url}", url=url)
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to {url}: {exc}", url=url)
    return TransportError(f"WebSocket handshake with {url} failed: {exc}", url=url)


STDIN_PIECE = 128 << 10  # bytes (or characters) of input per frame: far below the server's limit


def _stdin_frames(data: bytes | str) -> list[str | bytes]:
    """Input as frames the server takes (it refuses a frame over 1 MiB by default)."""
    if isinstance(data, str):
        return [
            json.dumps({"type": "stdin", "data": data[i : i + STDIN_PIECE]})
            for i in range(0, len(data), STDIN_PIECE)
        ]
    data = bytes(data)  # a binary frame is stdin as it is
    return [data[i : i + STDIN_PIECE] for i in range(0, len(data), STDIN_PIECE)]


class ExecSession:
    """A command over a WebSocket (blocking). Use it as a context manager."""

    def __init__(self, connection: SyncConnection, started: StartedEvent | None) -> None:
        self._connection = connection
        self.started = started
        self.command_id = started.command_id if started else None
        self.result: Terminal | None = None

    @classmethod
    def open(
        cls,
        url: str,
        headers: Mapping[str, str],
        *,
        start: dict[str, Any] | None,
        timeout: float | None,
    ) -> ExecSession:
        try:
            connection = _sync_open(
                url,
                additional_headers=dict(headers),
                open_timeout=timeout,
                max_size=MAX_FRAME,
                compression=None,
            )
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
            raise _handshake_error(exc, url) from exc
        started = None
        if start is not None:
            try:
                connection.send(json.dumps(start))
                first = parse_event(connection.recv(timeout))
            except (ConnectionClosed, TimeoutError) as exc:
                connection.close()
                raise TransportError(f"the session ended before it started: {exc}") from exc
            if isinstance(first, ErrorEvent):
                connection.close()
                raise error_from_frame(first)
            if not isinstance(first, StartedEvent):
                connection.close()
                raise TransportError(f"unexpected first frame: {first!r}")
            started = first
        return cls(connection, started)

    # --- input ---

    def send_stdin(self, data: bytes | str) -> None:
        for frame in _stdin_frames(data):
            self._send(frame)

    def close_stdin(self) -> None:
        self._send(json.dumps({"type": "close_stdin"}))

    def resize(self, rows: int, cols: int) -> None:
        self._send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    def signal(self, signal: str | int) -> None:
        self._send(json.dumps({"type": "signal", "signal": signal}))

    def _send(self, frame: str | bytes) -> None:
        try:
            self._connection.send(frame)
        except ConnectionClosed as exc:
            raise TransportError(f"the session is closed: {exc}") from exc

    # --- output ---

    def recv(self, timeout: float | None = None) -> Any:
        """The next event; None once the session has ended (after the terminal event)."""
        while True:
            if self.result is not None:
                return None
            try:
                message = self._connection.recv(timeout)
            except ConnectionClosed as exc:
                if self.result is None:
                    raise TransportError(f"the session broke off: {exc}") from exc
                return None
            event = parse_event(message)
            if event is None:
                continue
            if isinstance(event, ExitEvent | ErrorEvent):
                self.result = event
            return event

    def __iter__(self) -> Iterator[Any]:
        while (event := self.recv()) is not None:
            yield event

    def collect(self) -> StreamOutput:
        """Read the session to its end: the output of each stream and the terminal event."""
        gatherer = OutputGatherer()
        for event in self:
            gatherer.add(event)
        return gatherer.done(self.result)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ExecSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncExecSession:
    """A command over a WebSocket (asyncio). Use it as an async context manager."""

    def __init__(self, connection: AsyncConnection, started: StartedEvent | None) -> None:
        self._connection = connection
        self.started = started
        self.command_id = started.command_id if started else None
        self.result: Terminal | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        headers: Mapping[str, str],
        *,
        start: dict[str, Any] | None,
        timeout: float | None,
    ) -> AsyncExecSession:
        try:
            connection = await async_connect(
                url,
                additional_headers=dict(headers),
                open_timeout=timeout,
                max_size=MAX_FRAME,
                compression=None,
            )
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
            raise _handshake_error(exc, url) from exc
        started = None
        if start is not None:
            try:
                await connection.send(json.dumps(start))
                first = parse_event(await _recv(connection, timeout))
            except (ConnectionClosed, TimeoutError) as exc:
                await connection.close()
                raise TransportError(f"the session ended before it started: {exc}") from exc
            if isinstance(first, ErrorEvent):
                await connection.close()
                raise error_from_frame(first)
            if not isinstance(first, StartedEvent):
                await connection.close()
                raise TransportError(f"unexpected first frame: {first!r}")
            started = first
        return cls(connection, started)

    async def send_stdin(self, data: bytes | str) -> None:
        for frame in _stdin_frames(data):
            await self._send(frame)

    async def close_stdin(self) -> None:
        await self._send(json.dumps({"type": "close_stdin"}))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def signal(self, signal: str | int) -> None:
        await self._send(json.dumps({"type": "signal", "signal": signal}))

    async def _send(self, frame: str | bytes) -> None:
        try:
            await self._connection.send(frame)
        except ConnectionClosed as exc:
            raise TransportError(f"the session is closed: {exc}") from exc

    async def recv(self, timeout: float | None = None) -> Any:
        while True:
            if self.result is not None:
                return None
            try:
                message = await _recv(self._connection, timeout)
            except ConnectionClosed as exc:
                if self.result is None:
                    raise TransportError(f"the session broke off: {exc}") from exc
                return None
            event = parse_event(message)
            if event is None:
                continue
            if isinstance(event, ExitEvent | ErrorEvent):
                self.result = event
            return event

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (event := await self.recv()) is not None:
            yield event

    async def collect(self) -> StreamOutput:
        gatherer = OutputGatherer()
        async for event in self:
            gatherer.add(event)
        return gatherer.done(self.result)

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> AsyncExecSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _sync_open(url: str, **options: Any) -> SyncConnection:
    """A connection held open beyond one `with` block (websockets >= 17.1 wants it entered)."""
    try:
        opener = sync_connect(url, legacy=False, **options)  # type: ignore[call-overload]
    except TypeError:  # websockets < 17.1: connect() is the connection
        return sync_connect(url, **options)  # type: ignore[no-any-return]
    return opener.__enter__()  # type: ignore[no-any-return]


async def _recv(connection: AsyncConnection, timeout: float | None) -> str | bytes:
    if timeout is None:
        return await connection.recv()
    return await asyncio.wait_for(connection.recv(), timeout)
