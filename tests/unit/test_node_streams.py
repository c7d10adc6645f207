"""The node's streaming side (fake runtime): raw stdout for transfers, stdin with back-pressure,
logs that are not kept, and the terminal input writer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from corral.core.models import CommandStatus
from corral.node.local import STDIN_BUFFER, _StdinProtocol, _TerminalWriter
from corral.node.output_log import read_output

from .helpers import run
from .test_node_fake import local_node, spec


def test_raw_stdout_streams_any_amount_at_the_readers_pace(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, bytes, CommandStatus]:
        async with local_node(tmp_path) as node:
            command = dataclasses.replace(spec("cat"), interactive=True, raw_stdout=True)
            execution = await node.run(command)
            payload = os.urandom(6 << 20)  # more than every buffer on the way

            async def feed() -> None:
                for i in range(0, len(payload), 1 << 18):
                    await execution.write_stdin(payload[i : i + (1 << 18)])
                await execution.close_stdin()

            writer = asyncio.ensure_future(feed())
            received = bytearray()
            while data := await execution.read_stdout(1 << 16):
                received += data
                await asyncio.sleep(0)  # a slow reader
            await writer
            outcome = await execution.outcome()
            await execution.close_stdout()
            # Raw stdout never reaches the log.
            out, _ = read_output(node.log_path(command.sandbox_id, command.id))
            assert out == b""
            return payload, bytes(received), outcome.status

    payload, received, status = run(scenario(), timeout=30)
    assert received == payload and status is CommandStatus.completed


def test_stdin_writers_wait_for_a_command_that_does_not_read(tmp_path: Path) -> None:
    async def scenario() -> bool:
        async with local_node(tmp_path) as node:
            command = dataclasses.replace(spec("sleep 5"), interactive=True)
            execution = await node.run(command)
            blocked = asyncio.ensure_future(execution.write_stdin(b"x" * (4 * STDIN_BUFFER)))
            await asyncio.sleep(0.3)
            waiting = not blocked.done()  # back-pressure: the writer waits, memory stays bounded
            await execution.cancel()
            await execution.outcome()
            await asyncio.wait_for(blocked, 5)  # released when the command ends
            return waiting

    assert run(scenario())


def test_logs_not_kept_are_removed_at_the_end(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, bytes | None]:
        async with local_node(tmp_path) as node:
            command = dataclasses.replace(spec("echoerr oops"), keep_log=False)
            execution = await node.run(command)
            await execution.outcome()
            await asyncio.sleep(0)
            path = node.log_path(command.sandbox_id, command.id)
            memory = execution.log.memory_output()
            return path.exists(), memory[1] if memory else None

    exists, stderr = run(scenario())
    assert not exists and stderr == b"oops\n"


def test_terminal_writer_buffers_and_applies_flow_control() -> None:
    async def scenario() -> tuple[bytes, bool, bool]:
        read_end, write_end = os.pipe()
        protocol = _StdinProtocol()
        writer = _TerminalWriter(write_end, protocol, high=1 << 16)
        data = os.urandom(1 << 20)  # far more than the pipe holds
        writer.write(data)
        paused = protocol._paused
        received = bytearray()
        os.set_blocking(read_end, False)
        while len(received) < len(data):
            try:
                received += os.read(read_end, 1 << 16)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await protocol.drain()
        writer.close()
        os.close(read_end)
        return bytes(received), paused, protocol._closed

    received, paused, closed = run(scenario())
    assert paused and closed and len(received) == 1 << 20
