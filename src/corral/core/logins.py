"""The password login throttle: repeated failures from one client address, or for one account,
make the next attempts wait (429 with `Retry-After`).

Each key (an address, an account) has `FREE_FAILURES` failures free; every failure past them
closes the key for a while, 1 s after the first and doubling up to `MAX_WAIT`. While a key is
closed, attempts are refused before the password is checked, so the wait cannot be used to try
passwords. A success forgets the failures of its keys; failures older than `FORGET_AFTER` are
forgotten too. A closed account locks out its real owner as well, for `MAX_WAIT` at most: the
price of stopping a guesser who changes address; API keys keep working meanwhile.

The counts are in the store (`login_failures`), so every API replica sees the same ones. Within
a process attempts are checked one at a time, so that a burst of parallel attempts cannot all
pass before the first failure is written; across replicas such a burst can pass the limit by
one attempt per replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from corral.core.errors import RateLimited
from corral.core.metrics import Metrics
from corral.store.db import Database
from corral.store.tables import LoginFailureRow

FREE_FAILURES = 5
FIRST_WAIT = 1.0  # seconds, after the first failure past the free ones
MAX_WAIT = 300.0
FORGET_AFTER = timedelta(hours=1)


class LoginThrottled(RateLimited):
    code = "login_throttled"


def login_keys(address: str | None, account: str) -> list[str]:
    """The keys an attempt counts against: its client address and the account it names (hashed:
    the table holds no email addresses, and any account string fits the key)."""
    digest = hashlib.sha256(account.strip().lower().encode()).hexdigest()[:40]
    return [f"addr:{(address or 'unknown')[:60]}", f"user:{digest}"]


def wait_after(failures: int) -> float:
    """How long a key stays closed after its `failures`-th failure."""
    if failures <= FREE_FAILURES:
        return 0.0
    return min(FIRST_WAIT * 2.0 ** min(failures - FREE_FAILURES - 1, 32), MAX_WAIT)


class LoginThrottle:
    def __init__(self, db: Database, metrics: Metrics | None = None) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        self._lock = asyncio.Lock()
        # Keys this process saw closed, and until when: a flood of attempts on a closed key is
        # refused without the store. (No success can reopen a key early anywhere: successes
        # happen only on open keys.)
        self._closed: dict[str, datetime] = {}

    async def attempt(self, keys: Sequence[str], verify: Callable[[], bool]) -> bool:
        """`verify()` (the password check), unless a key is closed (LoginThrottled); its failure
        is counted against every key, its success forgets them."""
        try:
            return await self._attempt(keys, verify)
        except LoginThrottled:
            self.metrics.refused("login")
            raise

    async def _attempt(self, keys: Sequence[str], verify: Callable[[], bool]) -> bool:
        self._refuse_if_closed(keys, self._closed)
        async with self._lock:
            self._refuse_if_closed(keys, self._closed)  # closed while this one queued
            now = datetime.now(UTC)
            async with self.db.session() as session:
                rows = list(
                    await session.scalars(
                        select(LoginFailureRow).where(LoginFailureRow.key.in_(keys))
                    )
                )
            self._refuse_if_closed(keys, {r.key: r.blocked_until for r in rows if r.blocked_until})
            ok = verify()
            if ok:
                await self._forget(keys)
            else:
                await self._count(keys, now)
            return ok

    def _refuse_if_closed(self, keys: Sequence[str], closed: dict[str, datetime]) -> None:
        now = datetime.now(UTC)
        until = [closed[k] for k in keys if k in closed and closed[k] > now]
        if not until:
            return
        for key in keys:
            if key in closed and closed[key] > now:
                self._closed[key] = closed[key]
        wait = math.ceil((max(until) - now).total_seconds())
        raise LoginThrottled(
            f"too many failed logins; try again in {wait} s", retry_after=max(1, wait)
        )

    async def _forget(self, keys: Sequence[str]) -> None:
        async with self.db.transaction() as session:
            await session.execute(delete(LoginFailureRow).where(LoginFailureRow.key.in_(keys)))

    async def _count(self, keys: Sequence[str], now: datetime) -> None:
        async with self.db.transaction() as session:
            for key in keys:
                row = await session.get(LoginFailureRow, key)
                if row is None:
                    row = LoginFailureRow(key=key, failures=0, last_failure_at=now)
                    session.add(row)
                elif now - row.last_failure_at > FORGET_AFTER:
                    row.failures = 0
                row.failures += 1
                row.last_failure_at = now
                wait = wait_after(row.failures)
                row.blocked_until = now + timedelta(seconds=wait) if wait else None
                if row.blocked_until is not None:
                    self._closed[key] = row.blocked_until
            if len(self._closed) > 10_000:
                self._closed = {k: t for k, t in self._closed.items() if t > now}
            # Keys quiet for long are of no use any more.
            await session.execute(
                delete(LoginFailureRow).where(LoginFailureRow.last_failure_at < now - FORGET_AFTER)
            )
