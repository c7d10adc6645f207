"""What the faces share: each face's own error shape, applied to its routes only, and small
lookups over the core that more than one face needs.

A face router is built with `face_router(tag, render)`: every error raised while serving one of
its routes (a core error, a validation error, an HTTP error, an auth failure) is turned into a
`Problem` and rendered by the face. The native error handlers stay as they are for every other
route.
"""

from __future__ import annotations

import asyncio
import codecs
import platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy import func, select
from starlette.exceptions import HTTPException

from corral.api.auth import get_services, may_use, token_from_request
from corral.api.errors import HTTP_CODES
from corral.core.errors import CorralError, NotFound, RateLimited
from corral.core.models import Command, CommandStatus
from corral.core.tokens import Principal, RateInfo, TokenRateLimited
from corral.services import Services
from corral.store.tables import CommandRow

SIGKILL = 9


@dataclass
class Problem:
    """An error, before a face gives it its shape."""

    status: int
    code: str  # the native code
    message: str
    details: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: Exception) -> Problem | None:
        if isinstance(exc, CorralError):
            problem = cls(exc.status, exc.code, exc.message, exc.details)
            if isinstance(exc, RateLimited):
                problem.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            if isinstance(exc, TokenRateLimited):
                problem.headers.update(rate_headers(exc.info))
            return problem
        if isinstance(exc, RequestValidationError | pydantic.ValidationError):
            errors = exc.errors()
            if any(e.get("type") == "json_invalid" for e in errors):
                return cls(400, "invalid_json", "the body is not valid JSON")
            details = [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in errors
            ]
            first = details[0] if details else {"loc": [], "msg": "invalid"}
            where = ".".join(str(p) for p in first["loc"] if p != "body")
            message = f"{where}: {first['msg']}" if where else str(first["msg"])
            return cls(422, "invalid_argument", message, details)
        if isinstance(exc, HTTPException):
            code = HTTP_CODES.get(exc.status_code, "error")
            message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
            return cls(exc.status_code, code, message, headers=dict(exc.headers or {}))
        return None


Renderer = Callable[[Request, Problem], Response]
AfterHook = Callable[[Request, Response], None]


def face_router(
    tag: str, render: Renderer, *, after: AfterHook | None = None, **kwargs: Any
) -> APIRouter:
    """An APIRouter whose routes render their errors with `render` (and pass every response
    through `after`, e.g. to add headers)."""

    class FaceRoute(APIRoute):
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

    return APIRouter(tags=[tag], route_class=FaceRoute, **kwargs)


# --- auth --------------------------------------------------------------------------------------


async def authenticate(request: Request, secret: str | None = None) -> Principal:
    """The caller, from any of the auth styles Corral accepts (or `secret` when given)."""
    services = get_services(request)
    principal = await services.tokens.authenticate(
        secret if secret is not None else token_from_request(request)
    )
    request.state.principal = principal
    return principal


def rate_headers(info: RateInfo) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(info.limit),
        "X-RateLimit-Remaining": str(info.remaining),
        "X-RateLimit-Reset": str(info.reset),
    }


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
