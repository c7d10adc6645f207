"""Leader leases on a real SQLite store: one holder at a time, taken over once it lapses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.core.leases import LeaderLoop, Lease
from corral.store.db import Database


async def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
    await db.migrate()
    return db


def test_one_holder_until_the_lease_lapses(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _db(tmp_path)
        a, b = Lease(db, "reaper", "a", ttl=0.5), Lease(db, "reaper", "b", ttl=0.5)
        assert await a.acquire()
        assert not await b.acquire()
        assert await a.acquire()  # renewal
        await asyncio.sleep(0.6)
        assert await b.acquire()  # a lapsed
        assert not await a.acquire()
        await b.release()
        assert await a.acquire()
        await db.close()

    asyncio.run(main())


def test_many_contenders_one_winner(tmp_path: Path) -> None:
    async def main() -> list[bool]:
        db = await _db(tmp_path)
        leases = [Lease(db, "sweep", f"p{i}") for i in range(10)]
        won = await asyncio.gather(*(lease.acquire() for lease in leases))
        await db.close()
        return list(won)

    assert sum(asyncio.run(main())) == 1


def test_leader_loop_runs_in_one_process_and_moves_on_stop(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int]:
        db = await _db(tmp_path)
        runs = {"a": 0, "b": 0}

        def body(who: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                runs[who] += 1

            return run

        a = LeaderLoop(db, "pool", "a", body("a"), interval=0.05)
        a.start()
        await asyncio.sleep(0.05)
        b = LeaderLoop(db, "pool", "b", body("b"), interval=0.05)
        b.start()
        await asyncio.sleep(0.5)
        a_runs, b_runs_while_a = runs["a"], runs["b"]
        await a.stop()  # releases: b takes over at its next turn
        await asyncio.sleep(0.3)
        await b.stop()
        await db.close()
        return a_runs, b_runs_while_a, runs["b"]

    a_runs, b_while_a, b_after = asyncio.run(main())
    assert a_runs >= 5
    assert b_while_a == 0
    assert b_after >= 3
