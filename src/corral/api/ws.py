"""WebSocket sessions on a command: the exec protocol and attach share this.

Server frames are the output events of `corral.core.events` (JSON text frames): stdout, stderr,
heartbeat, then exactly one terminal frame, `exit` or `error`, after which the server closes the
socket (1000). The exec protocol sends a `started` frame first.

Client frames (JSON text): stdin {data | data_base64}, resize {rows, cols}, signal {signal},
close_stdin, heartbeat. A binary frame is stdin bytes as they are. Input goes to the command in
order, with back-pressure: a command that does not read its input slows the client down, never
the server's memory. A frame the protocol does not allow ends the session with an `error` frame
(code `invalid_frame`) and close code 1008 (1009 for a frame over the size limit); the command
runs on.

A session ends with its token: once the token is revoked or expires, the server sends an `error`
frame (code `unauthenticated`) and closes with 4001 and the reason; input is refused from then
on, and the command runs on (unless it was started with `kill_on_disconnect`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import signal as signals
from typing import Any

import pydantic
from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState

from corral.api import ws_frames
from corral.api.auth import token_from_request
from corral.api.console.session import cookie_secret
from corral.api.ws_frames import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOKEN_ENDED,
    CLOSE_TRY_AGAIN,
    FrameError,
    FrameLimits,
    close_reason,
)
from corral.core.errors import CorralError, InvalidArgument, RateLimited
from corral.core.events import Encoding, command_events
from corral.core.models import (
    ClientFrame,
    ClientHeartbeatFrame,
    CloseStdinFrame,
    ResizeFrame,
    SignalFrame,
    StdinFrame,
)
from corral.core.token_watch import TokenEnded, TokenLease
from corral.core.tokens import Principal
from corral.node.base import Execution
from corral.services import Services
from corral.store.tables import CommandRow

log = logging.getLogger(__name__)

STDIN_QUEUE = 64  # frames of input waiting for the command
FRAMES = pydantic.TypeAdapter(ClientFrame)
_CLOSE = object()


def parse_signal(value: str | int) -> int:
    """A signal by number or name (`INT`, `SIGINT`, `int`, `"2"`)."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        if 1 <= number <= signals.SIGRTMAX:
            return number
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        with contextlib.suppress(KeyError):
            return int(signals.Signals[name])
    raise InvalidArgument(f"unknown signal {value!r}")


async def authenticate(websocket: WebSocket, services: Services) -> Principal | None:
    """The caller, by any token style the HTTP API takes (the console's cookie included); None
    once the handshake is refused."""
    try:
        secret = token_from_request(websocket)  # type: ignore[arg-type]
        if secret is None:
            secret = cookie_secret(websocket)
        return await services.tokens.authenticate(secret)
    except CorralError as exc:
        await refuse(websocket, exc)
        return None


