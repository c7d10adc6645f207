"""The port proxy: a raw ASGI layer in front of the API that serves an exposed port of a sandbox.

Two URL forms reach port P of sandbox S (its id or its name):
- the path form `/v1/sandboxes/S/ports/P/<path>`: the sandbox's service sees `/<path>`, and an
  `X-Forwarded-Prefix` header with what was cut;
- the host form `Host: P-S.<CORRAL_PUBLIC_DOMAIN>` on the server's own port: the whole path goes
  to the service. In a host name the id's underscore may be a hyphen (`8080-sb-0123...`).

Authentication (none for a port exposed `public`; then everything the client sent passes):
- a token in `Authorization` (Bearer or Basic username) or `X-API-Key`, with the `exec` scope
  and a limit that covers the sandbox; it is not passed on to the sandbox;
- `?access_token=T` or a signed URL (`?corral_expires=&corral_signature=`, see core/ports.py) on
  a first visit: the answer is a redirect to the same URL without them, setting an HttpOnly
  cookie `corral_port`, scoped to that host (host form) or to the port's path (path form);
- that cookie, on later visits. Corral's parameters and cookies (the console's and faces'
  too) never reach the sandbox, and its service cannot set them. Path-form answers carry
  `Content-Security-Policy: sandbox ...`: such a page shares the API's origin, so it is made to
  run in an opaque one.

HTTP is relayed one request per connection to the service (h11 as the client), both bodies
streamed in pieces with back-pressure both ways: the server never holds more than a few pieces
of a body. WebSocket is relayed frame by frame (websockets' sans-I/O client towards the service),
messages up to CORRAL_WS_MAX_FRAME_BYTES. A port nothing listens on answers 502 at once.
Errors are the native error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import h11
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Opcode
from websockets.http11 import Response as WsResponse
from websockets.uri import parse_uri

from corral.api.auth import may_use
from corral.api.console.session import COOKIE as CONSOLE_COOKIE
from corral.api.faces.rundatsheesh.vms import COOKIE as RDS_COOKIE
from corral.core.errors import (
    BadGateway,
    CorralError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from corral.core.models import Scope
from corral.core.ports import EXPIRES_PARAM, SIGNATURE_PARAM
from corral.core.sandboxes import no_sandbox
from corral.core.tokens import Principal
from corral.node.base import PortStream
from corral.store.tables import SandboxRow

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PATH_FORM = re.compile(r"^/v1/sandboxes/([^/]+)/ports/([^/]+)(/.*)?$", re.DOTALL)
COOKIE = "corral_port"
# Every cookie the server itself reads (the port's, the console's, run-dat-sheesh's session): a
# sandbox's service never sees them, public port or not, and may not set them either (a page
# served in the path form shares the API's origin; one in the host form, its parent domain).
SERVER_COOKIES = frozenset({COOKIE, CONSOLE_COOKIE, RDS_COOKIE})
# A path-form page runs in an opaque origin: its scripts cannot read the API's cookies or call
# it with them. The host form is the one for pages that need an origin of their own.
PATH_FORM_CSP = (
    b"sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads "
    b"allow-pointer-lock allow-presentation"
)
SIGNED_COOKIE_PREFIX = "s."
TOKEN_PARAM = "access_token"
OWN_PARAMS = frozenset({TOKEN_PARAM, EXPIRES_PARAM, SIGNATURE_PARAM})
READ_SIZE = 1 << 18
MAX_RESPONSE_HEAD = 64 * 1024
# Not passed on either way: they describe one hop, not the exchange.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the proxy itself, never taken from the client.
FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"}
)
WS_HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
    }
)


@dataclass
class Target:
    ref: str  # the sandbox, as the URL names it
    port_text: str
    path: str  # raw path (and query) for the service
    prefix: str  # what the path form cut ("" for the host form)
    host_form: bool
    cookie_path: str


@dataclass
class Grant:
    """How the caller was let in."""

    principal: Principal | None = None  # a token's (None: public, or a signed URL)
    consumed_headers: frozenset[bytes] = frozenset()  # Corral's credentials: not passed on
    first_visit: str | None = None  # a cookie value to set, with a redirect
    max_age: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PortProxy:
    """ASGI middleware: requests for a sandbox port go to the sandbox, the rest to `app`."""

    def __init__(self, app: Any, *, public_domain: str | None) -> None:
        self.app = app
        self.domain = public_domain.split(":", 1)[0] if public_domain else None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            target = self.target(scope)
            if target is not None:
                await Exchange(scope, receive, send, target).run()
                return
        await self.app(scope, receive, send)

    def target(self, scope: dict[str, Any]) -> Target | None:
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        if self.domain is not None:
            host = header(scope, b"host")
            if host is not None:
                name = host.decode("latin-1").rsplit(":", 1)[0].lower().rstrip(".")
                if name.endswith("." + self.domain):
                    label = name[: -len(self.domain) - 1]
                    port, dash, ref = label.partition("-")
                    if "." not in label and dash and ref:
                        return Target(ref, port, with_query(raw, query), "", True, "/")
        match = PATH_FORM.match(raw)
        if match is None:
            return None
        if match.group(3) is None:
            # `.../ports/P` itself: a browser is sent on to `.../ports/P/`; the rest is the API's
            # (DELETE unexposes the port).
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                return Target(unquote(match.group(1)), unquote(match.group(2)), "", raw, False, "")
            return None
        prefix = raw[: match.start(3)]
        return Target(
            unquote(match.group(1)),
            unquote(match.group(2)),
            with_query(match.group(3), query),
            prefix,
            False,
            prefix + "/",
        )


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def with_query(path: str, query: str) -> str:
    return path + "?" + query if query else path


def query_values(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        values.setdefault(unquote(key.replace("+", " ")), unquote(value.replace("+", " ")))
    return values


def without_own_params(target: str) -> str:
    path, _, query = target.partition("?")
    kept = [
        part
        for part in (query.split("&") if query else ())
        if unquote(part.partition("=")[0]) not in OWN_PARAMS
    ]
    return with_query(path, "&".join(kept))


def cookie_values(scope: dict[str, Any]) -> list[str]:
    found = []
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, content = part.strip().partition("=")
                if name == COOKIE:
                    found.append(unquote(content))
    return found


def without_own_cookie(value: bytes) -> bytes | None:
    parts = [
        part.strip()
        for part in value.decode("latin-1").split(";")
        if part.strip() and part.strip().partition("=")[0].strip() not in SERVER_COOKIES
    ]
    return "; ".join(parts).encode("latin-1") if parts else None


def sets_server_cookie(value: bytes) -> bool:
    """Whether a Set-Cookie header names one of the server's own cookies."""
    name = value.decode("latin-1").partition("=")[0].strip()
    return name.removeprefix("__Host-").removeprefix("__Secure-") in SERVER_COOKIES


