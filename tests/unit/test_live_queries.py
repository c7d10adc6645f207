"""The counts of live sandboxes read only the live ones: the history keeps every deleted
sandbox's row, and a count that walked them would slow every create as the history grows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, text

from corral.core.nodes import NodeRegistry
from corral.core.sandboxes import SandboxService
from corral.node.directory import NodeDirectory
from corral.store.db import Database

from .helpers import run

HISTORY = 2_000


async def _store(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
    await db.migrate()
    rows = [(f"sb_old{i:05d}", "local", i, "deleted") for i in range(HISTORY)]
    rows += [("sb_live1", "local", 1, "running"), ("sb_live2", "n2", 1, "stopped")]
    async with db.transaction() as session:
        for sid, node, slot, state in rows:
            await session.execute(
                text(
                    "INSERT INTO sandboxes (id, node_id, slot, state, template, spec, created_at,"
                    " updated_at) VALUES (:id, :node, :slot, :state, 'host', '{}',"
                    " '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                ),
                {"id": sid, "node": node, "slot": slot, "state": state},
            )
    return db


@contextmanager
def _selects(db: Database) -> Iterator[list[tuple[str, object]]]:
    """The SELECT statements (and their parameters) the store runs meanwhile."""
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _many):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


async def _plans_of(db: Database, statements: list[tuple[str, object]]) -> list[str]:
    plans = []
    async with db.session() as session:
        conn = await session.connection()
        for sql, params in statements:
            raw = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)  # type: ignore[arg-type]
            plans.append(" | ".join(str(r[-1]) for r in raw.all()))
    return plans


def test_live_counts_are_right_and_read_the_live_slot_index(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _store(tmp_path)
        try:
            with _selects(db) as seen:
                async with db.session() as session:
                    admitted = await SandboxService._live_count(session)
                    counts = await NodeRegistry._sandbox_counts(session)
            assert admitted == 2
            assert counts == {"local": 1, "n2": 1}
            assert len(seen) == 2
            for plan in await _plans_of(db, seen):
                # The partial index over live sandboxes only, never the table or the state index.
                assert "uq_sandboxes_live_slot" in plan, plan
        finally:
            await db.close()

    run(main())


def test_the_live_listing_reads_the_live_sandboxes_only(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _store(tmp_path)
        sandboxes = SandboxService(
            db, NodeDirectory(db, None), tmp_path, max_sandboxes=10, uid_count=10
        )
        try:
            with _selects(db) as seen:
                page = await sandboxes.list(limit=1)
                rest = await sandboxes.list(limit=1, cursor=page.next_cursor)
                every = await sandboxes.list(include_deleted=True, limit=HISTORY + 10)
            assert [s.id for s in page.items] == ["sb_live1"] and page.next_cursor
            assert [s.id for s in rest.items] == ["sb_live2"] and rest.next_cursor is None
            assert len(every.items) == HISTORY + 2
            assert [s.id for s in every.items] == sorted(s.id for s in every.items)
            plan = (await _plans_of(db, seen[:1]))[0]
            assert "uq_sandboxes_live_slot" in plan, plan
        finally:
            await db.close()

    run(main())
