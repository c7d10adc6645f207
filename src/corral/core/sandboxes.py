"""Sandboxes: creation, lookup, lifecycle, and reconciliation after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from corral import ids
from corral.core.errors import Conflict, NotFound, RateLimited, SandboxNotRunning, Unavailable
from corral.core.models import Page, Sandbox, SandboxCreate, SandboxState, SandboxUpdate
from corral.core.paging import decode_cursor, encode_cursor
from corral.node.base import Node
from corral.runtime.base import NeedsRestart, SandboxConfig, SandboxDied
from corral.runtime.limits import Limits
from corral.store.db import Database
from corral.store.tables import SandboxRow

log = logging.getLogger(__name__)
RECONCILE_CONCURRENCY = 8


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_model(row: SandboxRow, enforced: dict[str, str] | None = None) -> Sandbox:
    spec = row.spec
    return Sandbox(
        id=row.id,
        name=row.name,
        state=SandboxState(row.state),
        node_id=row.node_id,
        template=row.template,
        env_keys=sorted(spec.get("env", {})),
        labels=spec.get("labels", {}),
        cpu=spec.get("cpu"),
        memory_mb=spec.get("memory_mb"),
        pids=spec.get("pids"),
        disk_mb=spec.get("disk_mb"),
        ttl_seconds=spec.get("ttl_seconds"),
        network=spec.get("network", "none"),
        allow=spec.get("allow", []),
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        error=row.error,
        limits_enforced=enforced or {},
    )


class SandboxService:
    def __init__(
        self,
        db: Database,
        node: Node,
        data_dir: Path,
        *,
        max_sandboxes: int,
        uid_count: int,
        default_limits: Limits | None = None,
    ) -> None:
        self.default_limits = default_limits or Limits()
        self.db = db
        self.node = node
        self.data_dir = data_dir
        self.max_sandboxes = max_sandboxes
        self.uid_count = uid_count
        self._alloc_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Rows of live sandboxes, by id and by name: every exec looks its sandbox up, and this
        # server is the only writer of its sandboxes' rows, so it can answer from memory. Each
        # write replaces the cached row after its commit; `_writes` stops a read that started
        # before a write from caching what it read.
        self._rows: dict[str, SandboxRow] = {}
        self._names: dict[str, str] = {}
        self._writes: dict[str, int] = {}
        node.on_sandbox_died = self._on_died

    def config(self, row: SandboxRow) -> SandboxConfig:
        return SandboxConfig(
            id=row.id,
            slot=row.slot,
            dir=self.data_dir / "sandboxes" / row.id,
            env=dict(row.spec.get("env", {})),
            limits=self.limits(row),
            template=row.template,
            network=row.spec.get("network", "none"),
            allow=tuple(row.spec.get("allow", [])),
        )

    def limits(self, row: SandboxRow) -> Limits:
        spec, default = row.spec, self.default_limits
        return Limits(
            cpu=spec.get("cpu") or default.cpu,
            memory_mb=spec.get("memory_mb") or default.memory_mb,
            pids=spec.get("pids") or default.pids,
            disk_mb=spec.get("disk_mb") or default.disk_mb,
        )

    def model(self, row: SandboxRow) -> Sandbox:
        return to_model(row, self.node.enforceable())

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    # --- queries ---

    def _remember(self, row: SandboxRow) -> None:
        """Cache a row just committed (or read with no write since)."""
        old = self._rows.get(row.id)
        if old is not None and old.name and self._names.get(old.name) == row.id:
            del self._names[old.name]
        if row.state == SandboxState.deleted.value:
            self._rows.pop(row.id, None)
            return
        self._rows[row.id] = row
        if row.name:
            self._names[row.name] = row.id

    def _written(self, sandbox_id: str) -> None:
        self._writes[sandbox_id] = self._writes.get(sandbox_id, 0) + 1

    async def row(self, ref: str) -> SandboxRow:
        """A sandbox by id, or by name among those not deleted."""
        cached = self._rows.get(ref) or self._rows.get(self._names.get(ref, ""))
        if cached is not None:
            return cached
        writes = dict(self._writes)
        async with self.db.session() as session:
            row = await session.get(SandboxRow, ref)
            if row is None:
                row = await session.scalar(
                    select(SandboxRow).where(
                        SandboxRow.name == ref, SandboxRow.state != SandboxState.deleted.value
                    )
                )
        if row is None:
            raise NotFound(f"no sandbox {ref!r}")
        if writes.get(row.id) == self._writes.get(row.id):
            self._remember(row)
        return row

    async def get(self, ref: str) -> Sandbox:
        return self.model(await self.row(ref))

    async def running_row(self, ref: str) -> SandboxRow:
        row = await self.row(ref)
        if row.state != SandboxState.running.value:
            raise SandboxNotRunning(f"sandbox {row.id} is {row.state}")
        if not self.node.sandbox_running(row.id):
            raise Unavailable(f"sandbox {row.id} is restarting; try again")
        return row

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        include_deleted: bool = False,
        only: frozenset[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Sandbox]:
        query = select(SandboxRow).order_by(SandboxRow.id).limit(limit + 1)
        if state is not None:
            query = query.where(SandboxRow.state == state.value)
        elif not include_deleted:
            query = query.where(SandboxRow.state != SandboxState.deleted.value)
        if only is not None:
            query = query.where(or_(SandboxRow.id.in_(only), SandboxRow.name.in_(only)))
        if cursor:
            query = query.where(SandboxRow.id > decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        nxt = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
        return Page[Sandbox](items=[self.model(r) for r in rows[:limit]], next_cursor=nxt)

    # --- lifecycle ---

    async def create(self, req: SandboxCreate) -> Sandbox:
        now = utcnow()
        spec = req.model_dump(mode="json")
        row = SandboxRow(
            id=ids.new_id(ids.SANDBOX),
            name=req.name,
            node_id=self.node.id,
            slot=0,
            state=SandboxState.creating.value,
            template=req.template,
            spec=spec,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=req.ttl_seconds) if req.ttl_seconds else None,
        )
        available = self.node.templates()
        if req.template not in available:
            raise Conflict(f"unknown template {req.template!r}; available: {', '.join(available)}")
        if req.network != "none" and not self.node.enforceable().get("network"):
            raise Unavailable("this host cannot give sandboxes a network policy")
        async with self._alloc_lock:
            async with self.db.transaction() as session:
                live = SandboxRow.state != SandboxState.deleted.value
                count = await session.scalar(select(func.count()).where(live))
                if (count or 0) >= self.max_sandboxes:
                    raise RateLimited(f"the limit of {self.max_sandboxes} sandboxes is reached")
                used = set(
                    await session.scalars(
                        select(SandboxRow.slot).where(live, SandboxRow.node_id == self.node.id)
                    )
                )
                row.slot = next(i for i in range(1, self.uid_count + 2) if i not in used)
                if row.slot > self.uid_count:
                    raise RateLimited("no free host uid for another sandbox")
                session.add(row)
                try:
                    await session.flush()
                except IntegrityError:
                    raise Conflict(f"a sandbox named {req.name!r} exists already") from None
            self._written(row.id)
            self._remember(row)
        await self._boot(row)
        return await self.get(row.id)

    async def _boot(self, row: SandboxRow) -> None:
        """Start the sandbox's processes and record the outcome."""
        try:
            await self.node.start_sandbox(self.config(row))
        except Exception as exc:
            log.warning("sandbox %s failed to start: %s", row.id, exc)
            await self._set_state(row.id, SandboxState.error, error=str(exc)[:2000])
            raise Unavailable(f"the sandbox could not start: {exc}") from None
        await self._set_state(row.id, SandboxState.running, error=None)

    async def _set_state(
        self, sandbox_id: str, state: SandboxState, *, error: str | None = None
    ) -> SandboxRow:
        async with self.db.transaction() as session:
            row = await session.get(SandboxRow, sandbox_id)
            if row is None:
                raise NotFound(f"no sandbox {sandbox_id!r}")
            current = SandboxState(row.state)
            if current != state and not current.can_become(state):
                raise Conflict(
                    f"sandbox {sandbox_id} is {current.value}, cannot become {state.value}"
                )
            row.state = state.value
            row.error = error
            row.updated_at = utcnow()
        self._written(sandbox_id)
        self._remember(row)
        return row

    async def delete(self, ref: str) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.deleted.value:
                return self.model(row)
            try:
                await self.node.remove_sandbox(self.config(row))
            except OSError as exc:
                log.warning("sandbox %s: removing its files failed: %s", row.id, exc)
                raise Unavailable(
                    f"the sandbox's files could not be removed ({exc}); "
                    "its processes are stopped: try the delete again"
                ) from None
            row = await self._set_state(row.id, SandboxState.deleted)
        self._locks.pop(row.id, None)
        return self.model(row)

    async def stop(self, ref: str) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.stopped.value:
                return self.model(row)
            if not SandboxState(row.state).can_become(SandboxState.stopped):
                raise Conflict(f"sandbox {row.id} is {row.state}")
            await self.node.stop_sandbox(row.id)
            return self.model(await self._set_state(row.id, SandboxState.stopped))

    async def update(self, ref: str, change: SandboxUpdate) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.deleted.value:
                raise Conflict(f"sandbox {row.id} is deleted")
            spec = dict(row.spec)
            if change.network is not None:
                spec["network"] = change.network
            if change.allow is not None:
                spec["allow"] = change.allow
            if spec.get("network", "none") != "none" and not self.node.enforceable().get("network"):
                raise Unavailable("this host cannot give sandboxes a network policy")
            async with self.db.transaction() as session:
                stored = await session.get(SandboxRow, row.id)
                assert stored is not None
                stored.spec = spec
                stored.updated_at = utcnow()
            self._written(row.id)
            self._remember(stored)
            row = await self.row(row.id)
            if row.state != SandboxState.running.value or not self.node.sandbox_running(row.id):
                return self.model(row)  # applies at the next start
            config = self.config(row)
            try:
                await self.node.set_network(row.id, config.network, config.allow)
            except SandboxDied as exc:
                raise Unavailable(f"sandbox {row.id} is restarting: {exc}") from None
            except NeedsRestart:
                if self.node.running_count(row.id):
                    raise Conflict(
                        "switching to or from network 'none' restarts the sandbox; "
                        "wait for its commands to end, or cancel them"
                    ) from None
                await self._set_state(row.id, SandboxState.creating)
                await self._boot(row)
        return await self.get(row.id)

    async def pause(self, ref: str) -> Sandbox:
        """Freeze every process of the sandbox; commands keep their wall-clock timeouts."""
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.paused.value:
                return self.model(row)
            if row.state != SandboxState.running.value:
                raise SandboxNotRunning(f"sandbox {row.id} is {row.state}")
            try:
                await self.node.pause_sandbox(row.id)
            except (RuntimeError, SandboxDied) as exc:
                raise Unavailable(str(exc)) from None
            return self.model(await self._set_state(row.id, SandboxState.paused))

    async def resume(self, ref: str) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.running.value:
                return self.model(row)
            if row.state != SandboxState.paused.value:
                raise Conflict(f"sandbox {row.id} is {row.state}, not paused")
            try:
                await self.node.resume_sandbox(row.id)
            except (RuntimeError, SandboxDied) as exc:
                raise Unavailable(str(exc)) from None
            return self.model(await self._set_state(row.id, SandboxState.running))

    async def start(self, ref: str) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.running.value and self.node.sandbox_running(row.id):
                return self.model(row)
            if row.state == SandboxState.deleted.value:
                raise Conflict(f"sandbox {row.id} is deleted")
            ttl = row.spec.get("ttl_seconds")
            if ttl and row.expires_at is not None and row.expires_at <= utcnow():
                async with self.db.transaction() as session:  # a new lifetime from now
                    stored = await session.get(SandboxRow, row.id)
                    assert stored is not None
                    stored.expires_at = utcnow() + timedelta(seconds=ttl)
                self._written(row.id)
                self._remember(stored)
            await self._set_state(row.id, SandboxState.creating)
            await self._boot(row)
        return await self.get(row.id)

    async def _on_died(self, sandbox_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._set_state(
                sandbox_id, SandboxState.error, error="the sandbox's processes exited unexpectedly"
            )

    async def reconcile(self) -> None:
        """After a restart: bring back every sandbox that should run on this node."""
        async with self.db.session() as session:
            rows = list(
                await session.scalars(
                    select(SandboxRow).where(
                        SandboxRow.node_id == self.node.id,
                        SandboxRow.state.in_(
                            [
                                SandboxState.creating.value,
                                SandboxState.running.value,
                                SandboxState.paused.value,
                            ]
                        ),
                    )
                )
            )
        gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)

        async def bring_back(row: SandboxRow) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    if row.state != SandboxState.creating.value:
                        await self._set_state(row.id, SandboxState.creating)
                    await self._boot(row)

        await asyncio.gather(*(bring_back(r) for r in rows))

    # --- lifetime ---

    def start_reaper(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_expired())

    async def stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                async with self.db.session() as session:
                    expired = list(
                        await session.scalars(
                            select(SandboxRow.id).where(
                                SandboxRow.node_id == self.node.id,
                                SandboxRow.state.in_(
                                    [SandboxState.running.value, SandboxState.paused.value]
                                ),
                                SandboxRow.expires_at <= utcnow(),
                            )
                        )
                    )
                for sandbox_id in expired:
                    # Stopped, not deleted: its files and history stay until someone deletes it.
                    log.info("sandbox %s reached its ttl: stopping it", sandbox_id)
                    await self.stop(sandbox_id)
            except Exception:
                log.exception("expiring sandboxes failed")
