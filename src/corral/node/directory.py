"""The nodes a server reaches: its built-in node, and in fleet mode every agent over NATS.

A sandbox stays on its node for life, so which node holds a sandbox is looked up once and kept.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from corral.core.models import NodeInfo
from corral.node.base import Node, NodeUnavailable
from corral.node.bus import Bus
from corral.node.local import LocalNode
from corral.node.remote import RemoteNode, ResultWaiter
from corral.store.db import Database
from corral.store.tables import NodeRow, SandboxRow

INFO_MAX_AGE = 10.0  # seconds a remote node's registered info is used before it is read again
MAX_KNOWN_SANDBOXES = 100_000


class NodeDirectory:
    def __init__(
        self,
        db: Database,
        local: LocalNode | None,
        *,
        bus: Bus | None = None,
        wait_result: ResultWaiter | None = None,
        lost_after: float = 15.0,
    ) -> None:
        self.db = db
        self.local = local
        self.bus = bus
        self.wait_result = wait_result
        self.lost_after = lost_after
        self._remote: dict[str, tuple[RemoteNode, float]] = {}
        self._sandbox_nodes: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def fleet(self) -> bool:
        """Nodes other than the built-in one may hold sandboxes (NATS is configured)."""
        return self.bus is not None

    async def get(self, node_id: str) -> Node:
        if self.local is not None and node_id == self.local.id:
            return self.local
        if self.bus is None or self.wait_result is None:
            raise NodeUnavailable(f"node {node_id} cannot be reached from this server")
        known = self._remote.get(node_id)
        if known is not None and time.monotonic() - known[1] < INFO_MAX_AGE:
            return known[0]
        async with self.db.session() as session:
            row = await session.get(NodeRow, node_id)
        if row is None or not row.info:
            raise NodeUnavailable(f"node {node_id} is not registered")
        info = NodeInfo.model_validate(row.info)
        if known is not None:
            known[0].info = info
            node = known[0]
        else:
            node = RemoteNode(self.bus, node_id, info, self.wait_result, self.lost_after)
        self._remote[node_id] = (node, time.monotonic())
        return node

    def enforced(self, node_id: str) -> dict[str, str]:
        """The limits a node enforces, as last known (for answers that list many sandboxes)."""
        if self.local is not None and node_id == self.local.id:
            return self.local.runtime.enforceable()
        known = self._remote.get(node_id)
        return dict(known[0].info.enforceable) if known is not None else {}

    def remember(self, sandbox_id: str, node_id: str) -> None:
        if len(self._sandbox_nodes) >= MAX_KNOWN_SANDBOXES:
            self._sandbox_nodes.clear()
        self._sandbox_nodes[sandbox_id] = node_id

    async def for_sandbox(self, sandbox_id: str) -> Node:
        if not self.fleet and self.local is not None:
            return self.local
        node_id = self._sandbox_nodes.get(sandbox_id)
        if node_id is None:
            async with self.db.session() as session:
                node_id = await session.scalar(
                    select(SandboxRow.node_id).where(SandboxRow.id == sandbox_id)
                )
            if node_id is None:
                raise NodeUnavailable(f"sandbox {sandbox_id} is on no known node")
            self.remember(sandbox_id, node_id)
        return await self.get(node_id)
