"""Live output and input: a command's log as ND-JSON, Server-Sent Events, raw bytes or a
WebSocket (from any offset: replay, then live), input over HTTP (stdin, signals, terminal size),
and the WebSocket exec protocol."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, WebSocket
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from corral.api import ws
from corral.api.auth import Caller, ServicesDep, running_sandbox, usable_sandbox
from corral.api.token_bound import TokenBoundStream
from corral.api.ws_frames import FrameError
from corral.core.errors import BadRequest, Conflict, CorralError, InvalidArgument
from corral.core.events import STREAM_SETS, Encoding, StreamChoice, command_events
from corral.core.models import (
    CommandStatus,
    ExecRequest,
    ExecStartFrame,
    ResizeRequest,
    Scope,
    SignalRequest,
    StdinWritten,
)
from corral.core.token_watch import TokenEnded, TokenLease
from corral.core.tokens import Principal
from corral.node.base import Execution
from corral.node.output_log import CorruptLog
from corral.services import Services
from corral.store.tables import CommandRow

router = APIRouter(prefix="/v1/sandboxes/{sandbox}", tags=["streams"])

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # the client went away mid-request (never seen by it; for the access log)
SSE_END = "end"  # the id of an SSE stream's terminal event: reconnecting after it gets 204

_LOGS_DOC = """A command's output from `offset` (default 0: everything): replayed, then live
until the command ends. The same log in three shapes:

- `ndjson` (default): one JSON event per line: `stdout`/`stderr` {offset, next_offset, data or
  data_base64}, `heartbeat` while idle, then exactly one `exit` {status, exit_code, signal, ...}
  or `error` {code, message} (`lost`: the result is unknown).
- `sse` (default when `Accept: text/event-stream`): the same events as Server-Sent Events, with
  `id:` = the offset to resume from (so `Last-Event-ID` resumes); the terminal event has id
  `end`, and reconnecting after it answers 204.
- `raw`: the bytes only (stdout and stderr interleaved as written, or one `stream`), fast, no
  heartbeats. `X-Corral-Offset` gives the start; resume with the same `offset` and `skip` = bytes
  already received.

Resume any stream at the `next_offset` of the last event received.

