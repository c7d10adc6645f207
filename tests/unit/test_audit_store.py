"""The audit log's store side on SQLite (tests/fleet/test_audit_postgres.py runs the same on
PostgreSQL): entries queued by `record` are all stored by `close`, filtered and paged newest
first, and pruned past the retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from corral.core.audit import AuditLog
from corral.store.db import Database
from corral.store.writer import BatchWriter

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def entry(n: int, *, at: datetime = NOW, status: int = 200) -> dict[str, object]:
    return {
        "at": at,
        "token_id": f"tok_{n % 3}",
        "token_name": f"t{n % 3}",
        "action": "sandbox.create" if n % 2 else "command.exec",
        "target": f"sb_{n % 4}",
        "method": "POST",
        "path": f"/v1/sandboxes/sb_{n % 4}/exec",
        "status": status,
        "address": "127.0.0.1",
        "request_id": f"req_{n}",
    }


async def exercise(url: str) -> None:
    db = Database(url)
    await db.migrate()
    writer = BatchWriter(db)
    writer.start()
    log = AuditLog(db, writer, retention_days=30)
    log.start()
    try:
        for n in range(1200):  # more than one batch
            log.record(**entry(n, status=500 if n == 7 else 200))  # type: ignore[arg-type]
        log.record(**entry(9999, at=NOW - timedelta(days=31)))  # type: ignore[arg-type]
        # A clean shutdown stores what is queued: none of the 1201 entries is lost.
        await log.close()
        page = await log.list(limit=1000)
        assert len(page.items) == 1000 and page.next_cursor is not None
        rest = await log.list(limit=1000, cursor=page.next_cursor)
        assert len(rest.items) == 201 and rest.next_cursor is None
        ids = [e.id for e in page.items + rest.items]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 1201

        errors = await log.list(result="error")
        assert [e.request_id for e in errors.items] == ["req_7"]
        assert errors.items[0].status == 500 and errors.items[0].at == NOW
        mine = await log.list(token="tok_1", action="sandbox.*", target="sb_1", limit=1000)
        assert mine.items and all(
            (e.token_id, e.target, e.action) == ("tok_1", "sb_1", "sandbox.create")
            for e in mine.items
        )
        assert (await log.list(action="sandbox")).items == []  # exact unless it ends in *
        assert len((await log.list(until=NOW - timedelta(days=1))).items) == 1

        assert await log.prune(now=NOW) == 1
        assert (await log.list(until=NOW - timedelta(days=1))).items == []
        assert (
            await AuditLog(db, writer, retention_days=0).prune(now=NOW + timedelta(days=999)) == 0
        )
    finally:
        await writer.close()
        await db.close()


def test_audit_store_on_sqlite(tmp_path: Path) -> None:
    asyncio.run(exercise(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"))
