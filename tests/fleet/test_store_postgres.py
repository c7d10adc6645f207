"""The store on PostgreSQL: the same migrations as SQLite, run once when replicas start together."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import text

from corral.store.db import Database
from tests.engines import PostgresCluster


async def _fresh_database(cluster: PostgresCluster) -> str:
    """A new empty database on the shared cluster, so each test migrates from nothing."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = Database(cluster.url)
    async with admin.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.close()
    return cluster.url.rsplit("/", 1)[0] + "/" + name


def test_replicas_starting_together_migrate_once(postgres: PostgresCluster) -> None:
    async def main() -> tuple[list[tuple[str]], int]:
        url = await _fresh_database(postgres)
        replicas = [Database(url) for _ in range(4)]
        try:
            # Without the lock, concurrent upgrades collide on CREATE TABLE and one fails.
            await asyncio.gather(*(db.migrate() for db in replicas))
            async with replicas[0].session() as session:
                versions = await session.execute(text("SELECT version_num FROM alembic_version"))
                tables = await session.execute(
                    text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                )
                return [tuple(r) for r in versions.all()], int(tables.scalar_one())
        finally:
            for db in replicas:
                await db.close()

    versions, tables = asyncio.run(main())
    assert len(versions) == 1
    assert tables >= 6  # sandboxes, commands, tokens, users, named commands, alembic_version


def test_one_lease_holder_among_racing_replicas(postgres: PostgresCluster) -> None:
    from corral.core.leases import Lease

    async def main() -> tuple[int, bool, bool]:
        url = await _fresh_database(postgres)
        dbs = [Database(url) for _ in range(5)]
        await dbs[0].migrate()
        try:
            leases = [Lease(db, "sweep", f"replica-{i}", ttl=0.5) for i, db in enumerate(dbs)]
            rounds = [
                await asyncio.gather(*(lease.acquire() for lease in leases)) for _ in range(3)
            ]
            winners = {tuple(r).index(True) for r in rounds if sum(r) == 1}
            await asyncio.sleep(0.6)
            # The holder lapsed: another may take it now, and then the first may not.
            holder = winners.pop() if len(winners) == 1 else -1
            other = (holder + 1) % len(leases)
            took = await leases[other].acquire()
            refused = not await leases[holder].acquire()
            return sum(sum(r) for r in rounds), took, refused
        finally:
            for db in dbs:
                await db.close()

    total, took, refused = asyncio.run(main())
    assert total == 3  # one winner per round, the same one renewing
    assert took and refused


def test_single_statements_commit_as_they_run_and_batches_keep_their_transaction(
    postgres: PostgresCluster,
) -> None:
    from sqlalchemy import select, update
    from sqlalchemy.exc import IntegrityError

    from corral.store.tables import CommandRow
    from corral.store.writer import BatchWriter
    from tests.unit.test_writer import COMMANDS, command

    async def main() -> None:
        url = await _fresh_database(postgres)
        db, other = Database(url), Database(url)
        try:
            await db.migrate()
            writer = BatchWriter(db)  # no task: each write is a batch of one
            await writer.insert(COMMANDS, command("cmd_one"))
            async with other.statements() as session:
                assert await session.get(CommandRow, "cmd_one") is not None
            # A bad row alone still fails as SQLAlchemy raises it, and leaves nothing behind.
            bad = {**command("cmd_one"), "command": "changed"}
            try:
                await writer.insert(COMMANDS, bad)
            except IntegrityError:
                pass
            else:
                raise AssertionError("a duplicate id was accepted")
            # A batch of several is one transaction: a bad row fails alone, its neighbour is
            # stored.
            failed = await writer.insert_many(COMMANDS, [command("cmd_two"), bad])
            assert failed == 1
            # A write through statements() is visible to others before its session ends.
            async with db.statements() as session:
                await session.execute(
                    update(CommandRow).where(CommandRow.id == "cmd_two").values(status="lost")
                )
                async with other.statements() as seen:
                    status = await seen.scalar(
                        select(CommandRow.status).where(CommandRow.id == "cmd_two")
                    )
                assert status == "lost"
            async with other.statements() as session:
                rows = {r.id: r for r in await session.scalars(select(CommandRow))}
            assert sorted(rows) == ["cmd_one", "cmd_two"]
            assert rows["cmd_one"].command == "true"
        finally:
            await db.close()
            await other.close()

    asyncio.run(main())
