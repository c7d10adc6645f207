"""Streams of a command's output for the SDK: events (ND-JSON) and raw bytes, each resumable.

A dropped connection (a network blip, an idle proxy, a restarting load balancer) is not an end:
the stream reconnects and asks the server for the output from the offset it had reached, so the
caller sees every byte once, in order, then exactly one terminal event. Only several failures in
a row without any progress end it with a `TransportError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import pydantic

from corral.client._exceptions import (
    CorralError,
    DecodingError,
    ReadTimeout,
    TransportError,
    map_httpx_errors,
)
from corral.core.models import (
    ErrorEvent,
    Event,
    ExitEvent,
    HeartbeatEvent,
    OutputEvent,
    StartedEvent,
)

EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Event)
KNOWN_EVENTS = frozenset({"stdout", "stderr", "started", "heartbeat", "exit", "error"})
MAX_RETRIES = 5  # failures in a row, without progress, before a stream gives up
BACKOFF_START = 0.2
BACKOFF_MAX = 5.0

Terminal = ExitEvent | ErrorEvent


def parse_event(text: str | bytes) -> Any:
    """One event from its JSON; None for an event type this SDK does not know (newer server)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodingError(f"invalid event: {exc}", response=_NO_RESPONSE) from None
    if not isinstance(data, dict):
        raise DecodingError("invalid event: not an object", response=_NO_RESPONSE)
    if data.get("type") not in KNOWN_EVENTS:
        return None
    try:
        return EVENTS.validate_python(data)
    except pydantic.ValidationError as exc:
        raise DecodingError(f"invalid event: {exc}", response=_NO_RESPONSE) from None


_NO_RESPONSE = httpx.Response(200)


@dataclass
class StreamOutput:
    """What a finished stream carried: the output by stream, and its terminal event."""

    stdout: bytes = b""
    stderr: bytes = b""
    result: Terminal | None = None
    events: int = 0

    @property
    def exit_code(self) -> int | None:
        return self.result.exit_code if isinstance(self.result, ExitEvent) else None


class OutputGatherer:
    """Builds a StreamOutput from a stream's events, for every stream's `collect()`."""

    def __init__(self) -> None:
        self._streams = {"stdout": bytearray(), "stderr": bytearray()}
        self._events = 0

    def add(self, event: Any) -> None:
        self._events += 1
        if isinstance(event, OutputEvent):
            self._streams[event.type].extend(event.bytes)

    def done(self, result: Terminal | None) -> StreamOutput:
        return StreamOutput(
            stdout=bytes(self._streams["stdout"]),
            stderr=bytes(self._streams["stderr"]),
            result=result,
            events=self._events,
        )


@dataclass
class _Cursor:
    """The I/O-free state of a resumable stream."""

    offset: int
    resume: bool
    silence_ok: bool = False  # raw streams: a read timeout is a quiet command, not a failure
    failures: int = 0
    result: Terminal | None = None
    received: int = 0  # raw streams: bytes since the first offset

    def took(self, event: Any) -> None:
        self.failures = 0
        next_offset = getattr(event, "next_offset", None)
        if next_offset is not None:
            self.offset = next_offset
        if isinstance(event, ExitEvent | ErrorEvent):
            self.result = event

    def took_bytes(self, count: int) -> None:
        self.failures = 0
        self.received += count

    def retry_delay(self, exc: BaseException) -> float | None:
        """Seconds to wait before reconnecting, or None to give up."""
        if self.silence_ok and isinstance(exc, httpx.ReadTimeout | ReadTimeout):
            return 0.0 if self.resume else None  # a raw stream has no heartbeats: quiet is fine
        self.failures += 1
        if not self.resume or self.failures > MAX_RETRIES:
            return None
        return min(BACKOFF_MAX, BACKOFF_START * 2 ** (self.failures - 1))


