"""The Runta runtimes API (seed 003), over Corral's core.

A runtime is a Corral sandbox; `{id}` takes its id or its display name. Every route is served
at `/v2` (the production API and its CLI) and at `/v1` (the docs'). Answers are
`{"data": ...}`; errors `{"error": {"code", "message"}, "request_id"}` with Runta's snake_case
codes. A runtime has `display_name` (its Corral name; `name` too) and `revision`; `stop`,
`start` and `DELETE` take `expected_revision` (409 `failed_precondition` when it is not the
runtime's); the list is cursor-paged (`limit`, `cursor`; `pagination: {next_cursor, has_more}`).

Where Corral differs from Runta:
- `revision` is the microsecond of the runtime's last change (it grows with every transition
  and network change, and with nothing else). `expected_revision` is checked under this
  server's lock of the runtime, just before the change; replicas of a fleet each hold their
  own lock.
- `command` is run by bash as a shell string when `args` is empty or absent, and as a program
  with those arguments (no shell) when `args` has items.
- A relative `cwd` is taken inside /workspace (the runtime's home); the default is /workspace.
- `stdin` is UTF-8 text, written and then closed. `max_output_bytes` caps each stream; the
  command's pipes keep being drained past the cap, and `*_truncated` tells that bytes were
  dropped. `timeout_secs` kills every process of the command with SIGKILL: the answer is still a
  200 with the output so far, `exit_code` 137 and `timed_out: true` (a field Runta lacks).
  A command killed by signal N has exit code 128+N.
- A command that cannot start (no such program, no such `cwd`) is a 422 `invalid_argument`.
- Creating a runtime with a name in use is a 409 `already_exists`; running in a stopped runtime
  is a 409 `failed_precondition`; a server-wide quota is a 429 `resource_exhausted`.
- `resources.requests.disk_gib` is kept as the runtime's disk limit, in MiB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import signal as signals
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect

from corral.api import ws_frames
from corral.api.auth import get_services, running_sandbox, token_from_request, usable_sandbox
from corral.api.errors import STORAGE_FULL
from corral.api.faces._common import (
    Problem,
    authenticate,
    face_errors,
    face_router,
    shell_exit_code,
)
from corral.api.ws_frames import CLOSE_TOKEN_ENDED, FrameError, FrameLimits
from corral.core.errors import Conflict, InvalidArgument, PayloadTooLarge, PermissionDenied
from corral.core.models import (
    MAX_DISK_MB,
    MIN_DISK_MB,
    Command,
    CommandStatus,
    Count,
    Cpus,
    ExecRequest,
    MemoryMb,
    Sandbox,
    SandboxCreate,
    SandboxPath,
    Scope,
    SecondsFloat,
    TerminalSize,
)
from corral.core.sandboxes import to_model as sandbox_model
from corral.core.token_watch import TokenEnded
from corral.core.tokens import Principal
from corral.node.output_log import STDOUT
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "Runta (seed 003)"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MIN_DISK_GIB = MIN_DISK_MB / 1024
DiskGib = Annotated[float, Field(ge=MIN_DISK_GIB, le=MAX_DISK_MB / 1024, allow_inf_nan=False)]
WORKSPACE = "/workspace"
CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "invalid_argument",
    409: "failed_precondition",
    413: "resource_exhausted",
    422: "invalid_argument",
    429: "resource_exhausted",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}


class RuntaErrorBody(BaseModel):
    code: str = Field(description="invalid_argument, not_found, failed_precondition, ...")
    message: str


class RuntaError(BaseModel):
    """Runta's error body."""

    error: RuntaErrorBody
    request_id: str | None = None


def render(request: Request, problem: Problem) -> Response:
    status = problem.status
    code = CODES.get(status, "internal")
    if status == 400:
        status = 422  # Runta has no 400: malformed requests are validation errors
    if problem.code == "already_exists":
        code = "already_exists"
    body = {
        "error": {"code": code, "message": problem.message},
        "request_id": getattr(request.state, "request_id", None),
    }
    return JSONResponse(body, status_code=status)


router = face_router(TAG, render, error_model=RuntaError)
STORAGE_ERRORS = face_errors(render, RuntaError, statuses=STORAGE_FULL)


