"""The per-command output log: frames, offsets, the per-stream cap, replay and live follow
(from memory while followers keep up, from the file behind them), batched writes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import stat
import struct
from pathlib import Path

import pytest

from corral.node import output_log
from corral.node.output_log import (
    MAX_FRAME,
    STDERR,
    STDOUT,
    Chunk,
    OutputLog,
    follow,
    follow_idle,
    follow_raw,
    read_frames,
    read_output,
)

from .helpers import eventually, run

HEADER = 5  # stream byte + 4-byte length


def all_frames(path: Path, offset: int = 0) -> list[Chunk]:
    """Every complete frame from offset on, across read_frames' per-call limit."""
    out: list[Chunk] = []
    while chunks := read_frames(path, offset):
        out.extend(chunks)
        offset = chunks[-1].next_offset
    return out


async def collect(path: Path, offset: int, live: OutputLog | None) -> list[Chunk]:
    return [c async for c in follow(path, offset, live)]


def joined(chunks: list[Chunk], stream: int) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


# --- frames and offsets ------------------------------------------------------------------------


def test_frames_keep_order_and_offsets(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "logs" / "cmd.log", cap=1000)
    writes = [(STDOUT, b"a"), (STDERR, b"bb"), (STDOUT, b"ccc"), (STDERR, b"dddd")]
    for stream, data in writes:
        log.append(stream, data)
    log.close()

    chunks = read_frames(log.path, 0)
    assert [(c.stream, c.data) for c in chunks] == writes
    assert [c.offset for c in chunks] == [0, 6, 13, 21]
    # Each frame ends where the next begins, and the last where the file ends.
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.next_offset == nxt.offset
    assert chunks[-1].next_offset == log.size == log.path.stat().st_size == 30


def test_read_from_a_middle_offset_gives_exactly_the_rest(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=1000)
    for i in range(6):
        log.append(STDOUT if i % 2 == 0 else STDERR, f"part{i}".encode())
    log.close()
    chunks = read_frames(log.path, 0)

    rest = read_frames(log.path, chunks[3].offset)
    assert rest == chunks[3:]
    assert read_frames(log.path, chunks[-1].next_offset) == []


def test_read_frames_stops_at_the_limit(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=1000)
    for data in (b"one", b"two", b"three"):
        log.append(STDOUT, data)
    log.close()

    first = read_frames(log.path, 0, limit=1)
    assert [c.data for c in first] == [b"one"]
    assert [c.data for c in read_frames(log.path, first[-1].next_offset, limit=4)] == [
        b"two",
        b"three",
    ]


def test_read_frames_skips_a_frame_still_being_written(tmp_path: Path) -> None:
    path = tmp_path / "cmd.log"
    log = OutputLog(path, cap=1000)
    log.append(STDOUT, b"whole")
    log.close()
    # A header announcing 10 bytes of which only 3 have reached the file yet.
    with path.open("ab") as f:
        f.write(struct.pack(">BI", STDERR, 10) + b"par")

    chunks = read_frames(path, 0)
    assert [c.data for c in chunks] == [b"whole"]
    assert read_output(path) == (b"whole", b"")


def test_missing_log_reads_as_empty(tmp_path: Path) -> None:
    assert read_frames(tmp_path / "never.log", 0) == []
    assert read_output(tmp_path / "never.log") == (b"", b"")


def test_log_file_is_private(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "sb" / "cmd.log", cap=10)
    log.append(STDOUT, b"secret")
    log.close()
    assert stat.S_IMODE(log.path.stat().st_mode) & 0o077 == 0


def test_no_output_makes_no_file_and_reads_as_empty(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "sb" / "cmd.log", cap=10)
    log.close()
    assert not log.path.exists()
    assert read_output(log.path) == (b"", b"")
    # The directory can vanish between commands (its sandbox deleted): the next log remakes it.
    first = OutputLog(tmp_path / "sb2" / "a.log", cap=10)
    first.append(STDOUT, b"1")
    first.close()
    first.path.unlink()
    first.path.parent.rmdir()
    second = OutputLog(tmp_path / "sb2" / "b.log", cap=10)
    second.append(STDOUT, b"2")
    second.close()
    assert read_output(second.path) == (b"2", b"")


