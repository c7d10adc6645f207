"""Commands in a sandbox: sync exec, async start, history, status and cancel."""

from __future__ import annotations

from fastapi import APIRouter, Query

from corral.api.auth import Caller, ServicesDep, running_sandbox, usable_sandbox
from corral.core.commands import to_model
from corral.core.models import Command, CommandStatus, ExecRequest, Page, Scope, Timestamp

router = APIRouter(prefix="/v1/sandboxes/{sandbox}", tags=["commands"])


@router.post("/exec", response_model=Command)
async def exec_command(
    sandbox: str, body: ExecRequest, services: ServicesDep, caller: Caller
) -> Command:
    """Run a command and answer with its result once it ends."""
    caller.require(Scope.exec)
    row = await running_sandbox(services, caller, sandbox)
    return await services.commands.run(row, body)


@router.post("/commands", status_code=202, response_model=Command)
async def start_command(
    sandbox: str, body: ExecRequest, services: ServicesDep, caller: Caller
) -> Command:
    """Start a command and answer at once; poll it, or wait on it, by its id."""
    caller.require(Scope.exec)
    row = await running_sandbox(services, caller, sandbox)
    command_row, _ = await services.commands.start(row, body)
    return to_model(command_row)


@router.get("/commands", response_model=Page[Command])
async def list_commands(
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    status: CommandStatus | None = None,
    since: Timestamp | None = None,
    until: Timestamp | None = None,
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
) -> Page[Command]:
    """The sandbox's command history, newest first (output left out: fetch one command)."""
    caller.require(Scope.read)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.commands.list(
        row.id, status=status, since=since, until=until, limit=limit, cursor=cursor
    )


@router.get("/commands/{command_id}", response_model=Command)
async def get_command(
    sandbox: str,
    command_id: str,
    services: ServicesDep,
    caller: Caller,
    wait: bool = False,
    timeout_ms: int = Query(60_000, ge=0, le=3_600_000),
) -> Command:
    """A command's status and output; with `wait`, block until it ends or `timeout_ms`."""
    caller.require(Scope.read)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.commands.get(row.id, command_id, wait=wait, timeout=timeout_ms / 1000)


@router.post("/commands/{command_id}/cancel", response_model=Command)
async def cancel_command(
    sandbox: str, command_id: str, services: ServicesDep, caller: Caller
) -> Command:
    """SIGTERM to every process of the command, SIGKILL after the grace period."""
    caller.require(Scope.exec)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.commands.cancel(row.id, command_id)
