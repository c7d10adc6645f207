"""The cmd.io Run API (seed 000), over Corral's core; the SSH front is in `corral.ssh`.

`/run/<user>/<command>` runs a user's named command in a fresh sandbox that is removed when it
ends. The token comes as the Basic-Auth username (password ignored), `?access_token=`, or any
other style Corral accepts; arguments from `?args=` (space-separated); the request body, if any,
is the command's standard input. Output is stdout and stderr combined in the order written:
buffered (with `X-Exit-Code`), chunked with `?stream=1`, or one WebSocket text frame per write
on an upgrade of the same URL. A non-zero exit adds a last line `exit status: N`. Errors before
the run are plain text: 401 `unauthorized token`, 404 `not found`.

Users, named commands, access lists and cmd.io tokens are managed under `/v1/users` with the
admin key (Corral's addition: cmd.io managed them over SSH only), and over SSH (`corral.ssh`).

Where Corral differs from cmd.io:
- A named command is a shell command line run by bash in a sandbox of the host template, not a
  Docker image; the caller's arguments are appended to it, each shell-quoted. A command may be
  bound to an existing sandbox (`sandbox`), where it then runs, keeping its files between runs,
  instead of in a fresh sandbox per run. Limits are the server's (default timeout 5 minutes),
  not cmd.io's 30 s; a command's own `timeout_ms` overrides it.
- Tokens are Corral tokens (`crl_...`), not UUIDs. A token made with `cmd-tokens new` can run
  only the commands whose access lists hold it; the admin key runs any command.
- The exit code is also given as the `X-Exit-Code` header on buffered runs; a command killed by
  signal N (a timeout is SIGKILL) exits 128+N; one that could not run adds `error: <reason>`
  and exit status 125. A token that exists but lacks access gets the same 401 as a bad token.
- The WebSocket is refused with the same plain-text 401/404 before the upgrade (or closed with
  1008 when the server cannot send an HTTP refusal). It takes no input, as in cmd.io.
- A buffered run answers `X-Command-Id` too: the run is in the history of its sandbox.
- A client that goes away does not end the run: the command goes on to its end or its timeout,
  then its sandbox is removed (a run's sandbox also has a lifetime of the command's timeout plus
  a minute, so that not even a crash of the server leaves it behind).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response, WebSocket
from fastapi.responses import PlainTextResponse
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect

from corral.api import ws_frames
from corral.api.auth import Caller, get_services, token_from_request
from corral.api.errors import error_responses
from corral.api.faces._common import Problem, TextDecoder, face_router, shell_exit_code
from corral.api.token_bound import TokenBoundStream
from corral.api.ws_frames import CLOSE_TOKEN_ENDED, FrameError, FrameLimits
from corral.core.errors import NotFound, PermissionDenied, Unauthenticated
from corral.core.models import Command, CommandStatus, Scope, Token, TokenCreated
from corral.core.named_commands import (
    AccessEntry,
    AccessGrant,
    NamedCommand,
    NamedCommandCreate,
    NamedRun,
    User,
    UserCreate,
)
from corral.core.tokens import Principal
from corral.services import Services

TAG = "cmd.io (seed 000)"
NOT_RUN_EXIT = 125


def render(request: Request, problem: Problem) -> Response:
    if problem.status in (401, 403):
        return PlainTextResponse("unauthorized token\n", status_code=401)
    if problem.status == 404:
        return PlainTextResponse("not found\n", status_code=404)
    return PlainTextResponse(
        f"{problem.message}\n", status_code=problem.status, headers=problem.headers
    )


run_router = face_router(TAG, render, error_media_type="text/plain")
manage = APIRouter(tags=[TAG], prefix="/v1/users", responses=error_responses())


# --- running -----------------------------------------------------------------------------------


def exit_status(command: Command) -> int:
    code = shell_exit_code(command)
    return NOT_RUN_EXIT if code is None else code


def trailer(command: Command, ends_with_newline: bool) -> bytes:
    """What follows the output: `exit status: N` on a non-zero exit (and the reason when the
    command never ran or its result is unknown)."""
    lines = []
    if command.status in (CommandStatus.failed, CommandStatus.lost) and command.error:
        lines.append(f"error: {command.error}")
    status = exit_status(command)
    if status != 0:
        lines.append(f"exit status: {status}")
    if not lines:
        return b""
    text = "\n".join(lines) + "\n"
    return (text if ends_with_newline else "\n" + text).encode()


async def authorize(
    services: Services, secret: str | None, user: str, name: str
) -> tuple[Principal, Any]:
    """The caller and the named command, when the caller may run it."""
    principal = await services.tokens.authenticate(secret)
    command = await services.named.command_row(user, name)
    if not await services.named.may_run(principal, command):
        raise Unauthenticated("unauthorized token")
    return principal, command


def parse_args(args: str | None) -> list[str]:
    return args.split() if args else []


async def _output(services: Services, run: NamedRun) -> AsyncIterator[bytes]:
    """The command's output in the order written, as it comes."""
    async for chunk in services.commands.follow_output(run.sandbox.id, run.row.id):
        if chunk is not None:
            yield chunk.data