def test_close_is_idempotent_and_wakes_waiters(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=10)
        waiter = log.changed()
        assert not waiter.done()
        log.close()
        log.close()
        assert waiter.done()
        assert log.changed().done()  # a closed log never makes anyone wait

    run(main())


def test_append_wakes_a_registered_waiter(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=10)
        waiter = log.changed()
        log.append(STDOUT, b"x")
        assert waiter.done()
        log.close()

    run(main())


# --- the cap -----------------------------------------------------------------------------------


def test_cap_applies_per_stream_and_drops_the_excess(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=10)
    log.append(STDOUT, b"012345")
    log.append(STDOUT, b"6789AB")  # 2 bytes over the cap
    assert log.kept[STDOUT] == 10
    assert log.seen[STDOUT] == 12
    assert log.truncated(STDOUT)

    # Stdout being full leaves the whole cap to stderr.
    log.append(STDERR, b"abcdefgh")
    assert log.kept[STDERR] == 8
    assert not log.truncated(STDERR)
    log.append(STDERR, b"ijklm")
    assert (log.kept[STDERR], log.seen[STDERR]) == (10, 13)
    assert log.truncated(STDERR)

    size = log.size
    log.append(STDOUT, b"z" * 100)  # past the cap: counted, not stored
    assert log.size == size == log.path.stat().st_size
    assert log.seen[STDOUT] == 112
    log.close()

    assert read_output(log.path) == (b"0123456789", b"abcdefghij")


def test_output_exactly_at_the_cap_is_not_truncated(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=4)
    log.append(STDOUT, b"abcd")
    assert not log.truncated(STDOUT)
    log.append(STDOUT, b"e")
    assert log.truncated(STDOUT)
    log.close()
    assert read_output(log.path) == (b"abcd", b"")


def test_zero_cap_stores_nothing(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=0)
    log.append(STDOUT, b"hello")
    log.append(STDERR, b"oops")
    log.close()
    assert not log.path.exists()  # nothing kept: no file at all
    assert log.truncated(STDOUT) and log.truncated(STDERR)
    assert log.seen == {STDOUT: 5, STDERR: 4}
    assert read_output(log.path) == (b"", b"")


# --- large frames ------------------------------------------------------------------------------