F = TypeVar("F", bound=Callable[..., Any])


class AlreadyExists(Conflict):
    code = "already_exists"


async def caller(request: Request) -> Principal:
    return await authenticate(request)


# --- wire shapes -------------------------------------------------------------------------------


class Requests(BaseModel):
    vcpus: Cpus | None = None
    memory_mib: MemoryMb | None = None
    disk_gib: DiskGib | None = Field(
        default=None, description=f"At least {MIN_DISK_GIB} ({MIN_DISK_MB} MiB)"
    )

    @property
    def disk_mb(self) -> int | None:
        # Rounded up: a disk is never smaller than asked.
        return math.ceil(self.disk_gib * 1024) if self.disk_gib is not None else None


class Resources(BaseModel):
    requests: Requests = Field(default_factory=Requests)


class CreateRuntime(BaseModel):
    model_config = ConfigDict(extra="ignore")
    display_name: str | None = Field(
        default=None, description="Unique among runtimes; accepted wherever an id is"
    )
    name: str | None = Field(default=None, description="The display name's older spelling")
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, str] = Field(default_factory=dict, description="Env for every command")


class ExecBody(BaseModel):
    """Buffered command execution request."""

    args: list[str] = Field(default_factory=list, description="Positional arguments.")
    command: str = Field(min_length=1, description="Executable or shell command.")
    cwd: str | None = Field(default=None, description="Working directory inside the runtime.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables.")
    max_output_bytes: Count | None = Field(
        default=None, description="Maximum bytes to retain per output stream."
    )
    stdin: str | None = Field(default=None, description="Standard input as UTF-8 text.")
    timeout_secs: SecondsFloat | None = Field(default=None, description="Timeout in seconds.")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def revision_of(sandbox: Sandbox) -> int:
    """A runtime's revision: the microsecond of its last change, so it grows with every change
    (a transition, a network change) and with nothing else."""
    return (sandbox.updated_at - EPOCH) // timedelta(microseconds=1)


def runtime_json(found: SandboxRow | Sandbox) -> dict[str, Any]:
    sandbox = sandbox_model(found) if isinstance(found, SandboxRow) else found
    disk = sandbox.disk_mb
    return {
        "id": sandbox.id,
        "name": sandbox.name,
        "display_name": sandbox.name,
        "revision": revision_of(sandbox),
        "status": sandbox.state.value,
        "resources": {
            "requests": {
                "vcpus": sandbox.cpu,
                "memory_mib": sandbox.memory_mb,
                "disk_gib": disk / 1024 if disk else None,
            }
        },
        "created_at": iso(sandbox.created_at),
        "updated_at": iso(sandbox.updated_at),
    }


def exec_json(command: Command) -> dict[str, Any]:
    return {
        "duration_ms": command.duration_ms or 0,
        "exit_code": shell_exit_code(command),
        "stderr": command.stderr or "",
        "stderr_truncated": command.stderr_truncated,
        "stdout": command.stdout or "",
        "stdout_truncated": command.stdout_truncated,
        "timed_out": command.status is CommandStatus.timed_out,
    }


def milliseconds(seconds: float | None) -> int | None:
    return max(1, math.ceil(seconds * 1000)) if seconds is not None else None


def cwd_of(value: str | None) -> str | None:
    if value is None or value.startswith("/"):
        return value
    return f"{WORKSPACE}/{value}"


# --- runtimes ----------------------------------------------------------------------------------


def both(method: str, path: str, **kwargs: Any) -> Callable[[F], F]:
    """A route at `/v2` (the production API and its CLI) and at `/v1` (the docs'). The OpenAPI
    document lists the `/v1` operation (the seed's) only: the `/v2` one is the same."""

    def register(handler: F) -> F:
        router.api_route(f"/v1{path}", methods=[method], **kwargs)(handler)
        router.api_route(f"/v2{path}", methods=[method], include_in_schema=False, **kwargs)(handler)
        return handler

    return register


class Transition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    expected_revision: int | None = Field(
        default=None, description="Refused (409) unless the runtime is at this revision"
    )


