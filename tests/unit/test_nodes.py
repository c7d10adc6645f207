"""The node registry on a real SQLite store: epochs, heartbeats, drain, placement, lost sweeps."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from corral.core.errors import InvalidArgument, RateLimited, Unavailable
from corral.core.models import NodeCapacity, NodeInfo, NodeState
from corral.core.nodes import NodeRegistry
from corral.store.db import Database
from corral.store.tables import CommandRow, SandboxRow


def info(node_id: str, sandboxes: int = 10, templates: tuple[str, ...] = ("host",)) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        version="0.1.0",
        protocol=1,
        runtime="namespaces",
        capacity=NodeCapacity(sandboxes=sandboxes, memory_mb=1024, cpus=2),
        templates=list(templates),
        enforceable={"memory_mb": "cgroup"},
    )


async def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
    await db.migrate()
    return db


async def _sandboxes(db: Database, node_id: str, n: int, first: int = 0) -> None:
    now = datetime.now(UTC)
    async with db.transaction() as session:
        for i in range(first, first + n):
            session.add(
                SandboxRow(
                    id=f"sb_{node_id}_{i}", name=None, node_id=node_id, slot=i, state="running",
                    template="host", spec={}, created_at=now, updated_at=now,
                )
            )  # fmt: skip


def test_epochs_and_heartbeats(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _db(tmp_path)
        nodes = NodeRegistry(db)
        assert await nodes.register(info("a")) == 1
        assert await nodes.heartbeat("a", 1, {"sandboxes": 0})
        assert await nodes.register(info("a")) == 2  # a restart
        assert not await nodes.heartbeat("a", 1, {})  # from the earlier run: refused
        assert not await nodes.heartbeat("ghost", 1, {})
        node = await nodes.get("a")
        assert node.state == NodeState.online and node.epoch == 2
        await db.close()

    asyncio.run(main())


def test_placement_least_loaded_with_room_and_template(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _db(tmp_path)
        nodes = NodeRegistry(db)
        for node_id, size in (("a", 10), ("b", 10), ("c", 2)):
            await nodes.register(
                info(node_id, size, ("host", "py") if node_id != "b" else ("host",))
            )
        await _sandboxes(db, "a", 3)
        await _sandboxes(db, "b", 1)
        await _sandboxes(db, "c", 2)
        assert await nodes.place() == "b"
        assert await nodes.place(template="py") == "a"  # b lacks it, c is full
        await nodes.set_draining("b")
        assert (await nodes.get("b")).state == NodeState.draining
        assert await nodes.place() == "a"
        with pytest.raises(RateLimited, match="full"):
            await nodes.place(wanted="c")
        with pytest.raises(Unavailable, match="draining"):
            await nodes.place(wanted="b")
        with pytest.raises(InvalidArgument):
            await nodes.place(wanted="zzz")
        with pytest.raises(Unavailable, match="no online node"):
            await nodes.place(template="gpu")
        await _sandboxes(db, "a", 7, first=3)  # a full too: only b, draining, has room
        with pytest.raises(RateLimited, match="full"):
            await nodes.place()
        await nodes.set_draining("b", False)
        assert await nodes.place() == "b"
        await db.close()

    asyncio.run(main())


def test_a_silent_node_is_declared_lost_with_its_commands(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _db(tmp_path)
        nodes = NodeRegistry(db, lost_after=1.0)
        await nodes.register(info("a"))
        await nodes.register(info("b"))
        now = datetime.now(UTC)
        async with db.transaction() as session:
            for cid, node_id in (("cmd_1", "a"), ("cmd_2", "b")):
                session.add(
                    CommandRow(
                        id=cid, sandbox_id="sb", node_id=node_id, status="running",
                        command="sleep 9", cwd="/", user="user", env_keys=[], timeout_ms=1,
                        max_output_bytes=1, created_at=now, source="native", oom_killed=False,
                    )
                )  # fmt: skip
        assert await nodes.sweep() == []
        await asyncio.sleep(1.1)  # both silent past the grace; b speaks just before the sweep
        await nodes.heartbeat("b", 1, {})
        assert await nodes.sweep() == [("a", 1)]
        assert await nodes.sweep() == []  # once
        assert (await nodes.get("a")).state == NodeState.offline
        assert (await nodes.get("b")).state == NodeState.online
        with pytest.raises(Unavailable, match="not been heard from"):
            await nodes.usable("a")
        async with db.session() as session:
            a_cmd = await session.get(CommandRow, "cmd_1")
            b_cmd = await session.get(CommandRow, "cmd_2")
        assert a_cmd is not None and a_cmd.status == "lost"
        assert b_cmd is not None and b_cmd.status == "running"
        # Back: a new registration brings it online again.
        await nodes.register(info("a"))
        assert (await nodes.get("a")).state == NodeState.online
        await db.close()

    asyncio.run(main())