async def _finish(services: Services, run: NamedRun) -> Command:
    await services.commands.wait_finished(run.row.id)
    return await services.commands.get(run.sandbox.id, run.row.id, output=(b"", b""))


async def run_command(
    user: str,
    command: str,
    request: Request,
    args: str | None = Query(None, description="Arguments, space-separated"),
    stream: str | None = Query(None, description="1: stream the output as it is written"),
    access_token: str | None = Query(None, description="The token (or Basic-Auth username)"),
) -> Response:
    services = get_services(request)
    principal, named = await authorize(services, token_from_request(request), user, command)
    body = await request.body()
    stack = contextlib.AsyncExitStack()
    run = await stack.enter_async_context(
        services.named.run(named, parse_args(args), source="cmdio", stdin=body)
    )
    if stream in ("1", "true", "yes"):
        return TokenBoundStream(
            _streamed(services, run, stack),
            services.tokens.lease(principal),
            ending=lambda reason: f"\nerror: {reason}\n".encode(),
            media_type="text/plain; charset=utf-8",
            # The run is let go even if the stream ended before its first byte.
            background=BackgroundTask(stack.aclose),
        )
    async with stack:
        out = bytearray()
        async for data in _output(services, run):
            out += data
        result = await _finish(services, run)
    out += trailer(result, not out or out.endswith(b"\n"))
    return Response(
        bytes(out),
        media_type="text/plain; charset=utf-8",
        headers={"X-Exit-Code": str(exit_status(result)), "X-Command-Id": result.id},
    )


for _method in ("GET", "POST"):
    run_router.add_api_route(
        "/run/{user}/{command}",
        run_command,
        methods=[_method],
        operation_id=f"cmdio_run_{_method.lower()}",
        summary="Run a named command (the body, if any, is its stdin)",
        response_class=PlainTextResponse,
        responses={
            200: {"description": "stdout and stderr combined", "content": {"text/plain": {}}}
        },
    )


async def _streamed(
    services: Services, run: NamedRun, stack: contextlib.AsyncExitStack
) -> AsyncIterator[bytes]:
    async with stack:
        last = b"\n"
        async for data in _output(services, run):
            last = data[-1:] or last
            yield data
        result = await _finish(services, run)
        tail = trailer(result, last == b"\n")
        if tail:
            yield tail


async def deny(ws: WebSocket, status: int, text: str) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(PlainTextResponse(text, status_code=status))
    else:
        await ws.close(1008, text.strip())


@run_router.websocket("/run/{user}/{command}")
async def run_command_ws(ws: WebSocket, user: str, command: str) -> None:
    """The same run over a WebSocket: one text frame per output write, a last `exit status: N`
    frame on a non-zero exit, then a normal close (1000). Client frames are ignored (a frame
    over the size limit closes with 1009). When the caller's token is revoked or expires, a
    last frame `error: <reason>` and close 4001; the run goes on, as when a client goes away."""
    services: Services = ws.app.state.services
    try:
        principal, named = await authorize(services, token_from_request(ws), user, command)  # type: ignore[arg-type]
    except NotFound:
        await deny(ws, 404, "not found\n")
        return
    except (Unauthenticated, PermissionDenied):
        await deny(ws, 401, "unauthorized token\n")
        return
    limits = FrameLimits.of(ws)
    with services.tokens.lease(principal) as lease:
        await ws.accept()
        args = parse_args(ws.query_params.get("args"))
        async with services.named.run(named, args, source="cmdio", stdin=b"") as run:
            sending = asyncio.ensure_future(_send_run(ws, services, run))
            reading = asyncio.ensure_future(_ignore_input(ws, limits))
            ending = asyncio.ensure_future(lease.wait())
            tasks = (sending, reading, ending)
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if sending.done() and not sending.cancelled():
            sending.result()  # the run was sent whole (or the client went away)
        elif ending.done() and not ending.cancelled():
            await _close_with(ws, ending.result(), CLOSE_TOKEN_ENDED)
        elif reading.done() and not reading.cancelled() and reading.result() is not None:
            problem = reading.result()
            await _close_with(ws, problem.message, problem.close_code)


async def _send_run(ws: WebSocket, services: Services, run: NamedRun) -> None:
    try:
        text = TextDecoder()
        async for data in _output(services, run):
            piece = text.decode(1, data)
            if piece:
                await ws.send_text(piece)
        rest = text.flush().get(1)
        if rest:
            await ws.send_text(rest)
        result = await _finish(services, run)
        if result.status in (CommandStatus.failed, CommandStatus.lost) and result.error:
            await ws.send_text(f"error: {result.error}")
        status = exit_status(result)
        if status != 0:
            await ws.send_text(f"exit status: {status}")
        await ws.close(1000)
    except WebSocketDisconnect:
        return


