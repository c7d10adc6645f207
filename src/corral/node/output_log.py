"""A command's durable output log: every chunk of stdout/stderr appended in order, with offsets.

File format: a sequence of frames, each `stream (1 byte) | length (4 bytes, big endian) | data`.
An offset is the byte position of a frame in the file, so a reader can resume exactly where it
stopped, whether the command still runs (live follow) or ended long ago (replay).

Followers of a running command are served from memory while they keep up (see `OutputLog`),
and from the file for anything older; both carry the same offsets. Appends reach the file in
batches, always before anyone reads the file through the log or is handed the bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Iterator
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
RING_BYTES = 8 << 20  # recent output held in memory per followed log
JOIN_BELOW = 64 << 10  # raw view: smaller frames are joined into one piece, larger sent as is
# Appends are written to the file in batches: at FLUSH_BYTES (or FLUSH_IOV pieces, below the
# kernel's IOV_MAX) pending, FLUSH_SECONDS after the first pending one, or before anyone reads
# the file or is handed the bytes. A write of a pipe read's 32 KiB costs twice its bytes' worth.
FLUSH_BYTES = 256 << 10
FLUSH_IOV = 512
_IOV_MAX = 1024  # Linux
FLUSH_SECONDS = 0.002
# Raw view of output that streams (pieces arriving within STREAMING_GAP of the last send): wait
# up to GATHER_SECONDS for GATHER_BYTES before sending: each send has a fixed cost (the ASGI
# chain, a syscall) that pipe-read-sized pieces would pay thousands of times a second. Output
# after a silence goes out at once.
GATHER_BYTES = 256 << 10
GATHER_SECONDS = 0.002
STREAMING_GAP = 0.01

# offset, next_offset, stream, data
Frame = tuple[int, int, int, "bytes | memoryview"]


class CorruptLog(ValueError):
    """The bytes at an offset are not a frame: a wrong offset, or a damaged log."""


@dataclass(frozen=True)
class Chunk:
    offset: int  # of this frame in the log
    next_offset: int
    stream: int
    data: bytes


class OutputLog:
    """Writer side, owned by the command's executor; followers subscribe for wake-ups.

    While anyone follows the log, its most recent frames are also held in memory (a ring of at
    most `RING_BYTES` of data, with their offsets), so that followers who keep up are served
    without reading back what was just written. Older offsets are read from the file.
    """

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap  # bytes kept per stream
        # The file is made at the first write: a command with no output costs no file (its
        # readers see an empty log either way).
        self._fd: int | None = None
        self.error: str | None = None  # set when the file could not be written
        self.size = 0
        self.kept = {STDOUT: 0, STDERR: 0}
        self.seen = {STDOUT: 0, STDERR: 0}
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []
        self._growth: list[tuple[int, asyncio.Future[None]]] = []  # (size awaited, future)
        # Small outputs are kept in memory too, so a sync reply needs no file read.
        self._memory: dict[int, bytearray] | None = {STDOUT: bytearray(), STDERR: bytearray()}
        # The ring: frames in order; entries before `_head` were dropped (None) and are
        # compacted away now and then, so that lookups can bisect a plain list.
        self._ring: list[Frame | None] = []
        self._head = 0
        self._ring_bytes = 0
        self._followers = 0
        self._pending: list[bytes | memoryview] = []  # headers and data not yet written
        self._pending_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None

    def truncated(self, stream: int) -> bool:
        return self.seen[stream] > self.kept[stream]

    def append(self, stream: int, data: bytes) -> None:
        self.seen[stream] += len(data)
        room = self.cap - self.kept[stream]
        if room <= 0:
            return  # over the cap: the reader keeps draining the pipe, the bytes are dropped
        if len(data) > room:
            data = data[:room]
        if not data:
            return
        self.kept[stream] += len(data)
        if len(data) <= MAX_FRAME:
            pieces: list[bytes | memoryview] = [data]
        else:
            view = memoryview(data)
            pieces = [view[i : i + MAX_FRAME] for i in range(0, len(data), MAX_FRAME)]
        pending = self._pending
        for piece in pieces:
            pending.append(_HEADER.pack(stream, len(piece)))
            pending.append(piece)
        offset = self.size
        added = len(data) + _HEADER.size * len(pieces)
        self.size += added
        self._pending_bytes += added
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_IOV:
            self.flush()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop to flush later (direct use, tests)
            else:
                self._flush_timer = loop.call_later(FLUSH_SECONDS, self.flush)
        if self._followers:
            self._remember(offset, stream, pieces)
        if self._memory is not None:
            self._memory[stream] += data
            if len(self._memory[STDOUT]) + len(self._memory[STDERR]) > 256 * 1024:
                self._memory = None
        self._wake()

    def _remember(self, offset: int, stream: int, pieces: list[bytes | memoryview]) -> None:
        ring = self._ring
        for piece in pieces:
            nxt = offset + _HEADER.size + len(piece)
            ring.append((offset, nxt, stream, piece))
            self._ring_bytes += len(piece)
            offset = nxt
        while self._ring_bytes > RING_BYTES:
            old = ring[self._head]
            assert old is not None
            ring[self._head] = None
            self._head += 1
            self._ring_bytes -= len(old[3])
        if self._head > 64 and self._head * 2 > len(ring):
            del ring[: self._head]
            self._head = 0

    def recent(self, offset: int, limit: int) -> list[Frame] | None:
        """The frames from `offset` on that memory holds, up to about `limit` bytes of data.

        [] at the end of the log; None when `offset` is older than the ring (or not a frame in
        it): read the file then.
        """
        if offset == self.size:
            return []
        ring, head = self._ring, self._head
        first = ring[head] if head < len(ring) else None
        if first is None or offset < first[0]:
            return None
        i = bisect.bisect_left(ring, offset, lo=head, key=_frame_offset)
        if i == len(ring) or ring[i][0] != offset:  # type: ignore[index]
            return None
        j, total = i, 0
        while j < len(ring) and total < limit:
            total += len(ring[j][3])  # type: ignore[index]
            j += 1
        return ring[i:j]  # type: ignore[return-value]

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Hold recent frames in memory for as long as this follower reads."""
        self._followers += 1
        try:
            yield
        finally:
            self._followers -= 1
            if not self._followers:
                self._ring.clear()
                self._head = self._ring_bytes = 0

    def flush(self) -> None:
        """Write the pending appends to the file."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        # Taken first, so that a failed write (disk full) cannot make pending output pile up.
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if self.error is not None:
            return
        written = self.size - sum(len(p) for p in pending)  # where the file ends
        try:
            if self._fd is None:
                self._fd = _create(self.path)
            _writev_all(self._fd, pending)
        except OSError as exc:
            self._failed(exc, written, pending)

    def _failed(self, exc: OSError, written: int, pending: list[bytes | memoryview]) -> None:
        """The file could not take more (disk full, ...): keep what it holds and nothing more,
        so that the offsets handed out and the file agree, and never raise to the writer."""
        self.error = f"the output log could not be written: {exc.strerror or exc}"
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, written)  # no partial frame at the end
        for i in range(0, len(pending), 2):
            stream, _length = _HEADER.unpack(bytes(pending[i]))
            self.kept[stream] -= len(pending[i + 1])
        self.size = written
        self.cap = 0  # later output is dropped, as over a cap (its `truncated` flag says so)
        self._memory = None  # the reply reads what the log holds
        self._ring = [f for f in self._ring if f is not None and f[0] < written]
        self._head = 0
        self._ring_bytes = sum(len(f[3]) for f in self._ring if f is not None)
        self._wake()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.flush()
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        if self._growth:
            waiting = []
            for size, fut in self._growth:
                if fut.done():
                    continue
                if self.closed or self.size >= size:
                    fut.set_result(None)
                else:
                    waiting.append((size, fut))
            self._growth = waiting

    async def grown(self, size: int, timeout: float) -> None:
        """Wait until the log holds `size` bytes, is closed, or `timeout` seconds pass."""
        if self.closed or self.size >= size:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._growth.append((size, fut))
        timer = loop.call_later(timeout, _settle, fut)
        try:
            await fut
        finally:
            timer.cancel()

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


_made_dirs: set[Path] = set()  # log directories known to exist: one mkdir per sandbox


def _create(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    if path.parent not in _made_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(_made_dirs) > 10_000:
            _made_dirs.clear()
        _made_dirs.add(path.parent)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:  # the directory went away since (its sandbox was deleted)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o600)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _frame_offset(frame: Frame | None) -> int:
    assert frame is not None
    return frame[0]


def _writev_all(fd: int, frames: list[bytes | memoryview]) -> int:
    if len(frames) > _IOV_MAX:  # one huge append: writev takes at most IOV_MAX pieces a call
        step = range(0, len(frames), _IOV_MAX)
        return sum(_writev_all(fd, frames[i : i + _IOV_MAX]) for i in step)
    total = sum(map(len, frames))
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
) -> tuple[list[Frame], int]:
    """Complete frames from `offset` on, up to about `limit` bytes of data.

    Returns (offset, next_offset, stream, data) for the frames of `streams` (all when None) and
    the offset after the last complete frame read. Frames are read in large blocks, not one
    syscall per frame, so that logs of many small writes replay fast.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], offset
    try:
        return _scan_fd(fd, offset, limit, streams)
    finally:
        os.close(fd)