# Documented by hand: the body is optional, read by `transition_body`.
TRANSITION_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": Transition.model_json_schema()}},
    }
}


class RevisionMismatch(Conflict):
    code = "failed_precondition"


ExpectedRevision = Annotated[
    int | None, Query(description="Refused (409) unless the runtime is at this revision")
]


def revision_check(*given: int | None) -> Callable[[SandboxRow], None] | None:
    """The check of the first revision given, made on the runtime's row under its lock, just
    before the change (None: no revision expected)."""
    expected = next((value for value in given if value is not None), None)
    if expected is None:
        return None

    def check(row: SandboxRow) -> None:
        current = revision_of(sandbox_model(row))
        if current != expected:
            raise RevisionMismatch(
                f"runtime {row.id} is at revision {current}, not {expected}",
                details=[{"current_revision": current, "expected_revision": expected}],
            )

    return check


async def transition_body(request: Request) -> Transition:
    """An optional JSON body (the CLI sends none when no revision is expected)."""
    raw = await request.body()
    if not raw.strip():
        return Transition()
    try:
        return Transition.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid body: {exc.errors()[0]['msg']}") from None


@both("POST", "/runtimes", status_code=201, summary="Create a runtime")
async def create_runtime(
    body: CreateRuntime,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create runtimes")
    wanted = body.resources.requests
    name = body.display_name if body.display_name is not None else body.name
    try:
        created = await services.sandboxes.create(
            SandboxCreate(
                name=name,
                env=body.env,
                cpu=wanted.vcpus,
                memory_mb=wanted.memory_mib,
                disk_mb=wanted.disk_mb,
                labels={"face": "runta"},
            )
        )
    except Conflict as exc:
        if "exists already" in exc.message:
            raise AlreadyExists(exc.message) from None
        raise
    return {"data": runtime_json(await services.sandboxes.row(created.id))}


@both("GET", "/runtimes", summary="List runtimes, a page at a time")
async def list_runtimes(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    page = await services.sandboxes.list(only=principal.sandbox_ids, cursor=cursor, limit=limit)
    return {
        "data": [runtime_json(sandbox) for sandbox in page.items],
        "pagination": {"next_cursor": page.next_cursor, "has_more": page.next_cursor is not None},
    }


@both("GET", "/runtimes/{runtime}", summary="One runtime (by id or display name)")
async def get_runtime(
    runtime: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    return {"data": runtime_json(await usable_sandbox(services, principal, runtime))}


@both("DELETE", "/runtimes/{runtime}", summary="Delete a runtime")
async def delete_runtime(
    runtime: str,
    expected_revision: ExpectedRevision = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, runtime)
    await services.sandboxes.delete(row.id, check=revision_check(expected_revision))
    return {"data": runtime_json(await services.sandboxes.row(row.id))}


@both(
    "POST",
    "/runtimes/{runtime}/stop",
    summary="Stop a runtime (its files stay)",
    openapi_extra=TRANSITION_BODY,
)
async def stop_runtime(
    runtime: str,
    expected_revision: ExpectedRevision = None,
    body: Transition = Depends(transition_body),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, runtime)
    check = revision_check(body.expected_revision, expected_revision)
    return {"data": runtime_json(await services.sandboxes.stop(row.id, check=check))}


@both(
    "POST",
    "/runtimes/{runtime}/start",
    summary="Start a stopped runtime",
    openapi_extra=TRANSITION_BODY,
)
async def start_runtime(
    runtime: str,
    expected_revision: ExpectedRevision = None,
    body: Transition = Depends(transition_body),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, runtime)
    check = revision_check(body.expected_revision, expected_revision)
    return {"data": runtime_json(await services.sandboxes.start(row.id, check=check))}


@both("POST", "/runtimes/{runtime}/exec", summary="Run a buffered command")
async def exec_command(
    runtime: str,
    body: ExecBody,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    req = ExecRequest(
        command=body.command,
        args=body.args or None,
        cwd=cwd_of(body.cwd),
        env=body.env,
        stdin=body.stdin,
        timeout_ms=milliseconds(body.timeout_secs),
        max_output_bytes=body.max_output_bytes,
    )
    row = await running_sandbox(services, principal, runtime)
    command = await services.commands.run(row, req, source="runta")
    if command.status is CommandStatus.failed:
        raise InvalidArgument(command.error or "the command could not start")
    return {"data": exec_json(command)}


# --- single files -------------------------------------------------------------------------------


async def _file_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


@both(
    "GET",
    "/runtimes/{runtime}/files",
    summary="One file's raw bytes",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def read_file(
    runtime: str,
    path: Annotated[SandboxPath, Query(description="Absolute, or relative to /workspace")],
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> StreamingResponse:
    principal.require(Scope.files)
    row = await running_sandbox(services, principal, runtime)
    header, stream = await services.files.open_download(row.id, "read", {"path": path})
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers={"Content-Length": str(int(header["size"]))},
        background=BackgroundTask(stream.abort),  # also when the client went away
    )


@both(
    "PUT",
    "/runtimes/{runtime}/files",
    summary="Write one file (parents created, replaced atomically)",
    responses=STORAGE_ERRORS,
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    },
)
async def write_file(
    runtime: str,
    request: Request,
    path: Annotated[SandboxPath, Query(description="Absolute, or relative to /workspace")],
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.files)
    row = await running_sandbox(services, principal, runtime)
    length = request.headers.get("content-length")
    limit = services.settings.max_upload_bytes
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the file exceeds {limit} bytes")
    info = await services.files.write_file(row.id, path, _file_body(request), mode=None)
    return {"data": info.model_dump(mode="json")}


# --- streaming exec: one command per WebSocket connection, JSON frames --------------------------

SIGNALS = {"INT": signals.SIGINT, "TERM": signals.SIGTERM, "KILL": signals.SIGKILL,
           "HUP": signals.SIGHUP, "QUIT": signals.SIGQUIT}  # fmt: skip


async def _ws_error(ws: WebSocket, message: str, close_code: int = 1000) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"type": "error", "message": message}))
        await ws.close(close_code, ws_frames.close_reason(message))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def deny(ws: WebSocket, response: Response) -> None:
    """Refuse a WebSocket before it opens: the HTTP answer when the server can send one."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(response)
    else:
        await ws.close(1008)


class StartFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    tty: bool = False
    rows: TerminalSize = 24
    cols: TerminalSize = 80
    timeout_secs: SecondsFloat | None = Field(default=None, description="Corral addition")


@router.websocket("/v1/runtimes/{runtime}/exec/stream")
@router.websocket("/v2/runtimes/{runtime}/exec/stream")
async def exec_stream(ws: WebSocket, runtime: str) -> None:
    """One command per connection. Client frames: `start` (first), `stdin`, `resize`, `signal`,
    `close_stdin`, `heartbeat`. Server frames: `stdout`/`stderr` (base64), `heartbeat`, then
    exactly one `exit` or `error`, and a normal close. A frame that is late (the start frame),
    too large or not a JSON object gets an `error` frame and close 1008 (1009 when too large);
    a session whose token is revoked or expires, an `error` frame and close 4001."""
    services: Services = ws.app.state.services
    try:
        principal = await services.tokens.authenticate(token_from_request(ws))  # type: ignore[arg-type]
        principal.require(Scope.exec)
        row = await usable_sandbox(services, principal, runtime)
    except Exception as exc:
        problem = Problem.of(exc)
        if problem is None:
            raise
        ws.state.request_id = None
        await deny(ws, render(ws, problem))  # type: ignore[arg-type]
        return
    limits = FrameLimits.of(ws)
    with services.tokens.lease(principal) as lease:
        await ws.accept()
        try:
            data = await lease.run(ws_frames.receive_start(ws, limits))
            if data is None:
                return
            first = ws_frames.parse_json(data)
            if not isinstance(first, dict) or first.get("type") != "start":
                await _ws_error(ws, 'the first frame must be {"type": "start", ...}')
                return
            start = StartFrame.model_validate(first)
            req = ExecRequest(
                command=start.command,
                args=start.args or None,
                cwd=cwd_of(start.cwd),
                env=start.env,
                timeout_ms=milliseconds(start.timeout_secs),
            )
            row = await services.sandboxes.running_row(row.id)
            if lease.ended:
                raise TokenEnded(lease.reason or "the token has ended")
            command_row, execution = await services.commands.start(
                row, req, source="runta", interactive=True, tty=start.tty,
                rows=start.rows, cols=start.cols,
            )  # fmt: skip
        except WebSocketDisconnect:
            return
        except TokenEnded as exc:
            await _ws_error(ws, exc.message, CLOSE_TOKEN_ENDED)
            return
        except FrameError as exc:
            await _ws_error(ws, exc.message, exc.close_code)
            return
        except Exception as exc:
            problem = Problem.of(exc) if not isinstance(exc, ValueError | KeyError) else None
            message = problem.message if problem is not None else f"invalid start frame: {exc}"
            await _ws_error(ws, message)
            return
        if execution is None:
            await _ws_error(ws, command_row.error or "the command could not start")
            return

        send_lock = asyncio.Lock()

        async def send(frame: dict[str, Any]) -> None:
            async with send_lock:
                await ws.send_text(json.dumps(frame))

        async def pump_output() -> None:
            async for chunk in services.commands.follow_output(row.id, command_row.id):
                if chunk is None:
                    continue
                kind = "stdout" if chunk.stream == STDOUT else "stderr"
                await send({"type": kind, "data_base64": _b64(chunk.data)})

        async def read_client() -> FrameError | None:
            """Client frames until the client goes (None) or sends one it cannot send."""
            while True:
                try:
                    data = await ws_frames.receive(ws, limits)
                    if data is None:
                        return None
                    frame = ws_frames.parse_json(data)
                    if not isinstance(frame, dict):
                        raise FrameError("a frame must be a JSON object")
                except FrameError as exc:
                    return exc
                kind = frame.get("type")
                if kind == "stdin":
                    with contextlib.suppress(BrokenPipeError, ValueError, TypeError):
                        await execution.write_stdin(base64.b64decode(frame.get("data_base64", "")))
                elif kind == "close_stdin":
                    await execution.close_stdin()
                elif kind == "resize":
                    with contextlib.suppress(TypeError, ValueError, KeyError):
                        await execution.resize(int(frame["rows"]), int(frame["cols"]))
                elif kind == "signal":
                    number = SIGNALS.get(str(frame.get("signal", "")).upper().removeprefix("SIG"))
                    if number is not None:
                        await execution.signal(number)
                elif kind == "heartbeat":
                    await send({"type": "heartbeat"})

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(services.settings.heartbeat_seconds)
                await send({"type": "heartbeat"})

        reader = asyncio.ensure_future(read_client())
        beater = asyncio.ensure_future(heartbeat())
        ended = asyncio.ensure_future(lease.wait())
        pump = asyncio.ensure_future(pump_output())
        try:
            done, _ = await asyncio.wait({pump, reader, ended}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                # The client went away, broke the protocol, or its token ended: end its input;
                # the command runs on to its end or its timeout, and stays in the history.
                for task in (pump, reader, beater):
                    task.cancel()
                await asyncio.gather(pump, reader, beater, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await execution.close_stdin()
                if ended in done:
                    await _ws_error(ws, ended.result(), CLOSE_TOKEN_ENDED)
                elif reader.done() and not reader.cancelled() and reader.exception() is None:
                    problem = reader.result()
                    if problem is not None:
                        await _ws_error(ws, problem.message, problem.close_code)
                return
            await pump
            await lease.run(services.commands.wait_finished(command_row.id))
            final = await services.commands.get(row.id, command_row.id)
            if final.status in (CommandStatus.failed, CommandStatus.lost):
                await send({"type": "error", "message": final.error or final.status.value})
            else:
                await send({"type": "exit", "code": shell_exit_code(final)})
            await ws.close(1000)
        except TokenEnded as exc:
            await _ws_error(ws, exc.message, CLOSE_TOKEN_ENDED)
        except (WebSocketDisconnect, RuntimeError):
            with contextlib.suppress(Exception):
                await execution.close_stdin()
        finally:
            for task in (reader, beater, ended, pump):
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a client that went away is no error
