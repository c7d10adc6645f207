"""Errors on the wire.

Every error is first a `Problem` (status, native code, message, details, headers), then given
the shape of the API its route belongs to: the native envelope
`{"error": {code, message, details}, "request_id"}`, or a face's own shape (a face's routes carry
its renderer, see `api/faces/_common.py`). Errors that arise outside a route's own handler (the
body limit in the middleware, a method the path does not take, an unexpected exception) look up
the route the path belongs to, so that a face's client gets the face's shape there too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydantic
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from corral.core.errors import CorralError, RateLimited
from corral.core.models import ErrorResponse
from corral.core.tokens import RateInfo, TokenRateLimited

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_argument",
    429: "rate_limited",
    503: "unavailable",
    507: "insufficient_storage",
}

# The statuses any operation may answer besides its own success, and what each means. 500 is
# left out: it is a bug, never an answer the API gives on purpose.
ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request (e.g. the body is not JSON)",
    401: "No token, or one that is unknown, expired or revoked",
    403: "The token lacks the scope, or may not use this sandbox",
    404: "No such sandbox, command, file or resource",
    409: "Conflict: the sandbox is not running, the name is taken, the command has ended, ...",
    413: "The request body (or an upload) is too large",
    422: "Invalid arguments; `details` names the failing fields",
    429: "Rate limit or quota; see Retry-After",
    503: "Unavailable for now: the sandbox is restarting or the server shutting down",
}
# Answered by the routes that write files, besides the above.
STORAGE_FULL: dict[int, str] = {507: "The sandbox's disk is full"}


def rate_headers(info: RateInfo) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(info.limit),
        "X-RateLimit-Remaining": str(info.remaining),
        "X-RateLimit-Reset": str(info.reset),
    }


@dataclass
class Problem:
    """An error, before it is given its shape."""

    status: int
    code: str  # the native code
    message: str
    details: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: Exception) -> Problem | None:
        """The problem an exception stands for; None for one that is a bug."""
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
            # Where and what; never the offending input (it may be large or secret).
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


def render_native(request: Request, problem: Problem) -> Response:
    body = {
        "error": {"code": problem.code, "message": problem.message, "details": problem.details},
        "request_id": getattr(request.state, "request_id", None),
    }
    return JSONResponse(body, status_code=problem.status)


def error_responses(
    model: type[Any] | None = ErrorResponse,
    *,
    statuses: dict[int, str] = ERROR_STATUSES,
    media_type: str = "application/json",
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of the OpenAPI document for these error statuses, with the body
    `model` (None: plain text)."""
    content: dict[str, Any] = {media_type: {"schema": {"type": "string"}}} if model is None else {}
    out: dict[int | str, dict[str, Any]] = {}
    for status, description in statuses.items():
        entry: dict[str, Any] = {"description": description}
        if model is not None:
            entry["model"] = model
        if content:
            entry["content"] = content
        out[status] = entry
    return out


def route_renderer(scope: Scope) -> Renderer | None:
    """The renderer of the route the request's path belongs to, if it has its own (faces are
    included without a prefix: their routes' own paths are matched)."""
    router = getattr(scope.get("app"), "router", None)
    for route in _leaf_routes(getattr(router, "routes", ())):
        render = getattr(route, "render_problem", None)
        if render is not None and route.matches(scope)[0] is not Match.NONE:
            return render  # type: ignore[no-any-return]
    return None


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI keeps included routers
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


def problem_response(request: Request, problem: Problem) -> Response:
    """`problem` in the shape of the API that the request's route belongs to."""
    render = route_renderer(request.scope) or render_native
    response = render(request, problem)
    for key, value in problem.headers.items():
        response.headers.setdefault(key, value)
    return response


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return problem_response(request, Problem(status, code, message, details, dict(headers or {})))


def install(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> Response:
        problem = Problem.of(exc)
        assert problem is not None  # registered for the exceptions Problem.of knows only
        return problem_response(request, problem)

    for kind in (CorralError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, known)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, Problem(500, "internal", "internal error"))