A stream ends with the caller's token: once it is revoked or expires, `ndjson` and `sse` send a
last `error` event (code `unauthenticated`) and end; `raw` ends."""


async def command_for(
    services: Services, caller: Principal, sandbox: str, command_id: str
) -> CommandRow:
    row = await usable_sandbox(services, caller, sandbox)
    return await services.commands.row(row.id, command_id)


async def _validated_offset(services: Services, row: CommandRow, offset: int) -> int:
    try:
        await services.commands.check_offset(row.sandbox_id, row.id, offset)
    except CorruptLog as exc:
        raise BadRequest(str(exc)) from None
    return offset


def sse_frame(event: dict[str, Any]) -> bytes:
    kind = event["type"]
    lines = [f"event: {kind}"]
    if kind in ("stdout", "stderr"):
        lines.append(f"id: {event['next_offset']}")
    elif kind in ("exit", "error"):
        lines.append(f"id: {SSE_END}")
    lines.append("data: " + json.dumps(event, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


@router.get(
    "/commands/{command_id}/logs",
    description=_LOGS_DOC,
    responses={
        200: {
            "content": {
                "application/x-ndjson": {},
                "text/event-stream": {},
                "application/octet-stream": {},
            }
        },
        204: {"description": "SSE: the stream had already ended (Last-Event-ID: end)"},
    },
)
async def command_logs(
    request: Request,
    sandbox: str,
    command_id: str,
    services: ServicesDep,
    caller: Caller,
    offset: int | None = Query(None, ge=0, description="Where to start (an event's next_offset)"),
    format: Literal["ndjson", "sse", "raw"] | None = Query(None),
    stream: StreamChoice = Query("both", description="Which output to send"),
    encoding: Encoding = Query("auto", description="auto: data as text when valid UTF-8"),
    skip: int = Query(0, ge=0, description="raw: bytes to leave out after offset"),
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    caller.require(Scope.read)
    row = await command_for(services, caller, sandbox, command_id)
    kind = format or (
        "sse" if "text/event-stream" in request.headers.get("accept", "") else "ndjson"
    )
    if skip and kind != "raw":
        raise InvalidArgument("skip applies to the raw format only")
    start = offset
    if start is None and kind == "sse" and last_event_id:
        if last_event_id == SSE_END:
            return Response(status_code=204)
        if not last_event_id.isdigit():
            raise BadRequest("Last-Event-ID is not an offset of this stream")
        start = int(last_event_id)
    start = await _validated_offset(services, row, start or 0)
    streams = STREAM_SETS[stream]
    heartbeat = services.settings.heartbeat_seconds
    sent = services.metrics.streamed

    if kind == "raw":
        pieces_from = services.commands.follow_raw(row.sandbox_id, row.id, start, streams)

        async def raw() -> AsyncIterator[bytes | memoryview]:
            to_skip = skip
            # Closed with this generator, so the log's ring and file are let go at once.
            async with contextlib.aclosing(pieces_from) as pieces:
                async for data, _ in pieces:
                    if to_skip:
                        if len(data) <= to_skip:
                            to_skip -= len(data)
                            continue
                        data = data[to_skip:]
                        to_skip = 0
                    sent("raw", len(data))
                    yield data

        headers = {**STREAM_HEADERS, "X-Corral-Offset": str(start)}
        return TokenBoundStream(
            raw(),
            services.tokens.lease(caller),
            media_type="application/octet-stream",
            headers=headers,
        )

    events = command_events(
        services.commands, row, start, heartbeat=heartbeat, encoding=encoding, streams=streams
    )
    if kind == "sse":

        async def sse() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            async for event in events:
                frame = sse_frame(event)
                sent("sse", len(frame))
                yield frame

        return TokenBoundStream(
            sse(),
            services.tokens.lease(caller),
            ending=lambda reason: sse_frame(token_ended_event(reason)),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
        )

    async def ndjson() -> AsyncIterator[bytes]:
        async for event in events:
            line = ndjson_line(event)
            sent("ndjson", len(line))
            yield line

    return TokenBoundStream(
        ndjson(),
        services.tokens.lease(caller),
        ending=lambda reason: ndjson_line(token_ended_event(reason)),
        media_type="application/x-ndjson",
        headers=STREAM_HEADERS,
    )


def ndjson_line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


def token_ended_event(reason: str) -> dict[str, Any]:
    """The terminal event of a stream whose token was revoked or expired."""
    return {"type": "error", "code": TokenEnded.code, "message": reason}


async def running_execution(services: Services, row: CommandRow) -> Execution:
    execution = await services.commands.execution(row)
    if execution is None or execution.finished or CommandStatus(row.status).finished:
        raise Conflict(f"command {row.id} has finished ({row.status})")
    return execution


@router.post(
    "/commands/{command_id}/stdin",
    response_model=StdinWritten,
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    },
)
async def write_stdin(
    request: Request,
    sandbox: str,
    command_id: str,
    services: ServicesDep,
    caller: Caller,
    close: bool = Query(False, description="Close standard input after this data"),
) -> StdinWritten:
    """Send the body, as raw bytes, to a running interactive command's standard input."""
    caller.require(Scope.exec)
    row = await command_for(services, caller, sandbox, command_id)
    execution = await running_execution(services, row)
    if not execution.spec.interactive:
        raise Conflict("the command does not take input: start it with interactive=true")
    if not execution.stdin_open:
        raise Conflict("the command's standard input is closed")
    written = 0
    try:
        async for chunk in request.stream():
            if chunk:
                await execution.write_stdin(chunk)
                written += len(chunk)
        if close:
            await execution.close_stdin()
    except BrokenPipeError:
        raise Conflict(
            f"the command's standard input closed after {written} bytes of this request"
        ) from None
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)  # type: ignore[return-value]
    return StdinWritten(bytes=written, closed=close or not execution.stdin_open)


@router.post("/commands/{command_id}/signal", status_code=204)
async def signal_command(
    sandbox: str, command_id: str, body: SignalRequest, services: ServicesDep, caller: Caller
) -> Response:
    """Send a signal to the command's process group, as a terminal's Ctrl-C would."""
    caller.require(Scope.exec)
    signum = ws.parse_signal(body.signal)
    row = await command_for(services, caller, sandbox, command_id)
    execution = await running_execution(services, row)
    await execution.signal(signum)
    return Response(status_code=204)


