"""Raw pipe descriptors handed to the event loop's pipe transports, closed exactly once.

uvloop's pipe transports close the descriptor themselves (libuv owns it) and then also close
the file object they were given; with a real file object that is a second close() of the same
number, which closes whatever descriptor the kernel handed out under that number in between
(another command's pipe, a sandbox's socket, the database). The asyncio transports close only
the file object. `PipeEnd` closes the descriptor only where the loop does not: which kind of
loop it is gets checked once, by watching a probe pipe.
"""

from __future__ import annotations

import asyncio
import os

_loop_closes: dict[type, bool] = {}


class PipeEnd:
    """A file-like holder of a pipe descriptor for `connect_read_pipe`/`connect_write_pipe`."""

    def __init__(self, fd: int, *, owner: bool) -> None:
        self._fd = fd
        self._owner = owner

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._owner and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


async def pipe_end(fd: int) -> PipeEnd:
    """Wrap `fd` for the running loop's pipe transports; the transport's close closes it."""
    loop = asyncio.get_running_loop()
    kind = type(loop)
    if kind not in _loop_closes:
        _loop_closes[kind] = await _closes_descriptor(loop)
    return PipeEnd(fd, owner=not _loop_closes[kind])


async def _closes_descriptor(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop's transport closes the descriptor itself, besides the file object."""
    r, w = os.pipe2(os.O_CLOEXEC)
    inode = os.fstat(r).st_ino
    probe = PipeEnd(r, owner=False)
    try:
        transport, _ = await loop.connect_read_pipe(asyncio.Protocol, probe)
        transport.close()
        for _ in range(5):  # the close completes on a later loop iteration
            await asyncio.sleep(0)
        try:
            closed = os.fstat(r).st_ino != inode  # a new inode: closed, and the number reused
        except OSError:
            closed = True
        if not closed:
            os.close(r)
        return closed
    finally:
        os.close(w)
