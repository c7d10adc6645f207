"""Pipe descriptors given to the loop's transports are closed exactly once. uvloop closes the
descriptor itself and then the file object it was given; a second close() of the number could
hit a descriptor another thread has just been given."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from corral import pipes

Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS: dict[str, Runner] = {"uvloop": uvloop.run, "asyncio": asyncio.run}


def is_closed(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino != inode
    except OSError:
        return True


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_a_pipe_is_closed_exactly_once(
    loop: str, write: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    closes: list[int] = []
    real_close = os.close

    def counting_close(fd: int) -> None:
        closes.append(fd)
        real_close(fd)

    async def main() -> None:
        running = asyncio.get_running_loop()
        probe_r, probe_w = os.pipe2(os.O_CLOEXEC)
        await pipes.pipe_end(probe_r)  # the one-time check of the loop, before counting
        os.close(probe_r)
        os.close(probe_w)
        monkeypatch.setattr(pipes.os, "close", counting_close)
        for _ in range(10):
            r, w = os.pipe2(os.O_CLOEXEC)
            ours, other = (w, r) if write else (r, w)
            inode = os.fstat(ours).st_ino
            end = await pipes.pipe_end(ours)
            connect = running.connect_write_pipe if write else running.connect_read_pipe
            transport, _ = await connect(asyncio.Protocol, end)
            transport.close()
            for _ in range(5):
                await asyncio.sleep(0)
            assert is_closed(ours, inode)
            # Where the loop closes the descriptor itself, Python must not close it again.
            assert closes.count(ours) == (0 if loop == "uvloop" else 1)
            closes.clear()
            real_close(other)

    LOOPS[loop](main())
