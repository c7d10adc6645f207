"""Sandboxes: creation, lookup, lifecycle, and reconciliation after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral import hostnames, ids
from corral.clock import utcnow
from corral.core import idempotency
from corral.core.errors import (
    BadRequest,
    Conflict,
    InvalidArgument,
    NotFound,
    RateLimited,
    SandboxNotRunning,
    Unavailable,
)
from corral.core.images import env_pairs
from corral.core.metrics import Metrics
from corral.core.models import (
    MAX_SECONDS,
    CommandStatus,
    InjectionCount,
    InjectRule,
    Page,
    Sandbox,
    SandboxCreate,
    SandboxNetwork,
    SandboxState,
    SandboxUpdate,
    VolumeMount,
)
from corral.core.nodes import NodeRegistry
from corral.core.paging import decode_cursor, next_cursor
from corral.node.base import CommandSpec, Node
from corral.node.directory import NodeDirectory
from corral.runtime.base import NeedsRestart, SandboxConfig, SandboxDied, VolumeBind
from corral.runtime.limits import Limits
from corral.store.db import PLACEMENT_LOCK_KEY, Database
from corral.store.tables import SandboxPortRow, SandboxRow
from corral.testhooks import SANDBOX_CREATED, crash_point

if TYPE_CHECKING:
    from corral.core.images import ImageService
    from corral.core.secrets import SecretService
    from corral.core.snapshots import SnapshotService
    from corral.core.volumes import VolumeService
    from corral.core.webhooks import EventSink

log = logging.getLogger(__name__)
# Run on the sandbox's row under its lock, before a change: raises to refuse the change (e.g. a
# face's expected revision).
RowCheck = Callable[[SandboxRow], None]
RECONCILE_CONCURRENCY = 8
POOL_RETRY_SECONDS = 5.0
REFILL_DELAY_SECONDS = 0.25
# Warm sandboxes started at once by the refill: while creates come in a row, one start waits on
# its mounts and processes while another runs.
REFILL_PARALLEL = 2
CLAIM_WAIT_SECONDS = 15.0  # at most this long for a warm sandbox already starting
WARM_MARKER = ".warm"  # in a warm sandbox's directory until it is claimed
SANDBOX_STATE_EVENT = "sandbox.state"  # core/webhooks.py


@dataclass(frozen=True)
class WarmSandbox:
    """A sandbox started ahead of demand, with the default spec: no row until it is claimed."""

    id: str
    slot: int


def no_sandbox(ref: str) -> NotFound:
    """The error for a sandbox that is missing, or that the caller may not use: one message for
    both, so that a token limited to some sandboxes cannot tell which others exist."""
    return NotFound(f"no sandbox {ref!r}")


def covered_by(only: frozenset[str]) -> ColumnElement[bool]:
    """The sandboxes a token limited to `only` (ids and names) may use: by id, or by name while
    live (a deleted sandbox's name may already belong to a new one)."""
    live = SandboxRow.state != SandboxState.deleted.value
    return or_(SandboxRow.id.in_(only), and_(live, SandboxRow.name.in_(only)))


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
        inject=[InjectRule(**r) for r in spec.get("inject") or ()],
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        error=row.error,
        limits_enforced=enforced or {},
        volumes=[
            VolumeMount(name=v["name"], path=v["path"], read_only=v["read_only"])
            for v in spec.get("volumes") or ()
        ],
        snapshot=spec.get("snapshot"),
        image=image_spec(spec).get("reference"),
        image_id=image_spec(spec).get("id"),
    )


