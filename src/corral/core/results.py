"""Waiting for a command's stored result, from any replica.

The replica that applies a node's `ended` event announces it on `corral.command.<id>.done`
after the commit; waiters wake on that and read the store. Results written for many commands
at once (a node declared lost, or registered again) wake every waiter (`EVERY`), as does this
replica's return from a NATS outage (announcements may have been missed). Waiters also look at
the store now and then (from POLL_SECONDS, backing off to POLL_MAX), so nothing ever hangs.

The replica that started a command usually applies its result too (the node's events go to
any replica, and with one replica to that one): then the waiter registered with `expect` is
handed the applied outcome, and the command's output when the node sent it along, and reads
nothing back from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

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


def outcome_values(outcome: CommandOutcome) -> dict[str, Any]:
    """The columns of a command's row that its result fills in."""
    return {
        "status": outcome.status.value,
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "stdout_bytes": outcome.stdout_bytes,
        "stderr_bytes": outcome.stderr_bytes,
        "stdout_truncated": outcome.stdout_truncated,
        "stderr_truncated": outcome.stderr_truncated,
        "finished_at": outcome.finished_at,
        "duration_ms": outcome.duration_ms,
        "error": outcome.error,
        "cpu_ms": outcome.cpu_ms,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "oom_killed": outcome.oom_killed,
    }


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
        # Commands started here, whose result this replica may apply itself: the outcome
        # (and output) applied, once it is (see `deliver`).
        self._expected: dict[str, tuple[CommandOutcome, tuple[bytes, bytes] | None] | None] = {}
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

    def expect(self, cid: str) -> None:
        """Before the command can end: keep its result if this replica applies it."""
        self._expected[cid] = None

    def forget(self, cid: str) -> None:
        self._expected.pop(cid, None)

    def deliver(
        self, cid: str, outcome: CommandOutcome, output: tuple[bytes, bytes] | None
    ) -> None:
        """After this replica committed `outcome` for `cid`: its waiter here needs no read."""
        if cid in self._expected:
            self._expected[cid] = (outcome, output)
        self._wake(cid)

    def delivered_output(self, cid: str) -> tuple[bytes, bytes] | None:
        """The output that came with the command's result, once (None: ask the node)."""
        delivered = self._expected.pop(cid, None)
        return delivered[1] if delivered is not None else None

    async def announce(self, cid: str) -> None:
        """After a result was committed: wake its waiters, here and on every replica."""
        self._wake(cid)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(COMMAND_DONE.format(cid), b"")

    async def _row(self, cid: str) -> CommandRow | None:
        async with self.db.session() as session:
            return await session.get(CommandRow, cid)

    async def wait_row(
        self, cid: str, timeout: float | None = None, *, stored: dict[str, Any] | None = None
    ) -> CommandRow | None:
        """The command's row once finished; as it stands when `timeout` passes first (None
        if there is no such command).

        `stored`: the columns of the row as this replica inserted it, for a command it
        `expect`s. Its result, when applied here, is then taken as it was applied (the update
        changes only the result's columns of a running row), not read back."""
        event = asyncio.Event()
        self._waiters.setdefault(cid, set()).add(event)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        poll = POLL_SECONDS
        # Expected: registered before the command could end, so its result cannot have been
        # applied unseen yet; the first read waits for the event (or the first poll).
        read = stored is None or cid not in self._expected
        try:
            while True:
                event.clear()
                delivered = self._expected.get(cid) if stored is not None else None
                if delivered is not None:
                    return CommandRow.in_memory({**stored, **outcome_values(delivered[0])})
                if not read:
                    read = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), poll)
                    continue
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
