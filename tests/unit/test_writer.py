"""Group commit: concurrent writes share transactions, each caller's write is stored when its
await returns, a bad row fails alone, and a locked store never blocks the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from corral.store.db import Database
from corral.store.tables import CommandRow
from corral.store.writer import CHECKPOINT_EVERY, BatchWriter

from .helpers import run

COMMANDS = CommandRow.__table__


def command(cid: str) -> dict[str, Any]:
    return {
        "id": cid, "sandbox_id": "sb_x", "node_id": "local", "status": "running",
        "command": "true", "args": [], "cwd": "/workspace", "user": "user", "env_keys": ["A"],
        "timeout_ms": 1000, "max_output_bytes": 10, "exit_code": None, "signal": None,
        "stdout_bytes": 0, "stderr_bytes": 0, "stdout_truncated": False,
        "stderr_truncated": False, "created_at": datetime.now(UTC), "started_at": None,
        "finished_at": None, "duration_ms": None, "error": None, "source": "native",
        "cpu_ms": None, "peak_memory_bytes": None, "oom_killed": False,
    }  # fmt: skip


async def open_db(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
    await db.migrate()
    return db


async def stored_ids(db: Database) -> list[str]:
    async with db.session() as session:
        return sorted(await session.scalars(select(CommandRow.id)))


def test_concurrent_writes_are_stored_in_shared_transactions(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)
        writer.start()
        ids = [f"cmd_{i:04d}" for i in range(200)]
        await asyncio.gather(*(writer.insert(COMMANDS, command(i)) for i in ids))
        after_inserts = writer.transactions
        await asyncio.gather(
            *(
                writer.update(COMMANDS, "id", {"id": i, "status": "completed", "exit_code": n})
                for n, i in enumerate(ids)
            )
        )
        await writer.close()
        async with db.session() as session:
            rows = {r.id: r for r in await session.scalars(select(CommandRow))}
        assert sorted(rows) == ids
        assert all(rows[i].status == "completed" for i in ids)
        assert [rows[i].exit_code for i in ids] == list(range(200))
        assert rows[ids[0]].env_keys == ["A"] and rows[ids[0]].created_at.tzinfo is not None
        # 400 writes, far fewer transactions.
        assert 0 < after_inserts < 20 and after_inserts < writer.transactions < 40
        await db.close()

    run(main())


def test_a_bad_row_fails_alone(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)
        writer.start()
        await writer.insert(COMMANDS, command("cmd_taken"))
        results = await asyncio.gather(
            writer.insert(COMMANDS, command("cmd_a")),
            writer.insert(COMMANDS, command("cmd_taken")),  # the same key again
            writer.insert(COMMANDS, command("cmd_b")),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], IntegrityError)
        await writer.close()
        assert await stored_ids(db) == ["cmd_a", "cmd_b", "cmd_taken"]
        await db.close()

    run(main())


def test_without_its_task_each_write_is_a_transaction_of_its_own(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)  # never started
        await writer.insert(COMMANDS, command("cmd_one"))
        with pytest.raises(IntegrityError):
            await writer.insert(COMMANDS, command("cmd_one"))
        assert await stored_ids(db) == ["cmd_one"]
        await writer.close()
        await db.close()

    run(main())


def test_rows_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    """The SQLite path runs compiled statements on the DB-API connection: what lands in the
    file (JSON, booleans, UTC times, NULLs) is what the ORM itself writes for the same values."""

    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)
        writer.start()
        values = {**command("cmd_writer"), "args": None, "stderr_truncated": True}
        await writer.insert(COMMANDS, values)
        finished = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        update = {"id": "cmd_writer", "status": "completed", "finished_at": finished}
        await writer.update(COMMANDS, "id", update)
        async with db.transaction() as session:
            session.add(CommandRow(**{**values, **update, "id": "cmd_orm"}))
        await writer.close()
        async with db.session() as session:
            raw = {
                row[0]: row[1:]
                for row in (await session.execute(text("SELECT * FROM commands"))).all()
            }
        assert raw["cmd_writer"] == raw["cmd_orm"]
        await db.close()

    run(main())


def test_a_locked_store_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Small batches commit on the event loop; when another connection holds the store's write
    lock, the batch waits in the writer's thread, and the loop goes on meanwhile."""

    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)
        writer.start()
        await writer.insert(COMMANDS, command("cmd_before"))
        other = sqlite3.connect(tmp_path / "corral.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, held
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        write = asyncio.ensure_future(writer.insert(COMMANDS, command("cmd_while_locked")))
        await asyncio.sleep(0.5)
        assert not write.done()
        assert ticks >= 20  # the loop ran on while the write waited
        other.execute("ROLLBACK")
        other.close()
        await asyncio.wait_for(write, 10)
        ticker.cancel()
        await writer.close()
        assert await stored_ids(db) == ["cmd_before", "cmd_while_locked"]
        await db.close()

    run(main())


def test_the_wal_is_checkpointed_while_writes_commit_on_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_db(tmp_path)
        writer = BatchWriter(db)
        writer.start()
        wal = tmp_path / "corral.db-wal"
        for i in range(CHECKPOINT_EVERY * 8):
            await writer.insert(COMMANDS, command(f"cmd_{i:05d}"))
        # Without checkpoints the WAL holds every commit's pages (36 MiB here); with them it
        # starts over after each (~4.5 MiB: what CHECKPOINT_EVERY commits add).
        size = wal.stat().st_size
        assert size < 12 << 20, size
        await writer.close()
        async with db.session() as session:
            assert await session.scalar(select(func.count()).select_from(CommandRow)) == (
                CHECKPOINT_EVERY * 8
            )
        await db.close()

    run(main())
