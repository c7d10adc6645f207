"""The node protocol end to end: a `RemoteNode` on one NATS connection, a `NodeAgent` serving
a built-in node (the fake runtime) on another, and a stand-in for the replicas' side of the
events. Whatever a caller gets through the remote node is what it would get from the node."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.core.models import CommandStatus, NodeCapacity
from corral.node.agent import NodeAgent
from corral.node.base import CommandOutcome, CommandSpec, NodeUnavailable
from corral.node.bus import PREFIX, Bus, node_inbox_prefix
from corral.node.local import LocalNode
from corral.node.protocol import (
    EVENT_ENDED,
    EVENT_HEARTBEAT,
    EVENT_REGISTER,
    outcome_from_wire,
    output_from_wire,
)
from corral.node.remote import RemoteNode
from corral.runtime.base import Injection, SandboxConfig, SandboxDied
from corral.runtime.fake import FakeRuntime
from tests.engines import NatsServer

NODE = "t1"
SANDBOX = "sb_remote"


@dataclass
class Replicas:
    """The replicas' side of node events, reduced to what the test looks at."""

    registrations: int = 0
    ended: dict[str, CommandOutcome] = field(default_factory=dict)
    outputs: dict[str, tuple[bytes, bytes] | None] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, subject: str, op: str, args: dict[str, Any], data: bytes) -> Any:
        if op == EVENT_REGISTER:
            self.registrations += 1
            return {"epoch": self.registrations, "lost_after": 3.0}
        if op == EVENT_HEARTBEAT:
            return {"ok": True}
        if op == EVENT_ENDED:
            self.ended[args["command_id"]] = outcome_from_wire(args["outcome"])
            self.outputs[args["command_id"]] = output_from_wire(args.get("output"))
            self.arrived.set()
            return {"ok": True}
        return {"ok": True}

    async def wait(self, cid: str) -> CommandOutcome:
        while cid not in self.ended:
            self.arrived.clear()
            await self.arrived.wait()
        return self.ended[cid]


@asynccontextmanager
async def fleet_of_one(
    nats: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[RemoteNode, LocalNode, Replicas]]:
    user = nats.users[0]
    replica_bus = await Bus.connect(nats.url(user), name="replica")
    agent_bus = await Bus.connect(
        nats.url(user), name="agent", inbox_prefix=node_inbox_prefix(NODE)
    )
    replicas = Replicas()
    await replica_bus.serve_from(f"{PREFIX}.*.out.event", replicas.handle)
    local = LocalNode(node_id=NODE, runtime=FakeRuntime(), data_dir=tmp_path, kill_grace_ms=200)
    await local.prepare()
    capacity = NodeCapacity(sandboxes=10, memory_mb=1024, cpus=1)
    agent = NodeAgent(local, agent_bus, lambda: local.info(capacity), sandboxes_dir=tmp_path / "sb")
    await agent.start()
    remote = RemoteNode(replica_bus, NODE, local.info(capacity), replicas.wait, lost_after=1.0)
    try:
        yield remote, local, replicas
    finally:
        await local.shutdown()
        await agent.close()
        await agent_bus.close()
        await replica_bus.close()


def spec(script: str, cid: str, **kw: Any) -> CommandSpec:
    return CommandSpec(
        id=cid,
        sandbox_id=SANDBOX,
        argv=["/bin/bash", "-c", script],
        env={},
        cwd="/workspace",
        stdin=kw.pop("stdin", None),
        timeout_ms=kw.pop("timeout_ms", 5000),
        max_output_bytes=kw.pop("max_output_bytes", 4 << 20),
        **kw,
    )


