"""The Vercel Sandbox API (seed 004), over Corral's core.

A Vercel sandbox and its session are one Corral sandbox: the session id is the sandbox id (or
its name). Commands are a program and its arguments (no shell). With `wait` the answer is an
ND-JSON stream: `{"command": {..., "exitCode": null}}` once started, with `logs` then
`{"stream": "stdout"|"stderr", "data": "..."}` lines as the command writes, and last
`{"command": {..., "exitCode": N}}`, or `{"stream": "error", "data": {"code", "message"}}` when
the command could not run or its result is unknown. Errors are `{"error": {"code", "message"}}`.

Where Corral differs from Vercel:
- `cmdId` in the seed's query table is a documentation slip and is not required; `teamId` and
  `slug` are accepted and ignored (one tenant).
- `sudo: true` runs the command as uid 0 of the sandbox's own user namespace, never as host
  root; a server whose runtime cannot do that answers 400 `sudo_unavailable`.
- A command killed by its `timeout` reports exit code 137 (SIGKILL), one killed by another signal
  128+N, one that could not start (no such program, no such `cwd`) 127 with an `error` field.
  Commands also carry `status` (Corral's: running, completed, failed, timed_out, cancelled, lost)
  and `sandboxId`. `lost` (the server died while it ran) has exit code null: unknown.
- `POST .../kill {"signal": N}` (a number or a name; default SIGTERM) signals the command's
  process group and answers with the command as it is half a second later. As everywhere in
  Corral, processes the command left running in the background stay until the sandbox stops;
  a `timeout` ends every process of the command.
- `POST /v2/sandboxes` takes `resources.vcpus`, `timeout` (ms, the sandbox's lifetime) and
  ignores `source`, `ports` and `runtime` (the sandbox runs the host's /usr read-only). Unlike
  Vercel's, a sandbox has no network unless asked for (`network: "outbound"` or `"allow"` with
  `allow` CIDRs, Corral's fields).
- Validation errors are 400 `bad_request`; a stopped or deleted sandbox is 410
  `sandbox_stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal as signals
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.api.auth import get_services, usable_sandbox
from corral.api.faces._common import (
    Problem,
    TextDecoder,
    authenticate,
    face_router,
    shell_exit_code,
)
from corral.api.token_bound import TokenBoundStream
from corral.core.commands import to_model as command_model
from corral.core.errors import BadRequest, Conflict, PermissionDenied
from corral.core.models import (
    Command,
    CommandStatus,
    Cpus,
    ExecRequest,
    MemoryMb,
    Milliseconds,
    SandboxCreate,
    Scope,
)
from corral.core.tokens import Principal
from corral.node.base import Execution
from corral.node.output_log import STREAM_NAMES
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "Vercel Sandbox (seed 004)"
NDJSON = "application/x-ndjson"
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "sandbox_stopped",
    413: "payload_too_large",
    429: "too_many_requests",
    500: "internal_server_error",
    503: "service_unavailable",
}


class VercelErrorBody(BaseModel):
    code: str = Field(description="bad_request, not_found, sandbox_stopped, ...")
    message: str


class VercelError(BaseModel):
    """Vercel's error body."""

    error: VercelErrorBody


class SandboxGone(Conflict):
    status, code = 410, "sandbox_stopped"


class SudoUnavailable(BadRequest):
    code = "sudo_unavailable"


def render(request: Request, problem: Problem) -> Response:
    status = problem.status
    if status == 422:
        status = 400
    code = problem.code if problem.code in ("sudo_unavailable",) else CODES.get(status, "error")
    body = {"error": {"code": code, "message": problem.message}}
    return JSONResponse(body, status_code=status)


router = face_router(
    TAG,
    render,
    error_model=VercelError,
    extra_errors={410: "The sandbox is stopped or deleted"},
    prefix="/v2/sandboxes",
)


async def caller(request: Request) -> Principal:
    return await authenticate(request)


# --- wire shapes -------------------------------------------------------------------------------


class Resources(BaseModel):
    vcpus: Cpus | None = None
    memory: MemoryMb | None = Field(default=None, description="MiB (Corral addition)")


class CreateSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore")
    resources: Resources | None = None
    timeout: Annotated[Milliseconds, Field(ge=1000)] | None = Field(
        default=None, description="Lifetime in milliseconds"
    )
    name: str | None = Field(default=None, description="Corral: a unique sandbox name")
    env: dict[str, str] = Field(default_factory=dict, description="Corral: env for every command")
    network: Literal["none", "allow", "outbound"] = Field(
        default="none", description="Corral: no network (default), `allow` CIDRs, or `outbound`"
    )
    allow: list[str] = Field(default_factory=list, description="Corral: IPv4 CIDRs")


