"""Sandbox ports served at a URL: which ports of a sandbox are exposed, signed URLs for them, and
connections to them through the sandbox's node.

A port is exposed private (a token that may use the sandbox, with the `exec` scope) or public (no
token). Either way the node opens the connection inside the sandbox's own network namespace, to
127.0.0.1 there: nothing the sandbox or the caller says can point it elsewhere.

A signed URL carries `corral_expires` (Unix seconds) and `corral_signature`, an HMAC-SHA256 of
the sandbox id, the port and the expiry under a key derived from the admin key (so that every
replica of a fleet checks the same signatures, and a new admin key voids them all).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from sqlalchemy import select

from corral.clock import utcnow
from corral.core.errors import NotFound, RateLimited, SandboxNotRunning
from corral.core.models import Port, PortExpose, PortUrl
from corral.core.sandboxes import SandboxService
from corral.node.base import PortStream
from corral.runtime.base import SandboxDied
from corral.store.db import Database
from corral.store.tables import SandboxPortRow, SandboxRow

EXPIRES_PARAM = "corral_expires"
SIGNATURE_PARAM = "corral_signature"
SIGNATURE_CHARS = 43  # 256 bits, base64url without padding


def path_prefix(sandbox: str, port: int) -> str:
    return f"/v1/sandboxes/{sandbox}/ports/{port}"


def host_label(sandbox_id: str) -> str:
    """The sandbox's part of a host name: its id with a DNS-safe hyphen for the underscore."""
    return sandbox_id.replace("_", "-", 1)


class PortService:
    def __init__(
        self,
        db: Database,
        sandboxes: SandboxService,
        admin_key: str,
        *,
        public_domain: str | None,
        public_scheme: str,
        max_connections: int,
    ) -> None:
        self.db = db
        self.sandboxes = sandboxes
        self._key = hashlib.sha256(b"corral port urls\n" + admin_key.encode()).digest()
        self.domain = public_domain
        self.scheme = public_scheme
        self.max_connections = max_connections
        self._open: dict[str, int] = {}  # sandbox id -> connections open through this replica

    # --- exposure ------------------------------------------------------------------------------

    def model(self, row: SandboxPortRow) -> Port:
        return Port(
            sandbox_id=row.sandbox_id,
            port=row.port,
            public=row.public,
            url=path_prefix(row.sandbox_id, row.port) + "/",
            host_url=self.host_url(row.sandbox_id, row.port),
            created_at=row.created_at,
        )

    def host_url(self, sandbox_id: str, port: int) -> str | None:
        if self.domain is None:
            return None
        return f"{self.scheme}://{port}-{host_label(sandbox_id)}.{self.domain}/"

    async def expose(self, sandbox: SandboxRow, req: PortExpose) -> Port:
        """Expose the port (again: its `public` flag is updated)."""
        async with self.db.transaction() as session:
            row = await session.get(SandboxPortRow, (sandbox.id, req.port))
            if row is None:
                row = SandboxPortRow(
                    sandbox_id=sandbox.id, port=req.port, public=req.public, created_at=utcnow()
                )
                session.add(row)
            else:
                row.public = req.public
            await session.flush()
        return self.model(row)

    async def list(self, sandbox_id: str) -> list[Port]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(SandboxPortRow)
                .where(SandboxPortRow.sandbox_id == sandbox_id)
                .order_by(SandboxPortRow.port)
            )
            return [self.model(row) for row in rows]

    async def exposed(self, sandbox_id: str, port: int) -> SandboxPortRow | None:
        async with self.db.session() as session:
            return await session.get(SandboxPortRow, (sandbox_id, port))

    async def remove(self, sandbox_id: str, port: int) -> Port:
        async with self.db.transaction() as session:
            row = await session.get(SandboxPortRow, (sandbox_id, port))
            if row is None:
                raise NotFound(f"port {port} of sandbox {sandbox_id} is not exposed")
            await session.delete(row)
        return self.model(row)

    # --- signed URLs ---------------------------------------------------------------------------

    def signature(self, sandbox_id: str, port: int, expires: int) -> str:
        message = f"{sandbox_id}\n{port}\n{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def signature_valid(self, sandbox_id: str, port: int, expires: str, signature: str) -> bool:
        if not expires.isdigit() or len(expires) > 12 or len(signature) != SIGNATURE_CHARS:
            return False
        if int(expires) <= time.time():
            return False
        expected = self.signature(sandbox_id, port, int(expires))
        return hmac.compare_digest(expected, signature)

    def signed(self, sandbox_id: str, port: int, expires_in: int) -> PortUrl:
        expires = int(time.time()) + expires_in
        query = (
            f"?{EXPIRES_PARAM}={expires}&{SIGNATURE_PARAM}="
            f"{self.signature(sandbox_id, port, expires)}"
        )
        host = self.host_url(sandbox_id, port)
        return PortUrl(
            url=path_prefix(sandbox_id, port) + "/" + query,
            host_url=host + query if host is not None else None,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    # --- connections ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connect(self, sandbox: SandboxRow, port: int) -> AsyncIterator[PortStream]:
        """A connection to the port inside the running sandbox, closed on leaving; at most
        `max_connections` at once per sandbox (429 past them)."""
        row = await self.sandboxes.running_row(sandbox.id)
        count = self._open.get(row.id, 0)
        if count >= self.max_connections:
            raise RateLimited(
                f"sandbox {row.id} has {count} port connections open (CORRAL_MAX_PORT_CONNECTIONS)"
            )
        self._open[row.id] = count + 1
        try:
            node = await self.sandboxes.node_of(row)
            try:
                stream = await node.open_port(row.id, port)
            except SandboxDied:
                raise SandboxNotRunning(f"sandbox {row.id} is not running") from None
            try:
                yield stream
            finally:
                await stream.close()
        finally:
            left = self._open.get(row.id, 1) - 1
            if left > 0:
                self._open[row.id] = left
            else:
                self._open.pop(row.id, None)
