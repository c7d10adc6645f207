"""Views of a command's output log: the raw view, offset checks, heartbeats while following,
and the event shapes built from it."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from corral.core.events import output_event
from corral.core.models import ClientFrame, Event, ExitEvent, OutputEvent
from corral.node.output_log import (
    MAX_FRAME,
    STDERR,
    STDOUT,
    Chunk,
    CorruptLog,
    OutputLog,
    check_offset,
    follow_idle,
    follow_raw,
    read_frames,
    read_raw,
)

from .helpers import run


def written(tmp_path: Path, parts: list[tuple[int, bytes]]) -> OutputLog:
    log = OutputLog(tmp_path / "cmd.log", cap=1 << 30)
    for stream, data in parts:
        log.append(stream, data)
    return log


def test_raw_view_joins_data_and_filters_streams(tmp_path: Path) -> None:
    parts = [(STDOUT, b"a" * 10), (STDERR, b"E"), (STDOUT, b"b" * 5), (STDERR, b"F")]
    log = written(tmp_path, parts)
    log.close()
    data, nxt = read_raw(log.path, 0)
    assert data == b"a" * 10 + b"E" + b"b" * 5 + b"F" and nxt == log.size
    out, nxt = read_raw(log.path, 0, streams=frozenset({STDOUT}))
    assert out == b"a" * 10 + b"b" * 5 and nxt == log.size  # past stderr frames too
    frames = read_frames(log.path, 0)
    assert read_raw(log.path, frames[2].offset)[0] == b"b" * 5 + b"F"


def test_many_small_frames_and_one_large_frame(tmp_path: Path) -> None:
    parts = [(STDOUT, bytes([i % 256])) for i in range(20_000)]
    parts.append((STDERR, b"x" * MAX_FRAME))
    log = written(tmp_path, parts)
    log.close()
    offset, out = 0, bytearray()
    while True:
        data, nxt = read_raw(log.path, offset, limit=4096)
        if nxt == offset:
            break
        out += data
        offset = nxt
    assert bytes(out) == b"".join(d for _, d in parts)
    chunks: list[Chunk] = []
    offset = 0
    while batch := read_frames(log.path, offset, limit=1000):
        chunks += batch
        offset = batch[-1].next_offset
    assert len(chunks) == 20_001 and chunks[-1].data == b"x" * MAX_FRAME


def test_check_offset(tmp_path: Path) -> None:
    log = written(tmp_path, [(STDOUT, b"hello"), (STDERR, b"x")])
    frames = read_frames(log.path, 0)
    for good in (0, frames[1].offset, log.size):
        check_offset(log.path, good)
    for bad in (1, 3, frames[1].offset + 1):
        with pytest.raises(CorruptLog):
            check_offset(log.path, bad)
    with pytest.raises(CorruptLog, match="past the end"):
        check_offset(log.path, log.size + 1)
    with pytest.raises(CorruptLog, match="no output frame"):
        read_frames(log.path, 2)
    check_offset(tmp_path / "missing.log", 0)


def test_follow_yields_none_while_idle_then_the_rest(tmp_path: Path) -> None:
    async def scenario() -> list[object]:
        log = written(tmp_path, [(STDOUT, b"first")])
        seen: list[object] = []

        async def writer() -> None:
            await asyncio.sleep(0.35)
            log.append(STDERR, b"second")
            log.close()

        task = asyncio.ensure_future(writer())
        async for item in follow_idle(log.path, 0, log, idle=0.1):
            seen.append(item if item is None else item.data)
        await task
        return seen

    seen = run(scenario())
    assert seen[0] == b"first" and seen[-1] == b"second"
    assert 2 <= seen.count(None) <= 4


def test_follow_raw_replays_then_follows(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        log = written(tmp_path, [(STDOUT, b"1"), (STDERR, b"2")])

        async def writer() -> None:
            for i in range(3, 6):
                await asyncio.sleep(0.02)
                log.append(STDOUT, str(i).encode())
            log.close()

        task = asyncio.ensure_future(writer())
        out = b"".join([d async for d, _ in follow_raw(log.path, 0, log, frozenset({STDOUT}))])
        await task
        return out

    assert run(scenario()) == b"1345"


def test_output_event_encoding() -> None:
    text = output_event(Chunk(0, 8, STDOUT, b"caf\xc3\xa9"))
    assert text == {"type": "stdout", "offset": 0, "next_offset": 8, "data": "café"}
    split = output_event(Chunk(8, 14, STDERR, b"\xc3"))  # half a character: base64
    assert split["data_base64"] == base64.b64encode(b"\xc3").decode()
    forced = output_event(Chunk(0, 7, STDOUT, b"hi"), "base64")
    assert "data" not in forced and forced["data_base64"] == "aGk="
    events = TypeAdapter(Event)
    for raw in (text, split, forced):
        event = events.validate_python(raw)
        assert isinstance(event, OutputEvent)
    assert events.validate_python(split).bytes == b"\xc3"
    exit_event = events.validate_python(
        {"type": "exit", "command_id": "cmd_x", "status": "completed", "exit_code": 0}
    )
    assert isinstance(exit_event, ExitEvent)


def test_client_frames() -> None:
    frames = TypeAdapter(ClientFrame)
    assert frames.validate_json('{"type": "signal", "signal": "INT"}').signal == "INT"
    assert frames.validate_json('{"type": "resize", "rows": 5, "cols": 6}').cols == 6
    with pytest.raises(ValueError):
        frames.validate_json('{"type": "resize", "rows": 0, "cols": 6}')
    with pytest.raises(ValueError):
        frames.validate_json('{"type": "launch"}')
