"""The CMDOP Commands API (seed 001), over Corral's core.

A CMDOP machine is a Corral sandbox: `machine_id` takes a sandbox id or name. In a fleet the
nodes are machines too, for admin tokens: `machine_id` takes a node id, and a command there runs
on the node's host itself, as the unprivileged user its agent names with `--host-exec` (a node
without it refuses, 403). Host commands are answered, not kept in the history. Responses are
`{"data": ..., "meta": {...}}`; errors `{"error": {"code", "message", "details"}}`.

Where Corral differs from CMDOP:
- Machines are sandboxes, not hosts running an agent; `GET /v1/machines` lists the sandboxes the
  token may use (`status` online when running, else offline, starting, error).
- Command status is one of `running`, `completed` (ran to its end, whatever its exit code) and,
  beyond CMDOP, `failed` (could not start), `timed_out` (killed by SIGKILL at `timeout`; its
  output so far is kept), `cancelled` (by `DELETE`) and `lost` (the server died while it ran:
  the result is unknown). `exit_code` is the shell's: 128+N when signal N ended the command
  (137 for a timeout; `signal` tells N), null when it never ran or its result is unknown.
- `user` is `user` (uid 1000, the default), `root` (uid 0 of the sandbox's own user namespace,
  never a host privilege) or another user of the sandbox's `/etc/passwd` by name; what is no
  user name is a 422.
- `POST /v1/commands/batch` takes the fields of `POST /v1/commands` besides `machine_ids` and
  answers a map keyed by the machine ids as given (duplicates run once). Each entry is the
  command's result (including `timed_out` ones), or `{"error": {"code", "message"}}` for a
  machine where it could not start (not found, which a machine the token may not use also
  answers, or not running), was cancelled, or whose
  sandbox went away while it ran (`service_unavailable`). `meta` is `{total, succeeded, failed}`.
- `POST /v1/commands/async` answers 202.
- `X-RateLimit-Limit/Remaining/Reset` are sent when the server has a per-token rate limit
  (`CORRAL_RATE_LIMIT_PER_SECOND`); Limit is the burst, Reset the epoch second at which the
  budget is full again. Without a limit there is nothing to report and they are left out.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from corral import ids
from corral.api.auth import get_services, running_sandbox, usable_sandbox
from corral.api.faces._common import (
    Problem,
    authenticate,
    face_router,
    history,
    host_arch,
    rate_headers,
    usable_command_sandbox,
)
from corral.core.commands import to_model as command_model
from corral.core.errors import (
    Conflict,
    CorralError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from corral.core.models import (
    Command,
    CommandStatus,
    Count,
    ExecRequest,
    Milliseconds,
    Node,
    SandboxState,
    Scope,
    Timestamp,
)
from corral.core.sandboxes import covered_by
from corral.core.sandboxes import to_model as sandbox_model
from corral.core.tokens import Principal
from corral.node.protocol import HostExecRefused
from corral.node.remote import RemoteNode
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "CMDOP (seed 001)"
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


class CmdopErrorBody(BaseModel):
    code: str = Field(description="validation_error, not_found, conflict, ...")
    message: str
    details: Any = Field(default=None, description="For validation errors: the failing fields")


class CmdopError(BaseModel):
    """CMDOP's error body."""

    error: CmdopErrorBody


def render(request: Request, problem: Problem) -> Response:
    code = CODES.get(problem.status, problem.code)
    body = {"error": {"code": code, "message": problem.message, "details": problem.details}}
    return JSONResponse(body, status_code=problem.status)


def add_rate_headers(request: Request, response: Response) -> None:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or "x-ratelimit-limit" in response.headers:
        return
    info = get_services(request).tokens.rate_info(principal.token_id)
    if info is not None:
        response.headers.update(rate_headers(info))


router = face_router(TAG, render, after=add_rate_headers, error_model=CmdopError)


async def caller(request: Request) -> Principal:
    return await authenticate(request)


# --- wire shapes -------------------------------------------------------------------------------


class CommandBody(BaseModel):
    machine_id: str = Field(description="Target machine (a sandbox id or name)")
    command: str = Field(min_length=1, description="Command to execute (a shell string)")
    cwd: str | None = Field(default=None, description="Working directory (default /workspace)")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables")
    timeout: Milliseconds | None = Field(default=None, description="Timeout in milliseconds")
    user: str | None = Field(default=None, description="Run as user: `user`, `root` or a name")


class BatchBody(BaseModel):
    machine_ids: list[str] = Field(min_length=1, max_length=1000)
    command: str = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout: Milliseconds | None = None
    user: str | None = None


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_of(command: Command) -> str:
    return "running" if not command.status.finished else command.status.value


