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
RAW_CHUNK = 4 << 20  # bytes per read of the raw view
MIN_BLOCK = 64 << 10
MAX_BLOCK = 4 << 20


class CorruptLog(ValueError):
    """The bytes at an offset are not a frame: a wrong offset, or a damaged log."""


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


def _check_header(stream: int, length: int, pos: int) -> None:
    if stream not in STREAM_NAMES or length > MAX_FRAME:
        raise CorruptLog(f"no output frame starts at offset {pos}")


def _scan(
    path: Path, offset: int, limit: int, streams: frozenset[int] | None
) -> tuple[list[tuple[int, int, int, bytes | memoryview]], int]:
    """Complete frames from `offset` on, up to about `limit` bytes of data.

    Returns (offset, next_offset, stream, data) for the frames of `streams` (all when None) and
    the offset after the last complete frame read. Frames are read in large blocks, not one
    syscall per frame, so that logs of many small writes replay fast.
    """
    found: list[tuple[int, int, int, bytes | memoryview]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return found, offset
    try:
        total = 0
        pos = offset
        while total < limit:
            size = min(max(limit - total, MIN_BLOCK), MAX_BLOCK) + _HEADER.size
            block = os.pread(fd, size, pos)
            if len(block) < _HEADER.size:
                break
            view = memoryview(block)
            i = 0
            while i + _HEADER.size <= len(block) and total < limit:
                stream, length = _HEADER.unpack_from(block, i)
                _check_header(stream, length, pos + i)
                end = i + _HEADER.size + length
                if end > len(block):
                    break
                if streams is None or stream in streams:
                    found.append((pos + i, pos + end, stream, view[i + _HEADER.size : end]))
                    total += length
                i = end
            if i == 0:
                # The first frame is larger than the block: read it on its own.
                stream, length = _HEADER.unpack_from(block, 0)
                data = os.pread(fd, length, pos + _HEADER.size)
                if len(data) < length:
                    break  # a frame still being written
                nxt = pos + _HEADER.size + length
                if streams is None or stream in streams:
                    found.append((pos, nxt, stream, data))
                    total += length
                pos = nxt
                continue
            pos += i
            if i < len(block) and len(block) < size:
                break  # the file ends with a frame still being written
    finally:
        os.close(fd)
    return found, pos


def check_offset(path: Path, offset: int) -> None:
    """Raise CorruptLog unless a frame starts at `offset` (or it is the end of the log).

    Offsets come from the server, but clients may send anything: a cheap check of the header
    found there, so that a wrong offset is an error rather than garbage.
    """
    if offset == 0:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptLog(f"offset {offset} is past the end of the log") from None
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            raise CorruptLog(f"offset {offset} is past the end of the log ({size} bytes)")
        header = os.pread(fd, _HEADER.size, offset)
    finally:
        os.close(fd)
    if len(header) == _HEADER.size:
        _check_header(*_HEADER.unpack(header), offset)


def read_frames(path: Path, offset: int, limit: int = READ_CHUNK) -> list[Chunk]:
    """Complete frames from offset on, up to about `limit` bytes of data (blocking read)."""
    found, _ = _scan(path, offset, limit, None)
    return [Chunk(o, n, s, bytes(d)) for o, n, s, d in found]


def read_raw(
    path: Path, offset: int, limit: int = RAW_CHUNK, streams: frozenset[int] | None = None
) -> tuple[bytes, int]:
    """The data of the frames of `streams` from `offset` on, joined, and the offset after them.

    The raw view of a log: one copy from the file into the returned bytes, no per-frame objects.
    The returned offset moves past frames of other streams too.
    """
    found, nxt = _scan(path, offset, limit, streams)
    return b"".join(d for _, _, _, d in found), nxt


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
    async for chunk in follow_idle(path, offset, live):
        if chunk is not None:
            yield chunk


async def follow_idle(
    path: Path,
    offset: int,
    live: OutputLog | None,
    idle: float | None = None,
    *,
    limit: int = READ_CHUNK,
) -> AsyncIterator[Chunk | None]:
    """`follow`, yielding None whenever `idle` seconds pass without output (for heartbeats)."""
    while True:
        waiter = live.changed() if live is not None and not live.closed else None
        chunks = await asyncio.to_thread(read_frames, path, offset, limit)
        for c in chunks:
            yield c
            offset = c.next_offset
        if chunks:
            if waiter is not None:
                waiter.cancel()
            continue
        if waiter is None:
            return
        while not await _wait(waiter, idle):
            yield None


async def follow_raw(
    path: Path,
    offset: int,
    live: OutputLog | None,
    streams: frozenset[int] | None = None,
    *,
    limit: int = RAW_CHUNK,
) -> AsyncIterator[tuple[bytes, int]]:
    """The raw view: (data, next_offset) blocks of the chosen streams, replayed then followed."""
    while True:
        waiter = live.changed() if live is not None and not live.closed else None
        data, nxt = await asyncio.to_thread(read_raw, path, offset, limit, streams)
        if nxt != offset:
            offset = nxt
            if data:
                yield data, nxt
            if waiter is not None:
                waiter.cancel()
            continue
        if waiter is None:
            return
        await waiter


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> bool:
    """Whether `waiter` is done within `timeout`; it stays pending (and registered) if not."""
    if timeout is None:
        await waiter
        return True
    done, _ = await asyncio.wait({waiter}, timeout=timeout)
    return bool(done)
