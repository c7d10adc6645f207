"""Port tunnels across the node protocol (see node/protocol.py): the node's table of open
connections to sandbox ports, and the replica's PortStream over the bus.

Flow control is the pull: a replica asks for at most READ_BYTES at a time and sends at most
READ_BYTES per write, each answered once the node's socket has taken it (or `pending` after
FOLLOW_WAIT, then asked again without data), so neither side holds more than a piece or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from corral.node import protocol as p
from corral.node.base import PortStream
from corral.node.bus import RemoteError, Reply

MAX_TUNNELS = 4096  # open at once on one node
WAIT_CAP = 10.0


@dataclass
class Tunnel:
    stream: PortStream
    used: float = field(default_factory=time.monotonic)
    write: asyncio.Future[None] | None = None  # the write the socket has not taken yet


class Tunnels:
    """The node's side: tunnels by id, closed when idle for TUNNEL_IDLE seconds."""

    def __init__(self, open_port: Callable[[str, int], Awaitable[PortStream]]) -> None:
        self.open_port = open_port
        self._tunnels: dict[str, Tunnel] = {}

    def _get(self, args: dict[str, Any]) -> Tunnel:
        tunnel = self._tunnels.get(str(args["tunnel"]))
        if tunnel is None:
            raise RemoteError("broken_pipe", "the tunnel is closed")
        tunnel.used = time.monotonic()
        return tunnel

    async def sweep(self) -> None:
        now = time.monotonic()
        for key, tunnel in list(self._tunnels.items()):
            if now - tunnel.used > p.TUNNEL_IDLE:
                self._tunnels.pop(key, None)
                await tunnel.stream.close()

    async def close_all(self) -> None:
        tunnels, self._tunnels = list(self._tunnels.values()), {}
        for tunnel in tunnels:
            await tunnel.stream.close()

    async def open(self, args: dict[str, Any]) -> Any:
        await self.sweep()
        if len(self._tunnels) >= MAX_TUNNELS:
            raise RemoteError("os_error", "too many port tunnels open on this node")
        port = int(args["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
        stream = await self.open_port(str(args["sandbox_id"]), port)
        key = secrets.token_hex(12)
        self._tunnels[key] = Tunnel(stream)
        return {"tunnel": key}

    async def read(self, args: dict[str, Any]) -> Any:
        tunnel = self._get(args)
        n = max(1, min(int(args.get("n", p.READ_BYTES)), p.READ_BYTES))
        try:
            # A cancelled read takes nothing from the stream.
            data = await asyncio.wait_for(
                tunnel.stream.read(n), min(float(args.get("wait", p.FOLLOW_WAIT)), WAIT_CAP)
            )
        except TimeoutError:
            return Reply({"eof": False, "pending": True})
        return Reply({"eof": not data}, data)

    async def write(self, args: dict[str, Any], data: bytes) -> Any:
        tunnel = self._get(args)
        if data:
            if tunnel.write is not None and not tunnel.write.done():
                raise RemoteError("os_error", "a write to this tunnel is still pending")
            tunnel.write = asyncio.ensure_future(tunnel.stream.write(data))
            tunnel.write.add_done_callback(_retrieved)
        write = tunnel.write
        if write is None:
            return None
        try:
            await asyncio.wait_for(
                asyncio.shield(write), min(float(args.get("wait", p.FOLLOW_WAIT)), WAIT_CAP)
            )
        except TimeoutError:
            return {"pending": True}
        finally:
            if write.done() and tunnel.write is write:
                tunnel.write = None
        return None

    async def write_eof(self, args: dict[str, Any]) -> Any:
        await self._get(args).stream.write_eof()

    async def close(self, args: dict[str, Any]) -> Any:
        tunnel = self._tunnels.pop(str(args["tunnel"]), None)
        if tunnel is not None:
            await tunnel.stream.close()


def _retrieved(write: asyncio.Future[None]) -> None:
    if not write.cancelled():
        write.exception()


Call = Callable[..., Awaitable[tuple[Any, bytes]]]  # RemoteNode.call


class RemotePortStream(PortStream):
    """The replica's side of a tunnel."""

    def __init__(self, call: Call, tunnel: str, call_timeout: float) -> None:
        self._call = call
        self.tunnel = tunnel
        self.timeout = p.FOLLOW_WAIT + call_timeout
        self.call_timeout = call_timeout
        self._closed = False

    async def read(self, n: int = 1 << 16) -> bytes:
        args = {"tunnel": self.tunnel, "n": min(n, p.READ_BYTES), "wait": p.FOLLOW_WAIT}
        while True:
            try:
                answer, data = await self._call("port_read", args, timeout=self.timeout)
            except BrokenPipeError:
                return b""
            if not answer.get("pending"):
                return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), p.READ_BYTES):
            piece = bytes(view[start : start + p.READ_BYTES])
            args = {"tunnel": self.tunnel, "wait": p.FOLLOW_WAIT}
            answer, _ = await self._call("port_write", args, piece, timeout=self.timeout)
            while answer and answer.get("pending"):
                answer, _ = await self._call("port_write", args, timeout=self.timeout)

    async def write_eof(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            await self._call("port_write_eof", {"tunnel": self.tunnel}, timeout=self.call_timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Best effort: a node that does not answer closes the tunnel once it is idle.
        with contextlib.suppress(Exception):
            await self._call("port_close", {"tunnel": self.tunnel}, timeout=self.call_timeout)
