"""A sandbox port's connection on the node that runs the sandbox: asyncio streams over the socket
the runtime made inside the sandbox's network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from corral.node.base import PortStream, PortUnreachable
from corral.runtime.base import SandboxHandle
from corral.runtime.ports import PortRefused

# What the node's side reads ahead of its consumer, at most (asyncio pauses the socket past it).
READ_LIMIT = 1 << 18


class SocketPortStream(PortStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, handle: SandboxHandle, port: int) -> SocketPortStream:
        try:
            sock: socket.socket = await handle.connect_port(port)
        except PortRefused as exc:
            raise PortUnreachable(str(exc)) from None
        except TimeoutError:
            raise PortUnreachable(f"port {port} of the sandbox did not accept in time") from None
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
        return cls(reader, writer)

    async def read(self, n: int = 1 << 16) -> bytes:
        try:
            return await self.reader.read(n)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self.writer.wait_closed()
