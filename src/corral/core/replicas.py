"""How many API replicas a fleet runs now, for what they share out between them.

Each replica holds a lease of its own, `replica:<holder>`, renewed every INTERVAL; the unexpired
ones are the live replicas. A per-token rate limit is then split evenly: each replica allows its
share, so that a client spread over every replica never gets more than the limit (one pinned to
a single replica gets that replica's share).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

from sqlalchemy import delete, func, select

from corral.clock import utcnow
from corral.core.leases import Lease
from corral.store.db import Database
from corral.store.tables import LeaseRow

log = logging.getLogger(__name__)
INTERVAL = 2.0
PREFIX = "replica:"


class ReplicaCount:
    def __init__(self, db: Database, holder: str, on_change: Callable[[int], None]) -> None:
        self.db = db
        # Named by a digest of the holder: lease names are at most 64 characters.
        digest = hashlib.sha256(holder.encode()).hexdigest()[:32]
        self.lease = Lease(db, PREFIX + digest, holder, ttl=INTERVAL * 3)
        self.on_change = on_change
        self.count = 1
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> int:
        await self.lease.acquire()
        now = utcnow()
        mine = LeaseRow.name.startswith(PREFIX)
        async with self.db.transaction() as session:
            await session.execute(delete(LeaseRow).where(mine, LeaseRow.expires_at < now))
            count = await session.scalar(select(func.count()).where(mine)) or 1
        if count != self.count:
            log.info("%d API replica(s) live", count)
            self.count = count
            self.on_change(count)
        return count

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                await self.refresh()
            except Exception:
                log.exception("counting the replicas failed; trying again")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.lease.release()