class RunCommand(BaseModel):
    model_config = ConfigDict(extra="ignore")
    command: str = Field(min_length=1, description="The program, without arguments")
    args: list[str] = Field(default_factory=list)
    cwd: str | None = Field(default=None, description="Default: the sandbox's /workspace")
    env: dict[str, str] = Field(default_factory=dict)
    sudo: bool = False
    wait: bool = False
    logs: bool = False
    timeout: Milliseconds | None = Field(default=None, description="Milliseconds, then SIGKILL")


class KillCommand(BaseModel):
    model_config = ConfigDict(extra="ignore")
    signal: int | str = Field(default=int(signals.SIGTERM))


def epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def sandbox_json(row: SandboxRow) -> dict[str, Any]:
    spec = row.spec
    status = {"running": "running", "creating": "pending", "error": "failed"}.get(
        row.state, "stopped"
    )
    timeout = spec.get("ttl_seconds")
    return {
        "id": row.id,
        "name": row.name,
        "memory": spec.get("memory_mb"),
        "vcpus": spec.get("cpu"),
        "region": "local",
        "runtime": "host",
        "timeout": timeout * 1000 if timeout else None,
        "status": status,
        "cwd": "/workspace",
        "requestedAt": epoch_ms(row.created_at),
        "createdAt": epoch_ms(row.created_at),
        "updatedAt": epoch_ms(row.updated_at),
    }


def command_json(command: Command) -> dict[str, Any]:
    finished = command.status.finished
    exit_code = shell_exit_code(command) if finished else None
    if command.status is CommandStatus.failed:
        exit_code = 127
    if command.status is CommandStatus.lost:
        exit_code = None
    out: dict[str, Any] = {
        "id": command.id,
        "name": command.command,
        "args": command.args or [],
        "cwd": command.cwd,
        "sessionId": command.sandbox_id,
        "sandboxId": command.sandbox_id,
        "exitCode": exit_code,
        "startedAt": epoch_ms(command.started_at or command.created_at),
        "status": command.status.value if finished else "running",
    }
    if finished and command.duration_ms is not None:
        out["durationMs"] = command.duration_ms
    if command.error:
        out["error"] = command.error
    return out


def token_ended_line(reason: str) -> bytes:
    """The last line of a stream whose token was revoked or expired."""
    return line({"stream": "error", "data": {"code": "unauthenticated", "message": reason}})


def line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def session_row(services: Services, principal: Principal, ref: str) -> SandboxRow:
    row = await usable_sandbox(services, principal, ref)
    if row.state in ("stopped", "deleted", "error"):
        raise SandboxGone(f"sandbox {row.id} is {row.state}")
    return await services.sandboxes.running_row(row.id)


# --- sandboxes ---------------------------------------------------------------------------------


