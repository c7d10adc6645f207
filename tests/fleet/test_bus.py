"""The node protocol's NATS transport against a real nats-server: requests, versions, streams
with flow control, and per-node permissions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.node.bus import (
    PROTOCOL_VERSION,
    Bus,
    NodeUnreachable,
    RemoteError,
    VersionMismatch,
    encode,
    node_inbox_prefix,
    node_permissions,
    node_subject,
)
from tests.engines import NatsServer, NatsUser


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def replica_user(nats: NatsServer) -> NatsUser:
    return nats.users[0]


async def _bus(nats: NatsServer, user: NatsUser, node_id: str | None = None) -> Bus:
    prefix = node_inbox_prefix(node_id) if node_id else None
    return await Bus.connect(nats.url(user), name=user.user, inbox_prefix=prefix)


def test_request_answer_and_errors(nats: NatsServer, replica_user: NatsUser) -> None:
    async def main() -> None:
        node, replica = await _bus(nats, replica_user), await _bus(nats, replica_user)
        subject = node_subject("n1", "in", "rpc")

        async def handler(op: str, args: dict[str, Any], data: bytes) -> Any:
            if op == "add":
                return args["a"] + args["b"]
            if op == "missing":
                raise RemoteError("not_found", "no such sandbox")
            raise ValueError(f"unknown op {op}")

        await node.serve(subject, handler)
        await node.nc.flush()
        assert await replica.request(subject, "add", {"a": 2, "b": 3}) == 5
        with pytest.raises(RemoteError) as caught:
            await replica.request(subject, "missing")
        assert caught.value.type == "not_found"
        with pytest.raises(RemoteError) as caught:
            await replica.request(subject, "nope")
        assert caught.value.type == "invalid"
        # A peer of another version is refused, both ways.
        msg = await replica.nc.request(
            subject, encode({"v": PROTOCOL_VERSION + 1, "op": "add", "args": {}}), timeout=5
        )
        assert b'"type":"version"' in msg.data
        with pytest.raises(NodeUnreachable):
            await replica.request(node_subject("absent", "in", "rpc"), "add", timeout=1)
        await node.close()
        await replica.close()

    run(main())


def test_a_newer_peer_is_refused_with_a_clear_error(
    nats: NatsServer, replica_user: NatsUser
) -> None:
    async def main() -> None:
        node, replica = await _bus(nats, replica_user), await _bus(nats, replica_user)
        subject = node_subject("n2", "in", "rpc")

        async def old_node(msg: Any) -> None:
            await msg.respond(encode({"v": PROTOCOL_VERSION + 1, "result": 1}))

        await node.nc.subscribe(subject, cb=old_node)
        await node.nc.flush()
        with pytest.raises(VersionMismatch, match="same Corral version"):
            await replica.request(subject, "anything")
        await node.close()
        await replica.close()

    run(main())


def test_a_node_cannot_use_another_nodes_subjects() -> None:
    # Users are configured before the server starts, as in a deployment: a server that has
    # just reloaded its users may still answer "no responders" for a moment.
    users = {n: NatsUser(f"node-{n}", permissions=node_permissions(n)) for n in "ab"}
    replica = NatsUser("replica")
    nats = NatsServer([replica, *users.values()]).start()

    async def main() -> None:
        errors: list[str] = []
        node_a = await Bus.connect(
            nats.url(users["a"]), name="node-a", inbox_prefix=node_inbox_prefix("a")
        )
        node_a.nc._error_cb = _collect(errors)  # type: ignore[attr-defined]
        node_b = await _bus(nats, users["b"], "b")
        api = await _bus(nats, replica)

        # Its own subjects work: it serves its rpc and its answer reaches the replica.
        async def echo(op: str, args: dict[str, Any], data: bytes) -> Any:
            return {"node": "a", "op": op}

        await node_a.serve(node_subject("a", "in", "rpc"), echo)
        await node_a.nc.flush()
        assert await api.request(node_subject("a", "in", "rpc"), "ping") == {
            "node": "a",
            "op": "ping",
        }

        # Listening on b's requests is refused; so is speaking as b.
        seen: list[bytes] = []

        async def spy(msg: Any) -> None:
            seen.append(msg.data)

        await node_a.nc.subscribe(node_subject("b", "in", "rpc"), cb=spy)
        await node_a.nc.subscribe(node_subject("b", "out", "event"), cb=spy)
        await node_a.nc.subscribe("_INBOX_b.>", cb=spy)
        await node_a.nc.flush()
        heard: list[bytes] = []

        async def listen(msg: Any) -> None:
            heard.append(msg.data)

        await api.nc.subscribe(node_subject("b", "out", "event"), cb=listen)
        await api.nc.flush()
        await node_a.nc.publish(node_subject("b", "out", "event"), b"forged")
        await node_a.nc.publish(node_subject("b", "in", "rpc"), b"forged")
        await node_a.nc.flush()

        async def b_echo(op: str, args: dict[str, Any], data: bytes) -> Any:
            return "b"

        await node_b.serve(node_subject("b", "in", "rpc"), b_echo)
        await node_b.nc.flush()
        assert await api.request(node_subject("b", "in", "rpc"), "ping") == "b"
        await node_b.nc.publish(node_subject("b", "out", "event"), b"genuine")
        await node_b.nc.flush()
        await asyncio.sleep(0.5)
        assert seen == []
        assert heard == [b"genuine"]
        assert sum("permissions violation" in e.lower() for e in errors) >= 5, errors
        for bus in (node_a, node_b, api):
            await bus.close()

    try:
        run(main())
    finally:
        nats.remove()


def _collect(errors: list[str]) -> Any:
    async def cb(exc: Exception) -> None:
        errors.append(str(exc))

    return cb
