"""What remote nodes report, applied to the store by whichever replica receives it.

Events come as requests on `corral.node.<id>.out.event` to the queue group of replicas; the
subject names the node (its NATS user may publish only there). An answer means applied (or
refused for good): the node keeps an event until it gets one.

A result is fenced twice: by the node's epoch (a node registered again since the command
started lost it), and by a conditional update (only a command still running takes it), so a
result that arrives after its command was declared lost is never applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.aio.subscription import Subscription
from sqlalchemy import select, update

from corral.core.commands import COMMAND_FINISHED_EVENT, command_event
from corral.core.models import NodeInfo
from corral.core.nodes import RUNNING, NodeRegistry, lose_commands
from corral.core.results import EVERY, CommandResults, outcome_values
from corral.node import protocol as p
from corral.node.bus import PREFIX, Bus
from corral.store.db import Database
from corral.store.tables import CommandRow, NodeRow, SandboxRow

if TYPE_CHECKING:
    from corral.core.sandboxes import SandboxService
    from corral.core.webhooks import EventSink

log = logging.getLogger(__name__)


class NodeEvents:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        registry: NodeRegistry,
        results: CommandResults,
        sandboxes: SandboxService,
    ) -> None:
        self.db = db
        self.bus = bus
        self.registry = registry
        self.results = results
        self.sandboxes = sandboxes
        self.events: EventSink | None = None  # webhooks' command.finished; set by the server
        # Whether any webhook takes an event type (set by the server with `events`).
        self.events_wanted: Callable[[str], bool] = lambda _event_type: True
        self._sub: Subscription | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.bus.serve_from(
            f"{PREFIX}.*.out.event", self._handle, queue=p.REPLICAS_QUEUE
        )

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._background):
            task.cancel()

    async def _handle(self, subject: str, op: str, args: dict[str, Any], data: bytes) -> Any:
        node_id = subject.split(".")[2]
        if op == p.EVENT_HEARTBEAT:
            ok = await self.registry.heartbeat(node_id, int(args["epoch"]), dict(args["load"]))
            return {"ok": ok}
        if op == p.EVENT_ENDED:
            return await self._ended(node_id, args)
        if op == p.EVENT_DIED:
            return await self._died(node_id, args)
        if op == p.EVENT_REGISTER:
            return await self._register(node_id, args)
        raise ValueError(f"unknown node event {op!r}")

    async def _epoch(self, node_id: str) -> int | None:
        async with self.db.session() as session:
            row = await session.get(NodeRow, node_id)
        return row.epoch if row is not None else None

    async def _register(self, node_id: str, args: dict[str, Any]) -> Any:
        info = NodeInfo.model_validate(args["info"])
        if info.id != node_id:
            raise ValueError(f"node {node_id} cannot register as {info.id!r}")
        epoch = await self.registry.register(info)
        # What ran there before is gone with the node's previous life.
        async with self.db.transaction() as session:
            lost = await lose_commands(
                session,
                node_id,
                f"node {node_id} restarted while the command ran; its result is unknown",
                self.registry.on_lost,
            )
        if lost:
            await self.results.announce(EVERY)
            log.warning("node %s registered again: %d command(s) lost", node_id, lost)
        log.info("node %s registered (epoch %d, %s)", node_id, epoch, info.version)
        # Its sandboxes come back once it has its answer (it serves calls already).
        task = asyncio.ensure_future(self._reconcile(node_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return {"epoch": epoch, "lost_after": self.registry.lost_after}

    async def _reconcile(self, node_id: str) -> None:
        await asyncio.sleep(0.05)
        try:
            await self.sandboxes.reconcile(node_id)
        except Exception:
            log.exception("bringing back the sandboxes of node %s failed", node_id)
        images = self.sandboxes.images
        if images is not None:
            # What its image store holds now (it may have been emptied, or filled elsewhere).
            try:
                await images.sync(await self.sandboxes.directory.get(node_id))
            except Exception as exc:
                log.warning("listing the images of node %s failed: %s", node_id, exc)

    async def _ended(self, node_id: str, args: dict[str, Any]) -> Any:
        cid = str(args["command_id"])
        epoch = int(args["epoch"])
        outcome = p.outcome_from_wire(args["outcome"])
        current_life = (
            select(NodeRow.id).where(NodeRow.id == node_id, NodeRow.epoch == epoch).exists()
        )
        # One statement: the node's epoch and the command's state are both checked by it, and
        # the row as stored comes back with it (for the webhook event), no second read.
        ended = (
            update(CommandRow)
            .where(CommandRow.id == cid, CommandRow.node_id == node_id, RUNNING, current_life)
            .values(**outcome_values(outcome))
            .returning(CommandRow)
        )
        # With a webhook event to store, the event goes in the result's transaction (this
        # replica is the one that applied it). Without, the update is the whole change,
        # committed as it runs: one round trip, not three (SQLite has no such mode).
        sink = self.events if self.events_wanted(COMMAND_FINISHED_EVENT) else None
        opened = (
            self.db.transaction() if sink is not None or self.db.is_sqlite else self.db.statements()
        )
        async with opened as session:
            stored = (
                await session.execute(ended, execution_options={"synchronize_session": False})
            ).scalar_one_or_none()
            applied = stored is not None
            exists = applied or await session.get(CommandRow, cid) is not None
            if stored is not None and sink is not None:
                await sink(
                    COMMAND_FINISHED_EVENT,
                    stored.sandbox_id,
                    lambda: command_event(stored),
                    session,
                )
        if not exists:
            return {"retry": True}  # its row is being written by the replica that started it
        if not applied and await self._epoch(node_id) != epoch:
            log.info("result of %s from an earlier life of node %s: not applied", cid, node_id)
            return {"ok": False}
        if applied:
            self.results.deliver(cid, outcome, p.output_from_wire(args.get("output")))
            await self.results.announce(cid)
        else:
            log.info("result of %s not applied: it was no longer running", cid)
        return {"ok": applied}

    async def _died(self, node_id: str, args: dict[str, Any]) -> Any:
        sandbox_id = str(args["sandbox_id"])
        if await self._epoch(node_id) != int(args["epoch"]):
            return {"ok": False}
        async with self.db.session() as session:
            row = await session.get(SandboxRow, sandbox_id)
        if row is None or row.node_id != node_id:
            return {"ok": False}
        await self.sandboxes.died(sandbox_id, args.get("failure"))
        return {"ok": True}
