"""Commands: start, wait, cancel, and the history kept in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral import ids
from corral.clock import utcnow
from corral.core.errors import Conflict, InvalidArgument, NotFound, RateLimited, Unavailable
from corral.core.metrics import Metrics
from corral.core.models import Command, CommandStatus, ExecRequest, Page
from corral.core.nodes import lose_commands
from corral.core.paging import decode_cursor, next_cursor
from corral.core.results import CommandResults, outcome_values
from corral.node.base import (
    CommandOutcome,
    CommandSpec,
    Execution,
    Node,
    NodeUnavailable,
    TooManyCommands,
)
from corral.node.directory import NodeDirectory
from corral.node.output_log import Chunk
from corral.runtime.base import SandboxDied, SpawnError, StartUnknown
from corral.settings import Settings
from corral.store.db import Database
from corral.store.tables import CommandRow, SandboxRow
from corral.store.writer import BatchWriter

if TYPE_CHECKING:
    from corral.core.webhooks import EventSink

log = logging.getLogger(__name__)
SHELL = "/bin/bash"
DEFER_STORE_SECONDS = 0.1
COMMANDS = CommandRow.__table__
# The row's attributes as its table's columns (a ColumnCollection builds a list per iteration).
COLUMN_KEYS = tuple(c.key for c in COMMANDS.columns)
DEFAULT_CWD = "/workspace"
COMMAND_FINISHED_EVENT = "command.finished"  # core/webhooks.py


def default_cwd(sandbox: SandboxRow) -> str:
    """Where a command starts when it names no directory: its image's WorkingDir, if any."""
    image = sandbox.spec.get("image")
    working_dir = image.get("working_dir") if isinstance(image, dict) else None
    return str(working_dir) if working_dir and str(working_dir).startswith("/") else DEFAULT_CWD


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def to_model(row: CommandRow, output: tuple[bytes, bytes] | None = None) -> Command:
    return Command(
        id=row.id,
        sandbox_id=row.sandbox_id,
        status=CommandStatus(row.status),
        command=row.command,
        args=row.args,
        cwd=row.cwd,
        user=row.user,
        env_keys=row.env_keys,
        timeout_ms=row.timeout_ms,
        max_output_bytes=row.max_output_bytes,
        exit_code=row.exit_code,
        signal=row.signal,
        stdout=_decode(output[0]) if output is not None else None,
        stderr=_decode(output[1]) if output is not None else None,
        stdout_truncated=row.stdout_truncated,
        stderr_truncated=row.stderr_truncated,
        stdout_bytes=row.stdout_bytes,
        stderr_bytes=row.stderr_bytes,
        duration_ms=row.duration_ms,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
        cpu_ms=row.cpu_ms,
        peak_memory_bytes=row.peak_memory_bytes,
        oom_killed=bool(row.oom_killed),
    )


def command_event(row: CommandRow) -> dict[str, Any]:
    """A finished command as a webhook event's data: its result, without its output."""
    return {"command": to_model(row).model_dump(mode="json", exclude={"stdout", "stderr"})}