def _take_line(cursor: _Cursor, line: bytes, heartbeats: bool) -> Any | None:
    """The event a line of an event stream carries, once the cursor has taken it; None for a
    blank or unknown line, and for a heartbeat nobody asked for."""
    if not line.strip():
        return None
    event = parse_event(line)
    if event is None:
        return None
    cursor.took(event)
    if isinstance(event, HeartbeatEvent) and not heartbeats:
        return None
    return event


class StreamCut(Exception):
    """The response ended without the terminal event: the connection was cut."""


RETRYABLE = (httpx.TransportError, TransportError, StreamCut)


def _raise_transport(exc: BaseException) -> None:
    if isinstance(exc, CorralError):
        raise exc
    if isinstance(exc, StreamCut):
        raise TransportError(f"the stream kept breaking off: {exc}") from exc
    with map_httpx_errors():
        raise exc


def _iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


async def _aiter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


# --- events ------------------------------------------------------------------------------------


class _ResponseStream:
    """What EventStream and ByteStream share: the open response and the iterator over it,
    closed together (`close()`, or a `with` block)."""

    _response: httpx.Response | None
    _iterator: Iterator[Any] | None

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._drop()
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _AsyncResponseStream:
    """`_ResponseStream` for asyncio (`aclose()`, or an `async with` block)."""

    _response: httpx.Response | None
    _iterator: AsyncIterator[Any] | None

    async def _drop(self) -> None:
        if self._response is not None:
            await self._response.aclose()
            self._response = None

    async def aclose(self) -> None:
        await self._drop()
        if self._iterator is not None and hasattr(self._iterator, "aclose"):
            await self._iterator.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class EventStream(_ResponseStream):
    """A command's output events: iterate it (`for event in stream`).

    Yields `OutputEvent`s (stdout/stderr), `HeartbeatEvent`s (if asked for), and last one
    `ExitEvent` or `ErrorEvent`, also kept in `result`. Reconnects by itself from the last offset
    when the connection drops. Use it as a context manager, or `close()` it, to stop early.
    """

    def __init__(
        self,
        open_response: Callable[[int], httpx.Response],
        offset: int,
        *,
        heartbeats: bool = False,
        resume: bool = True,
        first: list[Any] | None = None,
    ) -> None:
        self._open = open_response
        self._cursor = _Cursor(offset, resume)
        self._heartbeats = heartbeats
        self._first = list(first or [])
        self._response: httpx.Response | None = open_response(offset)
        self._iterator: Iterator[Any] | None = None
        self.command_id = next(
            (e.command_id for e in self._first if isinstance(e, StartedEvent)), None
        )

    @property
    def offset(self) -> int:
        """Where the stream stands: resume a later stream from here."""
        return self._cursor.offset

    @property
    def result(self) -> Terminal | None:
        return self._cursor.result

    def __iter__(self) -> Iterator[Any]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    def _events(self) -> Iterator[Any]:
        yield from self._first
        cursor = self._cursor
        while cursor.result is None:
            try:
                if self._response is None:
                    self._response = self._open(cursor.offset)
                for line in _iter_lines(self._response.iter_bytes()):
                    event = _take_line(cursor, line, self._heartbeats)
                    if event is None:
                        continue
                    yield event
                    if cursor.result is not None:
                        break
                if cursor.result is None:
                    raise StreamCut("the response ended before the command's end")
            except RETRYABLE as exc:
                self._drop()
                delay = cursor.retry_delay(exc)
                if delay is None:
                    _raise_transport(exc)
                time.sleep(delay or 0)
        self._drop()

    def collect(self) -> StreamOutput:
        """Read the stream to its end: the output of each stream, and the terminal event."""
        gatherer = OutputGatherer()
        for event in self:
            gatherer.add(event)
        return gatherer.done(self.result)