@router.post("", summary="Create a sandbox and its session")
async def create_sandbox(
    body: CreateSandbox,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create sandboxes")
    resources = body.resources or Resources()
    created = await services.sandboxes.create(
        SandboxCreate(
            name=body.name,
            env=body.env,
            cpu=resources.vcpus,
            memory_mb=resources.memory,
            ttl_seconds=max(1, body.timeout // 1000) if body.timeout else None,
            network=body.network,
            allow=body.allow,
            labels={"face": "vercel"},
        )
    )
    row = await services.sandboxes.row(created.id)
    sandbox = sandbox_json(row)
    return {
        "sandbox": sandbox,
        "session": {"id": row.id, "sandboxId": row.id, "status": sandbox["status"]},
        "routes": [],
    }


@router.get("/{sandbox_id}", summary="A sandbox")
async def get_sandbox(
    sandbox_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    return {"sandbox": sandbox_json(await usable_sandbox(services, principal, sandbox_id))}


@router.post("/{sandbox_id}/stop", summary="Stop a sandbox")
async def stop_sandbox(
    sandbox_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, sandbox_id)
    await services.sandboxes.stop(row.id)
    return {"sandbox": sandbox_json(await services.sandboxes.row(row.id))}


# --- commands ----------------------------------------------------------------------------------


def _exec_request(body: RunCommand) -> ExecRequest:
    user = None
    if body.sudo:
        try:
            ExecRequest(command=body.command, user="root")
        except ValidationError:
            raise SudoUnavailable(
                "sudo is not available on this server yet: commands run as the sandbox's user"
            ) from None
        user = "root"
    return ExecRequest(
        command=body.command,
        args=body.args,
        cwd=body.cwd,
        env=body.env,
        timeout_ms=body.timeout,
        user=user,
    )


@router.post(
    "/sessions/{session_id}/cmd",
    summary="Run a command in a session",
    responses={200: {"content": {"application/json": {}, NDJSON: {}}}},
)
async def run_command(
    session_id: str,
    body: RunCommand,
    teamId: str | None = Query(None, description="Accepted and ignored"),
    slug: str | None = Query(None, description="Accepted and ignored"),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.exec)
    req = _exec_request(body)
    row = await session_row(services, principal, session_id)
    command_row, execution = await services.commands.start(row, req, source="vercel")
    started = command_model(command_row)
    if not body.wait:
        return JSONResponse({"command": command_json(started)})
    return TokenBoundStream(
        _wait_stream(services, started, execution, body.logs),
        services.tokens.lease(principal),
        ending=token_ended_line,
        media_type=NDJSON,
    )


async def _log_lines(
    services: Services, sandbox_id: str, command_id: str, execution: Execution | None
) -> AsyncIterator[bytes]:
    text = TextDecoder()
    async for chunk in services.commands.follow_output(sandbox_id, command_id):
        if chunk is None:
            continue
        data = text.decode(chunk.stream, chunk.data)
        if data:
            yield line({"stream": STREAM_NAMES[chunk.stream], "data": data})
    for stream, rest in text.flush().items():
        if rest:
            yield line({"stream": STREAM_NAMES[stream], "data": rest})


async def _wait_stream(
    services: Services, started: Command, execution: Execution | None, logs: bool
) -> AsyncIterator[bytes]:
    yield line({"command": command_json(started) | {"exitCode": None}})
    if logs:
        async for item in _log_lines(services, started.sandbox_id, started.id, execution):
            yield item
    await services.commands.wait_finished(started.id)
    final = await services.commands.get(started.sandbox_id, started.id)
    if final.status in (CommandStatus.failed, CommandStatus.lost):
        code = "command_failed" if final.status is CommandStatus.failed else "command_lost"
        yield line({"stream": "error", "data": {"code": code, "message": final.error or code}})
    else:
        yield line({"command": command_json(final)})


async def _command(
    services: Services, principal: Principal, session_id: str, command_id: str
) -> SandboxRow:
    row = await usable_sandbox(services, principal, session_id)
    await services.commands.row(row.id, command_id)  # 404 for a command of another sandbox
    return row


@router.get("/sessions/{session_id}/cmd/{command_id}", summary="A command, optionally awaited")
async def get_command(
    session_id: str,
    command_id: str,
    wait: bool = False,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await _command(services, principal, session_id, command_id)
    command = await services.commands.get(row.id, command_id, wait=wait)
    return {"command": command_json(command)}


@router.get(
    "/sessions/{session_id}/cmd/{command_id}/logs",
    summary="A command's output as ND-JSON: all of it so far, then live until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}}},
)
async def command_logs(
    session_id: str,
    command_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> StreamingResponse:
    principal.require(Scope.read)
    row = await _command(services, principal, session_id, command_id)
    command_row = await services.commands.row(row.id, command_id)
    execution = await services.commands.execution(command_row)
    return TokenBoundStream(
        _log_lines(services, row.id, command_id, execution),
        services.tokens.lease(principal),
        ending=token_ended_line,
        media_type=NDJSON,
    )


def _signal_number(value: int | str) -> int:
    if isinstance(value, int):
        number = value
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            number = int(signals.Signals[name])
        except KeyError:
            if not value.isdigit():
                raise BadRequest(f"unknown signal {value!r}") from None
            number = int(value)
    if not 1 <= number < signals.NSIG:
        raise BadRequest(f"unknown signal {value!r}")
    return number


@router.post("/sessions/{session_id}/cmd/{command_id}/kill", summary="Signal a command")
async def kill_command(
    session_id: str,
    command_id: str,
    body: KillCommand | None = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    number = _signal_number((body or KillCommand()).signal)
    row = await _command(services, principal, session_id, command_id)
    command_row = await services.commands.row(row.id, command_id)
    execution = await services.commands.execution(command_row)
    if execution is None or CommandStatus(command_row.status).finished:
        raise Conflict(f"command {command_id} has already finished")
    await execution.signal(number)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(services.commands.wait_finished(command_id), 0.5)
    return {"command": command_json(await services.commands.get(row.id, command_id))}