async def refuse(websocket: WebSocket, exc: CorralError) -> None:
    """Refuse a handshake: with the API's error answer when the server can send one (an HTTP
    status the client sees), else by closing with 1008."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        headers = None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        await websocket.send_denial_response(JSONResponse(body, exc.status, headers=headers))
    else:
        await websocket.close(code=CLOSE_POLICY, reason=close_reason(exc.message))


async def send_error(websocket: WebSocket, exc: CorralError | FrameError) -> None:
    """After the handshake: one terminal `error` frame, then close."""
    if isinstance(exc, FrameError):
        frame = {"type": "error", "code": "invalid_frame", "message": exc.message}
        code = exc.close_code
    else:
        frame = {"type": "error", "code": exc.code, "message": exc.message}
        code = CLOSE_INTERNAL if exc.status >= 500 else CLOSE_POLICY
        if exc.status in (429, 503):
            code = CLOSE_TRY_AGAIN
        if isinstance(exc, TokenEnded):
            code = CLOSE_TOKEN_ENDED
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps(frame))
        await websocket.close(code=code, reason=close_reason(exc.message))


class ProtocolError(Exception):
    def __init__(self, message: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.close_code = close_code


class Session:
    """A client attached to one command over a WebSocket (already accepted)."""

    def __init__(
        self,
        websocket: WebSocket,
        services: Services,
        row: CommandRow,
        execution: Execution | None,
        lease: TokenLease,
        *,
        offset: int = 0,
        encoding: Encoding = "auto",
        kill_on_disconnect: bool = False,
        may_send: bool = True,
    ) -> None:
        self.websocket = websocket
        self.services = services
        self.row = row
        self.execution = execution
        self.offset = offset
        self.encoding = encoding
        self.kill_on_disconnect = kill_on_disconnect
        self.may_send = may_send  # input needs the exec scope; watching needs read
        self.lease = lease  # the session ends when the caller's token does
        self.limits = FrameLimits.of(websocket)
        self._stdin: asyncio.Queue[object] = asyncio.Queue(STDIN_QUEUE)
        self._send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame, separators=(",", ":"))
        async with self._send_lock:
            await self.websocket.send_text(text)
        self.services.metrics.streamed("websocket", len(text))

    async def run(self) -> None:
        output = asyncio.create_task(self._output())
        inbound = asyncio.create_task(self._inbound())
        writer = asyncio.create_task(self._write_stdin())
        ended = asyncio.create_task(self.lease.wait())
        try:
            done, _ = await asyncio.wait(
                {output, inbound, ended}, return_when=asyncio.FIRST_COMPLETED
            )
            if ended in done and output not in done:
                # Nothing more in or out: the token no longer allows this session.
                for task in (inbound, writer, output):
                    task.cancel()
                await asyncio.gather(output, inbound, writer, return_exceptions=True)
                if self.kill_on_disconnect and self.execution is not None:
                    await self.execution.cancel()
                reason = ended.result()
                await self._close_with(
                    {"type": "error", "code": TokenEnded.code, "message": reason},
                    CLOSE_TOKEN_ENDED,
                )
                return
            if output in done:
                if output.exception() is None:
                    with contextlib.suppress(Exception):
                        await self.websocket.close(code=CLOSE_NORMAL)
                elif self.kill_on_disconnect and self.execution is not None:
                    await self.execution.cancel()  # the client went away while we were sending
                return
            outcome = inbound.exception() or inbound.result()
            output.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await output
            if isinstance(outcome, ProtocolError):
                await self._close_with(
                    {"type": "error", "code": "invalid_frame", "message": str(outcome)},
                    outcome.close_code,
                )
            elif isinstance(outcome, BaseException):
                log.warning("websocket session on %s failed: %r", self.row.id, outcome)
                await self._close_with(
                    {"type": "error", "code": "internal", "message": "internal error"},
                    CLOSE_INTERNAL,
                )
            elif self.kill_on_disconnect and self.execution is not None:
                await self.execution.cancel()
        finally:
            for task in (output, inbound, writer, ended):
                task.cancel()
            await asyncio.gather(output, inbound, writer, ended, return_exceptions=True)
            self.lease.release()

    async def _close_with(self, frame: dict[str, Any], code: int) -> None:
        if self.websocket.application_state != WebSocketState.CONNECTED:
            return
        with contextlib.suppress(Exception):
            await self.send(frame)
            await self.websocket.close(code=code, reason=close_reason(frame["message"]))

    async def _output(self) -> None:
        events = command_events(
            self.services.commands,
            self.row,
            self.offset,
            heartbeat=self.services.settings.heartbeat_seconds,
            encoding=self.encoding,
        )
        async for event in events:
            await self.send(event)

    async def _inbound(self) -> ProtocolError | None:
        """Client frames until the client goes away (None) or breaks the protocol."""
        while True:
            try:
                data = await ws_frames.receive(self.websocket, self.limits)
            except FrameError as exc:
                return ProtocolError(exc.message, exc.close_code)
            if data is None:
                return None
            try:
                if isinstance(data, bytes):
                    await self._input(data)
                else:
                    await self._handle(FRAMES.validate_json(data))
            except pydantic.ValidationError as exc:
                problem = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in problem.get("loc", ()))
                prefix = f"{where}: " if where else ""
                return ProtocolError(f"invalid frame: {prefix}{problem.get('msg', 'unreadable')}")
            except (ProtocolError, InvalidArgument) as exc:
                return ProtocolError(str(getattr(exc, "message", exc)))

    async def _handle(self, frame: Any) -> None:
        execution = self.execution
        if not self.may_send and not isinstance(frame, ClientHeartbeatFrame):
            raise ProtocolError("this token may only watch: input needs the 'exec' scope")
        if isinstance(frame, StdinFrame):
            if frame.data_base64 is not None:
                try:
                    data = base64.b64decode(frame.data_base64, validate=True)
                except binascii.Error:
                    raise ProtocolError("stdin: data_base64 is not base64") from None
            else:
                data = (frame.data or "").encode("utf-8")
            await self._input(data)
        elif isinstance(frame, CloseStdinFrame):
            if execution is not None and execution.spec.interactive:
                await self._stdin.put(_CLOSE)
        elif isinstance(frame, SignalFrame):
            signum = parse_signal(frame.signal)
            if execution is not None and not execution.finished:
                await execution.signal(signum)
        elif isinstance(frame, ResizeFrame):
            if execution is not None and execution.spec.tty:
                await execution.resize(frame.rows, frame.cols)
        # heartbeat: nothing to do; it kept the connection busy

    async def _input(self, data: bytes) -> None:
        if not self.may_send:
            raise ProtocolError("this token may only watch: input needs the 'exec' scope")
        execution = self.execution
        if execution is None or not data:
            return  # the command has ended: input has nowhere to go
        if not execution.spec.interactive:
            raise ProtocolError("the command does not take input (start it interactive)")
        await self._stdin.put(data)

    async def _write_stdin(self) -> None:
        execution = self.execution
        if execution is None:
            return
        while True:
            item = await self._stdin.get()
            try:
                if item is _CLOSE:
                    await execution.close_stdin()
                else:
                    assert isinstance(item, bytes)
                    await execution.write_stdin(item)
            except BrokenPipeError:
                pass  # closed, or the command exited: later input is dropped like a pipe's


async def receive_start(websocket: WebSocket) -> Any:
    """The exec protocol's start frame, parsed; None when the client went away first."""
    data = await ws_frames.receive_start(websocket, FrameLimits.of(websocket))
    if data is None:
        return None
    if isinstance(data, bytes):
        raise FrameError("the start frame must be a text frame")
    return ws_frames.parse_json(data)