@router.post("/commands/{command_id}/resize", status_code=204)
async def resize_command(
    sandbox: str, command_id: str, body: ResizeRequest, services: ServicesDep, caller: Caller
) -> Response:
    """Set a terminal command's window size (its foreground processes get SIGWINCH)."""
    caller.require(Scope.exec)
    row = await command_for(services, caller, sandbox, command_id)
    execution = await running_execution(services, row)
    if not execution.spec.tty:
        raise Conflict("the command does not run on a terminal")
    await execution.resize(body.rows, body.cols)
    return Response(status_code=204)


# --- WebSockets --------------------------------------------------------------------------------


@router.websocket("/commands/{command_id}/attach")
async def attach(
    websocket: WebSocket,
    sandbox: str,
    command_id: str,
    offset: int = 0,
    encoding: Encoding = "auto",
) -> None:
    """Attach to a command: its output from `offset` (replay, then live) and, while it runs
    interactive, input (stdin, resize, signal, close_stdin frames)."""
    services: Services = websocket.app.state.services
    caller = await ws.authenticate(websocket, services)
    if caller is None:
        return
    try:
        caller.require(Scope.read)
        row = await command_for(services, caller, sandbox, command_id)
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        await _validated_offset(services, row, offset)
        execution = await services.commands.execution(row)
    except CorralError as exc:
        await ws.refuse(websocket, exc)
        return
    may_send = caller.is_admin or Scope.exec in caller.scopes
    with services.tokens.lease(caller) as lease:
        await websocket.accept()
        session = ws.Session(
            websocket,
            services,
            row,
            execution,
            lease,
            offset=offset,
            encoding=encoding,
            may_send=may_send,
        )
        await session.run()


@router.websocket("/exec/stream")
async def exec_stream(websocket: WebSocket, sandbox: str, encoding: Encoding = "auto") -> None:
    """The exec protocol: a `start` frame (an exec request, plus `tty`, `rows`, `cols`,
    `kill_on_disconnect`), then input frames; the server answers `started`, the output, and
    one `exit` or `error` frame."""
    services: Services = websocket.app.state.services
    caller = await ws.authenticate(websocket, services)
    if caller is None:
        return
    try:
        caller.require(Scope.exec)
        sandbox_row = await running_sandbox(services, caller, sandbox)
    except CorralError as exc:
        await ws.refuse(websocket, exc)
        return
    with services.tokens.lease(caller) as lease:
        await websocket.accept()
        try:
            raw = await lease.run(ws.receive_start(websocket))
            if raw is None:
                return  # gone before it started anything
            start, row, execution = await _start(services, sandbox_row.id, raw, lease)
        except (CorralError, FrameError) as exc:
            await ws.send_error(websocket, exc)
            return
        except WebSocketDisconnect:
            return
        try:
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "started",
                        "command_id": row.id,
                        "sandbox_id": row.sandbox_id,
                        "tty": start.tty,
                    }
                )
            )
        except Exception:
            if start.kill_on_disconnect and execution is not None:
                await execution.cancel()
            return
        session = ws.Session(
            websocket,
            services,
            row,
            execution,
            lease,
            encoding=encoding,
            kill_on_disconnect=start.kill_on_disconnect,
        )
        await session.run()


async def _start(
    services: Services, sandbox_id: str, raw: Any, lease: TokenLease
) -> tuple[ExecStartFrame, CommandRow, Execution | None]:
    """The command a start frame asks for, started."""
    try:
        start = ExecStartFrame.model_validate(raw)
    except ValueError as exc:
        raise InvalidArgument(f"invalid start frame: {_first_error(exc)}") from None
    sandbox_row = await services.sandboxes.running_row(sandbox_id)
    request = ExecRequest(
        **start.model_dump(exclude={"type", "kill_on_disconnect", "interactive"}),
        interactive=True,
    )
    if lease.ended:  # the token went while the start frame was read: nothing is started
        raise TokenEnded(lease.reason or "the token has ended")
    row, execution = await services.commands.start(sandbox_row, request)
    return start, row, execution


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        items = errors()
        if items:
            where = ".".join(str(p) for p in items[0].get("loc", ()))
            return f"{where}: {items[0].get('msg', '')}"
    return str(exc)