def _scan_fd(
    fd: int, offset: int, limit: int, streams: frozenset[int] | None
) -> tuple[list[Frame], int]:
    found: list[Frame] = []
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
    return found, pos


class _LogFile:
    """A follower's read side of the log file: opened once, so that a log unlinked when its
    command ends stays readable to whoever already follows it; read in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._reading: asyncio.Future[tuple[list[Frame], int]] | None = None

    async def scan(
        self, offset: int, limit: int, streams: frozenset[int] | None
    ) -> tuple[list[Frame], int]:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return [], offset
        loop = asyncio.get_running_loop()
        self._reading = loop.run_in_executor(None, _scan_fd, self._fd, offset, limit, streams)
        # Shielded: a cancelled follower must not mark the read done while its thread runs.
        return await asyncio.shield(self._reading)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._reading is not None and not self._reading.done():
            # Never close the descriptor under a read still running in its thread.
            self._reading.add_done_callback(lambda _: os.close(fd))
        else:
            os.close(fd)


def _following(live: OutputLog | None) -> contextlib.AbstractContextManager[None]:
    return live.following() if live is not None else contextlib.nullcontext()


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


def _chunk(frame: Frame) -> Chunk:
    offset, nxt, stream, data = frame
    return Chunk(offset, nxt, stream, data if isinstance(data, bytes) else bytes(data))


async def follow_idle(
    path: Path,
    offset: int,
    live: OutputLog | None,
    idle: float | None = None,
    *,
    limit: int = READ_CHUNK,
) -> AsyncIterator[Chunk | None]:
    """`follow`, yielding None whenever `idle` seconds pass without output (for heartbeats)."""
    file = _LogFile(path)
    with _following(live), contextlib.closing(file):
        while True:
            if live is not None:
                frames = live.recent(offset, limit)
                if frames is not None:
                    if frames:
                        live.flush()  # what a client has seen is in the file for others
                        for frame in frames:
                            yield _chunk(frame)
                        offset = frames[-1][1]
                        continue
                    if live.closed:
                        return
                    waiter = live.changed()
                    while not await _wait(waiter, idle):
                        yield None
                    continue
            waiter = None
            if live is not None:
                live.flush()
                waiter = None if live.closed else live.changed()
            found, nxt = await file.scan(offset, limit, None)
            if nxt != offset:
                if waiter is not None:
                    waiter.cancel()
                for frame in found:
                    yield _chunk(frame)
                offset = nxt
                continue
            if waiter is None:
                return
            while not await _wait(waiter, idle):
                yield None


def _pieces(
    frames: list[Frame], streams: frozenset[int] | None
) -> Iterator[tuple[bytes | memoryview, int]]:
    """The raw data of `frames` of `streams`: large frames as they are (no copy), runs of small
    ones joined (fewer, larger sends). Each with the offset after its last frame."""
    run: list[bytes | memoryview] = []
    run_end = 0
    for _, nxt, stream, data in frames:
        if streams is not None and stream not in streams:
            continue
        if len(data) >= JOIN_BELOW:
            if run:
                yield (run[0] if len(run) == 1 else b"".join(run)), run_end
                run = []
            yield data, nxt
        else:
            run.append(data)
            run_end = nxt
    if run:
        yield (run[0] if len(run) == 1 else b"".join(run)), run_end


async def follow_raw(
    path: Path,
    offset: int,
    live: OutputLog | None,
    streams: frozenset[int] | None = None,
    *,
    limit: int = RAW_CHUNK,
) -> AsyncIterator[tuple[bytes | memoryview, int]]:
    """The raw view: (data, next_offset) pieces of the chosen streams, replayed then followed.

    Pieces may be memoryviews (of the log's own buffers, or of a block read from the file).
    """
    file = _LogFile(path)
    loop = asyncio.get_running_loop()
    sent_at = -STREAMING_GAP
    with _following(live), contextlib.closing(file):
        while True:
            if live is not None:
                frames = live.recent(offset, limit)
                if frames and live.size - offset < GATHER_BYTES and not live.closed:
                    if loop.time() - sent_at < STREAMING_GAP:
                        await live.grown(offset + GATHER_BYTES, GATHER_SECONDS)
                        frames = live.recent(offset, limit)
                if frames is not None:
                    if frames:
                        live.flush()  # what a client has seen is in the file for others
                        offset = frames[-1][1]
                        for piece in _pieces(frames, streams):
                            yield piece
                        sent_at = loop.time()
                        continue
                    if live.closed:
                        return
                    await live.changed()
                    continue
            waiter = None
            if live is not None:
                live.flush()
                waiter = None if live.closed else live.changed()
            found, nxt = await file.scan(offset, limit, streams)
            if nxt != offset:
                if waiter is not None:
                    waiter.cancel()
                offset = nxt
                for piece in _pieces(found, None):
                    yield piece
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
