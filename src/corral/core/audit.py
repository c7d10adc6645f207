"""The audit log: every state-changing call, stored and queryable.

Entries come from api/observe.py as requests end. `record` never waits and never fails: it
appends to a queue that a background task writes every FLUSH_SECONDS (or at once when a batch
is full), as one executemany through the store's batch writer, beside the commands' rows. A
request therefore pays no store round trip for its entry. On a clean shutdown `close` writes
what is queued before the store closes; a crash may lose the last FLUSH_SECONDS of entries.
If the store refuses a batch, it is kept and tried again with the next one (up to MAX_QUEUED
entries; past that the oldest are dropped, with a warning).

Entries older than the retention (CORRAL_AUDIT_RETENTION_DAYS) are pruned at start and every
PRUNE_SECONDS, by every replica (the delete is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, select

from corral import ids
from corral.clock import utcnow
from corral.core.models import AuditEntry, Page
from corral.core.paging import decode_cursor, next_cursor
from corral.store.db import Database
from corral.store.tables import AuditRow
from corral.store.writer import MAX_BATCH, BatchWriter

log = logging.getLogger(__name__)
AUDIT = AuditRow.__table__
FLUSH_SECONDS = 0.25
PRUNE_SECONDS = 3600.0
MAX_QUEUED = 100_000
AUDIT_ID = "aud"


def result_of(status: int) -> Literal["ok", "error"]:
    return "ok" if 0 < status < 400 else "error"


class AuditLog:
    def __init__(self, db: Database, writer: BatchWriter, *, retention_days: float = 90) -> None:
        self.db = db
        self.writer = writer
        self.retention = timedelta(days=retention_days) if retention_days > 0 else None
        self._queue: list[dict[str, object]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dropped = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def record(
        self,
        *,
        at: datetime,
        token_id: str | None,
        token_name: str | None,
        action: str,
        target: str | None,
        method: str,
        path: str,
        status: int,
        address: str | None,
        request_id: str | None,
    ) -> None:
        """Queue an entry; it is stored within FLUSH_SECONDS."""
        self._queue.append(
            {
                "id": ids.new_id(AUDIT_ID),
                "at": at,
                "token_id": token_id,
                "token_name": (token_name or "")[:200] or None,
                "action": action[:100],
                "target": target,
                "method": method,
                "path": path,
                "status": status,
                "result": result_of(status),
                "address": address,
                "request_id": request_id,
            }
        )
        if len(self._queue) > MAX_QUEUED:
            del self._queue[: len(self._queue) - MAX_QUEUED]
            self._dropped += 1
        if len(self._queue) >= MAX_BATCH:
            self._wake.set()

    async def flush(self) -> None:
        """Store every queued entry (those the store refuses stay queued)."""
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                failed = await self.writer.insert_many(AUDIT, batch)
            except Exception:
                log.exception("could not store %d audit entries; trying again", len(batch))
                failed = len(batch)
            if failed:
                log.warning("%d audit entries were refused by the store", failed)
                if failed == len(batch):  # the store is down: keep them for the next round
                    self._queue[:0] = batch
                    return
        if self._dropped:
            log.warning("the audit queue overflowed %d time(s); oldest entries dropped",
                        self._dropped)  # fmt: skip
            self._dropped = 0

    async def _run(self) -> None:
        next_prune = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            await self.flush()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_SECONDS
                try:
                    await self.prune()
                except Exception:
                    log.exception("could not prune the audit log")

    async def close(self) -> None:
        """Store what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        await self.flush()

    async def prune(self, now: datetime | None = None) -> int:
        """Delete the entries older than the retention; how many."""
        if self.retention is None:
            return 0
        cutoff = (now or utcnow()) - self.retention
        async with self.db.transaction() as session:
            result = await session.execute(delete(AuditRow).where(AuditRow.at < cutoff))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def list(
        self,
        *,
        token: str | None = None,
        action: str | None = None,
        target: str | None = None,
        result: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[AuditEntry]:
        """Newest first. `action` ending in `*` matches a prefix (`sandbox.*`)."""
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit + 1)
        if token is not None:
            query = query.where(AuditRow.token_id == token)
        if action is not None:
            if action.endswith("*"):
                prefix = action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                query = query.where(AuditRow.action.like(prefix + "%", escape="\\"))
            else:
                query = query.where(AuditRow.action == action)
        if target is not None:
            query = query.where(AuditRow.target == target)
        if result is not None:
            query = query.where(AuditRow.result == result)
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if until is not None:
            query = query.where(AuditRow.at < until)
        if cursor:
            query = query.where(AuditRow.id < decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        nxt = next_cursor(rows, limit)
        return Page[AuditEntry](
            items=[AuditEntry.model_validate(row, from_attributes=True) for row in rows[:limit]],
            next_cursor=nxt,
        )
