"""The HTTP/1.1 connection protocol the server runs: uvicorn's httptools protocol, bounded.

uvicorn with httptools and uvloop is kept for its speed (an exec round trip is a few ms, and
the parser is C). Its own options do not bound what a client can hold: `limit_concurrency`
counts idle connections against requests and answers 503 only once a request has arrived,
`h11_max_incomplete_event_size` applies to h11 only, and `timeout_keep_alive` starts after a
first response, so a connection that never sends a request head is kept forever. This subclass
adds, per connection:

- a head deadline: a request head must be complete within `head_timeout` seconds of its first
  byte (of the accept, for a connection's first request). A slowloris trickling one byte a
  second is cut at the deadline, whatever it sends; a head that was begun gets a 408. Between
  requests, uvicorn's keep-alive timeout closes an idle connection.
- head caps: `MAX_HEAD_BYTES` for the whole head (431), `MAX_URL_BYTES` for the request target
  (414), `MAX_HEADER_LINE_BYTES` per header line and `MAX_HEADERS` lines (431). Data is fed to
  the parser in slices while a head is open, so no more than the cap is ever buffered for it;
  chunked-body trailers (which the parser accumulates like headers) are metered the same way.
- a connection bound: past `max_connections` open connections (WebSockets included), a new
  connection is answered 503 once its head arrives; past the bound plus a small margin it is
  answered 503 at once, unread, so that descriptors never run out.

Every refusal is JSON in the native error shape with `Connection: close`; the connection is
then half-closed and drained briefly before it is closed, so that the client reads the answer
instead of a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_URL_BYTES = 16 * 1024
MAX_HEADER_LINE_BYTES = 16 * 1024
MAX_HEADERS = 128

# After a refusal: how long, and how many bytes, the rest of a request is read and dropped.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024

# The descriptor limit is raised to the hard limit, up to this (an unlimited hard limit would
# otherwise hand every sandbox a soft limit in the billions).
MAX_NOFILE = 1 << 20

# A body up to this size is joined to its held head; a larger one is written beside it.
COALESCE_MAX_BYTES = 64 * 1024

# Warnings about the connection bound, at most one per this many seconds.
WARN_EVERY_SECONDS = 10.0

_CODES = {
    400: "bad_request",
    408: "request_timeout",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    503: "unavailable",
}


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout: float
    max_connections: int
    # Connections past max_connections whose head is still read, to answer it 503.
    overflow: int

    @property
    def hard_ceiling(self) -> int:
        return self.max_connections + self.overflow


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (at most MAX_NOFILE); the new soft
    limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_NOFILE if hard == resource.RLIM_INFINITY else min(hard, MAX_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target if soft == resource.RLIM_INFINITY else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def connection_limits(
    descriptors: int, *, head_timeout: float, max_connections: int | None
) -> ConnectionLimits:
    """The bound for a process allowed `descriptors` open files. By default half of them are
    kept for sandboxes, output logs and the store, and connections take the other half: the
    bound, and an eighth more to answer 503."""
    if max_connections is None:
        max_connections = max(descriptors // 2 * 8 // 9, 16)
    return ConnectionLimits(head_timeout, max_connections, max(max_connections // 8, 16))


def error_response(
    status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A complete HTTP response in the native error shape, closing the connection."""
    request_id = "req_" + os.urandom(8).hex()
    body = json.dumps(
        {
            "error": {"code": _CODES[status], "message": message, "details": None},
            "request_id": request_id,
        },
        separators=(",", ":"),
    ).encode()
    lines = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-request-id: " + request_id.encode() + b"\r\n",
        b"connection: close\r\n",
    ]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join([*lines, b"\r\n", body])


