"""`POST /v1/sandboxes/{id}/exec` without the framework's per-request machinery.

The exec round trip is the API's hottest call and most of its cost was FastAPI's: the route
table walked (~180 routes), dependencies solved, the body validated through a generic field,
the returned model validated again and encoded twice (to Python objects, then with `json`).
This ASGI layer sits innermost, behind every middleware (request id, body limit, and whatever
is added later), and answers an ordinary exec itself: the same auth, checks and service call
as `routes/commands.py`, the body parsed and the result encoded by pydantic in one pass each.

Anything out of the ordinary goes on to the route, unchanged and with its body replayed, so
that its answer (a 422's details, a face's claim on the path, a non-JSON body) is exactly the
route's: the fast path decides nothing the route would decide otherwise. Errors from the
service (401, 403, 404, 409, 429, 503) are rendered as the route's error handlers render them.
The request's scope names the route and its path parameters as the router would have set them,
so that whatever looks at `scope["route"]` afterwards (metrics by route template, the request
log, audit actions) sees an exec as it would have seen it through the router.
"""

from __future__ import annotations

import re

import pydantic
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.auth import get_principal, running_sandbox
from corral.api.errors import Problem, problem_response
from corral.api.routes import commands
from corral.core.errors import CorralError
from corral.core.models import ExecRequest
from corral.core.models import Scope as TokenScope
from corral.services import Services

EXEC_PATH = re.compile(r"/v1/sandboxes/([^/]+)/exec")
JSON_TYPE = b"application/json"


class ExecFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The route the router would have taken (it sets the same object in the scope).
        self.route = next(
            r
            for r in commands.router.routes
            if getattr(r, "endpoint", None) is commands.exec_command
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = EXEC_PATH.fullmatch(scope["path"])
        if match is None or not _json_body(scope):
            await self.app(scope, receive, send)
            return
        body, replay = await _read_body(receive)
        if body is None:  # the client went away, or a chunk was refused: the route's to answer
            await self.app(scope, replay, send)
            return
        try:
            req = ExecRequest.model_validate_json(body)
        except pydantic.ValidationError:
            await self.app(scope, replay, send)  # the route's 400 or 422, details and all
            return
        services: Services | None = getattr(scope["app"].state, "services", None)
        if services is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = self.route
        scope["endpoint"] = commands.exec_command
        scope["path_params"] = {"sandbox": match.group(1)}
        request = Request(scope, replay)
        try:
            caller = await get_principal(request)
            caller.require(TokenScope.exec)
            row = await running_sandbox(services, caller, match.group(1))
            command = await services.commands.run(row, req)
        except CorralError as exc:
            problem = Problem.of(exc)
            assert problem is not None
            await problem_response(request, problem)(scope, replay, send)
            return
        data = command.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(data)).encode()),
                    (b"content-type", JSON_TYPE),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


def _json_body(scope: Scope) -> bool:
    """A JSON content type (parameters allowed), as the route requires."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == JSON_TYPE
    return False


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole body, and a `receive` that hands the same messages to whoever reads next."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    complete = False
    error: Exception | None = None
    try:
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete = True
                break
    except Exception as exc:  # e.g. the body limit: raised again to the route, which answers it
        error = exc

    async def replay() -> Message:
        nonlocal error
        if messages:
            return messages.pop(0)
        if error is not None:
            exc, error = error, None
            raise exc
        return await receive()

    return (b"".join(chunks) if complete else None), replay
