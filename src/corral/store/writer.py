"""Group commit for the hot path: rows written by many concurrent requests go to the store in
one transaction per batch, as one executemany per statement shape.

Every exec writes its command row (and, for a longer one, updates it at the end). Written one
transaction each, concurrent execs queue on the store's single writer and pay a transaction and
several thread hops apiece; batched, they share them. A caller's write is committed when its
`await` returns, as with its own transaction.

With SQLite, a batch is one hop to a thread of its own, which runs the whole transaction on its
own connection (the async driver would hop once per call). There each statement shape is
compiled once, to its SQL and the bind processors of its columns (as SQLAlchemy's own execution
would apply them), and run on the DB-API connection: an exec's one write, on its critical
path, went from 0.33 ms through `Connection.execute` to 0.18 ms. Other databases use the async
engine.

A small batch (INLINE_MAX rows at most: what one turn of the event loop queued) commits on
the event loop itself, on a connection of its own: the hop to the thread and back cost a
sequential exec 5% of its round trip. That connection never waits: it has no busy timeout (a
batch that finds the store locked goes to the thread, which waits) and no automatic
checkpoint (which would copy the WAL into the database and fsync on the loop); the thread
checkpoints instead, after every CHECKPOINT_EVERY commits on the loop, with the writes
queued behind it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Executable, Table, bindparam, create_engine, event, insert, make_url, update
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.expression import Insert, Update

from corral.store.db import Database, sqlite_pragmas

MAX_BATCH = 500
INLINE_MAX = 16  # rows a batch committed on the event loop may have (more go to the thread)
CHECKPOINT_EVERY = 256  # commits on the loop's connection between two checkpoints in the thread
KEY = "pk_"  # bind name of the key in batched updates (it must not clash with a column)
BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

log = logging.getLogger(__name__)


@dataclass
class _Write:
    table: Table
    values: dict[str, Any]
    key: str | None  # None: insert; else the primary-key column to update by
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @functools.cached_property
    def shape(self) -> tuple[str, str | None, tuple[str, ...]]:  # grouped, then looked up
        return self.table.name, self.key, tuple(sorted(self.values))


class BatchWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[_Write] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._raw: Any = None  # the writer thread's DB-API connection (SQLite)
        self._inline_engine: Engine | None = None
        self._inline: Any = None  # the event loop's DB-API connection (SQLite)
        self._inline_commits = 0  # since the last checkpoint
        self._compiled: dict[tuple[str, str | None, tuple[str, ...]], _Compiled | None] = {}
        self.transactions = 0  # committed, for tests and the curious
        if db.is_sqlite:
            url = make_url(db.url).set(drivername="sqlite")
            self._engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self._engine, "connect", sqlite_pragmas)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="corral-writer")
            self._inline_engine = create_engine(url, connect_args={"timeout": 0})
            event.listen(self._inline_engine, "connect", sqlite_pragmas)
            event.listen(self._inline_engine, "connect", _never_wait)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._thread is not None:
            if self._raw is not None:
                self._thread.submit(self._raw.close).result()
                self._raw = None
            self._thread.shutdown(wait=True)
        for engine in (self._engine, self._inline_engine):
            if engine is not None:
                engine.dispose()

    async def insert(self, table: Table, values: dict[str, Any]) -> None:
        await self._submit(_Write(table, values, None))

    async def insert_many(self, table: Table, rows: Sequence[dict[str, Any]]) -> int:
        """Insert `rows` in one batch (with whatever else is queued); how many failed."""
        writes = [_Write(table, values, None) for values in rows]
        if self._task is None or self._task.done():
            await self._write(writes)
        else:
            self._queue.extend(writes)
            self._wake.set()
        outcomes = await asyncio.gather(
            *(asyncio.shield(w.done) for w in writes), return_exceptions=True
        )
        return sum(isinstance(o, BaseException) for o in outcomes)

    async def update(self, table: Table, key: str, values: dict[str, Any]) -> None:
        """Update the row whose `key` column equals values[key] with the other values."""
        await self._submit(_Write(table, values, key))

    async def _submit(self, write: _Write) -> None:
        if self._task is None or self._task.done():
            await self._write([write])  # not started (or stopped): a transaction of its own
        else:
            self._queue.append(write)
            self._wake.set()
        await asyncio.shield(write.done)

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._write(batch, inline=True)
                if self._inline_commits >= CHECKPOINT_EVERY:
                    await self._checkpoint()

    def _commit_inline(self, batch: Sequence[_Write]) -> bool:
        """Commit a small batch here and now; False if the thread must: it is large, or a shape
        the DB-API path does not cover, or another connection holds the store's write lock.
        Raises what the store raised for the rows themselves (a duplicate key...)."""
        if self._inline_engine is None or len(batch) > INLINE_MAX:
            return False
        groups = _groups(batch)
        plans = [self._compile(first) for first, _ in groups]
        if None in plans:
            return False
        if self._inline is None:
            self._inline = self._inline_engine.raw_connection()
        try:
            _commit(self._inline, plans, groups)
        except OperationalError as exc:
            if exc.orig.sqlite_errorcode & 0xFF in BUSY:
                return False  # another connection is writing: the thread waits for it
            raise
        finally:
            if not self._inline.is_valid:
                self._inline = None  # broken: opened again for the next batch
        self.transactions += 1
        self._inline_commits += 1
        return True

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database in the thread. Nothing commits meanwhile (the writes
        queue behind it), so the checkpoint takes the whole WAL and the next commit starts it
        over; commits that went on would keep it growing."""
        self._inline_commits = 0
        assert self._thread is not None
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._checkpoint_in_thread
            )
        except Exception as exc:
            log.warning("WAL checkpoint failed: %s", exc)

    def _checkpoint_in_thread(self) -> None:
        cursor = self._thread_connection().cursor()
        try:
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            cursor.close()

    async def _write(self, batch: Sequence[_Write], *, inline: bool = False) -> None:
        try:
            if self._thread is not None:
                if not (inline and self._commit_inline(batch)):
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._thread, self._transaction_in_thread, batch)
            else:
                await self._transaction(batch)
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].done.done():
                    batch[0].done.set_exception(exc)
                return
            # One bad row must not fail its neighbours: write them one by one.
            for write in batch:
                await self._write([write], inline=inline)
            return
        for write in batch:
            if not write.done.done():
                write.done.set_result(None)

    def _transaction_in_thread(self, batch: Sequence[_Write]) -> None:
        assert self._engine is not None
        groups = _groups(batch)
        compiled = [self._compile(first) for first, _ in groups]
        if None in compiled:  # a shape the DB-API path does not cover: SQLAlchemy runs it all
            with self._engine.begin() as conn:
                for statement, params in _statements(batch):
                    conn.execute(statement, params)
            self.transactions += 1
            return
        raw = self._thread_connection()
        try:
            _commit(raw, compiled, groups)
        finally:
            if not raw.is_valid:
                self._raw = None  # broken: opened again for the next batch
        self.transactions += 1

    def _thread_connection(self) -> Any:
        """The writer thread's DB-API connection, opened on first use."""
        assert self._engine is not None
        if self._raw is None:
            self._raw = self._engine.raw_connection()
        return self._raw

    def _compile(self, first: _Write) -> _Compiled | None:
        shape = first.shape
        if shape not in self._compiled:
            assert self._engine is not None
            self._compiled[shape] = _Compiled.of(first, self._engine.dialect)
        return self._compiled[shape]

    async def _transaction(self, batch: Sequence[_Write]) -> None:
        if len(batch) == 1:
            # One row, one statement: atomic on its own, without a BEGIN and a COMMIT around
            # it (two round trips of three, on every remote exec's critical path).
            ((statement, params),) = _statements(batch)
            async with self.db.single_statements.connect() as conn:
                await conn.execute(statement, params[0])
                await conn.commit()  # nothing to send in autocommit; ends SQLAlchemy's own
        else:
            async with self.db.engine.begin() as conn:
                for statement, params in _statements(batch):
                    await conn.execute(statement, params)
        self.transactions += 1


