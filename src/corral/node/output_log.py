"""A command's durable output log: every chunk of stdout/stderr appended in order, with offsets.

File format: a sequence of frames, each `stream (1 byte) | length (4 bytes, big endian) | data`.
An offset is the byte position of a frame in the file, so a reader can resume exactly where it
stopped, whether the command still runs (live follow) or ended long ago (replay).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

STDOUT = 1
STDERR = 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
_HEADER = struct.Struct(">BI")
MAX_FRAME = 1 << 20
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    offset: int  # of this frame in the log
    next_offset: int
    stream: int
    data: bytes


class OutputLog:
    """Writer side, owned by the command's executor; followers subscribe for wake-ups."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap  # bytes kept per stream
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = 0
        self.kept = {STDOUT: 0, STDERR: 0}
        self.seen = {STDOUT: 0, STDERR: 0}
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []
        # Small outputs are kept in memory too, so a sync reply needs no file read.
        self._memory: dict[int, bytearray] | None = {STDOUT: bytearray(), STDERR: bytearray()}

    def truncated(self, stream: int) -> bool:
        return self.seen[stream] > self.kept[stream]

    def append(self, stream: int, data: bytes) -> None:
        self.seen[stream] += len(data)
        room = self.cap - self.kept[stream]
        if room <= 0:
            return  # over the cap: the reader keeps draining the pipe, the bytes are dropped
        if len(data) > room:
            data = data[:room]
        self.kept[stream] += len(data)
        view = memoryview(data)
        frames = []
        for start in range(0, len(data), MAX_FRAME):
            piece = view[start : start + MAX_FRAME]
            frames.append(_HEADER.pack(stream, len(piece)))
            frames.append(piece)
        self.size += _writev_all(self._fd, frames)
        if self._memory is not None:
            self._memory[stream] += data
            if len(self._memory[STDOUT]) + len(self._memory[STDERR]) > 256 * 1024:
                self._memory = None
        self._wake()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    def changed(self) -> asyncio.Future[None]:
        """A future set at the next append or at close; register it before reading."""
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def memory_output(self) -> tuple[bytes, bytes] | None:
        if self._memory is None:
            return None
        return bytes(self._memory[STDOUT]), bytes(self._memory[STDERR])


def _writev_all(fd: int, frames: list) -> int:
    total = sum(len(f) for f in frames)
    written = os.writev(fd, frames)
    if written < total:  # rare (disk nearly full, signals): finish with plain writes
        rest = memoryview(b"".join(bytes(f) for f in frames))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    return total


def read_frames(path: Path, offset: int, limit: int = READ_CHUNK) -> list[Chunk]:
    """Complete frames from offset on, up to about `limit` bytes of data (blocking read)."""
    chunks: list[Chunk] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return chunks
    try:
        total = 0
        pos = offset
        while total < limit:
            header = os.pread(fd, _HEADER.size, pos)
            if len(header) < _HEADER.size:
                break
            stream, length = _HEADER.unpack(header)
            data = os.pread(fd, length, pos + _HEADER.size)
            if len(data) < length:
                break  # a frame still being written
            nxt = pos + _HEADER.size + length
            chunks.append(Chunk(pos, nxt, stream, data))
            total += length
            pos = nxt
    finally:
        os.close(fd)
    return chunks


def read_output(path: Path) -> tuple[bytes, bytes]:
    """The whole kept stdout and stderr of a log."""
    out, err = bytearray(), bytearray()
    offset = 0
    while True:
        chunks = read_frames(path, offset)
        if not chunks:
            return bytes(out), bytes(err)
        for c in chunks:
            (out if c.stream == STDOUT else err).extend(c.data)
        offset = chunks[-1].next_offset


async def follow(path: Path, offset: int, live: OutputLog | None) -> AsyncIterator[Chunk]:
    """Replay from offset, then (when `live` is the log still being written) follow to the end."""
    while True:
        waiter = live.changed() if live is not None and not live.closed else None
        chunks = await asyncio.to_thread(read_frames, path, offset)
        for c in chunks:
            yield c
            offset = c.next_offset
        if chunks:
            if waiter is not None:
                waiter.cancel()
            continue
        if waiter is None:
            return
        await waiter
