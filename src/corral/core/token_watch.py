"""Long-lived sessions end with the token that opened them.

A session that outlives its request (a WebSocket, a followed log, an SSH channel) holds a
`TokenLease` while it runs and races its work against it (`TokenLease.run`). One `TokenWatcher`
per server keeps the leases by token and ends them when their token goes:

- revoked here: `TokenWatcher.end` at once, from the code that deleted the token;
- revoked on another replica sharing the store (or removed with its cmd.io user): one query for
  every watched token, about once a second, finds the ones that are gone;
- expired: at its expiry, by the clock, without asking the store.

A session costs one lease (an event in a dict) and one waiting task; the store's cost does not
grow with the number of sessions, only (in batches) with the number of distinct tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import select

from corral.core.errors import Unauthenticated
from corral.store.db import Database
from corral.store.tables import TokenRow

log = logging.getLogger(__name__)

T = TypeVar("T")

REVOKED = "the token was revoked"
EXPIRED = "the token has expired"
CHECK_SECONDS = 1.0  # how often the store is asked about the watched tokens
QUERY_BATCH = 500  # token ids per query (SQLite takes at most 32766 bound values)
UNKNOWN = object()  # an expiry not known yet: the next check of the store reads it
GONE_KEPT = 10_000  # ended tokens remembered, so that a session opened late ends at once


class TokenEnded(Unauthenticated):
    """The token a session was opened with was revoked or expired while it ran."""


class TokenLease:
    """One session's hold on its token; `ended` once the token is revoked or expires."""

    __slots__ = ("_event", "_watcher", "reason", "token_id")

    def __init__(self, token_id: str, watcher: TokenWatcher | None) -> None:
        self.token_id = token_id
        self.reason: str | None = None
        self._event = asyncio.Event()
        self._watcher = watcher  # None: a token that never ends (the admin key)

    @property
    def ended(self) -> bool:
        return self.reason is not None

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._event.set()

    async def wait(self) -> str:
        """The reason, once the token has ended (never, for the admin key)."""
        await self._event.wait()
        assert self.reason is not None
        return self.reason

    async def run(self, work: Awaitable[T]) -> T:
        """`work`'s result; if the token ends first, `work` is cancelled and TokenEnded raised."""
        if self.ended:
            if asyncio.iscoroutine(work):
                work.close()
            raise TokenEnded(self.reason or REVOKED)
        task = asyncio.ensure_future(work)
        if self._watcher is None:
            return await task
        ending = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, ending}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            ending.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TokenEnded(self.reason or REVOKED)

    def release(self) -> None:
        if self._watcher is not None:
            self._watcher._drop(self)
            self._watcher = None

    def __enter__(self) -> TokenLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TokenWatcher:
    """The leases of one server, by token, and the loop that ends them."""

    def __init__(
        self,
        db: Database,
        *,
        check_seconds: float = CHECK_SECONDS,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.check_seconds = check_seconds
        self._on_gone = on_gone  # told of each token found revoked (to drop cached lookups)
        self._leases: dict[str, set[TokenLease]] = {}
        self._expiry: dict[str, float | None] = {}  # epoch seconds; None: never
        self._gone: dict[str, str] = {}  # token id: why it ended (ids are never reused)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def lease(self, token_id: str, expires_at: datetime | Any | None = UNKNOWN) -> TokenLease:
        lease = TokenLease(token_id, self)
        if token_id in self._gone:
            lease.end(self._gone[token_id])
            lease._watcher = None
            return lease
        self._leases.setdefault(token_id, set()).add(lease)
        if expires_at is not UNKNOWN:
            when = None if expires_at is None else expires_at.timestamp()
            if when is not None and when <= time.time():
                self.end(token_id, EXPIRED)
                return lease
            self._expiry[token_id] = when
            if when is not None:
                self._wake.set()  # it may expire before the loop would next look
        return lease

    def end(self, token_id: str, reason: str) -> None:
        """End every session of a token now (it was revoked or has expired)."""
        if len(self._gone) >= GONE_KEPT:
            self._gone.clear()
        self._gone[token_id] = reason
        for lease in self._leases.pop(token_id, ()):
            lease.end(reason)
            lease._watcher = None
        self._expiry.pop(token_id, None)

    @property
    def watched(self) -> int:
        return len(self._leases)

    def _drop(self, lease: TokenLease) -> None:
        leases = self._leases.get(lease.token_id)
        if leases is None:
            return
        leases.discard(lease)
        if not leases:
            del self._leases[lease.token_id]
            self._expiry.pop(lease.token_id, None)

    # --- the loop ---

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time()
        while True:
            self._wake.clear()  # before reading the expiries: a lease added later wakes us
            soonest = min((e for e in self._expiry.values() if e is not None), default=math.inf)
            delay = min(next_check - loop.time(), soonest - time.time())
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            self.expire_due()
            if loop.time() >= next_check:
                next_check = loop.time() + self.check_seconds
                await self.check()

    def expire_due(self) -> None:
        now = time.time()
        for token_id, when in list(self._expiry.items()):
            if when is not None and when <= now:
                self.end(token_id, EXPIRED)

    async def check(self) -> None:
        """Ask the store about every watched token: gone ones end, expiries are learned."""
        ids = list(self._leases)
        try:
            found: dict[str, datetime | None] = {}
            for start in range(0, len(ids), QUERY_BATCH):
                batch = ids[start : start + QUERY_BATCH]
                async with self.db.session() as session:
                    rows = await session.execute(
                        select(TokenRow.id, TokenRow.expires_at).where(TokenRow.id.in_(batch))
                    )
                    found.update((token_id, expires_at) for token_id, expires_at in rows)
        except Exception as exc:  # the store is unreachable: sessions go on, retried soon
            if not self._failing:
                log.warning("cannot check the tokens of open sessions: %r", exc)
            self._failing = True
            return
        self._failing = False
        now = datetime.now(UTC)
        for token_id in ids:
            if token_id not in self._leases:
                continue  # its sessions ended while the store answered
            if token_id not in found:
                self.end(token_id, REVOKED)
                if self._on_gone is not None:
                    self._on_gone(token_id)
                continue
            expires_at = found[token_id]
            if expires_at is not None and expires_at <= now:
                self.end(token_id, EXPIRED)
            else:
                self._expiry[token_id] = None if expires_at is None else expires_at.timestamp()