def busy_response() -> bytes:
    return error_response(
        503, "the server has too many open connections; retry later", ((b"retry-after", b"1"),)
    )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the answer is already sent."""


class HeadHolder:
    """A request's view of the connection's transport that sends a response's head with the
    first write of its body, as one segment.

    uvicorn writes the head and the body separately: two syscalls and two TCP segments for
    every response, and a client that wakes for the head only to wait for the body. A held head
    goes out with the next write, or at the event loop's next turn if none comes in the same
    turn (a streamed response whose first chunk is not ready yet), so nothing waits on it.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= COALESCE_MAX_BYTES:
                self._transport.write(held + data)
            else:
                self._transport.writelines((held, data))  # one writev, no copy of the body
            return
        if data.endswith(b"\r\n\r\n") and data.startswith(b"HTTP/1.1 ") and data[9:10] != b"1":
            self._held = data  # a final response's head (an interim 100 Continue goes at once)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, head caps and a connection bound.

    Configure with `configured(limits)`, which returns a subclass for uvicorn's `http=`.
    """

    limits: ClassVar[ConnectionLimits]
    _last_warning: ClassVar[float] = 0.0

    @classmethod
    def configured(cls, limits: ConnectionLimits) -> type[BoundedHttpToolsProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The deadline's timer is armed once per deadline, not once per request: when it fires
        # it looks at the head in progress (if any) and re-arms for what is left of its time.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_began: float | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # True while a request head (or a chunked body's trailers) is being read: the bytes
        # fed meanwhile are counted against MAX_HEAD_BYTES.
        self._metered = True
        self._metered_bytes = 0
        # True from the end of one request to the end of the next one's head: the deadline.
        self._in_head = True
        self._header_count = 0
        self._over_bound = False
        self._refused = False
        self._drained = 0
        self._head_holder: HeadHolder | None = None

    # --- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        open_now = len(self.connections)
        super().connection_made(transport)
        if open_now >= self.limits.max_connections:
            self._warn_bound(open_now)
            if open_now >= self.limits.hard_ceiling:
                self._refused = True
                transport.write(busy_response())
                transport.close()
                return
            self._over_bound = True
        self._head_began = self.loop.time()
        self._arm_head_timer(self.limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # The answer is sent; read the rest of the request so the client is not reset.
            self._drained += len(data)
            if self._drained > LINGER_MAX_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._in_head and self._head_began is None:
            self._head_began = self.loop.time()
            if self._head_timer is None:
                self._arm_head_timer(self.limits.head_timeout)
        cap = MAX_HEAD_BYTES
        try:
            # While a head is open, feed at most one byte past the cap at a time: if the head
            # is still open after that, it is too large.
            while self._metered and self._metered_bytes + len(data) > cap:
                room = cap - self._metered_bytes + 1
                self._metered_bytes += room
                self.parser.feed_data(data[:room])
                data = data[room:]
                if self._metered and self._metered_bytes > cap:
                    self._refuse(431, f"the request head exceeds {cap} bytes")
                    return
            if self._metered:
                self._metered_bytes += len(data)
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # Also a callback's error: one of ours (answered already) or uvicorn's on a
            # malformed request, which gets a 400 as uvicorn would give it.
            if not self._refused:
                self.logger.debug("invalid HTTP request received")
                self._refuse(400, "invalid HTTP request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid HTTP request")

    # --- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, f"the request target exceeds {MAX_URL_BYTES} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header, inlined (it runs for every header line), with the line caps.
        self._header_count += 1
        if len(name) + len(value) > MAX_HEADER_LINE_BYTES:
            self._refuse(431, f"a header line exceeds {MAX_HEADER_LINE_BYTES} bytes")
            raise _Refused
        if self._header_count > MAX_HEADERS:
            self._refuse(431, f"the request has more than {MAX_HEADERS} header lines")
            raise _Refused
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_began = None
        self._in_head = self._metered = False
        if self._over_bound:
            self._refused = True
            self._answer_and_linger(busy_response())
            raise _Refused
        super().on_headers_complete()
        if self.cycle is not None:  # its task has not run yet: nothing is written so far
            if self._head_holder is None:
                self._head_holder = HeadHolder(self.transport, self.loop)
            self.cycle.transport = self._head_holder  # type: ignore[assignment]

    def on_chunk_header(self) -> None:
        # The last chunk's header is followed by trailers, which the parser buffers.
        self._metered = True
        self._metered_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._metered = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = self._metered = True
        self._metered_bytes = 0

    # --- deadlines and refusals ----------------------------------------------------------------

    def _arm_head_timer(self, delay: float) -> None:
        self._head_timer = self.loop.call_later(delay, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_began is None or self.transport.is_closing():
            return  # no head in progress: the next one arms the timer again
        left = self._head_began + self.limits.head_timeout - self.loop.time()
        if left > 0:
            self._arm_head_timer(left)
            return
        if self._metered_bytes == 0:
            self.transport.close()  # nothing sent: nobody to answer
        else:
            self._refuse(408, "the request head was not received in time")

    def _refuse(self, status: int, message: str) -> None:
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self._refused = True
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is under way on this connection: no room for another answer.
            self.transport.close()
            return
        self._answer_and_linger(error_response(status, message))

    def _answer_and_linger(self, response: bytes) -> None:
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _warn_bound(self, open_now: int) -> None:
        now = time.monotonic()
        cls = type(self)
        if now - cls._last_warning >= WARN_EVERY_SECONDS:
            cls._last_warning = now
            log.warning(
                "%d connections open (bound %d, CORRAL_MAX_CONNECTIONS): answering 503",
                open_now,
                self.limits.max_connections,
            )
