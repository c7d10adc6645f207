"""Port forwarding: a local TCP listener whose connections each reach a port inside a sandbox,
through the server's raw TCP tunnel (`/v1/sandboxes/{id}/tcp/{port}`, binary WebSocket frames).

What `corral port-forward` runs; usable from Python too:

    async with PortForward(url, headers, local_port=5432) as forward:
        await forward.serve_forever()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from types import TracebackType

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
MAX_FRAME = 1 << 20


def handshake_problem(exc: BaseException) -> str:
    """What the server said when it refused the tunnel (its error message when it gave one)."""
    if isinstance(exc, InvalidStatus):
        try:
            error = json.loads(exc.response.body or b"")["error"]
            return f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__


class PortForward:
    """Listens on `host`:`local_port` (0: any free port, see `.local_port`)."""

    def __init__(
        self,
        ws_url: str,
        headers: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        local_port: int = 0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.ws_url = ws_url
        self.headers = dict(headers)
        self.host = host
        self.local_port = local_port
        self.on_error = on_error or (lambda message: log.warning("%s", message))
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PortForward:
        self._server = await asyncio.start_server(self._accepted, self.host, self.local_port)
        self.local_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None, "use `async with PortForward(...)` first"
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def check(self) -> None:
        """Open one tunnel and close it: raises ConnectionError with the server's reason when
        the sandbox's port cannot be reached."""
        try:
            connection = await ws_connect(
                self.ws_url, additional_headers=self.headers, max_size=MAX_FRAME, compression=None
            )
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            raise ConnectionError(handshake_problem(exc)) from None
        await connection.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            tunnel = await ws_connect(
                self.ws_url, additional_headers=self.headers, max_size=MAX_FRAME, compression=None
            )
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            self.on_error(f"cannot reach the sandbox's port: {handshake_problem(exc)}")
            return
        async with tunnel:
            outbound = asyncio.create_task(self._to_sandbox(reader, tunnel))
            try:
                async for message in tunnel:
                    if isinstance(message, str):
                        break
                    writer.write(message)
                    await writer.drain()
            except (ConnectionClosed, ConnectionError):
                pass
            finally:
                outbound.cancel()
                await asyncio.gather(outbound, return_exceptions=True)

    @staticmethod
    async def _to_sandbox(reader: asyncio.StreamReader, tunnel: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed, ConnectionError):
            while data := await reader.read(READ_SIZE):
                await tunnel.send(data)
            await tunnel.send(b"")  # our end is done: the sandbox's side reads EOF
