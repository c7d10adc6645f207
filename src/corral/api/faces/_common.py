"""What the faces share: each face's own error shape, applied to its routes only, and small
lookups over the core that more than one face needs.

A face router is built with `face_router(tag, render, error_model=...)`: every error raised while
serving one of its routes (a core error, a validation error, an HTTP error, an auth failure) is
turned into a `Problem` and rendered by the face, and errors raised around its routes (the body
limit, 405) find the face's renderer through the route (`api/errors.py`). The OpenAPI document
lists, for each of its operations, the statuses the face answers with `error_model` as the body.
Every other route keeps the native shape.
"""

from __future__ import annotations

import asyncio
import codecs
import platform
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import func, select

from corral.api.auth import get_services, may_use, token_from_request
from corral.api.errors import (
    ERROR_STATUSES,
    HTTP_CODES,
    Problem,
    Renderer,
    error_responses,
)
from corral.api.errors import rate_headers as rate_headers  # the faces' own import
from corral.core.errors import NotFound
from corral.core.models import Command, CommandStatus
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import CommandRow

SIGKILL = 9

AfterHook = Callable[[Request, Response], None]


def face_errors(
    render: Renderer,
    model: type[BaseModel] | None,
    *,
    statuses: dict[int, str] = ERROR_STATUSES,
    media_type: str = "application/json",
) -> dict[int | str, dict[str, Any]]:
    """The error statuses a face answers and its error body, for the OpenAPI document: found by
    rendering one problem of each of `statuses` (a face may answer some under another status,
    e.g. Vercel's 400 for validation errors)."""
    probe = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}})
    answered_as: dict[int, list[str]] = {}
    for status, description in statuses.items():
        code = HTTP_CODES.get(status, "error")
        answered = render(probe, Problem(status, code, description)).status_code
        answered_as.setdefault(answered, []).append(description)
    return error_responses(
        model,
        statuses={s: "; ".join(d) for s, d in sorted(answered_as.items())},
        media_type=media_type,
    )


def face_router(
    tag: str,
    render: Renderer,
    *,
    after: AfterHook | None = None,
    error_model: type[BaseModel] | None = None,
    error_media_type: str = "application/json",
    extra_errors: dict[int, str] | None = None,
    **kwargs: Any,
) -> APIRouter:
    """An APIRouter whose routes render their errors with `render` (and pass every response
    through `after`, e.g. to add headers), and document them as `error_model` bodies (None:
    plain text)."""

    class FaceRoute(APIRoute):
        # Found by errors raised before the route's own handler runs (api/errors.py).
        render_problem = staticmethod(render)

        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            original = super().get_route_handler()

            async def handler(request: Request) -> Response:
                try:
                    response = await original(request)
                except Exception as exc:
                    problem = Problem.of(exc)
                    if problem is None:
                        raise
                    response = render(request, problem)
                    for key, value in problem.headers.items():
                        response.headers.setdefault(key, value)
                if after is not None:
                    after(request, response)
                return response

            return handler

    statuses = {**ERROR_STATUSES, **(extra_errors or {})}
    responses = face_errors(render, error_model, statuses=statuses, media_type=error_media_type)
    return APIRouter(
        tags=[tag],
        route_class=FaceRoute,
        responses={**responses, **kwargs.pop("responses", {})},
        **kwargs,
    )


# --- auth --------------------------------------------------------------------------------------


async def authenticate(request: Request, secret: str | None = None) -> Principal:
    """The caller, from any of the auth styles Corral accepts (or `secret` when given)."""
    services = get_services(request)
    principal = await services.tokens.authenticate(
        secret if secret is not None else token_from_request(request)
    )
    request.state.principal = principal
    return principal


# --- lookups -----------------------------------------------------------------------------------


async def command_sandbox(services: Services, command_id: str) -> str:
    """The sandbox a command ran in, from the command id alone."""
    async with services.db.session() as session:
        sandbox_id = await session.scalar(
            select(CommandRow.sandbox_id).where(CommandRow.id == command_id)
        )
    if sandbox_id is None:
        raise NotFound(f"no command {command_id!r}")
    return sandbox_id


async def usable_command_sandbox(services: Services, caller: Principal, command_id: str) -> str:
    """The sandbox a command ran in, if the caller's token may use it; a command in a sandbox
    it may not use (a deleted one it had by name, included) answers as a missing command."""
    sandbox_id = await command_sandbox(services, command_id)
    if not may_use(caller, await services.sandboxes.row(sandbox_id)):
        raise NotFound(f"no command {command_id!r}")
    return sandbox_id


async def history(
    services: Services,
    sandbox_id: str,
    *,
    since: datetime | None,
    limit: int,
    offset: int,
) -> tuple[list[Command], int]:
    """One page of a sandbox's command history, newest first, by offset, and the total."""
    from corral.core.commands import to_model

    where = [CommandRow.sandbox_id == sandbox_id]
    if since is not None:
        where.append(CommandRow.created_at >= since)
    async with services.db.session() as session:
        total = await session.scalar(select(func.count()).select_from(CommandRow).where(*where))
        rows = list(
            await session.scalars(
                select(CommandRow)
                .where(*where)
                .order_by(CommandRow.id.desc())
                .offset(offset)
                .limit(limit)
            )
        )
    return [to_model(r) for r in rows], int(total or 0)


def shell_exit_code(command: Command) -> int | None:
    """The exit code a shell would show: 128+N for a command killed by signal N (a timeout is
    a SIGKILL: 137); None while it runs or when it never ran."""
    if command.exit_code is not None:
        return command.exit_code
    if command.signal is not None:
        return 128 + command.signal
    if command.status is CommandStatus.timed_out:
        return 128 + SIGKILL
    return None


def host_arch() -> str:
    return platform.machine()


class TextDecoder:
    """UTF-8 decoding of a byte stream in pieces, one decoder per stream: a character split
    across two chunks is kept whole, invalid bytes are replaced."""

    def __init__(self) -> None:
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}

    def decode(self, stream: int, data: bytes, final: bool = False) -> str:
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(data, final)

    def flush(self) -> dict[int, str]:
        return {s: d.decode(b"", True) for s, d in self._decoders.items()}


async def wait_result(services: Services, sandbox_id: str, command_id: str) -> Command:
    await services.commands.wait_finished(command_id)
    return await services.commands.get(sandbox_id, command_id)


async def gather_settled(*aws: Awaitable[Any]) -> list[Any]:
    return await asyncio.gather(*aws, return_exceptions=True)
