"""Snapshots: a running sandbox's files (its writable root and /workspace) captured on its node,
its processes frozen for the moment of capture, to start new sandboxes from on that node.

A snapshot lives on one node and its sandboxes run there (they share its files as a lower
layer where the node's file system allows). It outlives the sandbox it was taken of. While a
sandbox that was started from it is not deleted, the snapshot stays: deleting it is refused,
and once expired it is no longer started from but is kept until its last sandbox is deleted.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral import ids
from corral.clock import utcnow
from corral.core.errors import Conflict, InvalidArgument, NotFound, SandboxNotRunning, Unavailable
from corral.core.models import (
    Page,
    Sandbox,
    SandboxCreate,
    SandboxState,
    Snapshot,
    SnapshotCreate,
    SnapshotState,
)
from corral.core.paging import decode_cursor, next_cursor
from corral.core.sandboxes import SandboxService, image_spec
from corral.node.base import HostFailure, SnapshotsUnsupported
from corral.node.directory import NodeDirectory
from corral.runtime.base import SandboxDied
from corral.store.db import PLACEMENT_LOCK_KEY, Database
from corral.store.tables import SandboxRow, SnapshotRow

log = logging.getLogger(__name__)

# What a fork takes from its source unless its create says otherwise: it is a copy, run alike.
# Not its name, labels, lifetime or volumes: those are the new sandbox's own.
FORK_INHERITS = ("env", "cpu", "memory_mb", "pids", "disk_mb", "network", "allow")
# A capture not finished after this long was abandoned (its replica died): it is removed.
STALE_CAPTURE = timedelta(minutes=30)


def no_snapshot(ref: str) -> NotFound:
    return NotFound(f"no snapshot {ref!r}")


def to_model(row: SnapshotRow, used_by: list[str]) -> Snapshot:
    return Snapshot(
        id=row.id,
        name=row.name,
        state=SnapshotState(row.state),
        sandbox_id=row.sandbox_id,
        node_id=row.node_id,
        template=row.template,
        image=row.image,
        size_bytes=row.size_bytes,
        labels=row.labels,
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_by=sorted(used_by),
    )


async def _users(session: AsyncSession, snapshot_id: str | None = None) -> dict[str, list[str]]:
    """Snapshot id -> the sandboxes (not deleted) started from it."""
    live = SandboxRow.state != SandboxState.deleted.value
    rows = (await session.execute(select(SandboxRow.id, SandboxRow.spec).where(live))).all()
    users: dict[str, list[str]] = {}
    for sandbox_id, spec in rows:
        source = spec.get("snapshot")
        if source and (snapshot_id is None or source == snapshot_id):
            users.setdefault(source, []).append(sandbox_id)
    return users


class SnapshotService:
    def __init__(self, db: Database, directory: NodeDirectory, sandboxes: SandboxService) -> None:
        self.db = db
        self.directory = directory
        self.sandboxes = sandboxes

    # --- queries ---

    async def row(self, ref: str) -> SnapshotRow:
        """A snapshot by id or name."""
        async with self.db.session() as session:
            row = await session.get(SnapshotRow, ref)
            if row is None:
                row = await session.scalar(select(SnapshotRow).where(SnapshotRow.name == ref))
        if row is None:
            raise no_snapshot(ref)
        return row

    async def get(self, ref: str) -> Snapshot:
        row = await self.row(ref)
        async with self.db.session() as session:
            users = await _users(session, row.id)
        return to_model(row, users.get(row.id, []))

    async def list(
        self, *, sandbox: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Page[Snapshot]:
        query = select(SnapshotRow).order_by(SnapshotRow.id).limit(limit + 1)
        if sandbox is not None:
            query = query.where(SnapshotRow.sandbox_id == sandbox)
        if cursor:
            query = query.where(SnapshotRow.id > decode_cursor(cursor))
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
            users = await _users(session)
        nxt = next_cursor(rows, limit)
        items = [to_model(r, users.get(r.id, [])) for r in rows[:limit]]
        return Page[Snapshot](items=items, next_cursor=nxt)

    # --- capture ---

    async def create(self, sandbox_id: str, req: SnapshotCreate) -> Snapshot:
        """Capture the running sandbox `sandbox_id` (an id the caller may use)."""
        now = utcnow()
        expires_at = req.expires_at
        if req.expires_in is not None:
            expires_at = now + timedelta(seconds=req.expires_in)
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument(
                "expires_at is in the past",
                details=[{"loc": ["body", "expires_at"], "msg": "must be in the future"}],
            )
        # The sandbox's lock: a stop, pause or delete through this server waits for the capture.
        async with self.sandboxes.lifecycle_lock(sandbox_id):
            source = await self.sandboxes.row(sandbox_id)
            if source.state == SandboxState.paused.value:
                raise SandboxNotRunning(
                    f"sandbox {source.id} is paused: resume it, then take the snapshot"
                )
            source = await self.sandboxes.running_row(source.id)
            row = SnapshotRow(
                id=ids.new_id(ids.SNAPSHOT),
                name=req.name,
                node_id=source.node_id,
                sandbox_id=source.id,
                state=SnapshotState.creating.value,
                template=source.template,
                image=image_spec(source.spec).get("id"),
                size_bytes=None,
                labels=req.labels,
                created_at=now,
                expires_at=expires_at,
            )
            try:
                async with self.db.transaction() as session:
                    session.add(row)
                    await session.flush()
            except IntegrityError:
                raise Conflict(f"a snapshot named {req.name!r} exists already") from None
            try:
                node = await self.sandboxes.node_of(source)
                size = await node.snapshot_sandbox(source.id, row.id)
            except BaseException as exc:
                await self._forget(row, remove_files=not isinstance(exc, SnapshotsUnsupported))
                if isinstance(exc, SandboxDied):
                    raise SandboxNotRunning(
                        f"sandbox {source.id} stopped during the capture"
                    ) from None
                if isinstance(exc, SnapshotsUnsupported | HostFailure):
                    raise Unavailable(str(exc)) from None
                if isinstance(exc, Exception) and not isinstance(exc, Unavailable):
                    log.warning("snapshot %s of %s failed: %r", row.id, source.id, exc)
                    raise Unavailable(f"the snapshot could not be taken: {exc}") from None
                raise
        async with self.db.transaction() as session:
            stored = await session.get(SnapshotRow, row.id)
            if stored is None:  # removed meanwhile (an operator, or a stale-capture sweep)
                raise Unavailable(f"snapshot {row.id} was removed while it was taken")
            stored.state = SnapshotState.ready.value
            stored.size_bytes = int(size)
        log.info("snapshot %s of sandbox %s: %d bytes", row.id, source.id, size)
        return to_model(stored, [])

    async def _forget(self, row: SnapshotRow, *, remove_files: bool) -> None:
        """After a failed capture: the node's files (if any were made) and the row go."""
        if remove_files:
            with contextlib.suppress(Exception):
                await (await self.directory.get(row.node_id)).remove_snapshot(row.id)
        async with self.db.transaction() as session:
            stored = await session.get(SnapshotRow, row.id)
            if stored is not None:
                await session.delete(stored)

    # --- sandboxes from a snapshot ---

    async def prepare(self, req: SandboxCreate) -> tuple[SandboxCreate, str]:
        """The request to start from `req.snapshot`, with the snapshot's id, template and image,
        and the snapshot's node (where the sandbox must run)."""
        assert req.snapshot is not None
        try:
            row = await self.row(req.snapshot)
        except NotFound:
            raise no_snapshot(req.snapshot) from None
        self._check_usable(row)
        update: dict[str, object] = {"snapshot": row.id, "template": row.template}
        if "template" in req.model_fields_set and req.template != row.template:
            raise InvalidArgument(
                f"snapshot {row.id} is of template {row.template!r}, not {req.template!r}",
                details=[{"loc": ["body", "template"], "msg": "not the snapshot's template"}],
            )
        if "image" in SandboxCreate.model_fields:
            image = getattr(req, "image", None)
            if image is not None and image != row.image:
                raise InvalidArgument(
                    f"snapshot {row.id} is of image {row.image!r}, not {image!r}",
                    details=[{"loc": ["body", "image"], "msg": "not the snapshot's image"}],
                )
            update["image"] = row.image
        return req.model_copy(update=update), row.node_id

    @staticmethod
    def _check_usable(row: SnapshotRow) -> None:
        if row.state != SnapshotState.ready.value:
            raise Conflict(f"snapshot {row.id} is {row.state}")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise Conflict(f"snapshot {row.id} expired at {row.expires_at.isoformat()}")

    async def check_usable(self, session: AsyncSession, snapshot_id: str) -> None:
        """Inside the create's placement transaction: the snapshot is still there and ready
        (a delete claims it under the same lock)."""
        row = await session.get(SnapshotRow, snapshot_id)
        if row is None:
            raise no_snapshot(snapshot_id)
        self._check_usable(row)

    async def fork(self, sandbox_id: str, req: SandboxCreate) -> Sandbox:
        """A snapshot of `sandbox_id` and a new sandbox from it, in one call, with the source's
        environment, limits and network unless `req` gives its own. The snapshot is an
        ordinary one (listed, deletable once its sandboxes are); if the sandbox cannot be made,
        the snapshot goes too."""
        if req.snapshot is not None:
            raise InvalidArgument(
                "a fork starts from a snapshot of its own",
                details=[{"loc": ["body", "snapshot"], "msg": "not allowed in a fork"}],
            )
        source = await self.sandboxes.row(sandbox_id)
        if "template" in req.model_fields_set and req.template != source.template:
            raise InvalidArgument(
                f"sandbox {source.id} is of template {source.template!r}, not {req.template!r}",
                details=[{"loc": ["body", "template"], "msg": "not the source's template"}],
            )
        if req.node is not None and req.node != source.node_id:
            raise InvalidArgument(
                f"a fork runs on its source's node {source.node_id}, not {req.node}",
                details=[{"loc": ["body", "node"], "msg": "not the source's node"}],
            )
        inherited = {
            key: source.spec[key]
            for key in FORK_INHERITS
            if key not in req.model_fields_set and source.spec.get(key) is not None
        }
        snapshot = await self.create(source.id, SnapshotCreate())
        try:
            return await self.sandboxes.create(
                req.model_copy(update={**inherited, "snapshot": snapshot.id})
            )
        except BaseException:
            row = await self.row(snapshot.id)
            async with self.db.session() as session:
                users = await _users(session, row.id)
            if not users:  # a sandbox row that failed to start keeps it (its state says why)
                await self._forget(row, remove_files=True)
            raise

    # --- removal ---

    async def delete(self, ref: str) -> None:
        row = await self.row(ref)
        await self._claim(row.id, refuse_if_used=True)
        await self._remove(row)

    async def _claim(self, snapshot_id: str, *, refuse_if_used: bool) -> bool:
        """Mark the snapshot `deleting`, unless a sandbox not deleted was started from it
        (Conflict, or False for the reaper). Under the placement lock: a create that starts
        from it either sees it deleting or is counted here."""
        async with self.sandboxes.placement_lock:
            async with self.db.transaction() as session:
                await self.db.serialize(session, PLACEMENT_LOCK_KEY)
                row = await session.get(SnapshotRow, snapshot_id, with_for_update=True)
                if row is None:
                    raise no_snapshot(snapshot_id)
                using = (await _users(session, snapshot_id)).get(snapshot_id)
                if using:
                    if not refuse_if_used:
                        return False
                    raise Conflict(
                        f"snapshot {row.id} is in use by {', '.join(sorted(using))}: "
                        "delete those sandboxes first"
                    )
                if row.state == SnapshotState.creating.value and refuse_if_used:
                    raise Conflict(f"snapshot {row.id} is still being taken")
                row.state = SnapshotState.deleting.value
        return True

    async def _remove(self, row: SnapshotRow) -> None:
        """The node's files, then the row. A node that fails leaves the row `deleting`: the
        reaper tries again."""
        try:
            node = await self.directory.get(row.node_id)
            await node.remove_snapshot(row.id)
        except SnapshotsUnsupported:
            pass  # a node that takes no snapshots keeps no files of one
        except HostFailure as exc:
            raise Unavailable(f"{exc}; the removal is retried") from None
        async with self.db.transaction() as session:
            stored = await session.get(SnapshotRow, row.id)
            if stored is not None:
                await session.delete(stored)
        log.info("snapshot %s removed", row.id)

    async def reap(self, node_id: str | None = None) -> None:
        """Remove expired snapshots that no sandbox uses, captures abandoned midway and
        removals that failed (of one node, or of every node when `node_id` is None)."""
        now = utcnow()
        query = select(SnapshotRow).where(
            ((SnapshotRow.state == SnapshotState.ready.value) & (SnapshotRow.expires_at <= now))
            | (
                (SnapshotRow.state == SnapshotState.creating.value)
                & (SnapshotRow.created_at <= now - STALE_CAPTURE)
            )
            | (SnapshotRow.state == SnapshotState.deleting.value)
        )
        if node_id is not None:
            query = query.where(SnapshotRow.node_id == node_id)
        async with self.db.session() as session:
            due = list(await session.scalars(query))
        for row in due:
            try:
                if row.state != SnapshotState.deleting.value and not await self._claim(
                    row.id, refuse_if_used=False
                ):
                    continue  # in use: kept until its last sandbox is deleted
                await self._remove(row)
            except NotFound:
                continue
            except Exception as exc:
                log.warning("removing snapshot %s failed: %s", row.id, exc)
