"""The raw TCP tunnel over a WebSocket: what `corral port-forward` speaks.

Binary frames carry the connection's bytes both ways. An empty binary frame from the client is
its end of input (the sandbox's side reads EOF, and may go on answering); the server closes with
1000 once the sandbox's side has closed. Text frames are refused (1003). Back-pressure holds both
ways: a frame is read from the client only once the previous one is written to the sandbox's
socket, and the socket is read only once the previous frame has been sent.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from corral.api import ws
from corral.core.errors import CorralError, InvalidArgument
from corral.core.tokens import Principal
from corral.node.base import PortStream
from corral.services import Services
from corral.store.tables import SandboxRow

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_TOKEN_ENDED = 4001
READ_SIZE = 1 << 16


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(f"port must be a number from 1 to 65535, not {text[:20]!r}")
    return int(text)


async def serve(
    websocket: WebSocket, services: Services, caller: Principal, row: SandboxRow, port: int
) -> None:
    with services.tokens.lease(caller) as lease:
        try:
            async with services.ports.connect(row, port) as stream:
                await websocket.accept()
                await relay(websocket, stream, lease.wait())
        except CorralError as exc:
            if websocket.application_state == WebSocketState.CONNECTED:
                await ws.send_error(websocket, exc)
            else:
                await ws.refuse(websocket, exc)


async def relay(websocket: WebSocket, stream: PortStream, ended: object) -> None:
    inbound = asyncio.create_task(_inbound(websocket, stream))
    outbound = asyncio.create_task(_outbound(websocket, stream))
    token = asyncio.ensure_future(ended)  # type: ignore[arg-type]
    try:
        done, _ = await asyncio.wait(
            {inbound, outbound, token}, return_when=asyncio.FIRST_COMPLETED
        )
        if token in done:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_TOKEN_ENDED, ws.close_reason(str(token.result())))
            return
        if inbound in done and inbound.exception() is None and inbound.result():
            # The client ended its input: the sandbox may still answer.
            await asyncio.wait({outbound, token}, return_when=asyncio.FIRST_COMPLETED)
        if outbound.done() and outbound.exception() is None:
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_NORMAL)
        elif inbound.done() and isinstance(inbound.exception(), _TextFrame):
            with contextlib.suppress(Exception):
                await websocket.close(CLOSE_UNSUPPORTED, "binary frames only")
    finally:
        for task in (inbound, outbound, token):
            task.cancel()
        await asyncio.gather(inbound, outbound, token, return_exceptions=True)


class _TextFrame(Exception):
    pass


async def _inbound(websocket: WebSocket, stream: PortStream) -> bool:
    """Client frames to the sandbox; True once the client ended its input, False once it left."""
    while True:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return False
        if message["type"] == "websocket.disconnect":
            return False
        data = message.get("bytes")
        if data is None:
            raise _TextFrame
        if not data:
            await stream.write_eof()
            return True
        await stream.write(data)


async def _outbound(websocket: WebSocket, stream: PortStream) -> None:
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            return
        await websocket.send_bytes(data)
