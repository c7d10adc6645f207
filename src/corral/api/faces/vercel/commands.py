"""Commands in a session: run (at once, or `wait` with ND-JSON `logs`), get, logs, kill."""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from corral.api.auth import get_services
from corral.api.faces._common import TextDecoder
from corral.api.faces.vercel.wire import (
    NDJSON,
    KillCommand,
    RunCommand,
    SudoUnavailable,
    caller,
    command_json,
    line,
    live_sandbox,
    router,
    session_row,
    token_ended_line,
)
from corral.api.token_bound import TokenBoundStream
from corral.core.commands import to_model as command_model
from corral.core.errors import BadRequest
from corral.core.models import Command, CommandStatus, ExecRequest, Scope
from corral.core.tokens import Principal
from corral.node.output_log import STREAM_NAMES
from corral.services import Services
from corral.store.tables import SandboxRow

STDERR = 2
Caller = Depends(caller)
ServicesDep = Depends(get_services)


# sudo's options that change nothing here: the environment is the command's own either way, and
# there is no password to ask for.
SUDO_NOOPS = frozenset({"-E", "--preserve-env", "-H", "--set-home", "-n", "--non-interactive",
                        "-S", "--stdin"})  # fmt: skip


def _sudo(args: list[str]) -> tuple[str, str, list[str]]:
    """(user, program, arguments) of `sudo [-u USER] [--] PROGRAM ARGS...`. A setuid sudo cannot
    work in a sandbox (its processes have no_new_privs), so the face runs what it was asked
    for as that user itself, as Vercel's sandboxes do with their sudo (the SDK's `asUser`)."""
    user, rest = "root", list(args)
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option == "--":
            break
        if option in ("-u", "--user"):
            if not rest:
                raise BadRequest(f"sudo: option {option} needs a user name")
            user = rest.pop(0)
        elif option.startswith("--user="):
            user = option.removeprefix("--user=")
        elif option.startswith("-u") and len(option) > 2:
            user = option[2:]
        elif option not in SUDO_NOOPS:
            raise BadRequest(f"sudo: option {option} is not supported here")
    if not rest:
        raise BadRequest("sudo: no command to run")
    return user, rest[0], rest[1:]


def _exec_request(body: RunCommand) -> ExecRequest:
    user = None
    command, args = body.command, body.args
    if command == "sudo":
        user, command, args = _sudo(args)
    if body.sudo and user is None:
        user = "root"
    if user is not None:
        try:
            ExecRequest(command=command, user=user)
        except ValidationError:
            if user == "root":
                raise SudoUnavailable(
                    "sudo is not available on this server yet: commands run as the sandbox's user"
                ) from None
            raise BadRequest(f"sudo: {user!r} is not a user name") from None
    return ExecRequest(
        command=command,
        args=args,
        cwd=body.cwd,
        env=body.env,
        timeout_ms=body.timeout,
        user=user,
    )


@router.post(
    "/v2/sandboxes/sessions/{session_id}/cmd",
    summary="Run a command in a session",
    responses={200: {"content": {"application/json": {}, NDJSON: {}}}},
)
async def run_command(
    session_id: str,
    body: RunCommand,
    teamId: str | None = Query(None, description="Accepted and ignored"),
    slug: str | None = Query(None, description="Accepted and ignored"),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> Response:
    principal.require(Scope.exec)
    req = _exec_request(body)
    row = await session_row(services, principal, session_id)
    command_row, _ = await services.commands.start(row, req, source="vercel")
    started = command_model(command_row)
    if not body.wait:
        return JSONResponse({"command": command_json(started)})
    return TokenBoundStream(
        _wait_stream(services, started, body.logs),
        services.tokens.lease(principal),
        ending=token_ended_line,
        media_type=NDJSON,
    )


async def _log_lines(services: Services, sandbox_id: str, command_id: str) -> AsyncIterator[bytes]:
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
    # A program that could not start wrote nothing: say why on stderr, as a shell would.
    await services.commands.wait_finished(command_id)
    final = await services.commands.get(sandbox_id, command_id)
    if final.status is CommandStatus.failed and final.error:
        reason = f"{final.command}: {final.error.rstrip()}\n"
        yield line({"stream": STREAM_NAMES[STDERR], "data": reason})


async def _wait_stream(services: Services, started: Command, logs: bool) -> AsyncIterator[bytes]:
    yield line({"command": command_json(started) | {"exitCode": None}})
    if logs:  # live, as the command writes
        async for item in _log_lines(services, started.sandbox_id, started.id):
            yield item
    await services.commands.wait_finished(started.id)
    final = await services.commands.get(started.sandbox_id, started.id)
    if final.status is CommandStatus.lost:  # the result is unknown: no exit code to give
        message = final.error or "the command's result is unknown"
        yield line({"stream": "error", "data": {"code": "command_lost", "message": message}})
    else:
        yield line({"command": command_json(final)})


async def _command(
    services: Services, principal: Principal, session_id: str, command_id: str
) -> SandboxRow:
    row = await live_sandbox(services, principal, session_id)
    await services.commands.row(row.id, command_id)  # 404 for a command of another sandbox
    return row


@router.get(
    "/v2/sandboxes/sessions/{session_id}/cmd/{command_id}",
    summary="A command, optionally awaited",
)
async def get_command(
    session_id: str,
    command_id: str,
    wait: bool = False,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await _command(services, principal, session_id, command_id)
    command = await services.commands.get(row.id, command_id, wait=wait)
    return {"command": command_json(command)}


@router.get(
    "/v2/sandboxes/sessions/{session_id}/cmd/{command_id}/logs",
    summary="A command's output as ND-JSON: all of it so far, then live until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}}},
)
async def command_logs(
    session_id: str,
    command_id: str,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> StreamingResponse:
    principal.require(Scope.read)
    row = await _command(services, principal, session_id, command_id)
    return TokenBoundStream(
        _log_lines(services, row.id, command_id),
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


@router.post(
    "/v2/sandboxes/sessions/{session_id}/cmd/{command_id}/kill", summary="Signal a command"
)
async def kill_command(
    session_id: str,
    command_id: str,
    body: KillCommand | None = None,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.exec)
    number = _signal_number((body or KillCommand()).signal)
    row = await _command(services, principal, session_id, command_id)
    command_row = await services.commands.row(row.id, command_id)
    execution = await services.commands.execution(command_row)
    # A command that has ended already is answered as it is, as Vercel does.
    if execution is not None and not CommandStatus(command_row.status).finished:
        await execution.signal(number)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(services.commands.wait_finished(command_id), 0.5)
    return {"command": command_json(await services.commands.get(row.id, command_id))}
