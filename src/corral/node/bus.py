"""The node protocol's transport over NATS: requests to a node and events from it, with binary
data beside their JSON.

Subjects. Everything a node sends or receives is under its own prefix, so that the node's NATS
user can be limited to it and one host can never act as another:

    corral.node.<id>.in.rpc            replica -> node: requests, answered on the reply inbox
    corral.node.<id>.out.event         node -> one replica (queue group): events, acknowledged

A node's user may publish on `corral.node.<id>.out.>`, subscribe on `corral.node.<id>.in.>` and
on its own inbox prefix `_INBOX_<id>.>`, and answer the requests it receives (allow_responses).

A message is one line of JSON, then optionally binary data after its newline: a request
`{"v", "op", "args"}`, an answer `{"v", "result"}` or `{"v", "error": {"type", "message"}}`.
A peer of another protocol version is refused. Data moves in bounded pieces by request and
answer (the reader pulls), which is the flow control: see node/protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PREFIX = "corral.node"
NO_RESPONDERS_RETRY = 0.1
CLOSE_TIMEOUT = 5.0
NO_RESPONDERS_GRACE = 0.5  # how long "nobody serves this" is taken for a subscription on its way


def tls_context(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """A client TLS context for NATS: its CA (else the system's), and a client certificate
    for servers that verify clients; None when nothing is set (tls:// URLs still verify the
    server against the system's CAs)."""
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def node_subject(node_id: str, direction: str, *parts: str) -> str:
    """`corral.node.<id>.<in|out>.<parts...>`; ids are checked to be one subject token."""
    check_token(node_id)
    for part in parts:
        check_token(part)
    return ".".join((PREFIX, node_id, direction, *parts))


def check_token(value: str) -> str:
    if not value or any(c in value for c in " .*>\t\r\n"):
        raise ValueError(f"not a NATS subject token: {value!r}")
    return value


def node_inbox_prefix(node_id: str) -> str:
    return f"_INBOX_{check_token(node_id)}"


def node_permissions(node_id: str) -> dict[str, Any]:
    """The NATS permissions of a node's user (docs/fleet.md shows them in a server config)."""
    return {
        "publish": {"allow": [f"{PREFIX}.{check_token(node_id)}.out.>"]},
        "subscribe": {"allow": [f"{PREFIX}.{node_id}.in.>", f"{node_inbox_prefix(node_id)}.>"]},
        "allow_responses": True,
    }


class BusError(Exception):
    """The transport failed: no node answered, or the answer never came."""


class NodeUnreachable(BusError):
    pass


class RemoteError(Exception):
    """The peer answered with an error of `type` (a node-level error, by name)."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


class VersionMismatch(RemoteError):
    def __init__(self, message: str) -> None:
        super().__init__("version", message)


def encode(payload: dict[str, Any], data: bytes = b"") -> bytes:
    # Compact JSON never holds a raw newline: the first one ends it.
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n" + data


def decode(body: bytes) -> dict[str, Any]:
    return decode_with_data(body)[0]


def decode_with_data(body: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, data = body.partition(b"\n")
    value = json.loads(head)
    if not isinstance(value, dict):
        raise ValueError("a message must be a JSON object")
    return value, data


@dataclass(frozen=True)
class Reply:
    """A handler's answer with binary data beside its JSON result."""

    result: Any
    data: bytes = b""


def check_version(message: dict[str, Any]) -> None:
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"node protocol version {version!r} is not {PROTOCOL_VERSION}: "
            "run the same Corral version on every node and replica"
        )


Handler = Callable[[str, dict[str, Any], bytes], Awaitable[Any]]  # op, args, data -> result
SubjectHandler = Callable[[str, str, dict[str, Any], bytes], Awaitable[Any]]


class Bus:
    """One NATS connection, reconnecting for ever, with the node protocol's calls on it."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        # When the connection last came up (loop time), None while it is down: what a replica
        # has not heard while cut off from NATS is no sign that nodes went silent.
        self.connected_since: float | None = asyncio.get_running_loop().time()
        self.reconnect_listeners: list[Callable[[], None]] = []

    def connected_for(self) -> float:
        """Seconds the connection has been up without a break (0 while it is down)."""
        if self.connected_since is None or not self.nc.is_connected:
            return 0.0
        return asyncio.get_running_loop().time() - self.connected_since

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        creds: str | None = None,
        inbox_prefix: str | None = None,
        tls: ssl.SSLContext | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> Bus:
        holder: list[Bus] = []

        async def error_cb(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        async def disconnected() -> None:
            log.warning("NATS: disconnected; reconnecting")
            if holder:
                holder[0].connected_since = None

        async def reconnected() -> None:
            log.info("NATS: reconnected")
            if holder:
                holder[0].connected_since = asyncio.get_running_loop().time()
                for listener in holder[0].reconnect_listeners:
                    listener()
            if on_reconnect is not None:
                await on_reconnect()

        kwargs: dict[str, Any] = {}
        if creds:
            kwargs["user_credentials"] = creds
        if inbox_prefix:
            kwargs["inbox_prefix"] = inbox_prefix.encode()
        if tls is not None:
            kwargs["tls"] = tls
        nc = await nats.connect(
            servers=[url],
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=error_cb,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **kwargs,
        )
        bus = cls(nc)
        holder.append(bus)
        return bus

    async def close(self) -> None:
        # Bounded, both: with the server gone, draining and even closing can wait for ever (on
        # a connection that never reports itself lost).
        if self.nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), CLOSE_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), CLOSE_TIMEOUT)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    # --- requests ---

    async def request(
        self, subject: str, op: str, args: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        """Send a request and return its result; RemoteError for an error answer."""
        return (await self.request_data(subject, op, args, timeout=timeout))[0]

    async def request_data(
        self,
        subject: str,
        op: str,
        args: dict[str, Any] | None = None,
        data: bytes = b"",
        *,
        timeout: float = 10.0,
    ) -> tuple[Any, bytes]:
        """A request with binary data; the answer's result and data."""
        body = encode({"v": PROTOCOL_VERSION, "op": op, "args": args or {}}, data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        absent_until = loop.time() + min(timeout, NO_RESPONDERS_GRACE)
        while True:
            try:
                msg = await self.nc.request(
                    subject, body, timeout=max(0.05, deadline - loop.time())
                )
                break
            except NoRespondersError as exc:
                # A subscription made a moment ago may not be visible yet: look again briefly.
                if loop.time() + NO_RESPONDERS_RETRY > absent_until:
                    raise NodeUnreachable(f"nothing serves {subject}") from exc
                await asyncio.sleep(NO_RESPONDERS_RETRY)
            except NatsTimeout as exc:
                raise NodeUnreachable(f"no answer on {subject} within {timeout} s") from exc
        answer, payload = decode_with_data(msg.data)
        check_version(answer)
        error = answer.get("error")
        if error is not None:
            if error.get("type") == "version":
                raise VersionMismatch(str(error.get("message")))
            raise RemoteError(str(error.get("type")), str(error.get("message")))
        return answer.get("result"), payload

    async def serve(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        """Answer requests on `subject` with `handler(op, args, data)`; each request runs in its
        own task, so a slow one never holds up the others."""

        async def on_message(msg: Msg) -> None:
            asyncio.get_running_loop().create_task(self._answer(msg, handler))

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def serve_from(
        self, subject: str, handler: SubjectHandler, *, queue: str = ""
    ) -> Subscription:
        """`serve` for a wildcard subject: the handler also gets the subject a request came on
        (which names its sender: a node may publish only under its own prefix)."""

        async def on_message(msg: Msg) -> None:
            async def bound(op: str, args: dict[str, Any], data: bytes) -> Any:
                return await handler(msg.subject, op, args, data)

            asyncio.get_running_loop().create_task(self._answer(msg, bound))

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def _answer(self, msg: Msg, handler: Handler) -> None:
        data = b""
        try:
            request, payload = decode_with_data(msg.data)
            check_version(request)
            result = await handler(str(request.get("op")), request.get("args") or {}, payload)
            if isinstance(result, Reply):
                result, data = result.result, result.data
            answer: dict[str, Any] = {"v": PROTOCOL_VERSION, "result": result}
        except RemoteError as exc:
            answer = {"v": PROTOCOL_VERSION, "error": {"type": exc.type, "message": exc.message}}
        except ValueError as exc:
            answer = {"v": PROTOCOL_VERSION, "error": {"type": "invalid", "message": str(exc)}}
        except Exception as exc:
            log.exception("node protocol handler failed")
            answer = {
                "v": PROTOCOL_VERSION,
                "error": {"type": "internal", "message": f"{type(exc).__name__}: {exc}"},
            }
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(answer, data))
