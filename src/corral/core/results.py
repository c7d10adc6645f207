"""Waiting for a command's stored result, from any replica.

The replica that applies a node's `ended` event announces it on `corral.command.<id>.done`
after the commit; waiters wake on that and read the store. Results written for many commands
at once (a node declared lost, or registered again) wake every waiter (`EVERY`), as does this
replica's return from a NATS outage (announcements may have been missed). Waiters also look at
the store now and then (from POLL_SECONDS, backing off to POLL_MAX), so nothing ever hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from corral.clock import utcnow
from corral.core.models import CommandStatus
from corral.node.base import CommandOutcome
from corral.node.bus import Bus
from corral.node.protocol import COMMAND_DONE
from corral.store.db import Database
from corral.store.tables import CommandRow

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
POLL_MAX = 10.0
EVERY = "every"  # announced for results written to many commands at once


def outcome_of(row: CommandRow) -> CommandOutcome:
    """A stored result as a node's outcome."""
    started = row.started_at or row.created_at
    return CommandOutcome(
        status=CommandStatus(row.status),
        exit_code=row.exit_code,
        signal=row.signal,
        stdout_bytes=row.stdout_bytes or 0,
        stderr_bytes=row.stderr_bytes or 0,
        stdout_truncated=bool(row.stdout_truncated),
        stderr_truncated=bool(row.stderr_truncated),
        started_at=started,
        finished_at=row.finished_at or utcnow(),
        error=row.error,
        cpu_ms=row.cpu_ms,
        peak_memory_bytes=row.peak_memory_bytes,
        oom_killed=bool(row.oom_killed),
    )


class CommandResults:
    def __init__(self, db: Database, bus: Bus) -> None:
        self.db = db
        self.bus = bus
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        async def on_done(msg: Msg) -> None:
            self._wake(msg.subject.split(".")[2])

        self._sub = await self.bus.nc.subscribe(COMMAND_DONE.format("*"), cb=on_done)
        self.bus.reconnect_listeners.append(lambda: self._wake(EVERY))

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _wake(self, cid: str) -> None:
        waiters = (
            [e for group in self._waiters.values() for e in group]
            if cid == EVERY
            else self._waiters.get(cid, ())
        )
        for event in waiters:
            event.set()

    async def announce(self, cid: str) -> None:
        """After a result was committed: wake its waiters, here and on every replica."""
        self._wake(cid)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(COMMAND_DONE.format(cid), b"")

    async def _row(self, cid: str) -> CommandRow | None:
        async with self.db.session() as session:
            return await session.get(CommandRow, cid)

    async def wait_row(self, cid: str, timeout: float | None = None) -> CommandRow | None:
        """The command's row once finished; as it stands when `timeout` passes first (None
        if there is no such command)."""
        event = asyncio.Event()
        self._waiters.setdefault(cid, set()).add(event)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        poll = POLL_SECONDS
        try:
            while True:
                event.clear()
                row = await self._row(cid)
                if row is None or CommandStatus(row.status).finished:
                    return row
                left = poll if deadline is None else min(poll, deadline - loop.time())
                if left <= 0:
                    return row
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
                poll = min(POLL_MAX, poll * 2)
        finally:
            waiters = self._waiters.get(cid)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[cid]

    async def wait_outcome(self, cid: str) -> CommandOutcome:
        row = await self.wait_row(cid)
        if row is None:
            raise LookupError(f"no command {cid} in the store")
        return outcome_of(row)
