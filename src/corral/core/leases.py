"""Leader leases in the store: a singleton loop (the TTL reaper, the lost-node sweep, the warm
pool's refill) runs in the one process that holds its lease; when that process dies, another
takes the lease over once it lapses.

A lease is one row, taken and renewed by a conditional update (`holder` is us, or it expired),
so that two processes can never both believe they hold it at the same moment of the store's
clock; the same code serves SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError

from corral.clock import utcnow
from corral.store.db import Database
from corral.store.tables import LeaseRow

log = logging.getLogger(__name__)


def process_identity() -> str:
    """Who holds a lease: unique per process, readable by an operator."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(4).hex()}"


class Lease:
    def __init__(self, db: Database, name: str, holder: str, ttl: float = 10.0) -> None:
        self.db = db
        self.name = name
        self.holder = holder
        self.ttl = ttl

    async def acquire(self) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        now = utcnow()
        until = now + timedelta(seconds=self.ttl)
        async with self.db.transaction() as session:
            result = await session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    or_(LeaseRow.holder == self.holder, LeaseRow.expires_at < now),
                )
                .values(holder=self.holder, expires_at=until)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                return True
            if await session.get(LeaseRow, self.name) is not None:
                return False  # held by another, and not expired
        try:
            async with self.db.transaction() as session:
                session.add(LeaseRow(name=self.name, holder=self.holder, expires_at=until))
        except IntegrityError:
            return False  # another process made it first
        return True

    async def release(self) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                delete(LeaseRow).where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
            )


class LeaderLoop:
    """Runs `body` every `interval` seconds while this process holds the lease `name`.

    The lease lasts three intervals, so a holder that misses one renewal keeps it; a dead
    holder's loop moves to another process within three intervals.
    """

    def __init__(
        self,
        db: Database,
        name: str,
        holder: str,
        body: Callable[[], Awaitable[None]],
        *,
        interval: float,
    ) -> None:
        self.lease = Lease(db, name, holder, ttl=interval * 3)
        self.body = body
        self.interval = interval
        self.leading = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                leading = await self.lease.acquire()
                if leading != self.leading:
                    log.info("%s the %s lease", "took" if leading else "lost", self.lease.name)
                self.leading = leading
                if leading:
                    await self.body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the %s loop failed; trying again", self.lease.name)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.leading:
            # Another process may take over at once instead of waiting out the lease.
            with contextlib.suppress(Exception):
                await self.lease.release()
            self.leading = False
