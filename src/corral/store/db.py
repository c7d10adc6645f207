"""The database handle: engine, sessions, migrations at start-up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

MIGRATIONS = Path(__file__).with_name("migrations")
# One key for every replica: a PostgreSQL advisory lock held while migrating, so that replicas
# starting together run each migration once (the others wait, then find the schema current).
MIGRATION_LOCK_KEY = 0x636F7272616C  # "corral"
POOL_SIZE = 20  # PostgreSQL connections a process keeps (as many again in a burst)
PLACEMENT_LOCK_KEY = MIGRATION_LOCK_KEY + 1  # admission and uid slots of new sandboxes


class Database:
    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if not self.is_sqlite:
            # A command on a remote node takes a few sessions in turn; with the default pool
            # (5) a replica under load waits for connections and opens new ones per request.
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
            # Sessions end their own transactions on close; the pool's extra rollback per
            # checkout is one more thread hop on every request.
            kwargs["pool_reset_on_return"] = None
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # PostgreSQL runs a lone statement as a transaction of its own. Through this engine a
        # read or a single write is one round trip; a session's BEGIN and its ROLLBACK (or
        # COMMIT) at the end were two more, on the fleet's hot path (the sandbox's row on
        # every exec). SQLite's driver begins a transaction only to write: nothing to save.
        self.single_statements: AsyncEngine = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._statements = async_sessionmaker(self.single_statements, expire_on_commit=False)

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Transaction-scoped: released with the commit that ends the migration.
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            await conn.run_sync(_upgrade)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def statements(self) -> AsyncIterator[AsyncSession]:
        """A session whose statements run each on its own: for reads that need no snapshot
        across statements. On PostgreSQL a write through it is committed as it runs (nothing
        else is atomic with it); on SQLite it is rolled back at the end, so write there only
        through `transaction()`."""
        async with self._statements() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    async def serialize(self, session: AsyncSession, key: int) -> None:
        """Hold `key` until the session's transaction ends, against every replica (SQLite has
        one writer at a time already)."""
        if not self.is_sqlite:
            await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    async def close(self) -> None:
        await self.engine.dispose()


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer. NORMAL: a commit survives a crash of the process
    # (the kernel holds the WAL); only a power loss can take the last commits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _upgrade(conn: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
