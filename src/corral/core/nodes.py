"""The fleet's nodes as the store knows them: registration with an epoch, heartbeats, drain,
placement of new sandboxes, and the sweep that declares silent nodes lost.

Every fact lives in the store, so any replica answers for any node. A node's `epoch` grows at
each registration; a heartbeat or a result that carries an older epoch comes from an earlier
run of the node (or from before a partition healed) and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.clock import utcnow
from corral.core.errors import CorralError, InvalidArgument, NotFound, RateLimited, Unavailable
from corral.core.metrics import Metrics
from corral.core.models import (
    CommandStatus,
    Node,
    NodeCapacity,
    NodeInfo,
    NodeState,
    SandboxState,
)
from corral.store.db import Database
from corral.store.tables import CommandRow, NodeRow, SandboxRow

if TYPE_CHECKING:
    from corral.node.directory import NodeDirectory

USABLE_MAX_AGE = 1.0  # seconds a node's row is trusted for "is it usable" checks

log = logging.getLogger(__name__)
# The partial indexes' own predicate: a NOT IN would miss them and read every deleted sandbox
# the history keeps (4.9 ms to count per node beside 100,000 of them, against 0.02 ms).
LIVE_SANDBOX = SandboxRow.state != SandboxState.deleted.value
RUNNING = CommandRow.status.in_([CommandStatus.queued.value, CommandStatus.running.value])


class NodeRegistry:
    def __init__(
        self, db: Database, *, lost_after: float = 15.0, metrics: Metrics | None = None
    ) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        self.lost_after = lost_after
        self.on_lost: LostSink | None = None  # set by the server (webhooks)
        self._usable: dict[str, tuple[NodeRow, float]] = {}

    # --- what nodes say ---

    async def register(self, info: NodeInfo) -> int:
        """Record a node's (re)registration; its new epoch."""
        now = utcnow()
        async with self.db.transaction() as session:
            row = await session.get(NodeRow, info.id, with_for_update=True)
            if row is None:
                row = NodeRow(
                    id=info.id,
                    epoch=0,
                    draining=False,
                    registered_at=now,
                    load={},
                )
                session.add(row)
            row.epoch = (row.epoch or 0) + 1
            row.state = NodeState.draining.value if row.draining else NodeState.online.value
            row.version = info.version
            row.protocol = info.protocol
            row.info = info.model_dump(mode="json")
            row.registered_at = now
            row.last_seen_at = now
            epoch = row.epoch
        return epoch

    async def heartbeat(self, node_id: str, epoch: int, load: dict[str, int]) -> bool:
        """Whether the heartbeat was taken: False for an unknown node or an older epoch (the
        node must register again, and reconcile)."""
        now = utcnow()
        async with self.db.transaction() as session:
            result = await session.execute(
                update(NodeRow)
                # Not once declared offline: the node registers again (and reconciles).
                .where(
                    NodeRow.id == node_id,
                    NodeRow.epoch == epoch,
                    NodeRow.state != NodeState.offline.value,
                )
                .values(last_seen_at=now, load=load)
            )
            taken = bool(result.rowcount)  # type: ignore[attr-defined]
        self.metrics.heartbeat(node_id, taken)
        return taken

    # --- what operators see and do ---

    def _state(self, row: NodeRow, now: datetime) -> NodeState:
        if row.state == NodeState.offline.value or now - row.last_seen_at > timedelta(
            seconds=self.lost_after
        ):
            return NodeState.offline
        return NodeState.draining if row.draining else NodeState.online

    @staticmethod
    async def _sandbox_counts(
        session: AsyncSession, node_ids: list[str] | None = None
    ) -> dict[str, int]:
        """Live sandboxes per node (of `node_ids`, or of every node)."""
        query = select(SandboxRow.node_id, func.count()).where(LIVE_SANDBOX)
        if node_ids is not None:
            query = query.where(SandboxRow.node_id.in_(node_ids))
        return dict((await session.execute(query.group_by(SandboxRow.node_id))).all())

    async def _counts(self, node_ids: list[str] | None = None) -> tuple[dict[str, int], ...]:
        commands = select(CommandRow.node_id, func.count()).where(RUNNING)
        if node_ids is not None:
            commands = commands.where(CommandRow.node_id.in_(node_ids))
        async with self.db.session() as session:
            boxes = await self._sandbox_counts(session, node_ids)
            running = dict((await session.execute(commands.group_by(CommandRow.node_id))).all())
        return boxes, running

    def _model(self, row: NodeRow, boxes: int, running: int, now: datetime) -> Node:
        info = NodeInfo.model_validate(row.info)
        return Node(
            id=row.id,
            state=self._state(row, now),
            version=row.version,
            runtime=info.runtime,
            capacity=info.capacity,
            sandboxes=boxes,
            running_commands=running,
            templates=info.templates,
            enforceable=info.enforceable,
            host_exec=info.host_exec,
            epoch=row.epoch,
            registered_at=row.registered_at,
            last_heartbeat=row.last_seen_at,
        )

    async def list(self) -> list[Node]:
        async with self.db.session() as session:
            rows = list(await session.scalars(select(NodeRow).order_by(NodeRow.id)))
        boxes, running = await self._counts()
        now = utcnow()
        return [self._model(r, boxes.get(r.id, 0), running.get(r.id, 0), now) for r in rows]

    async def row(self, node_id: str) -> NodeRow:
        async with self.db.session() as session:
            row = await session.get(NodeRow, node_id)
        if row is None:
            raise NotFound(f"no node {node_id!r}")
        return row

    async def get(self, node_id: str) -> Node:
        row = await self.row(node_id)
        boxes, running = await self._counts([node_id])
        return self._model(row, boxes.get(node_id, 0), running.get(node_id, 0), utcnow())

    async def set_draining(self, node_id: str, draining: bool = True) -> Node:
        async with self.db.transaction() as session:
            result = await session.execute(
                update(NodeRow).where(NodeRow.id == node_id).values(draining=draining)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no node {node_id!r}")
        return await self.get(node_id)

    async def usable(self, node_id: str) -> NodeRow:
        """The node `node_id` if it is online now (503 with the reason otherwise). Every
        command on a remote node asks: the row is read at most once per USABLE_MAX_AGE."""
        seen = self._usable.get(node_id)
        now = time.monotonic()
        if seen is not None and now - seen[1] < USABLE_MAX_AGE:
            row = seen[0]
        else:
            row = await self.row(node_id)
            self._usable[node_id] = (row, now)
        if self._state(row, utcnow()) == NodeState.offline:
            raise Unavailable(
                f"node {node_id} has not been heard from for over {self.lost_after:g} s"
            )
        return row

    # --- placement ---

    async def node_for(self, directory: NodeDirectory, wanted: str | None) -> str:
        """The node to keep a new node-held object (a volume, an image) on: `wanted`, or
        the least loaded one; without a fleet, the built-in node."""
        if not directory.fleet:
            local = directory.local
            if local is None:
                raise Unavailable("this server runs no node")
            if wanted not in (None, local.id):
                raise InvalidArgument(
                    f"no node {wanted!r}", details=[{"loc": ["body", "node"], "msg": "unknown"}]
                )
            return local.id
        return await self.place(wanted=wanted)

    async def place(
        self,
        *,
        wanted: str | None = None,
        template: str | None = None,
        prefer: Collection[str] = (),
    ) -> str:
        """The node for a new sandbox: `wanted` if it can take it, else the least loaded online
        node with room that has the template (any node, when `template` is None), among those
        in `prefer` if any of them can (e.g. the nodes that have its image)."""
        # One session for both reads; running commands do not decide placement.
        async with self.db.session() as session:
            rows = list(await session.scalars(select(NodeRow)))
            boxes = await self._sandbox_counts(session)
        now = utcnow()

        def fits(row: NodeRow) -> CorralError | None:
            """Why `row` cannot take the sandbox, or None."""
            state = self._state(row, now)
            if state != NodeState.online:
                return Unavailable(f"node {row.id} is {state.value}")
            info = NodeInfo.model_validate(row.info)
            if template is not None and template not in info.templates:
                return Unavailable(f"node {row.id} has no template {template!r}")
            if boxes.get(row.id, 0) >= info.capacity.sandboxes:
                # Full, like a server at its sandbox limit: retry once one is deleted.
                return RateLimited(f"node {row.id} is full ({info.capacity.sandboxes} sandboxes)")
            return None

        if wanted is not None:
            row = next((r for r in rows if r.id == wanted), None)
            if row is None:
                raise InvalidArgument(
                    f"no node {wanted!r}",
                    details=[{"loc": ["body", "node"], "msg": "unknown node"}],
                )
            refusal = fits(row)
            if refusal is not None:
                raise refusal
            return row.id
        refusals = {r.id: fits(r) for r in rows}
        candidates = [r for r in rows if refusals[r.id] is None]
        if not candidates:
            if any(isinstance(e, RateLimited) for e in refusals.values()):
                raise RateLimited("every online node that could take the sandbox is full")
            raise Unavailable("no online node can take the sandbox")

        def load(row: NodeRow) -> tuple[float, str]:
            capacity = NodeInfo.model_validate(row.info).capacity.sandboxes or 1
            return boxes.get(row.id, 0) / capacity, row.id

        preferred = [r for r in candidates if r.id in prefer]
        return min(preferred or candidates, key=load).id

    # --- liveness ---

    async def sweep(self) -> list[tuple[str, int]]:
        """Declare the nodes silent for longer than the grace lost: state offline, their
        running commands `lost`. Returns (node, commands lost) for each node declared now."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.lost_after)
        declared: list[tuple[str, int]] = []
        async with self.db.transaction() as session:
            silent = list(
                await session.scalars(
                    select(NodeRow.id).where(
                        NodeRow.state != NodeState.offline.value, NodeRow.last_seen_at < cutoff
                    )
                )
            )
            for node_id in silent:
                # Conditional: a heartbeat that came in meanwhile keeps the node.
                taken = await session.execute(
                    update(NodeRow)
                    .where(NodeRow.id == node_id, NodeRow.last_seen_at < cutoff)
                    .values(state=NodeState.offline.value)
                )
                if not taken.rowcount:  # type: ignore[attr-defined]
                    continue
                lost = await lose_commands(
                    session,
                    node_id,
                    f"node {node_id} stopped answering; the result is unknown",
                    self.on_lost,
                )
                declared.append((node_id, lost))
        return declared


# Told of each command declared lost, in the transaction that declares it (webhooks).
LostSink = Callable[[AsyncSession, CommandRow], Awaitable[None]]


async def lose_commands(
    session: AsyncSession, node_id: str, error: str, announce: LostSink | None = None
) -> int:
    """Declare every command still running on `node_id` lost: its result is unknown. How many
    there were."""
    ids: list[str] = []
    if announce is not None:
        ids = list(
            await session.scalars(
                select(CommandRow.id).where(CommandRow.node_id == node_id, RUNNING)
            )
        )
    result = await session.execute(
        update(CommandRow)
        .where(CommandRow.node_id == node_id, RUNNING)
        .values(status=CommandStatus.lost.value, finished_at=utcnow(), error=error)
    )
    if announce is not None and ids:
        lost = await session.scalars(
            select(CommandRow)
            .where(CommandRow.id.in_(ids), CommandRow.status == CommandStatus.lost.value)
            .execution_options(populate_existing=True)
        )
        for row in list(lost):
            await announce(session, row)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def host_capacity(sandboxes: int) -> NodeCapacity:
    """The host this process runs on, as a node's capacity."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return NodeCapacity(
        sandboxes=sandboxes, memory_mb=memory // (1024 * 1024), cpus=float(os.cpu_count() or 1)
    )


class Presence:
    """Keeps a node that runs in this process registered and online: a heartbeat every
    `interval`, and a new registration when one is refused (the store lost the node, or another
    process registered the same node id since: that is logged, as two processes must never
    serve one node)."""

    def __init__(
        self,
        registry: NodeRegistry,
        info: Callable[[], NodeInfo],
        load: Callable[[], dict[str, int]],
        *,
        interval: float,
    ) -> None:
        self.registry = registry
        self.info = info
        self.load = load
        self.interval = interval
        self.epoch = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.epoch = await self.registry.register(self.info())
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                info = self.info()
                if not await self.registry.heartbeat(info.id, self.epoch, self.load()):
                    log.error(
                        "node %s was registered again elsewhere (epoch past %d): is another "
                        "server running with the same CORRAL_NODE_ID on this store?",
                        info.id,
                        self.epoch,
                    )
                    self.epoch = await self.registry.register(info)
            except Exception:
                log.exception("node heartbeat failed; trying again")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
