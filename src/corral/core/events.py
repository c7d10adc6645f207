"""A command's output log as a stream of events: replay from an offset, then live, heartbeats
while idle, and exactly one terminal event (`exit`, or `error` when the result is unknown).

Every view (ND-JSON, Server-Sent Events, the WebSockets) is built on `command_events`. Events are
plain dicts in the shape of the models in `corral.core.models` (OutputEvent, HeartbeatEvent,
ExitEvent, ErrorEvent): this path runs for every chunk of output, so it skips model objects.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from corral.core.commands import CommandService
from corral.core.models import CommandStatus
from corral.node.output_log import STDERR, STDOUT, STREAM_NAMES, Chunk, CorruptLog
from corral.store.tables import CommandRow

log = logging.getLogger(__name__)

Encoding = Literal["auto", "base64"]
StreamChoice = Literal["stdout", "stderr", "both"]
STREAM_SETS: dict[str, frozenset[int]] = {
    "stdout": frozenset({STDOUT}),
    "stderr": frozenset({STDERR}),
    "both": frozenset({STDOUT, STDERR}),
}


def output_event(chunk: Chunk, encoding: Encoding = "auto") -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": STREAM_NAMES[chunk.stream],
        "offset": chunk.offset,
        "next_offset": chunk.next_offset,
    }
    if encoding == "auto":
        try:
            event["data"] = chunk.data.decode("utf-8")
            return event
        except UnicodeDecodeError:
            pass  # binary output, or a character split between two pieces
    event["data_base64"] = base64.b64encode(chunk.data).decode("ascii")
    return event


def terminal_event(row: CommandRow, next_offset: int | None) -> dict[str, Any]:
    """`exit` for a known result; `error` (code `lost`) when it is unknown."""
    status = CommandStatus(row.status)
    if status is CommandStatus.lost or not status.finished:
        return {
            "type": "error",
            "code": "lost",
            "message": row.error or "the command's result is unknown",
            "command_id": row.id,
            "next_offset": next_offset,
        }
    return {
        "type": "exit",
        "command_id": row.id,
        "status": status.value,
        "exit_code": row.exit_code,
        "signal": row.signal,
        "duration_ms": row.duration_ms,
        "stdout_bytes": row.stdout_bytes,
        "stderr_bytes": row.stderr_bytes,
        "stdout_truncated": row.stdout_truncated,
        "stderr_truncated": row.stderr_truncated,
        "error": row.error,
        "next_offset": next_offset,
    }


async def command_events(
    commands: CommandService,
    row: CommandRow,
    offset: int,
    *,
    heartbeat: float | None,
    encoding: Encoding = "auto",
    streams: frozenset[int] = STREAM_SETS["both"],
) -> AsyncIterator[dict[str, Any]]:
    """The events of a command's log from `offset`: replay, live, then one terminal event.

    Heartbeats (`{"type": "heartbeat"}`) come whenever `heartbeat` seconds pass in silence.
    """
    sandbox_id, cid = row.sandbox_id, row.id
    position = offset
    try:
        async for chunk in commands.follow_output(sandbox_id, cid, offset, idle=heartbeat):
            if chunk is None:
                yield {"type": "heartbeat", "next_offset": position}
                continue
            position = chunk.next_offset
            if chunk.stream in streams:
                yield output_event(chunk, encoding)
    except CorruptLog as exc:
        yield {"type": "error", "code": "bad_offset", "message": str(exc), "command_id": cid}
        return
    final = await commands.final_row(sandbox_id, cid)
    yield terminal_event(final, position)