def test_data_larger_than_a_frame_is_split_and_reassembles(tmp_path: Path) -> None:
    data = os.urandom(2 * MAX_FRAME + MAX_FRAME // 2)
    log = OutputLog(tmp_path / "cmd.log", cap=len(data) + 1)
    log.append(STDERR, b"before")
    log.append(STDOUT, data)
    log.close()

    frames = all_frames(log.path)
    assert [len(c.data) for c in frames] == [6, MAX_FRAME, MAX_FRAME, MAX_FRAME // 2]
    assert all(len(c.data) <= MAX_FRAME for c in frames)
    assert log.size == sum(HEADER + len(c.data) for c in frames)
    assert read_output(log.path) == (data, b"before")

    async def replay() -> list[Chunk]:
        return await collect(log.path, 0, None)

    assert joined(run(replay()), STDOUT) == data


# --- memory copy -------------------------------------------------------------------------------


def test_memory_output_for_small_output(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=5)
    log.append(STDOUT, b"hi ")
    log.append(STDERR, b"err")
    log.append(STDOUT, b"there")  # the memory copy honours the cap as the file does
    assert log.memory_output() == (b"hi th", b"err")
    log.close()
    assert log.memory_output() == read_output(log.path)


def test_memory_output_dropped_past_256_kib(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "cmd.log", cap=1 << 20)
    log.append(STDOUT, b"o" * (128 * 1024))
    log.append(STDERR, b"e" * (128 * 1024))
    assert log.memory_output() == (b"o" * (128 * 1024), b"e" * (128 * 1024))  # 256 KiB: kept
    log.append(STDOUT, b"!")
    assert log.memory_output() is None
    log.append(STDERR, b"more")
    assert log.memory_output() is None  # not rebuilt later
    log.close()
    out, err = read_output(log.path)
    assert (len(out), len(err)) == (128 * 1024 + 1, 128 * 1024 + 4)


# --- follow ------------------------------------------------------------------------------------


def test_follow_replays_then_follows_live_appends(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1000)
        log.append(STDOUT, b"early ")
        received: list[Chunk] = []

        async def consume() -> None:
            async for chunk in follow(log.path, 0, log):
                received.append(chunk)

        consumer = asyncio.create_task(consume())
        await eventually(lambda: len(received) == 1)
        await asyncio.sleep(0.05)
        assert not consumer.done()  # an open log keeps the follower waiting

        log.append(STDERR, b"warn ")
        await eventually(lambda: len(received) == 2)
        log.append(STDOUT, b"late")
        await eventually(lambda: len(received) == 3)
        assert not consumer.done()

        log.close()
        await asyncio.wait_for(consumer, 2)
        assert [(c.stream, c.data) for c in received] == [
            (STDOUT, b"early "),
            (STDERR, b"warn "),
            (STDOUT, b"late"),
        ]
        assert received == read_frames(log.path, 0)

    run(main())


def test_follow_resumes_from_next_offset_with_exactly_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=10_000)
        for i in range(3):
            log.append(STDOUT, f"first{i};".encode())

        # A reader that goes away after two chunks, as a dropped connection would.
        seen: list[Chunk] = []
        async with contextlib.aclosing(follow(log.path, 0, log)) as gen:
            async for chunk in gen:
                seen.append(chunk)
                if len(seen) == 2:
                    break
        resume_at = seen[-1].next_offset

        async def produce() -> None:
            for i in range(3):
                await asyncio.sleep(0.01)
                log.append(STDERR if i == 1 else STDOUT, f"then{i};".encode())
            log.close()

        producer = asyncio.create_task(produce())
        rest = await collect(log.path, resume_at, log)
        await producer

        everything = read_frames(log.path, 0)
        assert seen + rest == everything
        assert joined(seen + rest, STDOUT) == b"first0;first1;first2;then0;then2;"
        assert joined(rest, STDERR) == b"then1;"

    run(main())


def test_follow_on_a_closed_log_ends(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=100)
        log.append(STDOUT, b"done")
        log.close()
        chunks = await collect(log.path, 0, log)
        assert [c.data for c in chunks] == [b"done"]
        assert await collect(log.path, log.size, log) == []
        assert await collect(log.path, 0, None) == chunks  # replay of a finished command

    run(main())


def test_follow_of_an_empty_log_ends_at_close(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=100)
        follower = asyncio.create_task(collect(log.path, 0, log))
        await asyncio.sleep(0.05)
        assert not follower.done()
        log.close()
        assert await asyncio.wait_for(follower, 2) == []

    run(main())


# --- followers served from memory, the file behind them ----------------------------------------


def pieces_of(n: int, size: int, seed: int = 0) -> list[bytes]:
    return [bytes([(seed + i) % 251]) * size for i in range(n)]


async def raw_of(
    path: Path, offset: int, live: OutputLog | None, streams: frozenset[int] | None = None
) -> tuple[bytes, list[int]]:
    """All the raw view's bytes from offset, and the next_offset of each piece."""
    data, offsets = bytearray(), []
    async for piece, nxt in follow_raw(path, offset, live, streams):
        data += piece
        offsets.append(nxt)
    return bytes(data), offsets


def test_a_follower_that_keeps_up_never_reads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans: list[int] = []
    real_scan = output_log._scan_fd

    def counted(*args: object) -> object:
        scans.append(1)
        return real_scan(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(output_log, "_scan_fd", counted)

    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        follower = asyncio.create_task(raw_of(log.path, 0, log))
        await asyncio.sleep(0)  # following before the first byte
        chunks = pieces_of(50, 10_000)
        for i, chunk in enumerate(chunks):
            log.append(STDERR if i % 7 == 3 else STDOUT, chunk)
            await asyncio.sleep(0)
        log.close()
        data, offsets = await asyncio.wait_for(follower, 5)
        assert data == b"".join(chunks)
        assert offsets[-1] == log.size
        assert scans == []
        assert log._ring == [] and log._ring_bytes == 0  # let go with the last follower

    run(main())


def test_replay_from_an_old_offset_while_live_crosses_into_memory_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_log, "RING_BYTES", 64 * 1024)

    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        chunks = pieces_of(60, 5_000)
        writes = [(STDERR if i % 5 == 4 else STDOUT, c) for i, c in enumerate(chunks)]
        # A first follower keeps the ring filled; its older part has already gone to the file.
        first = asyncio.create_task(collect(log.path, 0, log))
        for stream, data in writes[:40]:
            log.append(stream, data)
            await asyncio.sleep(0)
        assert log._ring_bytes <= 64 * 1024
        ring_start = log._ring[log._head][0]  # type: ignore[index]
        assert ring_start > 0

        # Replays from offsets before, at and inside what memory holds, while output goes on.
        log.flush()
        frames = read_frames(log.path, 0, limit=1 << 30)
        starts = [0, frames[3].offset, ring_start, frames[-2].offset]
        replays = [asyncio.create_task(collect(log.path, s, log)) for s in starts]
        raws = [asyncio.create_task(raw_of(log.path, s, log, frozenset({STDOUT}))) for s in starts]
        for stream, data in writes[40:]:
            log.append(stream, data)
            await asyncio.sleep(0)
        log.close()

        everything = all_frames(log.path)
        assert [(c.stream, c.data) for c in everything] == writes
        assert await asyncio.wait_for(first, 5) == everything
        for start, task, raw in zip(starts, replays, raws, strict=True):
            rest = [c for c in everything if c.offset >= start]
            assert await asyncio.wait_for(task, 5) == rest
            data, offsets = await asyncio.wait_for(raw, 5)
            assert data == joined(rest, STDOUT)
            assert offsets == sorted(offsets) and offsets[-1] <= log.size

    run(main())


def test_a_follower_starting_mid_stream_gets_exactly_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        early = asyncio.create_task(collect(log.path, 0, log))  # the ring is on from here
        for data in pieces_of(10, 3_000):
            log.append(STDOUT, data)
            await asyncio.sleep(0)
        middle = log.size
        late = asyncio.create_task(collect(log.path, middle, log))
        late_raw = asyncio.create_task(raw_of(log.path, middle, log))
        await asyncio.sleep(0.01)
        for data in pieces_of(10, 3_000, seed=100):
            log.append(STDERR, data)
            await asyncio.sleep(0)
        log.close()
        everything = await asyncio.wait_for(early, 5)
        rest = [c for c in everything if c.offset >= middle]
        assert await asyncio.wait_for(late, 5) == rest
        assert (await asyncio.wait_for(late_raw, 5))[0] == joined(rest, STDERR)
        assert everything == all_frames(log.path)

    run(main())


def test_a_slow_follower_bounds_memory_and_reads_the_rest_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_log, "RING_BYTES", 32 * 1024)
    scans: list[int] = []
    real_scan = output_log._scan_fd

    def counted(*args: object) -> object:
        scans.append(1)
        return real_scan(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(output_log, "_scan_fd", counted)

    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        received = bytearray()
        held: list[int] = []

        async def slow() -> None:
            async for piece, _ in follow_raw(log.path, 0, log, limit=8 * 1024):
                received.extend(piece)
                held.append(log._ring_bytes)
                await asyncio.sleep(0.002)

        follower = asyncio.create_task(slow())
        chunks = pieces_of(200, 4_000)
        for data in chunks:
            log.append(STDOUT, data)
            assert log._ring_bytes <= 32 * 1024
            await asyncio.sleep(0)
        log.close()
        await asyncio.wait_for(follower, 10)
        assert bytes(received) == b"".join(chunks)
        assert scans  # it fell behind what memory holds, and caught up from the file
        assert max(held) <= 32 * 1024

    run(main())


def test_a_follower_keeps_reading_a_log_removed_under_it(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        for data in pieces_of(20, 50_000):
            log.append(STDOUT, data)
        log.close()
        got = bytearray()
        async for piece, _ in follow_raw(log.path, 0, log, limit=100_000):
            got += piece
            log.path.unlink(missing_ok=True)  # a log not kept, removed when the command ended
        assert bytes(got) == b"".join(pieces_of(20, 50_000))

    run(main())


def test_streaming_output_goes_out_in_fewer_larger_pieces_but_a_lone_write_at_once(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        pieces: list[int] = []
        arrived = asyncio.Event()

        async def follower() -> None:
            async for piece, _ in follow_raw(log.path, 0, log):
                pieces.append(len(piece))
                arrived.set()

        task = asyncio.create_task(follower())
        await asyncio.sleep(0.05)
        log.append(STDOUT, b"prompt> ")  # after silence: no waiting for more
        await asyncio.wait_for(arrived.wait(), 0.5)
        assert pieces == [8]
        await asyncio.sleep(0.05)
        for _ in range(400):  # a burst of pipe-read-sized pieces
            log.append(STDOUT, b"x" * 4096)
            await asyncio.sleep(0)
        log.close()
        await asyncio.wait_for(task, 5)
        assert sum(pieces) == 8 + 400 * 4096
        assert len(pieces) < 100

    run(main())


def test_appends_are_written_in_batches_and_flushed_before_any_read(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        log.append(STDOUT, b"a" * 100)
        log.append(STDERR, b"b" * 100)
        assert log.size == 2 * (HEADER + 100)
        assert not log.path.exists()  # pending, for a moment (the file comes with its first write)
        assert await collect(log.path, 0, None) == []  # the file alone: not there yet
        # Whoever reads through the log flushes it first.
        follower = follow_idle(log.path, 0, log)
        first = await anext(follower)
        assert first is not None and first.data == b"a" * 100
        assert log.path.stat().st_size == log.size
        await follower.aclose()
        # Without readers, a timer writes it out soon.
        log.append(STDOUT, b"c")
        await asyncio.sleep(output_log.FLUSH_SECONDS * 10)
        assert log.path.stat().st_size == log.size
        # Large amounts go out at once, and close writes the rest.
        log.append(STDOUT, b"d" * output_log.FLUSH_BYTES)
        assert log.path.stat().st_size == log.size
        log.append(STDERR, b"e")
        log.close()
        assert log.path.stat().st_size == log.size
        assert read_output(log.path) == (
            b"a" * 100 + b"c" + b"d" * output_log.FLUSH_BYTES,
            b"b" * 100 + b"e",
        )

    run(main())


def test_many_tiny_appends_stay_under_the_iovec_limit(tmp_path: Path) -> None:
    async def main() -> None:
        log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
        for i in range(5000):
            log.append(STDOUT if i % 2 else STDERR, b"z")
        log.close()
        assert read_output(log.path) == (b"z" * 2500, b"z" * 2500)
        assert log.path.stat().st_size == log.size == 5000 * (HEADER + 1)

    run(main())


def test_an_append_of_more_frames_than_one_writev_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_log, "_IOV_MAX", 3)
    data = os.urandom(3 * MAX_FRAME + 10)  # 4 frames: 8 pieces, written 3 at a time
    log = OutputLog(tmp_path / "cmd.log", cap=len(data))
    log.append(STDOUT, data)
    log.close()
    assert log.path.stat().st_size == log.size == len(data) + 4 * HEADER
    assert read_output(log.path) == (data, b"")


def test_a_failed_write_keeps_the_log_consistent_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "sb"
    blocker.write_text("a file where the log directory belongs")
    log = OutputLog(blocker / "cmd.log", cap=1 << 20)
    log.append(STDOUT, b"x" * 1000)
    log.flush()  # fails inside: reported on the log, not raised
    assert log.error is not None and "could not be written" in log.error
    assert log.size == 0 and log.kept == {STDOUT: 0, STDERR: 0}
    log.append(STDERR, b"later")  # dropped, as over a cap
    assert log.truncated(STDOUT) and log.truncated(STDERR)
    assert log.memory_output() is None
    log.close()
    log.close()
