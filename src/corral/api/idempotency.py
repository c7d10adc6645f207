"""`Idempotency-Key` on the native creates and command starts (core/idempotency.py keeps the
keys).

A request with the header is claimed under its token and key before the route runs; the route's
answer is kept for 24 hours and replayed (status, body and headers, plus
`Idempotent-Replayed: true`) to every retry with the same key and the same request. The same
key with another method, path or body is 422; a retry that comes while the first request is
still being answered waits for it (up to WAIT_SECONDS, then 409 with Retry-After). Answers that
made nothing (any 4xx or 5xx before the resource was stored) free the key instead, so that a
retry does the work. A request without a token (or with an unknown one) passes through: its
route answers 401.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from fastapi.encoders import jsonable_encoder
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.auth import token_from_request
from corral.api.console.session import COOKIE
from corral.api.errors import Problem, problem_response
from corral.core import idempotency
from corral.core.errors import CorralError

if TYPE_CHECKING:
    from corral.services import Services

HEADER = "idempotency-key"
REPLAYED = "idempotent-replayed"
WAIT_SECONDS = 30.0
MAX_KEPT_BODY = 4 * 1024 * 1024  # larger answers are answered again from their resource
# POST routes that make something: the native creates and command starts.
ROUTES: tuple[re.Pattern[str], ...] = (
    re.compile(r"/v1/sandboxes"),
    re.compile(r"/v1/sandboxes/[^/]+/(exec|commands|run|snapshots|fork)"),
    re.compile(r"/v1/(tokens|volumes|webhooks)"),
)
# Answer headers a replay leaves out: they belong to the one response, or to the caller.
NOT_KEPT = {"content-length", "date", "server", "set-cookie", "x-request-id"}
NOT_KEPT_PREFIXES = ("x-ratelimit-",)


class Idempotency:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = _header(scope, HEADER.encode())
        if key is None or not any(p.fullmatch(scope["path"]) for p in ROUTES):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not idempotency.valid_key(key):
            problem = Problem(
                400,
                "invalid_idempotency_key",
                f"{HEADER.title()} must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII "
                "characters",
            )
            await problem_response(request, problem)(scope, receive, send)
            return
        services: Services = scope["app"].state.services
        secret = token_from_request(request) or request.cookies.get(COOKIE)
        token_id = await services.tokens.identify(secret)
        if token_id is None:
            await self.app(scope, receive, send)  # the route refuses it
            return
        try:
            body = await _read_body(receive)
        except HTTPException as exc:
            problem = Problem.of(exc)
            assert problem is not None
            await problem_response(request, problem)(scope, receive, send)
            return
        replay = _replay_receive(body, receive)
        print_ = idempotency.fingerprint(
            scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), body
        )
        sealer = idempotency.answer_key(secret or "")
        try:
            response = await self._answer(
                services, scope, replay, send, token_id, key, print_, sealer
            )
        except CorralError as exc:
            problem = Problem.of(exc)
            assert problem is not None
            response = problem_response(request, problem)
        if response is not None:
            await response(scope, replay, send)

    async def _answer(
        self,
        services: Services,
        scope: Scope,
        receive: Receive,
        send: Send,
        token_id: str,
        key: str,
        print_: str,
        sealer: bytes,
    ) -> Response | None:
        """Run the route under a claim of the key (None: it has answered), or the answer the
        key holds already."""
        keys = services.idempotency
        request = Request(scope)
        for _ in range(2):
            got = await keys.claim(token_id, key, print_, scope["method"], scope["path"])
            if isinstance(got, idempotency.Claim):
                await self._run(services, got, scope, receive, send, sealer)
                return None
            if got.kind == "mismatch":
                return problem_response(
                    request,
                    Problem(
                        422,
                        "idempotency_key_reused",
                        f"this {HEADER.title()} was used for another request (method, path or "
                        "body differs); use a new key",
                    ),
                )
            if got.kind == "replay" and got.row.body is not None:
                body = idempotency.unseal(sealer, got.row.body)
                if body is not None:
                    return _stored(got.row.status_code or 200, got.row.headers or [], body)
            if got.kind in ("replay", "orphan") and got.row.resource_kind in RESOURCES:
                return await _from_resource(services, keys, got.row, sealer)
            if got.kind == "replay":
                return problem_response(
                    request,
                    Problem(
                        409,
                        "idempotency_answer_unavailable",
                        f"the request with this {HEADER.title()} was done, but its answer was "
                        f"too large to keep (over {MAX_KEPT_BODY} bytes); look the result up",
                    ),
                )
            waited = await keys.wait(token_id, key, WAIT_SECONDS)
            if (
                waited is not None
                and waited.state == idempotency.PENDING
                and (await keys.alive(waited.owner))
            ):
                break  # still in flight after the wait
        return problem_response(
            request,
            Problem(
                409,
                "idempotency_in_flight",
                f"a request with this {HEADER.title()} is still being answered; retry",
                headers={"Retry-After": "1"},
            ),
        )

    async def _run(
        self,
        services: Services,
        claim: idempotency.Claim,
        scope: Scope,
        receive: Receive,
        send: Send,
        sealer: bytes,
    ) -> None:
        status = 0
        headers: list[list[str]] = []
        chunks: list[bytes] = []
        size = 0

        async def capture(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    text = name.decode("latin-1").lower()
                    if text not in NOT_KEPT and not text.startswith(NOT_KEPT_PREFIXES):
                        headers.append([text, value.decode("latin-1")])
            elif message["type"] == "http.response.body":
                part = message.get("body", b"")
                size += len(part)
                if size <= MAX_KEPT_BODY:
                    chunks.append(part)
            await send(message)

        token = idempotency.enter(claim)
        try:
            await self.app(scope, receive, capture)
        finally:
            idempotency.leave(token)
            made = claim.resource is not None
            if status and (200 <= status < 300 or made):
                body = b"".join(chunks) if size <= MAX_KEPT_BODY else None
                if body is None and not made:
                    await services.idempotency.release(claim)
                else:
                    sealed = None if body is None else idempotency.seal(sealer, body)
                    await services.idempotency.finish(claim, status, headers, sealed)
            elif made:
                # Stored, never answered (the route failed after the create): retries are
                # answered from the resource.
                await services.idempotency.finish(claim, 0, [], None)
            else:
                await services.idempotency.release(claim)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay_receive(body: bytes, receive: Receive) -> Receive:
    """The body read already, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _stored(status: int, headers: list[list[str]], body: bytes) -> Response:
    response = Response(body, status_code=status)
    for name, value in headers:
        if name != "content-type":
            response.headers.append(name, value)
        else:
            response.headers[name] = value
    response.headers[REPLAYED] = "true"
    return response


# What a key's resource is answered as when its first answer was never kept: the status its
# create answers, and the resource as its GET shows it now.
async def _sandbox(services: Services, resource_id: str) -> tuple[int, Any]:
    return 201, await services.sandboxes.get(resource_id)


RESOURCES = {"sandbox": _sandbox}


async def _from_resource(
    services: Services, keys: idempotency.IdempotencyKeys, row: Any, sealer: bytes
) -> Response:
    render = RESOURCES.get(row.resource_kind or "")
    if render is None or row.resource_id is None:
        raise CorralError("the first answer to this key was not kept")  # cannot happen
    status, model = await render(services, row.resource_id)
    body = json.dumps(jsonable_encoder(model), separators=(",", ":")).encode()
    headers = [["content-type", "application/json"]]
    claim = idempotency.Claim(row.token_id, row.key, (row.resource_kind, row.resource_id))
    await keys.finish_orphan(claim, row.owner, status, headers, idempotency.seal(sealer, body))
    return _stored(status, headers, body)