def image_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The image a sandbox runs on, as resolved at its create ({} for a template's)."""
    image = spec.get("image")
    return image if isinstance(image, dict) else {}


def _poolable(req: SandboxCreate) -> bool:
    """Whether a warm sandbox (default template, limits and network) can serve the request."""
    return (
        req.template == "host"
        and req.node is None
        and req.network == "none"
        and not req.allow
        and not req.inject
        and req.cpu is None
        and req.memory_mb is None
        and req.pids is None
        and req.disk_mb is None
        and not req.volumes
        and req.snapshot is None
        and req.image is None
    )


class SandboxService:
    def __init__(
        self,
        db: Database,
        directory: NodeDirectory,
        data_dir: Path,
        *,
        max_sandboxes: int,
        uid_count: int,
        default_limits: Limits | None = None,
        warm_pool: int = 0,
        nodes: NodeRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.default_limits = default_limits or Limits()
        self.metrics = metrics or Metrics()
        self.nodes = nodes
        self.db = db
        self.directory = directory
        self.local = directory.local  # the built-in node, if this server runs one
        self.volumes: VolumeService | None = None  # set by the server once it has one
        self.snapshots: SnapshotService | None = None  # likewise
        self.images: ImageService | None = None  # set by the server once it has one
        self.events: EventSink | None = None  # webhooks' sandbox.state; set by the server
        self.secrets: SecretService | None = None  # likewise
        self.data_dir = data_dir
        self.max_sandboxes = max_sandboxes
        self.uid_count = uid_count
        self._alloc_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Rows of live sandboxes, by id and by name: every exec looks its sandbox up, and this
        # server is the only writer of its sandboxes' rows, so it can answer from memory. Each
        # write replaces the cached row after its commit; `_generation` stops a read that
        # started before a write from caching what it read. Not in fleet mode: every replica
        # writes rows there.
        self._cache_rows = not directory.fleet
        self._rows: dict[str, SandboxRow] = {}
        self._names: dict[str, str] = {}
        self._generation = 0  # of writes to sandbox rows
        # The warm pool: started sandboxes a create with the default spec claims at once. It
        # belongs to the built-in node (a replica of a fleet keeps none).
        self.warm_pool = warm_pool if self.local is not None and not directory.fleet else 0
        self._warm: list[WarmSandbox] = []
        self._reserved: set[int] = set()  # uid slots of warm sandboxes, started or starting
        self._refill = asyncio.Event()
        self._starting = 0  # warm sandboxes being started
        self._waiting = 0  # creates waiting for one of them
        self._pool_change: asyncio.Event = asyncio.Event()  # a warm one is ready, or failed
        self._filler: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._pool_closed = False
        if self.local is not None:
            self.local.on_sandbox_died = self.died

    def config(self, row: SandboxRow) -> SandboxConfig:
        image = image_spec(row.spec)
        return SandboxConfig(
            id=row.id,
            slot=row.slot,
            dir=self.data_dir / "sandboxes" / row.id,
            # The image's environment (its PATH too), under the sandbox's own.
            env={**env_pairs(image.get("env") or ()), **row.spec.get("env", {})},
            image=image.get("id"),
            user=str(image.get("user") or ""),
            limits=self.limits(row),
            template=row.template,
            network=row.spec.get("network", "none"),
            allow=tuple(row.spec.get("allow", [])),
            volumes=tuple(
                VolumeBind(str(v["id"]), str(v["path"]), bool(v["read_only"]))
                for v in row.spec.get("volumes") or ()
            ),
            snapshot=row.spec.get("snapshot"),
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
        return to_model(row, self.directory.enforced(row.node_id))

    async def node_of(self, row: SandboxRow) -> Node:
        return await self.directory.get(row.node_id)

    async def is_running(self, row: SandboxRow) -> bool:
        """Whether the sandbox's processes run on its node now (False if it does not answer)."""
        try:
            return await (await self.node_of(row)).sandbox_running(row.id)
        except Unavailable:
            return False

    async def templates(self) -> list[str]:
        """The templates of the built-in node, or in a fleet those of any online node."""
        if not self.directory.fleet and self.local is not None:
            return await self.local.templates()
        found: set[str] = set()
        if self.nodes is not None:
            for node in await self.nodes.list():
                if node.state.value == "online":
                    found.update(node.templates)
        return sorted(found)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def lifecycle_lock(self, sandbox_id: str) -> asyncio.Lock:
        """Held by this server's changes of one sandbox (a snapshot's capture takes it too)."""
        return self._lock(sandbox_id)

    @property
    def placement_lock(self) -> asyncio.Lock:
        """Held by this server's creates from their admission to their row."""
        return self._alloc_lock

    # --- queries ---

    def _remember(self, row: SandboxRow) -> None:
        """Cache a row just committed (or read with no write since)."""
        self.directory.remember(row.id, row.node_id)
        if not self._cache_rows:
            return
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
        self._generation += 1

    async def row(self, ref: str) -> SandboxRow:
        """A sandbox by id, or by name among those not deleted."""
        cached = self._rows.get(ref) or self._rows.get(self._names.get(ref, ""))
        if cached is not None:
            return cached
        generation = self._generation
        async with self.db.statements() as session:
            row = await session.get(SandboxRow, ref)
            if row is None:
                row = await session.scalar(
                    select(SandboxRow).where(
                        SandboxRow.name == ref, SandboxRow.state != SandboxState.deleted.value
                    )
                )
        if row is None:
            raise no_sandbox(ref)
        # Only the built-in node's rows: their only writer is this server.
        if generation == self._generation and self.local and row.node_id == self.local.id:
            self._remember(row)
        else:
            self.directory.remember(row.id, row.node_id)
        return row

    async def get(self, ref: str) -> Sandbox:
        return self.model(await self.row(ref))

    async def running_row(self, ref: str) -> SandboxRow:
        return await self.check_running(await self.row(ref))

    async def check_running(self, row: SandboxRow) -> SandboxRow:
        """`row`, just read, if its sandbox is running (as running_row, without reading it
        again: on a remote node's sandbox every read is a round trip to the store)."""
        if row.state != SandboxState.running.value:
            raise SandboxNotRunning(f"sandbox {row.id} is {row.state}")
        node = await self.node_of(row)
        if node.remote:
            # A node declared offline answers at once with why, rather than after a timeout.
            if self.nodes is not None:
                await self.nodes.usable(row.node_id)
        elif not await node.sandbox_running(row.id):
            raise Unavailable(f"sandbox {row.id} is restarting; try again")
        return row

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        include_deleted: bool = False,
        only: frozenset[str] | None = None,
        name_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[Sandbox]:
        live_only = state is None and not include_deleted
        if live_only and self.db.is_sqlite:
            # In id order SQLite walks the primary key through every deleted sandbox the history
            # keeps to fill a page of live ones (8.8 ms beside 100,000). `+id` is no index's
            # order: it reads the live-slot partial index and sorts what it finds (0.1 ms).
            order: Any = text("+sandboxes.id")
        else:
            order = SandboxRow.id
        query = select(SandboxRow).order_by(order).limit(limit + 1)
        if name_prefix:
            escaped = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(SandboxRow.name.like(escaped + "%", escape="\\"))
        if state is not None:
            query = query.where(SandboxRow.state == state.value)
        elif live_only:
            query = query.where(SandboxRow.state != SandboxState.deleted.value)
        if only is not None:
            query = query.where(covered_by(only))
        if cursor:
            query = query.where(SandboxRow.id > decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        nxt = next_cursor(rows, limit)
        return Page[Sandbox](items=[self.model(r) for r in rows[:limit]], next_cursor=nxt)

    # --- lifecycle ---

    @staticmethod
    async def _live_count(session: AsyncSession) -> int:
        live = SandboxRow.state != SandboxState.deleted.value
        # Counting a column that the live-slot partial index holds (never NULL) reads that
        # index: with count(*), SQLite without statistics reads the state index, every deleted
        # sandbox of the history with it (2.4 ms beside 100,000 of them, against 0.02 ms).
        return await session.scalar(select(func.count(SandboxRow.node_id)).where(live)) or 0

    async def _admit(self, session: AsyncSession) -> int:
        """The number of live sandboxes, or RateLimited when one more would pass the limit."""
        count = await self._live_count(session)
        if count >= self.max_sandboxes:
            raise RateLimited(f"the limit of {self.max_sandboxes} sandboxes is reached")
        return count

    async def _used_slots(self, session: AsyncSession, node_id: str) -> set[int]:
        """The uid slots held by a node's live sandboxes."""
        live = SandboxRow.state != SandboxState.deleted.value
        query = select(SandboxRow.slot).where(live, SandboxRow.node_id == node_id)
        return set(await session.scalars(query))

    def _free_slot(self, used: set[int]) -> int:
        """The lowest free uid slot; uid_count + 1 when there is none."""
        taken = used | self._reserved
        return next(i for i in range(1, self.uid_count + 2) if i not in taken)

    async def _place(
        self, req: SandboxCreate, wanted: str | None, prefer: list[str] | None = None
    ) -> Node:
        """The node for a new sandbox: the built-in one (which may be draining), or in a fleet
        the least loaded online node with room, or the one asked for (or its volumes')."""
        if not self.directory.fleet:
            if self.local is None:
                raise Unavailable("this server runs no node")
            if self.nodes is not None:
                # The template is checked against the node itself (it may have new ones).
                node_id = await self.nodes.place(wanted=wanted or self.local.id)
                if node_id != self.local.id:
                    raise Unavailable(f"node {node_id} cannot be reached from this server")
            return self.local
        assert self.nodes is not None
        return await self.directory.get(
            await self.nodes.place(wanted=wanted, template=req.template, prefer=prefer or ())
        )

    async def create(self, req: SandboxCreate) -> Sandbox:
        started = time.perf_counter()
        wanted, mounts = req.node, []
        if req.snapshot is not None:
            if self.snapshots is None:
                raise Unavailable("this server keeps no snapshots")
            req, wanted = await self.snapshots.prepare(req)
            if req.node is not None and req.node != wanted:
                raise InvalidArgument(
                    f"the snapshot is on node {wanted}, not {req.node}",
                    details=[{"loc": ["body", "node"], "msg": "not the snapshot's node"}],
                )
        if req.volumes:
            if self.volumes is None:
                raise Unavailable("this server keeps no volumes")
            volume_node, mounts = await self.volumes.resolve(req.volumes)
            if wanted is not None and wanted != volume_node:
                raise InvalidArgument(
                    f"the volumes are on node {volume_node}, not {wanted}",
                    details=[{"loc": ["body", "node"], "msg": "not the volumes' node"}],
                )
            wanted = volume_node
        holders: list[str] = []
        if req.image is not None:
            if self.images is None:
                raise Unavailable("this server keeps no images")
            if wanted is None:
                holders = await self.images.holders(req.image)  # else it is pulled there
        node = await self._place(req, wanted, holders)
        if (self._warm or self._starting) and _poolable(req):
            claimed = await self._claim_or_wait(req)
            if claimed is not None:
                self.metrics.created(time.perf_counter() - started, warm=True)
                return claimed
        image_spec: dict[str, Any] | None = None
        if req.image is not None and self.images is not None:
            image = await self.images.ensure(node, req.image)
            image_spec = {
                "reference": req.image,
                "id": image.id,
                "env": list(image.env),
                "working_dir": image.working_dir,
                "user": image.user,
            }
        now = utcnow()
        spec = req.model_dump(mode="json")
        spec["volumes"] = mounts  # with each volume's id: a name may be given to another later
        spec["image"] = image_spec  # with its id: a reference may move to another image later
        row = SandboxRow(
            id=ids.new_id(ids.SANDBOX),
            name=req.name,
            node_id=node.id,
            slot=0,
            state=SandboxState.creating.value,
            template=req.template,
            spec=spec,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=req.ttl_seconds) if req.ttl_seconds else None,
        )
        available = await node.templates()
        if req.template not in available:
            raise Conflict(f"unknown template {req.template!r}; available: {', '.join(available)}")
        if req.network != "none" and not (await node.enforceable()).get("network"):
            raise Unavailable("this host cannot give sandboxes a network policy")
        await self._check_inject(req.inject, req.allow, req.network)
        async with self._alloc_lock:
            async with self.db.transaction() as session:
                await self.db.serialize(session, PLACEMENT_LOCK_KEY)  # against other replicas
                if req.snapshot is not None and self.snapshots is not None:
                    await self.snapshots.check_usable(session, req.snapshot)
                count = await self._admit(session)
                # Warm sandboxes count towards the limit too: one makes room for a create.
                while self._warm and count + len(self._reserved) >= self.max_sandboxes:
                    await self._remove_warm(self._warm.pop())
                used = await self._used_slots(session, node.id)
                row.slot = self._free_slot(used)
                if row.slot > self.uid_count and self._warm:
                    await self._remove_warm(self._warm.pop())  # a create goes before the pool
                    row.slot = self._free_slot(used)
                if row.slot > self.uid_count:
                    raise RateLimited("no free host uid for another sandbox")
                session.add(row)
                try:
                    await session.flush()
                except IntegrityError:
                    raise Conflict(f"a sandbox named {req.name!r} exists already") from None
                await idempotency.bind(session, "sandbox", row.id)  # with the row, or neither
                await self._announce(session, row, None)
            self._written(row.id)
            self._remember(row)
        crash_point(SANDBOX_CREATED)
        await self._boot(row)
        self.metrics.created(time.perf_counter() - started, warm=False)
        return await self.get(row.id)

    async def _announce(self, session: AsyncSession, row: SandboxRow, previous: str | None) -> None:
        """A sandbox.state event for webhooks, stored with the change (in its transaction)."""
        if self.events is None:
            return

        def data() -> dict[str, Any]:
            return {"sandbox": self.model(row).model_dump(mode="json"), "previous_state": previous}

        try:
            await self.events(SANDBOX_STATE_EVENT, row.id, data, session)
        except Exception:
            log.exception("the sandbox.state event of %s was not stored", row.id)

    async def _boot(self, row: SandboxRow) -> None:
        """Start the sandbox's processes and record the outcome."""
        try:
            await (await self.node_of(row)).start_sandbox(await self._start_config(row))
        except Exception as exc:
            log.warning("sandbox %s failed to start: %s", row.id, exc)
            await self._set_state(row.id, SandboxState.error, error=str(exc)[:2000])
            raise Unavailable(f"the sandbox could not start: {exc}") from None
        await self._set_state(row.id, SandboxState.running, error=None)

    async def _set_state(
        self, sandbox_id: str, state: SandboxState, *, error: str | None = None
    ) -> SandboxRow:
        async with self.db.transaction() as session:
            # Locked (PostgreSQL): replicas changing one sandbox at once take turns here.
            row = await session.get(SandboxRow, sandbox_id, with_for_update=True)
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
            if current != state:
                await self._announce(session, row, current.value)
        self._written(sandbox_id)
        self._remember(row)
        return row

    async def delete(self, ref: str, *, check: RowCheck | None = None) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if check is not None:
                check(row)
            if row.state == SandboxState.deleted.value:
                return self.model(row)
            try:
                await (await self.node_of(row)).remove_sandbox(self.config(row))
            except OSError as exc:
                log.warning("sandbox %s: removing its files failed: %s", row.id, exc)
                raise Unavailable(
                    f"the sandbox's files could not be removed ({exc}); "
                    "its processes are stopped: try the delete again"
                ) from None
            row = await self._set_state(row.id, SandboxState.deleted)
            async with self.db.transaction() as session:  # its ports are served no more
                await session.execute(
                    delete(SandboxPortRow).where(SandboxPortRow.sandbox_id == row.id)
                )
        self._locks.pop(row.id, None)
        return self.model(row)

    async def stop(self, ref: str, *, check: RowCheck | None = None) -> Sandbox:
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if check is not None:
                check(row)
            if row.state == SandboxState.stopped.value:
                return self.model(row)
            if not SandboxState(row.state).can_become(SandboxState.stopped):
                raise Conflict(f"sandbox {row.id} is {row.state}")
            await (await self.node_of(row)).stop_sandbox(row.id)
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
            if change.inject is not None:
                spec["inject"] = [r.model_dump() for r in change.inject]
            await self._check_inject(
                [InjectRule(**r) for r in spec.get("inject") or ()],
                spec.get("allow", []),
                spec.get("network", "none"),
            )
            node = await self.node_of(row)
            if spec.get("network", "none") != "none" and not (await node.enforceable()).get(
                "network"
            ):
                raise Unavailable("this host cannot give sandboxes a network policy")
            async with self.db.transaction() as session:
                stored = await session.get(SandboxRow, row.id)
                assert stored is not None
                stored.spec = spec
                stored.updated_at = utcnow()
            self._written(row.id)
            self._remember(stored)
            row = await self.row(row.id)
            if row.state != SandboxState.running.value or not await node.sandbox_running(row.id):
                return self.model(row)  # applies at the next start
            config = await self._start_config(row)
            try:
                await node.set_network(row.id, config.network, config.allow, config.inject)
            except SandboxDied as exc:
                raise Unavailable(f"sandbox {row.id} is restarting: {exc}") from None
            except NeedsRestart:
                if await node.running_count(row.id):
                    raise Conflict(
                        "switching to or from network 'none' restarts the sandbox; "
                        "wait for its commands to end, or cancel them"
                    ) from None
                await self._set_state(row.id, SandboxState.creating)
                await self._boot(row)
        return await self.get(row.id)

    async def _check_inject(self, rules: list[InjectRule], allow: list[str], network: str) -> None:
        """Each rule's host is one the sandbox may reach by name; its secrets exist."""
        names = [a for a in allow if not hostnames.is_cidr(a)]
        for rule in rules:
            if network == "none" or not hostnames.allowed(names, rule.host):
                raise BadRequest(
                    f"inject: {rule.host} is not a host the sandbox's allow-list names"
                )
        if rules:
            if self.secrets is None:
                raise Unavailable("this server keeps no secrets")
            await self.secrets.check(rules)

    async def _start_config(self, row: SandboxRow) -> SandboxConfig:
        """The sandbox's config with its injection rules' secrets filled in: for its node only."""
        config = self.config(row)
        rules = [InjectRule(**r) for r in row.spec.get("inject") or ()]
        if not rules or self.secrets is None or config.network == "none":
            return config
        return dataclasses.replace(config, inject=await self.secrets.fill(row.id, rules))

    async def network(self, ref: str) -> SandboxNetwork:
        """The sandbox's network policy, and what its node counted of it while it runs."""
        row = await self.row(ref)
        spec = row.spec
        rules = [InjectRule(**r) for r in spec.get("inject") or ()]
        status: dict[str, Any] = {}
        if row.state == SandboxState.running.value and spec.get("network", "none") != "none":
            node = await self.node_of(row)
            with contextlib.suppress(SandboxDied, Unavailable):
                status = await node.network_status(row.id)
        counts = {(i["host"], i["header"]): i["count"] for i in status.get("injections", ())}
        return SandboxNetwork(
            id=row.id,
            network=spec.get("network", "none"),
            allow=spec.get("allow", []),
            inject=[
                InjectionCount(**r.model_dump(), count=counts.get((r.host, r.header), 0))
                for r in rules
            ],
            counters=status.get("counters", {}),
            resolved=status.get("resolved", {}),
            recent_refusals=status.get("recent_refusals", []),
            open_connections=status.get("open_connections", 0),
        )

    async def set_deadline(self, ref: str, seconds: int) -> Sandbox:
        """Stop the sandbox `seconds` from now (instead of at its old deadline, if it had one);
        its later starts get as long."""
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.deleted.value:
                raise Conflict(f"sandbox {row.id} is deleted")
            async with self.db.transaction() as session:
                stored = await session.get(SandboxRow, row.id)
                assert stored is not None
                stored.spec = {**stored.spec, "ttl_seconds": seconds}
                stored.expires_at = utcnow() + timedelta(seconds=seconds)
                stored.updated_at = utcnow()
            self._written(row.id)
            self._remember(stored)
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
                await (await self.node_of(row)).pause_sandbox(row.id)
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
                await (await self.node_of(row)).resume_sandbox(row.id)
            except (RuntimeError, SandboxDied) as exc:
                raise Unavailable(str(exc)) from None
            return self.model(await self._set_state(row.id, SandboxState.running))

    async def start(
        self, ref: str, *, renew: bool = False, check: RowCheck | None = None
    ) -> Sandbox:
        """Start a stopped (or failed) sandbox again. A sandbox with a ttl gets a new lifetime
        from now if its old one is over, or always with `renew`."""
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if check is not None:
                check(row)
            if row.state == SandboxState.running.value and await self.is_running(row):
                return self.model(row)
            if row.state == SandboxState.deleted.value:
                raise Conflict(f"sandbox {row.id} is deleted")
            ttl = row.spec.get("ttl_seconds")
            if ttl and row.expires_at is not None and (renew or row.expires_at <= utcnow()):
                async with self.db.transaction() as session:  # a new lifetime from now
                    stored = await session.get(SandboxRow, row.id)
                    assert stored is not None
                    stored.expires_at = utcnow() + timedelta(seconds=ttl)
                self._written(row.id)
                self._remember(stored)
            await self._set_state(row.id, SandboxState.creating)
            await self._boot(row)
        return await self.get(row.id)

    async def extend(self, ref: str, seconds: int) -> Sandbox:
        """Lengthen the lifetime of a sandbox that has one by `seconds`: its ttl (so that its
        later starts get as long) and its deadline. One without a ttl is left as it is."""
        row = await self.row(ref)
        async with self._lock(row.id):
            row = await self.row(row.id)
            if row.state == SandboxState.deleted.value:
                raise Conflict(f"sandbox {row.id} is deleted")
            ttl = row.spec.get("ttl_seconds")
            if not ttl:
                return self.model(row)
            async with self.db.transaction() as session:
                stored = await session.get(SandboxRow, row.id, with_for_update=True)
                assert stored is not None
                stored.spec = {**stored.spec, "ttl_seconds": min(ttl + seconds, MAX_SECONDS)}
                now = utcnow()
                deadline = (stored.expires_at or now) + timedelta(seconds=seconds)
                stored.expires_at = min(deadline, now + timedelta(seconds=MAX_SECONDS))
                stored.updated_at = now
            self._written(row.id)
            self._remember(stored)
        return await self.get(row.id)

    async def died(self, sandbox_id: str, failure: str | None = None) -> None:
        """A node reports that a sandbox's processes ended on their own."""
        with contextlib.suppress(Exception):
            await self._set_state(
                sandbox_id,
                SandboxState.error,
                error=failure or "the sandbox's processes exited unexpectedly",
            )

    # --- warm pool ---

    async def count_by_state_and_node(self) -> list[tuple[str, str, int]]:
        """(state, node, count) of the sandboxes that are not deleted: one grouped query."""
        query = (
            select(SandboxRow.state, SandboxRow.node_id, func.count())
            .where(SandboxRow.state != SandboxState.deleted.value)
            # node first, as the live-slot partial index has it: grouped by state first, SQLite
            # reads the state index and every deleted sandbox with it (4.1 ms beside 100,000).
            .group_by(SandboxRow.node_id, SandboxRow.state)
        )
        async with self.db.session() as session:
            return [(state, node, int(n)) for state, node, n in await session.execute(query)]

    @property
    def warm_count(self) -> int:
        return len(self._warm)

    def _warm_config(self, warm: WarmSandbox, env: dict[str, str] | None = None) -> SandboxConfig:
        return SandboxConfig(
            id=warm.id,
            slot=warm.slot,
            dir=self.data_dir / "sandboxes" / warm.id,
            env=dict(env or {}),
            limits=self.default_limits,
        )

    def _local(self) -> Node:
        if self.local is None:
            raise Unavailable("this server runs no node")
        return self.local

    async def _claim_or_wait(self, req: SandboxCreate) -> Sandbox | None:
        """A warm sandbox; if none is ready but one is starting that no other create waits
        for, that one once it is ready (it is further along than a cold start would be)."""
        deadline = asyncio.get_running_loop().time() + CLAIM_WAIT_SECONDS
        while True:
            if self._warm:
                claimed = await self._claim(req)
                if claimed is not None:
                    return claimed
            left = deadline - asyncio.get_running_loop().time()
            if self._waiting >= self._starting or left <= 0:
                return None
            self._waiting += 1
            try:
                self._pool_change.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pool_change.wait(), left)
            finally:
                self._waiting -= 1

    async def _claim(self, req: SandboxCreate) -> Sandbox | None:
        """Give a warm sandbox the request's name, env, labels and ttl; None if none is left."""
        local = self._local()
        while self._warm:
            warm = self._warm.pop(0)
            self._refill.set()
            if not await local.sandbox_running(warm.id):
                self._discard(warm)
                continue
            now = utcnow()
            row = SandboxRow(
                id=warm.id,
                name=req.name,
                node_id=local.id,
                slot=warm.slot,
                state=SandboxState.running.value,
                template=req.template,
                spec=req.model_dump(mode="json"),
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(seconds=req.ttl_seconds) if req.ttl_seconds else None,
            )
            await local.set_env(warm.id, req.env)
            try:
                async with self._alloc_lock:
                    async with self.db.transaction() as session:
                        await self._admit(session)
                        session.add(row)
                        await session.flush()
                        await idempotency.bind(session, "sandbox", row.id)
                        await self._announce(session, row, None)
                    self._reserved.discard(warm.slot)  # the row holds the slot now
            except BaseException as exc:
                await local.set_env(warm.id, {})
                if self._pool_closed:
                    self._discard(warm)
                else:
                    self._warm.insert(0, warm)
                if isinstance(exc, IntegrityError):
                    raise Conflict(f"a sandbox named {req.name!r} exists already") from None
                raise
            self._written(row.id)
            self._remember(row)
            with contextlib.suppress(OSError):
                (self._warm_config(warm).dir / WARM_MARKER).unlink()
            if not await local.sandbox_running(warm.id):
                # It died during the claim, before its row existed for died() to mark.
                await self.died(warm.id)
                return await self.get(warm.id)
            return self.model(row)
        return None

    async def _remove_warm(self, warm: WarmSandbox) -> None:
        try:
            await self._local().remove_sandbox(self._warm_config(warm))
        except Exception as exc:
            log.warning("removing warm sandbox %s failed: %s", warm.id, exc)
        finally:
            self._reserved.discard(warm.slot)

    def _discard(self, warm: WarmSandbox) -> None:
        """Remove a warm sandbox in the background (it died, or the pool is closing)."""
        task = asyncio.ensure_future(self._remove_warm(warm))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _warm_one(self) -> bool:
        """Start one more warm sandbox; False when capacity is used up."""
        self._starting += 1
        try:
            return await self._start_warm()
        finally:
            self._starting -= 1
            self._pool_change.set()  # ready, or not coming: waiting creates look again

    async def _start_warm(self) -> bool:
        async with self._alloc_lock:
            async with self.db.session() as session:
                count = await self._live_count(session)
                slot = self._free_slot(await self._used_slots(session, self._local().id))
            # The pool never takes the last places: it must not turn a create away.
            if slot >= self.uid_count or count + len(self._reserved) + 1 >= self.max_sandboxes:
                return False
            self._reserved.add(slot)
        local = self._local()
        warm = WarmSandbox(ids.new_id(ids.SANDBOX), slot)
        config = self._warm_config(warm)
        try:
            # Marked as warm until claimed: after a crash, only marked files without a row are
            # removed as strays (never a workspace whose row the store lost).
            config.dir.mkdir(parents=True, exist_ok=True)
            (config.dir / WARM_MARKER).touch()
            await local.start_sandbox(config)
            # A supervisor's first command pays for its first fork; pay it here, not in the
            # claimer's first exec.
            execution = await local.run(
                CommandSpec(
                    id=ids.new_id(ids.COMMAND),
                    sandbox_id=warm.id,
                    argv=["/bin/true"],
                    env={},
                    cwd="/",
                    stdin=None,
                    timeout_ms=10_000,
                    max_output_bytes=0,
                    keep_log=False,
                    report=False,
                )
            )
            checked = await execution.outcome()
            if checked.status != CommandStatus.completed or checked.exit_code != 0:
                raise RuntimeError(f"its check command ended {checked.status.value}")
        except BaseException:
            self._discard(warm)
            raise
        if self._pool_closed:
            self._discard(warm)
            return False
        self._warm.append(warm)
        return True

    async def _keep_warm(self) -> None:
        starts: set[asyncio.Task[bool]] = set()
        try:
            while True:
                await self._refill.wait()
                # Refill a moment after the claim: starting a sandbox takes most of a core for
                # ~100 ms, which the claimer's first commands should not have to share.
                await asyncio.sleep(REFILL_DELAY_SECONDS)
                self._refill.clear()
                full = False
                while not full:
                    while (
                        len(starts) < REFILL_PARALLEL
                        and len(self._warm) + len(starts) < self.warm_pool
                    ):
                        starts.add(asyncio.ensure_future(self._warm_one()))
                    if not starts:
                        break
                    done, starts = await asyncio.wait(starts, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        try:
                            full = full or not task.result()  # capacity used up
                        except Exception as exc:
                            log.warning("could not start a warm sandbox: %s", exc)
                            full = True
                            self._refill.set()
                            await asyncio.sleep(POOL_RETRY_SECONDS)
                if starts:
                    await asyncio.wait(starts)
                    for task in starts:
                        if not task.cancelled() and task.exception() is not None:
                            log.warning("could not start a warm sandbox: %s", task.exception())
                    starts.clear()
        finally:
            for task in starts:
                task.cancel()
            # Each removes its sandbox (in the background) as it ends: before close_pool waits.
            await asyncio.gather(*starts, return_exceptions=True)

    def start_pool(self) -> None:
        if self.warm_pool > 0:
            self._refill.set()
            self._filler = asyncio.ensure_future(self._keep_warm())

    async def close_pool(self) -> None:
        """Stop refilling and remove the warm sandboxes: they have no rows to come back from."""
        self._pool_closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        while self._warm:
            self._discard(self._warm.pop())
        if self._background:
            await asyncio.wait(set(self._background), timeout=30)

    async def _remove_strays(self) -> None:
        """Files of warm sandboxes of a server that was killed (marked, and with no row)."""
        root = self.data_dir / "sandboxes"
        if not root.is_dir():
            return
        names = [p.name for p in root.iterdir()]
        if not names:
            return
        async with self.db.session() as session:
            known = set(
                await session.scalars(select(SandboxRow.id).where(SandboxRow.id.in_(names)))
            )
        for name in names:
            if name in known or not (root / name / WARM_MARKER).exists():
                continue
            stray = SandboxConfig(id=name, slot=0, dir=root / name)
            try:
                await self._local().remove_sandbox(stray)
            except Exception as exc:
                log.warning("could not remove the files of stray sandbox %s: %s", name, exc)

    async def reconcile(self, node_id: str) -> None:
        """After a node's restart: bring back every sandbox that should run on it. One that
        runs there already (the node was cut off, not restarted) is kept as it is."""
        node = await self.directory.get(node_id)
        async with self.db.session() as session:
            rows = list(
                await session.scalars(
                    select(SandboxRow).where(
                        SandboxRow.node_id == node_id,
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
        if node is self.local:
            await self._remove_strays()
        gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)

        async def bring_back(row: SandboxRow) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    if node.remote and await node.sandbox_running(row.id):
                        return
                    if row.state != SandboxState.creating.value:
                        await self._set_state(row.id, SandboxState.creating)
                    await self._boot(row)

        await asyncio.gather(*(bring_back(r) for r in rows))

    # --- lifetime ---

    def start_reaper(self) -> None:
        """The ttl reaper of one server (in a fleet, the leader's loop calls reap_expired)."""
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
                await self.reap_expired()
            except Exception:
                log.exception("expiring sandboxes failed")

    async def reap_expired(self) -> None:
        """Stop the sandboxes past their ttl (on the built-in node; in a fleet, on any)."""
        query = select(SandboxRow.id).where(
            SandboxRow.state.in_([SandboxState.running.value, SandboxState.paused.value]),
            SandboxRow.expires_at <= utcnow(),
        )
        if not self.directory.fleet and self.local is not None:
            query = query.where(SandboxRow.node_id == self.local.id)
        async with self.db.session() as session:
            expired = list(await session.scalars(query))
        for sandbox_id in expired:
            # Stopped, not deleted: its files and history stay until someone deletes it.
            log.info("sandbox %s reached its ttl: stopping it", sandbox_id)
            try:
                await self.stop(sandbox_id)
            except Exception as exc:
                log.warning("stopping expired sandbox %s failed: %s", sandbox_id, exc)
        if self.snapshots is not None:
            local_only = not self.directory.fleet and self.local is not None
            await self.snapshots.reap(self.local.id if local_only and self.local else None)