@dataclass
class _Compiled:
    """A statement shape as the DB-API runs it: its SQL, and per positional parameter the value's
    name and the bind processor of its type (None where the value goes as it is)."""

    sql: str
    columns: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, first: _Write, dialect: Dialect) -> _Compiled | None:
        if dialect.paramstyle != "qmark":
            return None
        statement = _statement(first)
        if isinstance(statement, Insert):
            # A column left out would take its Python-side default, which only SQLAlchemy's
            # execution applies.
            if any(c.default is not None and c.key not in first.values for c in first.table.c):
                return None
        compiled = statement.compile(dialect=dialect, column_keys=sorted(first.values))
        names = tuple(compiled.positiontup or ())
        expected = set(first.values) if first.key is None else {*first.values, KEY} - {first.key}
        if set(names) != expected or len(names) != len(expected):
            return None
        columns = tuple((n, compiled.binds[n].type.bind_processor(dialect)) for n in names)
        return cls(str(compiled), columns)

    def parameters(self, row: dict[str, Any]) -> list[Any]:
        return [row[n] if process is None else process(row[n]) for n, process in self.columns]


def _commit(raw: Any, plans: Sequence[_Compiled | None], groups: list[Any]) -> None:
    """Run each group's statement on the pooled DB-API connection `raw`, then commit. On a
    failure: roll back (or invalidate `raw` if it cannot), and raise a database error as
    SQLAlchemy raises it (IntegrityError, OperationalError...)."""
    sql = ""
    try:
        cursor = raw.cursor()
        try:
            for plan, (_, rows) in zip(plans, groups, strict=True):
                assert plan is not None
                sql = plan.sql
                cursor.executemany(sql, [plan.parameters(row) for row in rows])
        finally:
            cursor.close()
        sql = "COMMIT"
        raw.commit()
    except BaseException as exc:
        try:
            raw.rollback()
        except Exception:
            raw.invalidate()
        if isinstance(exc, sqlite3.Error):
            raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc
        raise


def _never_wait(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=0")
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


def _groups(batch: Sequence[_Write]) -> list[tuple[_Write, list[dict[str, Any]]]]:
    """Runs of writes of one shape, in arrival order (a row's insert precedes its update), each
    with its rows as its statement takes them (an update's key under KEY)."""
    groups: list[tuple[_Write, list[dict[str, Any]]]] = []
    for write in batch:
        values = write.values
        if write.key is not None:
            values = {**{n: v for n, v in values.items() if n != write.key}, KEY: values[write.key]}
        if groups and groups[-1][0].shape == write.shape:
            groups[-1][1].append(values)
        else:
            groups.append((write, [values]))
    return groups


def _statement(first: _Write) -> Insert | Update:
    if first.key is None:
        return insert(first.table)
    key = first.key
    values = {name: bindparam(name) for name in first.values if name != key}
    return update(first.table).where(first.table.c[key] == bindparam(KEY)).values(values)


def _statements(batch: Sequence[_Write]) -> Iterator[tuple[Executable, list[dict[str, Any]]]]:
    """One executemany per run of writes of one shape."""
    for first, rows in _groups(batch):
        yield _statement(first), rows