def token_of_headers(scope: dict[str, Any]) -> tuple[str | None, frozenset[bytes]]:
    """A Corral token in Authorization (Bearer, Basic username) or X-API-Key."""
    value = header(scope, b"authorization")
    if value:
        scheme, _, rest = value.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip(), frozenset({b"authorization"})
        if scheme.lower() == "basic":
            try:
                user = base64.b64decode(rest.strip(), validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                user = ""
            if user:
                return user, frozenset({b"authorization"})
    key = header(scope, b"x-api-key")
    if key and key.strip():
        return key.decode("latin-1").strip(), frozenset({b"x-api-key"})
    return None, frozenset()


class Exchange:
    """One request (or WebSocket) for a sandbox port."""

    def __init__(self, scope: dict[str, Any], receive: Receive, send: Send, target: Target):
        self.scope = scope
        self.receive = receive
        self.send = send
        self.target = target
        self.services = scope["app"].state.services
        self.websocket = scope["type"] == "websocket"
        self.started = False  # an HTTP answer (or the WebSocket) has begun
        self.request_id = "req_" + os.urandom(8).hex()

    async def run(self) -> None:
        if self.websocket:
            message = await self.receive()
            if message["type"] != "websocket.connect":
                return
        if not self.target.path:
            query = self.scope.get("query_string", b"").decode("latin-1")
            await self._redirect_to(with_query(self.target.prefix + "/", query), [])
            return
        try:
            row, port, grant = await self._admit()
            if grant.first_visit is not None and not self.websocket:
                await self._redirect(grant)
                return
            with contextlib.ExitStack() as stack:
                lease = None
                if grant.principal is not None:
                    lease = stack.enter_context(self.services.tokens.lease(grant.principal))
                async with self.services.ports.connect(row, port) as stream:
                    if self.websocket:
                        await WebSocketRelay(self, stream, grant, port).run(lease)
                    else:
                        await HttpRelay(self, stream, grant).run()
        except CorralError as exc:
            await self.refuse(exc)
        except (h11.ProtocolError, ConnectionError) as exc:
            await self.refuse(BadGateway(f"the sandbox's service broke the connection: {exc}"))

    async def _admit(self) -> tuple[SandboxRow, int, Grant]:
        target = self.target
        text = target.port_text
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise InvalidArgument(f"port must be a number from 1 to 65535, not {text[:20]!r}")
        port = int(text)
        row = await self._sandbox(target.ref)
        exposed = await self.services.ports.exposed(row.id, port)
        if exposed is None:
            raise NotFound(f"port {port} of sandbox {target.ref!r} is not exposed")
        if exposed.public:
            # No credentials are looked at: everything the client sent is the service's
            # business, save Corral's own parameters and cookie (removed on the way).
            return row, port, Grant()
        return row, port, await self._authenticate(row, port)

    async def _sandbox(self, ref: str) -> SandboxRow:
        try:
            return await self.services.sandboxes.row(ref)
        except NotFound:
            if self.target.host_form and ref.startswith("sb-"):
                return await self.services.sandboxes.row("sb_" + ref[3:])
            raise

    async def _authenticate(self, row: SandboxRow, port: int) -> Grant:
        """The caller's grant to a private port, by the first credential it gave."""
        query = query_values(self.scope.get("query_string", b"").decode("latin-1"))
        token, consumed = token_of_headers(self.scope)
        if token is not None:
            return Grant(await self._principal(token, row), consumed)
        if TOKEN_PARAM in query:
            principal = await self._principal(query[TOKEN_PARAM], row)
            return Grant(principal, first_visit=query[TOKEN_PARAM])
        if EXPIRES_PARAM in query or SIGNATURE_PARAM in query:
            expires = query.get(EXPIRES_PARAM, "")
            signature = query.get(SIGNATURE_PARAM, "")
            if not self.services.ports.signature_valid(row.id, port, expires, signature):
                raise Unauthenticated("the signed URL is invalid or has expired")
            left = int(expires) - int(time.time())
            return Grant(first_visit=f"{SIGNED_COOKIE_PREFIX}{expires}.{signature}", max_age=left)
        cookies = cookie_values(self.scope)
        if not cookies:
            raise Unauthenticated(
                "a token is required (Authorization, ?access_token= or a signed URL)"
            )
        last: CorralError = Unauthenticated("invalid or expired token")
        for value in cookies:  # a path form may carry several (a parent path's too)
            try:
                if value.startswith(SIGNED_COOKIE_PREFIX):
                    expires, _, signature = value[len(SIGNED_COOKIE_PREFIX) :].partition(".")
                    if self.services.ports.signature_valid(row.id, port, expires, signature):
                        return Grant()
                    last = Unauthenticated("the signed URL is invalid or has expired")
                    continue
                return Grant(await self._principal(value, row))
            except CorralError as exc:
                last = exc
        raise last

    async def _principal(self, token: str, row: SandboxRow) -> Principal:
        principal: Principal = await self.services.tokens.authenticate(token)
        principal.require(Scope.exec)
        if not may_use(principal, row):
            raise no_sandbox(self.target.ref)
        return principal

    async def _redirect(self, grant: Grant) -> None:
        target = self.target
        location = target.prefix + without_own_params(target.path)
        cookie = f"{COOKIE}={quote(grant.first_visit or '', safe='')}; Path={target.cookie_path}"
        cookie += "; HttpOnly; SameSite=Lax"
        if grant.max_age is not None:
            cookie += f"; Max-Age={max(grant.max_age, 0)}"
        secure = self.scope.get("scheme") in ("https", "wss") or (
            target.host_form and self.services.settings.public_scheme == "https"
        )
        if secure:
            cookie += "; Secure"
        await self._redirect_to(location, [(b"set-cookie", cookie.encode("latin-1"))])

    async def _redirect_to(self, location: str, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 303 if self.scope["method"] not in ("GET", "HEAD") else 302,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    *headers,
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                    (b"x-request-id", self.request_id.encode()),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": b""})

    async def refuse(self, exc: CorralError) -> None:
        body = json.dumps(
            {
                "error": {"code": exc.code, "message": exc.message, "details": exc.details},
                "request_id": self.request_id,
            },
            separators=(",", ":"),
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.request_id.encode()),
        ]
        if exc.status == 429:
            headers.append((b"retry-after", b"1"))
        if self.websocket:
            if self.started:
                with contextlib.suppress(Exception):
                    await self.send({"type": "websocket.close", "code": 1011})
                return
            if "websocket.http.response" in self.scope.get("extensions", {}):
                await self.send(
                    {
                        "type": "websocket.http.response.start",
                        "status": exc.status,
                        "headers": headers,
                    }
                )
                await self.send({"type": "websocket.http.response.body", "body": body})
            else:
                await self.send({"type": "websocket.close", "code": 1008})
            return
        if self.started:
            return  # the answer is under way: the connection is cut instead
        self.started = True
        await self.send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def forwarded_headers(self, grant: Grant, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
        """The client's headers for the service: without hop-by-hop ones, Corral's credentials
        and cookie, with X-Forwarded-* set by the proxy."""
        scope = self.scope
        listed: set[bytes] = set()
        for key, value in scope.get("headers", ()):
            if key == b"connection":
                listed |= {v.strip().lower() for v in bytes(value).split(b",")}
        skip = HOP_BY_HOP | FORWARDED | drop | grant.consumed_headers | listed
        out: list[tuple[bytes, bytes]] = []
        for key, value in scope.get("headers", ()):
            if key in skip:
                continue
            if key == b"cookie":
                kept = without_own_cookie(bytes(value))
                if kept is not None:
                    out.append((key, kept))
                continue
            out.append((bytes(key), bytes(value)))
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", str(client[0]).encode()))
        proto = scope.get("scheme", "http")
        out.append(
            (b"x-forwarded-proto", {"ws": "http", "wss": "https"}.get(proto, proto).encode())
        )
        host = header(scope, b"host")
        if host is not None:
            out.append((b"x-forwarded-host", host))
        if self.target.prefix:
            out.append((b"x-forwarded-prefix", self.target.prefix.encode("latin-1")))
        return out


class ClientGone(Exception):
    pass


class HttpRelay:
    """One HTTP request to the service and its answer, both streamed."""

    def __init__(self, exchange: Exchange, stream: PortStream, grant: Grant) -> None:
        self.exchange = exchange
        self.stream = stream
        self.grant = grant
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)

    async def run(self) -> None:
        ex = self.exchange
        scope = ex.scope
        # Expect: 100-continue is the server's to answer (it does on the first read).
        headers = ex.forwarded_headers(self.grant, frozenset({b"content-length", b"expect"}))
        length = header(scope, b"content-length")
        chunked = any(
            key == b"transfer-encoding" and b"chunked" in value.lower()
            for key, value in scope.get("headers", ())
        )
        if length is not None:
            headers.append((b"content-length", length))
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        headers.append((b"connection", b"close"))
        if header(scope, b"host") is None:
            headers.append((b"host", b"127.0.0.1"))
        target = without_own_params(ex.target.path).encode("latin-1")
        request = h11.Request(method=scope["method"], target=target, headers=headers)
        await self.stream.write(self.conn.send(request))
        body = asyncio.create_task(self._request_body(length is not None or chunked))
        answer = asyncio.create_task(self._response())
        try:
            done, _ = await asyncio.wait({body, answer}, return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                answer.result()
                return
            error = body.exception()
            if isinstance(error, ClientGone):
                return  # nobody to answer
            if error is not None:
                raise error
            await answer
        finally:
            for task in (body, answer):
                task.cancel()
            await asyncio.gather(body, answer, return_exceptions=True)

    async def _request_body(self, has_body: bool) -> None:
        """The client's body to the service, then a watch for the client going away."""
        more = has_body
        while more:
            message = await self.exchange.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            data = message.get("body", b"")
            more = message.get("more_body", False)
            if data:
                await self.stream.write(self.conn.send(h11.Data(data=data)))
        if has_body:
            await self.stream.write(self.conn.send(h11.EndOfMessage()))
        else:
            self.conn.send(h11.EndOfMessage())
        while True:
            message = await self.exchange.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone

    async def _event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.read(READ_SIZE)
            self.conn.receive_data(data)

    async def _response(self) -> None:
        ex = self.exchange
        while True:
            event = await self._event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                break
            raise BadGateway("the sandbox's service closed the connection without an answer")
        headers = [
            (bytes(key), bytes(value))
            for key, value in event.headers
            # uvicorn sets its own Date and Server: two of each would confuse clients.
            if key not in HOP_BY_HOP and key not in (b"x-request-id", b"date", b"server")
            and not (key == b"set-cookie" and sets_server_cookie(bytes(value)))
        ]  # fmt: skip
        headers.append((b"x-request-id", ex.request_id.encode()))
        if ex.target.prefix:
            headers.append((b"content-security-policy", PATH_FORM_CSP))
        ex.started = True
        await ex.send(
            {"type": "http.response.start", "status": event.status_code, "headers": headers}
        )
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                await ex.send(
                    {"type": "http.response.body", "body": bytes(event.data), "more_body": True}
                )
            elif isinstance(event, h11.EndOfMessage):
                await ex.send({"type": "http.response.body", "body": b""})
                return
            else:
                # Cut short: the client sees a truncated answer, not a complete one.
                raise ConnectionError("the sandbox's service ended the answer early")


class WebSocketRelay:
    """A WebSocket relayed frame by frame between the client and the service."""

    def __init__(self, exchange: Exchange, stream: PortStream, grant: Grant, port: int) -> None:
        self.exchange = exchange
        self.stream = stream
        self.grant = grant
        max_size = exchange.services.settings.ws_max_frame_bytes
        subprotocols = [
            p.strip()
            for value in [header(exchange.scope, b"sec-websocket-protocol") or b""]
            for p in value.decode("latin-1").split(",")
            if p.strip()
        ]
        self._early: list[Any] = []
        self.protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/"),
            subprotocols=subprotocols or None,  # type: ignore[arg-type]
            max_size=max_size,
        )

    async def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await self.stream.write(data)
            else:
                await self.stream.write_eof()

    async def _feed(self) -> bool:
        data = await self.stream.read(READ_SIZE)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        await self._flush()
        return bool(data)

    async def run(self, lease: Any) -> None:
        ex = self.exchange
        request = self.protocol.connect()
        request.path = without_own_params(ex.target.path)
        for key, value in ex.forwarded_headers(self.grant, WS_HANDSHAKE):
            name = key.decode("latin-1")
            if name.lower() not in ("sec-websocket-protocol",):
                request.headers[name] = value.decode("latin-1")
        host = header(ex.scope, b"host")
        if host is not None:
            del request.headers["Host"]
            request.headers["Host"] = host.decode("latin-1")
        self.protocol.send_request(request)
        await self._flush()
        try:
            response = await asyncio.wait_for(
                self._handshake(), ex.services.settings.ws_start_timeout_seconds
            )
        except TimeoutError:
            raise BadGateway(
                "the sandbox's service did not answer the WebSocket handshake"
            ) from None
        if self.protocol.handshake_exc is not None:
            raise BadGateway(
                f"the sandbox's service refused the WebSocket (HTTP {response.status_code})"
            )
        await ex.send({"type": "websocket.accept", "subprotocol": self.protocol.subprotocol})
        ex.started = True
        tasks = {
            asyncio.create_task(self._from_client()),
            asyncio.create_task(self._from_service()),
        }
        ended = asyncio.create_task(lease.wait()) if lease is not None else None
        if ended is not None:
            tasks.add(ended)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        code = self.protocol.close_rcvd.code if self.protocol.close_rcvd else 1000
        if code in (1005, 1006, 1015) or not 1000 <= code <= 4999:
            code = 1000  # codes a close frame may not carry
        message: dict[str, Any] = {"type": "websocket.close", "code": code}
        if ended is not None and ended.done() and not ended.cancelled():
            # The token was revoked or expired: as every other session of it ends.
            message = {"type": "websocket.close", "code": 4001, "reason": ended.result()[:120]}
        with contextlib.suppress(Exception):
            await ex.send(message)

    async def _handshake(self) -> WsResponse:
        while True:
            alive = await self._feed()
            events = self.protocol.events_received()
            for i, event in enumerate(events):
                if isinstance(event, WsResponse):
                    self._early = events[i + 1 :]  # frames sent right behind the answer
                    return event
            if not alive:
                raise BadGateway("the sandbox's service closed the connection during the handshake")

    async def _from_client(self) -> None:
        while True:
            message = await self.exchange.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                with contextlib.suppress(InvalidState, ConnectionError):
                    code = message.get("code", 1000)
                    self.protocol.send_close(
                        code if code in range(1000, 5000) and code not in (1005, 1006) else 1000
                    )
                    await self._flush()
                return
            if kind != "websocket.receive":
                continue
            if message.get("bytes") is not None:
                self.protocol.send_binary(message["bytes"])
            else:
                self.protocol.send_text((message.get("text") or "").encode())
            await self._flush()

    async def _from_service(self) -> None:
        ex = self.exchange
        parts: list[bytes] = []
        text = False
        events: list[Any] = self._early
        alive = True
        while True:
            for event in events:
                opcode = event.opcode
                if opcode in (Opcode.TEXT, Opcode.BINARY):
                    parts = [event.data]
                    text = opcode is Opcode.TEXT
                elif opcode is Opcode.CONT:
                    parts.append(event.data)
                else:
                    if opcode is Opcode.CLOSE:
                        return
                    continue  # ping, pong: the protocol answers pings itself
                if event.fin:
                    data = b"".join(parts)
                    parts = []
                    if text:
                        await ex.send({"type": "websocket.send", "text": data.decode()})
                    else:
                        await ex.send({"type": "websocket.send", "bytes": data})
            if not alive:
                return
            alive = await self._feed()
            events = self.protocol.events_received()