def result(command: Command) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": command.id,
        "machine_id": command.sandbox_id,
        "command": command.command,
        "status": status_of(command),
        "stdout": command.stdout,
        "stderr": command.stderr,
        "exit_code": command.exit_code,
        "signal": command.signal,
        "stdout_truncated": command.stdout_truncated,
        "stderr_truncated": command.stderr_truncated,
        "duration": command.duration_ms,
        "started_at": iso(command.started_at),
        "finished_at": iso(command.finished_at),
    }
    if command.error:
        out["reason"] = command.error  # why it failed or was lost
    return out


def exec_request(body: CommandBody | BatchBody) -> ExecRequest:
    return ExecRequest(
        command=body.command,
        cwd=body.cwd,
        env=body.env,
        timeout_ms=body.timeout,
        user=body.user,
    )


def machine(row: SandboxRow) -> dict[str, Any]:
    sandbox = sandbox_model(row)
    status = {
        SandboxState.running: "online",
        SandboxState.creating: "starting",
        SandboxState.error: "error",
        SandboxState.deleted: "deleted",
    }.get(sandbox.state, "offline")
    return {
        "id": sandbox.id,
        "name": sandbox.name or sandbox.id,
        "hostname": sandbox.name or sandbox.id,
        "status": status,
        "os": "linux",
        "arch": host_arch(),
        "tags": [f"{k}={v}" for k, v in sorted(sandbox.labels.items())],
        "last_seen": iso(datetime.now(UTC) if status == "online" else sandbox.updated_at),
        "created_at": iso(sandbox.created_at),
    }


def node_machine_of(node: Node) -> dict[str, Any]:
    status = {"online": "online", "draining": "online", "offline": "offline"}[node.state.value]
    return {
        "id": node.id,
        "name": node.id,
        "hostname": node.id,
        "status": status,
        "os": "linux",
        "arch": host_arch(),
        "tags": [
            "kind=node",
            f"host_exec={str(node.host_exec).lower()}",
            f"state={node.state.value}",
        ],
        "last_seen": iso(node.last_heartbeat),
        "created_at": iso(node.registered_at),
    }


async def node_machine(services: Services, principal: Principal, machine_id: str) -> Node | None:
    """The fleet node `machine_id` names, for a caller that may see nodes; None otherwise."""
    if not services.directory.fleet or not principal.is_admin:
        return None
    try:
        return await services.nodes.get(machine_id)
    except NotFound:
        return None


async def host_command(
    services: Services, node: Node, body: CommandBody | BatchBody
) -> dict[str, Any]:
    """A command on a node's host, run and answered (CMDOP's own kind of machine)."""
    if body.user not in (None, "user"):
        raise InvalidArgument("host commands run as the node's host-exec user only")
    if not node.host_exec:
        raise PermissionDenied(
            f"node {node.id} runs no host commands: start its agent with --host-exec USER"
        )
    remote = await services.directory.get(node.id)
    if not isinstance(remote, RemoteNode):
        raise PermissionDenied(f"node {node.id} runs no host commands")
    timeout = body.timeout or services.settings.default_timeout_ms
    if timeout > services.settings.max_timeout_ms:
        raise InvalidArgument(f"timeout may be at most {services.settings.max_timeout_ms}")
    cid = ids.new_id(ids.COMMAND)
    try:
        ran = await remote.host_run(
            cid, body.command, env=body.env, cwd=body.cwd, timeout_ms=timeout
        )
    except HostExecRefused as exc:
        raise PermissionDenied(str(exc)) from None
    started = datetime.fromisoformat(ran["started_at"])
    finished = datetime.fromisoformat(ran["finished_at"]) if ran.get("finished_at") else None
    out: dict[str, Any] = {
        "id": cid,
        "machine_id": node.id,
        "command": body.command,
        "status": ran["status"],
        "stdout": ran["stdout"].decode(errors="replace"),
        "stderr": ran["stderr"].decode(errors="replace"),
        "exit_code": ran["exit_code"],
        "signal": ran["signal"],
        "stdout_truncated": bool(ran.get("stdout_truncated")),
        "stderr_truncated": bool(ran.get("stderr_truncated")),
        "duration": round((finished - started).total_seconds() * 1000) if finished else None,
        "started_at": iso(started),
        "finished_at": iso(finished),
    }
    if ran.get("error"):
        out["reason"] = ran["error"]
    return out


# --- commands ----------------------------------------------------------------------------------