def test_calls_output_and_results_through_the_remote_node(nats: NatsServer, tmp_path: Path) -> None:
    async def main() -> None:
        async with fleet_of_one(nats, tmp_path) as (remote, local, replicas):
            assert replicas.registrations == 1
            await remote.start_sandbox(SandboxConfig(id=SANDBOX, slot=1, dir=Path("/nowhere")))
            assert await remote.sandbox_running(SANDBOX) and await local.sandbox_running(SANDBOX)
            # A result reaches the replicas as an event; output is read through the node.
            execution = await remote.run(spec("echo hello; echoerr oops; exit 3", "cmd_a"))
            outcome = await execution.outcome()
            assert outcome.status == CommandStatus.completed and outcome.exit_code == 3
            assert await remote.output(SANDBOX, "cmd_a") == (b"hello\n", b"oops\n")
            # Small output comes along with the result: a sync exec's reply needs no call.
            assert replicas.outputs["cmd_a"] == (b"hello\n", b"oops\n")
            # Output larger than one answer comes in pages, byte for byte.
            big = await remote.run(spec("yes", "cmd_big", timeout_ms=400))
            assert (await big.outcome()).status == CommandStatus.timed_out
            expected = await local.output(SANDBOX, "cmd_big")
            assert len(expected[0]) > 1 << 20
            assert await remote.output(SANDBOX, "cmd_big") == expected
            await replicas.wait("cmd_big")
            assert replicas.outputs["cmd_big"] is None  # too large to come along
            # Following the log, and its raw view, give what the node's own reads give.
            remote_chunks = [c async for c in remote.follow_output(SANDBOX, "cmd_big") if c]
            local_chunks = [c async for c in local.follow_output(SANDBOX, "cmd_big") if c]
            assert remote_chunks == local_chunks
            raw = [bytes(d) async for d, _ in remote.follow_raw(SANDBOX, "cmd_big")]
            assert expected[1] == b"" and b"".join(raw) == expected[0]
            # Input, interactively, and a signal.
            cat = await remote.run(spec("cat", "cmd_cat", interactive=True))
            await cat.write_stdin(b"x" * 600_000)
            await cat.close_stdin()
            assert (await cat.outcome()).status == CommandStatus.completed
            assert (await remote.output(SANDBOX, "cmd_cat"))[0] == b"x" * 600_000
            # Any replica finds a running command through the node, and may cancel it.
            slow = await remote.run(spec("sleep 30", "cmd_slow"))
            found = await remote.execution("cmd_slow")
            assert found is not None and found.spec.argv == slow.spec.argv
            await found.cancel()
            assert (await slow.outcome()).status == CommandStatus.cancelled
            assert await remote.execution("cmd_slow") is None
            # Node-level errors cross as themselves.
            with pytest.raises(SandboxDied):
                await remote.run(dataclasses.replace(spec("true", "cmd_x"), sandbox_id="sb_no"))
            await remote.stop_sandbox(SANDBOX)
            assert not await remote.sandbox_running(SANDBOX)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_network_policy_and_status_through_the_remote_node(
    nats: NatsServer, tmp_path: Path
) -> None:
    """Injection rules (secrets filled in) reach the node's sandbox as given, both at the start
    and with set_network; its network status comes back."""
    seen: list[tuple[str, tuple[str, ...], tuple[Injection, ...]]] = []

    async def set_network(network: str, allow: tuple[str, ...], inject: tuple = ()) -> None:
        seen.append((network, allow, inject))

    async def network_status() -> dict[str, Any]:
        return {"counters": {"dns_refused": 2}}

    rule = Injection("api.example.com", "Authorization", "Bearer s3cr3t")

    async def main() -> None:
        async with fleet_of_one(nats, tmp_path) as (remote, local, _):
            config = SandboxConfig(
                id=SANDBOX, slot=1, dir=Path("/nowhere"), network="allow",
                allow=("*.example.com",), inject=(rule,),
            )  # fmt: skip
            await remote.start_sandbox(config)
            handle = local._sandboxes[SANDBOX]
            assert handle.config.inject == (rule,) and handle.config.allow == ("*.example.com",)
            handle.set_network = set_network  # type: ignore[method-assign]
            handle.network_status = network_status  # type: ignore[method-assign]
            await remote.set_network(SANDBOX, "allow", ("a.example.com",), (rule,))
            assert seen == [("allow", ("a.example.com",), (rule,))]
            assert await remote.network_status(SANDBOX) == {"counters": {"dns_refused": 2}}
            await remote.stop_sandbox(SANDBOX)

    asyncio.run(main())


def test_a_node_that_does_not_answer_is_unavailable_at_once(nats: NatsServer) -> None:
    async def main() -> None:
        bus = await Bus.connect(nats.url(nats.users[0]), name="replica")
        info = LocalNode(
            node_id="gone", runtime=FakeRuntime(), data_dir=Path("/nowhere"), kill_grace_ms=0
        ).info(NodeCapacity(sandboxes=1, memory_mb=1, cpus=1))
        remote = RemoteNode(bus, "gone", info, lambda cid: asyncio.sleep(0), lost_after=1.0)  # type: ignore[arg-type,return-value]
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(NodeUnavailable, match="gone"):
            await remote.sandbox_running(SANDBOX)
        assert loop.time() - began < 2
        await bus.close()

    asyncio.run(main())
