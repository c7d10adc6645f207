"""Watching the server: for every request, its Prometheus counts, one structured log line and,
for a call that changes state, an audit entry; and `GET /metrics`.

`Observe` is a raw ASGI layer in front of the API (inside the port proxy, whose relayed
requests are the sandboxes' own traffic, not the API's). It gives each request its id
(`X-Request-Id`: the client's, when it is a plain token of at most 128 characters, else a new
one), notes the caller that authentication found (core/tokens.py `CALLER`), and once the answer
is sent:
- counts it by method, route template and status (never the raw path: ids would make a series
  each);
- logs one line on `corral.request` (request_id, method, route, path with its secrets masked,
  status, duration_ms, token_id, client), JSON or text as CORRAL_LOG_FORMAT says;
- for POST, PUT, PATCH and DELETE, and a WebSocket that starts a command, hands an audit entry
  to the audit log (core/audit.py), which stores it in the background.

What is derived from a route (its template, face, action and target parameter) is computed once
per route and cached: the per-request cost is a few dict lookups, two metric updates, a log line
when the level allows it, and for a change an entry appended to a queue. No store query.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from fastapi import APIRouter, Request, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.auth import get_principal, get_services
from corral.core.errors import PermissionDenied, Unauthenticated
from corral.core.metrics import CONTENT_TYPE_LATEST
from corral.core.models import Scope as TokenScope
from corral.core.tokens import CALLER, CallerNote
from corral.redaction import Redactor

CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNROUTED = "(unrouted)"  # the route label of a request no route took (a 404, a 413 ...)
CLIENT_GONE = 499  # the status of a request whose client left before any answer (nginx's)
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
MAX_CAPTURE = 64 * 1024  # of a create's answer, read for the new object's id

# Actions named otherwise than the route's shape says (see `derive_action`), by face (None:
# the native API), method and route template.
ACTIONS: dict[tuple[str | None, str, str], str] = {
    (None, "POST", "/v1/sandboxes/{sandbox}/exec"): "command.exec",
    (None, "POST", "/v1/sandboxes/{sandbox}/commands"): "command.start",
    (None, "POST", "/v1/sandboxes/{sandbox}/run"): "code.run",
    (None, "DELETE", "/v1/tokens/{token_id}"): "token.revoke",
    (None, "PUT", "/v1/sandboxes/{sandbox}/files"): "file.write",
    (None, "DELETE", "/v1/sandboxes/{sandbox}/files"): "file.delete",
    (None, "PUT", "/v1/sandboxes/{sandbox}/archive"): "file.upload",
    ("cmdio", "POST", "/run/{user}/{command}"): "cmdio.command.run",
    ("e2b", "POST", "/e2b/envd/{service}/{method}"): "e2b.envd.call",
    ("console", "POST", "/console/api/session"): "console.session.create",
    ("console", "DELETE", "/console/api/session"): "console.session.delete",
}
# WebSockets that start a command (the others watch one, or relay a port: not audited).
WEBSOCKET_ACTIONS: dict[str, str] = {
    "/v1/sandboxes/{sandbox}/exec/stream": "command.start",
    "/v1/runtimes/{runtime}/exec/stream": "runta.command.start",
    "/v2/runtimes/{runtime}/exec/stream": "runta.command.start",
    "/run/{user}/{command}": "cmdio.command.run",
}
# Keys of a create's answer that hold the new object's id, in the native shape or a face's.
ID_KEYS = ("id", "sandbox_id", "sandboxID", "sandboxId", "vm_id", "runtime_id", "token_id")

request_log = logging.getLogger("corral.request")


@dataclass(frozen=True)
class RouteFacts:
    template: str
    face: str | None  # None: the native API
    action: str | None  # None: not audited
    target_param: str | None  # the path parameter that names the target


def plural(word: str) -> bool:
    return len(word) > 2 and word.endswith("s") and not word.endswith("ss") and "-" not in word


def singular(word: str) -> str:
    if not plural(word):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("xes", "shes", "sses")):
        return word[:-2]
    return word[:-1]


def derive_action(method: str, template: str, face: str | None) -> str:
    """`resource.verb` from a route's shape: `POST /v1/sandboxes` is sandbox.create, `DELETE
    /v1/sandboxes/{sandbox}` sandbox.delete, `POST /v1/sandboxes/{sandbox}/stop` sandbox.stop,
    `POST /v1/images/import` image.import; a face's actions are prefixed with its name
    (`vercel.sandbox.create`). Exceptions are in ACTIONS."""
    named = ACTIONS.get((face, method, template))
    if named is not None:
        return named
    parts = [p for p in template.strip("/").split("/") if p and not re.fullmatch(r"v\d+", p)]
    if face is not None and parts and parts[0] == face:
        parts = parts[1:]
    literals = [(i, p) for i, p in enumerate(parts) if not p.startswith("{")]
    verb = {"DELETE": "delete", "PUT": "update", "PATCH": "update"}.get(method, "create")
    if not literals:
        resource = "resource"
    else:
        last_index, last = literals[-1]
        ends_with_param = last_index < len(parts) - 1
        if ends_with_param or plural(last) or len(literals) == 1:
            resource = singular(last)  # a collection, or an item of one
        else:
            # `.../{id}/stop` or `images/import`: the verb on what comes before it.
            resource = singular(literals[-2][1]) if len(literals) > 1 else "resource"
            verb = last if method == "POST" else f"{last}.{verb}"
    action = f"{resource}.{verb}".replace("-", "_")
    return f"{face}.{action}" if face is not None else action


def route_facts(route: Any, method: str, websocket: bool) -> RouteFacts:
    path = getattr(route, "path", None)
    if path is None:
        return RouteFacts(UNROUTED, None, None, None)
    template = re.sub(r"{([^}:]+):[^}]*}", r"{\1}", path)  # `{image:path}` is `{image}`
    if isinstance(route, Mount):
        template += "/{path}"
    module = getattr(getattr(route, "endpoint", None), "__module__", "") or ""
    face: str | None = None
    if module.startswith("corral.api.faces."):
        face = module.split(".")[3]
    elif module.startswith("corral.api.console"):
        face = "console"
    params = re.findall(r"{([^}:]+)", template)
    target = params[0] if params else None
    if websocket:
        action = WEBSOCKET_ACTIONS.get(template)
    elif method in CHANGING:
        action = derive_action(method, template, face)
    else:
        action = None
    return RouteFacts(template, face, action, target)


def created_id(body: bytes) -> str | None:
    """The id in a create's JSON answer: at its top, or in an object one level down."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    for candidate in (data, *(v for v in data.values() if isinstance(v, dict))):
        for key in ID_KEYS:
            value = candidate.get(key)
            if isinstance(value, str) and value:
                return value[:200]
    return None


class Observe:
    def __init__(
        self,
        app: ASGIApp,
        *,
        redactor: Redactor | None = None,
        log_format: str = "json",
        stream: TextIO | None = None,
    ) -> None:
        self.app = app
        self.redact = redactor or Redactor()
        self._facts: dict[tuple[int, str, bool], RouteFacts] = {}
        self._routes: dict[int, Any] = {}  # keeps the routes behind the ids above alive
        # Rendered by structlog's processors and written straight to standard output (where
        # uvicorn's access log went): neither the logging module's handlers nor a bound
        # logger's context on the way, which cost several times the line itself. Whether a
        # line is written follows the level of logger `corral.request`; what it holds is
        # masked here (the path) or is not the client's to choose (ids, numbers, templates).
        self.out = stream or sys.stdout
        renderer: Any = (
            structlog.processors.JSONRenderer(ensure_ascii=False)
            if log_format == "json"
            else structlog.dev.ConsoleRenderer(colors=self.out.isatty(), sort_keys=False)
        )
        self.render = [structlog.processors.TimeStamper(fmt="iso", utc=True), renderer]

    def facts(self, scope: Scope) -> RouteFacts:
        route = scope.get("route")
        websocket = scope["type"] == "websocket"
        method = "GET" if websocket else scope["method"]
        key = (id(route), method, websocket)
        facts = self._facts.get(key)
        if facts is None:
            facts = self._facts[key] = route_facts(route, method, websocket)
            self._routes[id(route)] = route
        return facts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._client_request_id(scope) or "req_" + os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        note = CallerNote()
        reset = CALLER.set(note)
        websocket = scope["type"] == "websocket"
        status = 0
        capture: list[bytes] | None = None
        header_id = request_id.encode()
        changing = not websocket and scope["method"] in CHANGING
        audited = False

        async def observed_send(message: Message) -> None:
            nonlocal status, capture, audited
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", header_id)]
                if changing and status < 300 and "{" not in self.facts(scope).template:
                    capture = []  # a create on a collection: its answer names the new object
            elif kind == "http.response.body" and capture is not None:
                if sum(map(len, capture)) < MAX_CAPTURE:
                    capture.append(message.get("body", b""))
            elif kind == "websocket.accept":
                status = 101
                # A session that starts a command is audited as it starts, not when it ends.
                try:
                    audited = self._audit(scope, status, note, request_id, None, None)
                except Exception:  # never let watching fail a session
                    request_log.exception("could not audit request %s", request_id)
            elif kind == "websocket.http.response.start":
                status = message["status"]  # a handshake refused with an HTTP answer
            elif kind == "websocket.close" and status == 0:
                status = 403  # refused before it was accepted
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException as exc:
            if status == 0:  # a client that left cancels its request; anything else is a 500
                status = CLIENT_GONE if isinstance(exc, asyncio.CancelledError) else 500
            raise
        finally:
            CALLER.reset(reset)
            try:
                path = self._done(scope, status, time.perf_counter() - started, note, request_id)
                if not audited:
                    self._audit(scope, status, note, request_id, capture, path)
            except Exception:  # never let watching fail a request
                request_log.exception("could not record request %s", request_id)

    def _done(
        self, scope: Scope, status: int, seconds: float, note: CallerNote, request_id: str
    ) -> str | None:
        """Count the request and write its log line; the masked path, if it was needed."""
        facts = self.facts(scope)
        method = "WS" if scope["type"] == "websocket" else scope["method"]
        services = getattr(scope["app"].state, "services", None)
        if services is None:  # before start-up or after shutdown
            return None
        status = status or CLIENT_GONE
        services.metrics.request(method, facts.template, status, seconds)
        client = scope.get("client")
        address = client[0] if client else None
        path: str | None = None
        if request_log.isEnabledFor(logging.INFO):
            path = self._path(scope)
            line: Any = {
                "event": "request",
                "level": "info",
                "request_id": request_id,
                "method": method,
                "route": facts.template,
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "token_id": note.token_id,
                "client": address,
            }
            for processor in self.render:
                line = processor(None, "info", line)
            self.out.write(line + "\n")
            self.out.flush()
        return path

    def _audit(
        self,
        scope: Scope,
        status: int,
        note: CallerNote,
        request_id: str,
        capture: list[bytes] | None,
        path: str | None,
    ) -> bool:
        """Hand the request's audit entry to the audit log, if it is audited; whether it was."""
        facts = self.facts(scope)
        services = getattr(scope["app"].state, "services", None)
        if facts.action is None or services is None or services.audit is None:
            return False
        client = scope.get("client")
        target = None
        if facts.target_param is not None:
            target = str(scope.get("path_params", {}).get(facts.target_param, ""))[:200] or None
        elif capture:
            target = created_id(b"".join(capture))
        services.audit.record(
            at=datetime.now(UTC),
            token_id=note.token_id,
            token_name=note.token_name,
            action=facts.action,
            target=target,
            method="GET" if scope["type"] == "websocket" else scope["method"],
            path=path if path is not None else self._path(scope),
            status=status or CLIENT_GONE,
            address=client[0] if client else None,
            request_id=request_id,
        )
        return True

    def _client_request_id(self, scope: Scope) -> str | None:
        """The client's X-Request-Id, if it is a plain token and holds nothing secret-like."""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if CLIENT_REQUEST_ID.fullmatch(text) and self.redact(text) == text:
                    return text
                return None
        return None

    def _path(self, scope: Scope) -> str:
        path = scope.get("root_path", "") + scope["path"]
        query = scope.get("query_string", b"")
        if query:
            path += "?" + query.decode("latin-1")
        return self.redact(path)[:2000]


# --- GET /metrics ---

router = APIRouter(tags=["system"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    """This process's series in Prometheus text format (docs/operations.md lists them). Read by
    the admin key or a token with the `metrics` scope; CORRAL_METRICS_TOKEN may open it to a
    bearer of its value, or to anyone (`public`)."""
    services = get_services(request)
    await _may_read_metrics(request)
    counts = await services.sandboxes.count_by_state_and_node()
    services.metrics.refresh(counts, services.sandboxes.warm_count)
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _may_read_metrics(request: Request) -> None:
    setting = get_services(request).settings.metrics_token
    if setting == "public":
        return
    if setting:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), setting.encode()
        ):
            return
    try:
        caller = await get_principal(request)
    except Unauthenticated:
        raise Unauthenticated("a token with the metrics scope is required") from None
    if not caller.is_admin and TokenScope.metrics not in caller.scopes:
        raise PermissionDenied("this token lacks the 'metrics' scope")