async def _ignore_input(ws: WebSocket, limits: FrameLimits) -> FrameError | None:
    """Read (and drop) client frames, so that a client going away or sending a frame over the
    limit is seen; None once it has gone."""
    try:
        while await ws_frames.receive(ws, limits) is not None:
            pass
    except FrameError as exc:
        return exc
    return None


async def _close_with(ws: WebSocket, message: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(f"error: {message}")
        await ws.close(code, ws_frames.close_reason(message))


# --- management (Corral's addition; admin key) -------------------------------------------------


def admin(caller: Principal) -> None:
    caller.require(Scope.admin)


@manage.post("", status_code=201, response_model=User, summary="Create a cmd.io user")
async def create_user(body: UserCreate, caller: Caller, request: Request) -> User:
    admin(caller)
    return await get_services(request).named.create_user(body)


@manage.get("", response_model=list[User], summary="List users")
async def list_users(caller: Caller, request: Request) -> list[User]:
    admin(caller)
    return await get_services(request).named.list_users()


@manage.get("/{user}", response_model=User, summary="One user")
async def get_user(user: str, caller: Caller, request: Request) -> User:
    admin(caller)
    return await get_services(request).named.get_user(user)


@manage.put("/{user}/ssh_public_keys", response_model=User, summary="Replace a user's keys")
async def set_keys(user: str, body: list[str], caller: Caller, request: Request) -> User:
    admin(caller)
    try:
        return await get_services(request).named.set_user_keys(user, body)
    except ValueError as exc:
        from corral.core.errors import InvalidArgument

        raise InvalidArgument(str(exc)) from None


@manage.delete("/{user}", status_code=204, summary="Delete a user, their commands and tokens")
async def delete_user(user: str, caller: Caller, request: Request) -> Response:
    admin(caller)
    await get_services(request).named.delete_user(user)
    return Response(status_code=204)


@manage.post(
    "/{user}/commands", status_code=201, response_model=NamedCommand, summary="Publish a command"
)
async def create_named(
    user: str, body: NamedCommandCreate, caller: Caller, request: Request
) -> NamedCommand:
    admin(caller)
    return await get_services(request).named.create_command(user, body)


@manage.get("/{user}/commands", response_model=list[NamedCommand], summary="A user's commands")
async def list_named(user: str, caller: Caller, request: Request) -> list[NamedCommand]:
    admin(caller)
    return await get_services(request).named.list_commands(user)


@manage.get("/{user}/commands/{name}", response_model=NamedCommand, summary="One command")
async def get_named(user: str, name: str, caller: Caller, request: Request) -> NamedCommand:
    from corral.core.named_commands import command_model

    admin(caller)
    return command_model(await get_services(request).named.command_row(user, name))


@manage.delete("/{user}/commands/{name}", status_code=204, summary="Delete a command")
async def delete_named(user: str, name: str, caller: Caller, request: Request) -> Response:
    admin(caller)
    await get_services(request).named.delete_command(user, name)
    return Response(status_code=204)


@manage.get(
    "/{user}/commands/{name}/access",
    response_model=list[AccessEntry],
    summary="The tokens that may run a command",
)
async def list_access(user: str, name: str, caller: Caller, request: Request) -> list[AccessEntry]:
    admin(caller)
    return await get_services(request).named.access_list(user, name)


@manage.post(
    "/{user}/commands/{name}/access",
    status_code=201,
    response_model=AccessEntry,
    summary="Let a token run a command (`<name>:access add TOKEN`)",
)
async def grant_access(
    user: str, name: str, body: AccessGrant, caller: Caller, request: Request
) -> AccessEntry:
    admin(caller)
    return await get_services(request).named.grant(user, name, body.token)


@manage.delete(
    "/{user}/commands/{name}/access/{token}",
    status_code=204,
    summary="Take a token's access away (by token id or secret)",
)
async def revoke_access(
    user: str, name: str, token: str, caller: Caller, request: Request
) -> Response:
    admin(caller)
    await get_services(request).named.revoke(user, name, token)
    return Response(status_code=204)


@manage.post(
    "/{user}/tokens",
    status_code=201,
    response_model=TokenCreated,
    summary="Make a cmd.io token for the user (`cmd-tokens new`)",
)
async def new_token(user: str, caller: Caller, request: Request) -> TokenCreated:
    admin(caller)
    return await get_services(request).named.new_token(user)


@manage.get("/{user}/tokens", response_model=list[Token], summary="A user's cmd.io tokens")
async def list_tokens(user: str, caller: Caller, request: Request) -> list[Token]:
    admin(caller)
    return await get_services(request).named.list_tokens(user)


@manage.delete("/{user}/tokens/{token}", status_code=204, summary="Delete a user's cmd.io token")
async def remove_token(user: str, token: str, caller: Caller, request: Request) -> Response:
    admin(caller)
    await get_services(request).named.remove_token(user, token)
    return Response(status_code=204)


router = APIRouter()
router.include_router(run_router)
router.include_router(manage)
