"""Replicas counted through the store, and the per-token rate limit split between them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.core.replicas import ReplicaCount
from corral.core.tokens import TokenBucket, TokenRateLimited
from corral.store.db import Database


def test_live_replicas_are_counted_and_a_stopped_one_leaves(tmp_path: Path) -> None:
    async def main() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
        await db.migrate()
        seen: list[tuple[str, int]] = []
        a = ReplicaCount(db, "a", lambda n: seen.append(("a", n)))
        b = ReplicaCount(db, "b", lambda n: seen.append(("b", n)))
        await a.start()
        await b.start()
        assert await a.refresh() == 2 and await b.refresh() == 2
        await b.stop()
        assert await a.refresh() == 1
        assert sorted(seen) == [("a", 1), ("a", 2), ("b", 2)] and seen[-1] == ("a", 1)
        await a.stop()
        await db.close()

    asyncio.run(main())


def test_a_replica_allows_its_share_of_the_limit() -> None:
    bucket = TokenBucket(rate=10, burst=8)
    bucket.share(2)
    for _ in range(4):
        bucket.take("tok")
    with pytest.raises(TokenRateLimited):
        bucket.take("tok")  # half the burst: the other replica has the other half
    assert bucket.rate == 5
    bucket.share(1)
    assert bucket.rate == 10 and bucket.burst == 8
