"""Volumes: named persistent file systems on a node, mounted by sandboxes on that node, that
outlive them. Each is its own ext4 image on its node (its size is its limit), so a sandbox that
fills one fills nothing else."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from corral import ids
from corral.clock import utcnow
from corral.core.errors import Conflict, InvalidArgument, NotFound, Unavailable
from corral.core.models import SandboxState, Volume, VolumeCreate, VolumeMount
from corral.core.nodes import NodeRegistry
from corral.node.directory import NodeDirectory
from corral.store.db import Database
from corral.store.tables import SandboxRow, VolumeRow

log = logging.getLogger(__name__)


def no_volume(ref: str) -> NotFound:
    return NotFound(f"no volume {ref!r}")


class VolumeService:
    def __init__(
        self,
        db: Database,
        directory: NodeDirectory,
        nodes: NodeRegistry,
        *,
        default_size_mb: int,
    ) -> None:
        self.db = db
        self.directory = directory
        self.nodes = nodes
        self.default_size_mb = default_size_mb

    async def _node_for(self, wanted: str | None) -> str:
        return await self.nodes.node_for(self.directory, wanted)

    async def create(self, req: VolumeCreate) -> Volume:
        node_id = await self._node_for(req.node)
        row = VolumeRow(
            id=ids.new_id(ids.VOLUME),
            name=req.name,
            node_id=node_id,
            size_mb=req.size_mb,
            labels=req.labels,
            created_at=utcnow(),
        )
        try:
            async with self.db.transaction() as session:
                session.add(row)
                await session.flush()
        except IntegrityError:
            raise Conflict(f"a volume named {req.name!r} exists already") from None
        try:
            node = await self.directory.get(node_id)
            await node.create_volume(row.id, req.size_mb or self.default_size_mb)
        except BaseException as exc:
            # Nothing half-made: the node removed what it began; the row goes too.
            async with self.db.transaction() as session:
                stored = await session.get(VolumeRow, row.id)
                if stored is not None:
                    await session.delete(stored)
            if isinstance(exc, Exception) and not isinstance(exc, Unavailable):
                raise Unavailable(f"the volume could not be made: {exc}") from None
            raise
        return await self._model(row)

    async def row(self, ref: str) -> VolumeRow:
        async with self.db.session() as session:
            row = await session.get(VolumeRow, ref)
            if row is None:
                row = await session.scalar(select(VolumeRow).where(VolumeRow.name == ref))
        if row is None:
            raise no_volume(ref)
        return row

    async def _users(self) -> dict[str, list[str]]:
        """Volume id -> the live sandboxes that mount it."""
        live = SandboxRow.state != SandboxState.deleted.value
        async with self.db.session() as session:
            rows = (await session.execute(select(SandboxRow.id, SandboxRow.spec).where(live))).all()
        users: dict[str, list[str]] = {}
        for sandbox_id, spec in rows:
            for mount in spec.get("volumes") or ():
                users.setdefault(mount["id"], []).append(sandbox_id)
        return users

    async def _model(self, row: VolumeRow, users: dict[str, list[str]] | None = None) -> Volume:
        users = users if users is not None else await self._users()
        return Volume(
            id=row.id,
            name=row.name,
            node_id=row.node_id,
            size_mb=row.size_mb or self.default_size_mb,
            labels=row.labels,
            created_at=row.created_at,
            used_by=sorted(users.get(row.id, [])),
        )

    async def get(self, ref: str) -> Volume:
        return await self._model(await self.row(ref))

    async def list(self) -> list[Volume]:
        async with self.db.session() as session:
            rows = list(await session.scalars(select(VolumeRow).order_by(VolumeRow.name)))
        users = await self._users()
        return [await self._model(r, users) for r in rows]

    async def delete(self, ref: str) -> None:
        row = await self.row(ref)
        using = (await self._users()).get(row.id)
        if using:
            raise Conflict(
                f"volume {row.name} is mounted by {', '.join(sorted(using))}: delete them first"
            )
        node = await self.directory.get(row.node_id)
        await node.remove_volume(row.id)
        async with self.db.transaction() as session:
            stored = await session.get(VolumeRow, row.id)
            if stored is not None:
                await session.delete(stored)

    async def resolve(
        self, mounts: list[VolumeMount]
    ) -> tuple[str | None, list[dict[str, object]]]:
        """The node a sandbox with these volumes must go to, and the mounts as stored in its
        spec (with each volume's id)."""
        node_id: str | None = None
        resolved: list[dict[str, object]] = []
        for i, mount in enumerate(mounts):
            try:
                row = await self.row(mount.name)
            except NotFound:
                raise InvalidArgument(
                    f"no volume {mount.name!r}",
                    details=[{"loc": ["body", "volumes", i, "name"], "msg": "unknown volume"}],
                ) from None
            if node_id is not None and row.node_id != node_id:
                raise InvalidArgument(
                    "the volumes are on different nodes; a sandbox runs on one",
                    details=[{"loc": ["body", "volumes", i, "name"], "msg": "another node"}],
                )
            node_id = row.node_id
            resolved.append(
                {"name": row.name, "id": row.id, "path": mount.path, "read_only": mount.read_only}
            )
        return node_id, resolved
