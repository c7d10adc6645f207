"""What a sandbox's supervisor may cost the node.

The supervisor runs inside the sandbox, so whatever it sends is hostile input (supervisor.py
lists the events). Its real events are a few hundred bytes, a couple per command, and each
answers a request of the node. The node reads them within a budget per sandbox: at most
FRAME_BURST messages (BYTE_BURST bytes) at once, refilled at FRAME_RATE messages (BYTE_RATE
bytes) a second. Past it, reading pauses until the budget allows the next message (the
supervisor blocks on its send); a supervisor still over budget after OVER_BUDGET_GRACE seconds,
or one that sends anything the protocol does not allow (a malformed or oversized message, an
event about a command it was not asked to run), has its sandbox stopped with the reason as the
sandbox's error. Warnings about one sandbox are rate-limited (WARNINGS_PER_WINDOW lines per
WARNING_WINDOW seconds, then a count of those held back).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

MAX_FRAME = 4096  # bytes in one message; the supervisor's are far smaller
FRAME_RATE = 2000.0  # messages a second, sustained
FRAME_BURST = 4000.0
BYTE_RATE = float(1 << 20)  # bytes a second, sustained
BYTE_BURST = float(2 << 20)
OVER_BUDGET_GRACE = 3.0  # seconds a supervisor may stay over its budget
FRAMES_PER_WAKE = 64  # messages read at one wake-up, so other sandboxes and requests get turns
PAUSE = 0.05  # shortest pause of an over-budget reader: a few wake-ups a second, not thousands
WARNINGS_PER_WINDOW = 5
WARNING_WINDOW = 60.0

Clock = Callable[[], float]


class ProtocolError(ValueError):
    """A message the supervisor protocol does not allow; its text says what it was."""


class FrameBudget:
    """Token buckets of messages and bytes, and how long the reader has been held back."""

    def __init__(
        self,
        *,
        rate: float = FRAME_RATE,
        burst: float = FRAME_BURST,
        byte_rate: float = BYTE_RATE,
        byte_burst: float = BYTE_BURST,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate, self.burst = rate, burst
        self.byte_rate, self.byte_burst = byte_rate, byte_burst
        self.clock = clock
        self.frames, self.bytes = burst, byte_burst
        self.updated = clock()
        self.over_since: float | None = None  # first refusal since the budget was last rested

    def _refill(self) -> float:
        now = self.clock()
        elapsed = max(0.0, now - self.updated)
        self.updated = now
        self.frames = min(self.burst, self.frames + elapsed * self.rate)
        self.bytes = min(self.byte_burst, self.bytes + elapsed * self.byte_rate)
        if self.over_since is not None and self.frames >= self.burst / 2 and self.bytes >= 0:
            self.over_since = None  # the sender slowed down: a burst, not a flood
        return now

    def wait(self) -> float:
        """Seconds until the next message may be read; 0 when it may be now."""
        now = self._refill()
        frames_short = max(0.0, 1.0 - self.frames) / self.rate
        bytes_short = max(0.0, -self.bytes) / self.byte_rate
        delay = max(frames_short, bytes_short)
        if delay and self.over_since is None:
            self.over_since = now
        return delay

    def spend(self, size: int) -> None:
        self.frames -= 1
        self.bytes -= size

    def over_for(self) -> float:
        """How long the sender has been over budget without a rest (0 if it is not)."""
        return 0.0 if self.over_since is None else self.clock() - self.over_since


class WarningLog:
    """Warnings about one sandbox: at most `per_window` lines per `window` seconds; the first
    line of the next window says how many were held back."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_window: int = WARNINGS_PER_WINDOW,
        window: float = WARNING_WINDOW,
        clock: Clock = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_window, self.window = per_window, window
        self.clock = clock
        self.started = clock()
        self.written = 0
        self.held_back = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self.started >= self.window:
            self.started, self.written = now, 0
        if self.written >= self.per_window:
            self.held_back += 1
            return
        self.written += 1
        if self.held_back:
            message += " (%d similar warnings held back)"
            args = (*args, self.held_back)
            self.held_back = 0
        self.logger.warning(message, *args)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_event(data: bytes) -> dict[str, Any]:
    """One supervisor event, checked against the protocol; raises ProtocolError."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"a message of more than {MAX_FRAME} bytes")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("a message that is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message that is not a JSON object")
    ev = message.get("ev")
    if ev == "ready":
        return {"ev": ev}
    if ev not in ("started", "spawn_failed", "exit"):
        raise ProtocolError(f"an unknown event {str(ev)[:40]!r}")
    cid = message.get("id")
    if not isinstance(cid, str) or not cid:
        raise ProtocolError(f"a {ev!r} event without a command id")
    if ev == "started":
        pid = message.get("pid")
        if not _is_int(pid) or not 0 < pid < 1 << 22:
            raise ProtocolError("a 'started' event without a valid pid")
        return {"ev": ev, "id": cid, "pid": pid}
    if ev == "spawn_failed":
        error = message.get("error", "could not start")
        if not isinstance(error, str):
            raise ProtocolError("a 'spawn_failed' event whose error is not text")
        return {"ev": ev, "id": cid, "error": error[:500]}
    code, sig = message.get("code"), message.get("signal")
    exited = _is_int(code) and 0 <= code <= 255 and sig is None
    killed = code is None and _is_int(sig) and 0 < sig < 128
    if not (exited or killed):
        raise ProtocolError("an 'exit' event with neither a valid exit code nor a signal")
    return {"ev": ev, "id": cid, "code": code, "signal": sig}