class AsyncEventStream(_AsyncResponseStream):
    """`EventStream` for asyncio: `async for event in stream`."""

    def __init__(
        self,
        open_response: Callable[[int], Awaitable[httpx.Response]],
        offset: int,
        *,
        heartbeats: bool = False,
        resume: bool = True,
        first: list[Any] | None = None,
    ) -> None:
        self._open = open_response
        self._cursor = _Cursor(offset, resume)
        self._heartbeats = heartbeats
        self._first = list(first or [])
        self._response: httpx.Response | None = None
        self._iterator: AsyncIterator[Any] | None = None
        self.command_id = next(
            (e.command_id for e in self._first if isinstance(e, StartedEvent)), None
        )

    async def _start(self) -> AsyncEventStream:
        self._response = await self._open(self._cursor.offset)
        return self

    @property
    def offset(self) -> int:
        return self._cursor.offset

    @property
    def result(self) -> Terminal | None:
        return self._cursor.result

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def _events(self) -> AsyncIterator[Any]:
        for event in self._first:
            yield event
        cursor = self._cursor
        while cursor.result is None:
            try:
                if self._response is None:
                    self._response = await self._open(cursor.offset)
                async for line in _aiter_lines(self._response.aiter_bytes()):
                    event = _take_line(cursor, line, self._heartbeats)
                    if event is None:
                        continue
                    yield event
                    if cursor.result is not None:
                        break
                if cursor.result is None:
                    raise StreamCut("the response ended before the command's end")
            except RETRYABLE as exc:
                await self._drop()
                delay = cursor.retry_delay(exc)
                if delay is None:
                    _raise_transport(exc)
                await asyncio.sleep(delay or 0)
        await self._drop()

    async def collect(self) -> StreamOutput:
        gatherer = OutputGatherer()
        async for event in self:
            gatherer.add(event)
        return gatherer.done(self.result)


# --- raw bytes ---------------------------------------------------------------------------------


class ByteStream(_ResponseStream):
    """A command's output as raw bytes (`for chunk in stream`), resumed after a dropped
    connection without losing or repeating a byte. Ends when the command does."""

    def __init__(self, open_response: Callable[[int], httpx.Response], skip: int = 0) -> None:
        self._open = open_response
        self._skip = skip
        self._cursor = _Cursor(0, True, silence_ok=True)
        self._response: httpx.Response | None = open_response(skip)
        self._iterator: Iterator[bytes] | None = None

    @property
    def received(self) -> int:
        return self._cursor.received

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    def _chunks(self) -> Iterator[bytes]:
        cursor = self._cursor
        while True:
            try:
                if self._response is None:
                    self._response = self._open(self._skip + cursor.received)
                for chunk in self._response.iter_bytes():
                    if chunk:
                        cursor.took_bytes(len(chunk))
                        yield chunk
                self._drop()
                return
            except RETRYABLE as exc:
                self._drop()
                delay = cursor.retry_delay(exc)
                if delay is None:
                    _raise_transport(exc)
                time.sleep(delay or 0)

    def read(self) -> bytes:
        """Everything, to the end (mind the size)."""
        return b"".join(self)


class AsyncByteStream(_AsyncResponseStream):
    """`ByteStream` for asyncio: `async for chunk in stream`."""

    def __init__(
        self, open_response: Callable[[int], Awaitable[httpx.Response]], skip: int = 0
    ) -> None:
        self._open = open_response
        self._skip = skip
        self._cursor = _Cursor(0, True, silence_ok=True)
        self._response: httpx.Response | None = None
        self._iterator: AsyncIterator[bytes] | None = None

    async def _start(self) -> AsyncByteStream:
        self._response = await self._open(self._skip)
        return self

    @property
    def received(self) -> int:
        return self._cursor.received

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._iterator is None:
            self._iterator = self._chunks()
        return self._iterator

    async def _chunks(self) -> AsyncIterator[bytes]:
        cursor = self._cursor
        while True:
            try:
                if self._response is None:
                    self._response = await self._open(self._skip + cursor.received)
                async for chunk in self._response.aiter_bytes():
                    if chunk:
                        cursor.took_bytes(len(chunk))
                        yield chunk
                await self._drop()
                return
            except RETRYABLE as exc:
                await self._drop()
                delay = cursor.retry_delay(exc)
                if delay is None:
                    _raise_transport(exc)
                await asyncio.sleep(delay or 0)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])