class CommandService:
    def __init__(
        self,
        db: Database,
        directory: NodeDirectory,
        settings: Settings,
        writer: BatchWriter | None = None,
        results: CommandResults | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.writer = writer or BatchWriter(db)
        self.metrics = metrics or Metrics()
        self.directory = directory
        self.results = results
        self.settings = settings
        # Per running command: its final row once stored (None if it could not be).
        self._finished: dict[str, asyncio.Future[CommandRow | None]] = {}
        self._finishers: set[asyncio.Task[None]] = set()
        # Rows of commands running here, served from memory: this server is their only writer
        # until their result is stored. Not in fleet mode: any replica may store the result.
        self._live: dict[str, CommandRow] = {}
        # Output that came with a remote command's result, for run()'s reply.
        self._outputs: dict[str, tuple[bytes, bytes]] = {}
        self._cache_rows = not directory.fleet
        self._accepting = True
        self.events: EventSink | None = None  # webhooks' command.finished; set by the server

    # --- starting ---

    def _check(self, req: ExecRequest) -> tuple[int, int]:
        timeout_ms = req.timeout_ms or self.settings.default_timeout_ms
        if timeout_ms > self.settings.max_timeout_ms:
            raise InvalidArgument(
                f"timeout_ms may be at most {self.settings.max_timeout_ms}",
                details=[{"loc": ["body", "timeout_ms"], "msg": "too large"}],
            )
        cap = (
            req.max_output_bytes
            if req.max_output_bytes is not None
            else self.settings.default_max_output_bytes
        )
        if cap > self.settings.max_output_bytes_limit:
            raise InvalidArgument(
                f"max_output_bytes may be at most {self.settings.max_output_bytes_limit}",
                details=[{"loc": ["body", "max_output_bytes"], "msg": "too large"}],
            )
        return timeout_ms, cap

    async def start(
        self,
        sandbox: SandboxRow,
        req: ExecRequest,
        *,
        source: str = "native",
        stdin: bytes | None = None,
        interactive: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        defer_store: bool = False,
    ) -> tuple[CommandRow, Execution | None]:
        """Start a command; the returned row is already stored (running, or failed to start),
        unless `defer_store`: then it is stored by the time `wait_finished` returns.

        `interactive` keeps standard input open for `Execution.write_stdin`; `tty` runs the
        command on a terminal of `rows` x `cols` (one output stream).
        """
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        timeout_ms, cap = self._check(req)
        node = await self.directory.get(sandbox.node_id)
        argv = [SHELL, "-c", req.command] if req.args is None else [req.command, *req.args]
        cid = ids.new_id(ids.COMMAND)
        now = utcnow()
        row = CommandRow.in_memory(
            {
                "id": cid,
                "sandbox_id": sandbox.id,
                "node_id": sandbox.node_id,
                "status": CommandStatus.running.value,
                "command": req.command,
                "args": req.args,
                "cwd": req.cwd or default_cwd(sandbox),
                "user": req.user or "user",
                "env_keys": sorted(req.env),
                "timeout_ms": timeout_ms,
                "max_output_bytes": cap,
                "stdout_bytes": 0,
                "stderr_bytes": 0,
                "stdout_truncated": False,
                "stderr_truncated": False,
                "created_at": now,
                "source": source,
                "oom_killed": False,
            }
        )
        spec = CommandSpec(
            id=cid,
            sandbox_id=sandbox.id,
            argv=argv,
            env=req.env,
            cwd=row.cwd,
            stdin=stdin if stdin is not None else (req.stdin.encode() if req.stdin else None),
            timeout_ms=timeout_ms,
            max_output_bytes=cap,
            # Interactive and terminal either from the request (the native API) or from the
            # caller (faces that run their own sessions).
            interactive=interactive or tty or req.interactive or req.tty,
            tty=tty or req.tty,
            rows=req.rows if req.tty and not tty else rows,
            cols=req.cols if req.tty and not tty else cols,
            user=row.user,
            max_running=self.settings.max_running_commands_per_sandbox,  # the node refuses more
        )
        execution: Execution | None = None
        reply = defer_store  # run() answers with the output: keep it if it comes with the result
        inserted: dict[str, Any] | None = None
        if node.remote:
            # The node's `ended` event may come before run() returns here: the row is there
            # first, for whichever replica takes the event.
            defer_store = False
            row.started_at = now
            inserted = self._values(row)
            if self.results is not None:
                self.results.expect(cid)
            try:
                await self.writer.insert(COMMANDS, inserted)
            except BaseException:
                self._forget_expected(cid)
                raise
        try:
            execution = await node.run(spec)
            row.started_at = execution.started_at
        except SpawnError as exc:
            row.status = CommandStatus.failed.value
            row.error = f"could not start: {exc}"
            row.finished_at = utcnow()
            row.duration_ms = 0
        except StartUnknown as exc:
            row.status = CommandStatus.lost.value
            row.error = f"the sandbox stopped as the command started; its result is unknown: {exc}"
            row.finished_at = utcnow()
        except SandboxDied as exc:
            if node.remote:
                self._forget_expected(cid)
                await self._delete(row.id)
            raise Unavailable(f"sandbox {sandbox.id} is not running: {exc}") from None
        except TooManyCommands as exc:
            if node.remote:
                self._forget_expected(cid)
                await self._delete(row.id)
            raise RateLimited(str(exc)) from None
        except BaseException:
            if node.remote:
                self._forget_expected(cid)
                with contextlib.suppress(Exception):
                    await self._record_failure(row.id, "the node did not answer as it started")
            raise
        if execution is None:
            if node.remote:
                self._forget_expected(cid)
                await self._record_failure(row.id, row.error, row.status)
            else:
                await self._insert(row)
            self.metrics.command_finished(row.status)
            await self.announce(row)
            return row, None
        if node.remote:
            pass  # stored above
        elif not defer_store:
            try:
                await self._insert(row)
            except BaseException:
                await execution.cancel()
                raise
        if self._cache_rows:
            self._live[cid] = row
        self._finished[cid] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            self._finish(row, execution, stored=not defer_store, remote=inserted, keep_output=reply)
        )
        self._finishers.add(task)
        task.add_done_callback(self._finishers.discard)
        return row, execution

    @staticmethod
    def _values(row: CommandRow) -> dict[str, Any]:
        held = row.__dict__
        try:  # a row built here holds every column (a loaded one may not: then the ORM's way)
            return {key: held[key] for key in COLUMN_KEYS}
        except KeyError:
            return {key: getattr(row, key) for key in COLUMN_KEYS}

    async def _insert(self, row: CommandRow, values: dict[str, Any] | None = None) -> None:
        await self.writer.insert(COMMANDS, values if values is not None else self._values(row))

    def _forget_expected(self, cid: str) -> None:
        if self.results is not None:
            self.results.forget(cid)

    async def _delete(self, cid: str) -> None:
        async with self.db.transaction() as session:
            stored = await session.get(CommandRow, cid)
            if stored is not None:
                await session.delete(stored)

    async def _record_failure(
        self, cid: str, error: str | None, status: str = CommandStatus.lost.value
    ) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(CommandRow)
                .where(CommandRow.id == cid)
                .values(status=status, error=error, finished_at=utcnow(), duration_ms=0)
            )

    async def _finish(
        self,
        row: CommandRow,
        execution: Execution,
        *,
        stored: bool,
        remote: dict[str, Any] | None = None,
        keep_output: bool = False,
    ) -> None:
        """Record the result (`remote`: the row as inserted, for a command on a remote node)."""
        recorded: CommandRow | None = None
        try:
            if remote is not None:
                # Stored by the replica that took the node's event: waited for in the store,
                # or handed over by this replica's event handler.
                assert self.results is not None
                try:
                    recorded = await self.results.wait_row(row.id, stored=remote)
                finally:
                    output = self.results.delivered_output(row.id)
                if keep_output and output is not None:
                    self._outputs[row.id] = output
                return
            if not stored:
                # A sync command that ends within the grace is stored once, with its result;
                # a longer one is stored as running first, for listings and `lost` recovery.
                done = asyncio.ensure_future(execution.outcome())
                await asyncio.wait({done}, timeout=DEFER_STORE_SECONDS)
                if not done.done():
                    await self._insert(row)
                    stored = True
                outcome = await done
            else:
                outcome = await execution.outcome()
            # The result goes on a copy: readers keep seeing the running row until it is stored.
            values = {**self._values(row), **outcome_values(outcome)}
            final = CommandRow.in_memory(values)
            if stored:
                await self._record(row.id, outcome)
            else:
                await self._insert(final, values)
            recorded = final
            if self.results is not None:
                await self.results.announce(row.id)  # waiters on other replicas
            await self.announce(final)
        except Exception:
            log.exception("could not record the result of %s", row.id)
        finally:
            if recorded is not None:
                self.metrics.command_finished(recorded.status)
            self._live.pop(row.id, None)
            done_future = self._finished.pop(row.id, None)
            if done_future is not None and not done_future.done():
                done_future.set_result(recorded)

    async def announce(self, row: CommandRow) -> None:
        """A command.finished event for webhooks, once its result is stored (a result that
        comes from a remote node is announced by the replica that stores it)."""
        if self.events is None:
            return
        try:
            await self.events(
                COMMAND_FINISHED_EVENT, row.sandbox_id, lambda: command_event(row), None
            )
        except Exception:
            log.exception("the command.finished event of %s was not stored", row.id)

    async def announce_in(self, session: AsyncSession, row: CommandRow) -> None:
        """As `announce`, in `session`'s transaction (commands declared lost in bulk)."""
        if self.events is not None:
            await self.events(
                COMMAND_FINISHED_EVENT, row.sandbox_id, lambda: command_event(row), session
            )

    async def _record(self, cid: str, outcome: CommandOutcome) -> None:
        await self.writer.update(COMMANDS, "id", {"id": cid, **outcome_values(outcome)})

    async def run(
        self,
        sandbox: SandboxRow,
        req: ExecRequest,
        *,
        source: str = "native",
        stdin: bytes | None = None,
    ) -> Command:
        """Start a command and wait for its result, output included.

        The reply is built from memory; it is sent only once the result is stored."""
        started = time.perf_counter()
        row, execution = await self.start(
            sandbox, req, source=source, stdin=stdin, defer_store=True
        )
        if execution is None:
            return to_model(row, (b"", b""))
        try:
            final = await asyncio.shield(self._finished[row.id])
            output = self._outputs.pop(row.id, None)
        finally:
            self._outputs.pop(row.id, None)
        if final is None:
            raise Unavailable(f"command {row.id} ended but its result could not be stored")
        if output is None:
            output = await self.output(row.sandbox_id, row.id)
        self.metrics.exec_done(source, time.perf_counter() - started)
        return to_model(final, output)

    async def wait_finished(self, cid: str, timeout: float | None = None) -> bool:
        done = self._finished.get(cid)
        if done is None:
            if self.results is None:
                return True
            row = await self.results.wait_row(cid, timeout)
            return row is None or CommandStatus(row.status).finished
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return False
        return True

    # --- queries ---

    async def row(self, sandbox_id: str, cid: str) -> CommandRow:
        row = self._live.get(cid) if self._cache_rows else None
        if row is None:
            async with self.db.session() as session:
                row = await session.get(CommandRow, cid)
        if row is None or row.sandbox_id != sandbox_id:
            raise NotFound(f"no command {cid!r} in sandbox {sandbox_id}")
        return row

    async def get(
        self,
        sandbox_id: str,
        cid: str,
        *,
        wait: bool = False,
        timeout: float | None = None,
        output: tuple[bytes, bytes] | None = None,
    ) -> Command:
        row = await self.row(sandbox_id, cid)
        if wait and not CommandStatus(row.status).finished:
            await self.wait_finished(cid, timeout)
            row = await self.row(sandbox_id, cid)
        if output is None:
            try:
                output = await self.output(row.sandbox_id, row.id)
            except NodeUnavailable:
                output = None  # on a node that does not answer: the row alone
        return to_model(row, output)

    async def node_of(self, row: CommandRow) -> Node:
        return await self.directory.get(row.node_id)

    async def execution(self, row: CommandRow) -> Execution | None:
        """The command's execution while it runs, on whichever node (from any replica)."""
        if CommandStatus(row.status).finished:
            return None
        node = await self.directory.get(row.node_id)
        return await node.execution(row.id)

    # --- output, read through the node that holds it ---

    async def follow_output(
        self, sandbox_id: str, cid: str, offset: int = 0, *, idle: float | None = None
    ) -> AsyncIterator[Chunk | None]:
        node = await self.directory.for_sandbox(sandbox_id)
        source = node.follow_output(sandbox_id, cid, offset, idle=idle)
        async with contextlib.aclosing(source):  # type: ignore[type-var]
            async for chunk in source:
                yield chunk

    async def follow_raw(
        self, sandbox_id: str, cid: str, offset: int = 0, streams: frozenset[int] | None = None
    ) -> AsyncIterator[tuple[bytes | memoryview, int]]:
        node = await self.directory.for_sandbox(sandbox_id)
        source = node.follow_raw(sandbox_id, cid, offset, streams)
        async with contextlib.aclosing(source):  # type: ignore[type-var]
            async for piece in source:
                yield piece

    async def check_offset(self, sandbox_id: str, cid: str, offset: int) -> None:
        node = await self.directory.for_sandbox(sandbox_id)
        await node.check_offset(sandbox_id, cid, offset)

    async def output(self, sandbox_id: str, cid: str) -> tuple[bytes, bytes]:
        node = await self.directory.for_sandbox(sandbox_id)
        return await node.output(sandbox_id, cid)

    async def final_row(self, sandbox_id: str, cid: str) -> CommandRow:
        """The command's row once its result is recorded, or as it stands if it can no longer
        be (not running here any more, yet not finished: the caller reports it as unknown)."""
        while True:
            await self.wait_finished(cid)
            row = await self.row(sandbox_id, cid)
            if CommandStatus(row.status).finished:
                return row
            if self.results is not None:
                # Fleet mode: the result is stored by whoever takes the node's event.
                stored = await self.results.wait_row(cid)
                return stored if stored is not None else row
            execution = await self.execution(row)
            if execution is None:
                # Possibly registered a moment from now (start() stores the row first).
                await asyncio.sleep(0.05)
                row = await self.row(sandbox_id, cid)
                if CommandStatus(row.status).finished or cid in self._finished:
                    continue
                return row
            await execution.outcome()
            await asyncio.sleep(0)

    async def list(
        self,
        sandbox_id: str,
        *,
        status: CommandStatus | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Command]:
        """Newest first."""
        query = (
            select(CommandRow)
            .where(CommandRow.sandbox_id == sandbox_id)
            .order_by(CommandRow.id.desc())
            .limit(limit + 1)
        )
        if status is not None:
            query = query.where(CommandRow.status == status.value)
        if since is not None:
            query = query.where(CommandRow.created_at >= since)
        if until is not None:
            query = query.where(CommandRow.created_at < until)
        if cursor:
            query = query.where(CommandRow.id < decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        nxt = next_cursor(rows, limit)
        return Page[Command](items=[to_model(r) for r in rows[:limit]], next_cursor=nxt)

    async def ordinal(self, sandbox_id: str, cid: str) -> int:
        """The command's number in its sandbox: 1 for its first command, and so on (ids grow
        with time, so the number of a stored command does not change)."""
        async with self.db.session() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(CommandRow)
                .where(CommandRow.sandbox_id == sandbox_id, CommandRow.id <= cid)
            )
        return int(count or 0)

    async def by_ordinal(self, sandbox_id: str, number: int) -> CommandRow:
        """The sandbox's `number`th command (see `ordinal`)."""
        row = None
        if number >= 1:
            async with self.db.session() as session:
                row = await session.scalar(
                    select(CommandRow)
                    .where(CommandRow.sandbox_id == sandbox_id)
                    .order_by(CommandRow.id)
                    .offset(number - 1)
                    .limit(1)
                )
        if row is None:
            raise NotFound(f"no command number {number} in sandbox {sandbox_id}")
        return await self.row(sandbox_id, row.id)

    async def cancel(self, sandbox_id: str, cid: str) -> Command:
        row = await self.row(sandbox_id, cid)
        execution = await self.execution(row)
        if CommandStatus(row.status).finished or execution is None:
            raise Conflict(f"command {cid} has already finished ({row.status})")
        await execution.cancel()
        await self.wait_finished(cid)
        return await self.get(sandbox_id, cid)

    # --- lifecycle ---

    async def mark_lost(self, node_id: str) -> int:
        """At start-up: whatever was running on the built-in node when the server died has an
        unknown result."""
        async with self.db.transaction() as session:
            lost = await lose_commands(
                session,
                node_id,
                "the server stopped while the command ran; its result is unknown",
                self.announce_in,
            )
        if lost:
            self.metrics.command_finished(CommandStatus.lost.value, lost)
        return lost

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout: float) -> None:
        """Wait for running commands' results to be recorded."""
        if self._finishers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(set(self._finishers), timeout=timeout)