@router.post("/v1/commands", summary="Execute a command and wait for its result")
async def execute(
    body: CommandBody,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    req = exec_request(body)
    node = await node_machine(services, principal, body.machine_id)
    if node is not None:
        return {"data": await host_command(services, node, body)}
    row = await running_sandbox(services, principal, body.machine_id)
    return {"data": result(await services.commands.run(row, req, source="cmdop"))}


@router.post("/v1/commands/async", status_code=202, summary="Start a command; answer at once")
async def execute_async(
    body: CommandBody,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    req = exec_request(body)
    row = await running_sandbox(services, principal, body.machine_id)
    command_row, _ = await services.commands.start(row, req, source="cmdop")
    command = command_model(command_row)
    return {"data": {"id": command.id, "status": status_of(command)}}


@router.get("/v1/commands/{command_id}", summary="A command's status and output")
async def get_command(
    command_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    sandbox_id = await usable_command_sandbox(services, principal, command_id)
    return {"data": result(await services.commands.get(sandbox_id, command_id))}


@router.delete("/v1/commands/{command_id}", summary="Cancel a running command (SIGTERM)")
async def cancel_command(
    command_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    sandbox_id = await usable_command_sandbox(services, principal, command_id)
    command = await services.commands.cancel(sandbox_id, command_id)
    return {"data": {"cancelled": True, "id": command.id, "status": status_of(command)}}


@router.post("/v1/commands/batch", summary="Execute on several machines at once")
async def batch(
    body: BatchBody,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    req = exec_request(body)

    async def one(machine_id: str) -> dict[str, Any]:
        try:
            node = await node_machine(services, principal, machine_id)
            if node is not None:
                ran = await host_command(services, node, body)
                if ran["status"] == "lost":
                    raise Unavailable(ran.get("reason") or f"node {machine_id} went away")
                return ran
            row = await running_sandbox(services, principal, machine_id)
            command = await services.commands.run(row, req, source="cmdop")
            if command.status in (CommandStatus.cancelled, CommandStatus.lost):
                # Ended by its machine going away (stopped or deleted) or by a DELETE.
                if not await services.sandboxes.is_running(row):
                    raise Unavailable(f"machine {machine_id} went away while the command ran")
                raise Conflict(f"the command was {command.status.value}")
            if command.status is CommandStatus.failed:
                raise InvalidArgument(command.error or "the command could not start")
            return result(command)
        except CorralError as exc:
            code = CODES.get(exc.status, exc.code)
            return {"error": {"code": code, "message": exc.message}}

    unique = list(dict.fromkeys(body.machine_ids))
    outcomes = await asyncio.gather(*(one(m) for m in unique))
    data = dict(zip(unique, outcomes, strict=True))
    failed = sum(1 for o in outcomes if "id" not in o)
    return {
        "data": data,
        "meta": {"total": len(unique), "succeeded": len(unique) - failed, "failed": failed},
    }


# --- machines ----------------------------------------------------------------------------------


@router.get("/v1/machines/{machine_id}/commands", summary="A machine's history, newest first")
async def machine_commands(
    machine_id: str,
    since: Annotated[Timestamp | None, Query(description="ISO timestamp")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Results per page")] = 20,
    offset: Annotated[Count, Query(description="Pagination offset")] = 0,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await usable_sandbox(services, principal, machine_id)
    commands, total = await history(services, row.id, since=since, limit=limit, offset=offset)
    items = [
        {
            "id": c.id,
            "command": c.command,
            "status": status_of(c),
            "exit_code": c.exit_code,
            "duration": c.duration_ms,
            "executed_at": iso(c.started_at or c.created_at),
            "finished_at": iso(c.finished_at),
        }
        for c in commands
    ]
    return {"data": items, "meta": {"total": total, "limit": limit, "offset": offset}}


@router.get("/v1/machines", summary="Machines (sandboxes) this token may use")
async def machines(
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[Count, Query()] = 0,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    # In a fleet, its nodes first (for admin tokens), then the sandboxes.
    nodes = []
    if services.directory.fleet and principal.is_admin:
        nodes = [node_machine_of(n) for n in await services.nodes.list()]
    shown_nodes = nodes[offset : offset + limit]
    box_offset = max(0, offset - len(nodes))
    box_limit = limit - len(shown_nodes)
    where = [SandboxRow.state != SandboxState.deleted.value]
    if principal.sandbox_ids is not None:
        where.append(covered_by(principal.sandbox_ids))
    async with services.db.session() as session:
        total = await session.scalar(select(func.count()).select_from(SandboxRow).where(*where))
        rows = list(
            await session.scalars(
                select(SandboxRow)
                .where(*where)
                .order_by(SandboxRow.id)
                .offset(box_offset)
                .limit(box_limit)
            )
        )
    return {
        "data": shown_nodes + [machine(r) for r in rows],
        "meta": {"total": len(nodes) + int(total or 0), "limit": limit, "offset": offset},
    }


@router.get("/v1/machines/{machine_id}", summary="One machine")
async def get_machine(
    machine_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    node = await node_machine(services, principal, machine_id)
    if node is not None:
        return {"data": node_machine_of(node)}
    return {"data": machine(await usable_sandbox(services, principal, machine_id))}
