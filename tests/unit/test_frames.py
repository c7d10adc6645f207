"""The node's budget for what a supervisor sends, its rate-limited warnings, and the event
checks (runtime/frames.py), on a clock the tests move."""

from __future__ import annotations

import json
import logging

import pytest

from corral.runtime.frames import FrameBudget, ProtocolError, WarningLog, parse_event


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_allows_a_burst_then_the_rate_and_counts_time_over_it() -> None:
    clock = Clock()
    budget = FrameBudget(rate=10, burst=20, byte_rate=1000, byte_burst=2000, clock=clock)
    for _ in range(20):
        assert budget.wait() == 0
        budget.spend(10)
    assert budget.wait() == pytest.approx(0.1)
    assert budget.over_for() == 0
    for _ in range(20):  # a flood: each message taken as soon as it is allowed
        clock.now += 0.1
        assert budget.wait() == 0
        budget.spend(10)
        assert budget.wait() > 0
    assert budget.over_for() == pytest.approx(2.0)
    clock.now += 5.0  # it stopped: the bucket rests, and the count starts over
    assert budget.wait() == 0 and budget.over_for() == 0


def test_the_budget_counts_bytes_too() -> None:
    clock = Clock()
    budget = FrameBudget(rate=1000, burst=1000, byte_rate=100, byte_burst=100, clock=clock)
    budget.spend(300)
    assert budget.wait() == pytest.approx(2.0)  # 200 bytes over, at 100 a second


def test_warnings_are_limited_per_window_and_report_what_they_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    warnings = WarningLog(logging.getLogger("test.frames"), per_window=3, window=60, clock=clock)
    with caplog.at_level(logging.WARNING, "test.frames"):
        for i in range(1000):
            warnings.warning("bad message %d", i)
        assert len(caplog.records) == 3
        clock.now += 61
        warnings.warning("bad message %d", 1000)
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == "bad message 1000 (997 similar warnings held back)"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[" * 5000,
        b"[1]",
        b'{"ev":"nope","id":"c"}',
        b'{"ev":"started","id":"c"}',
        b'{"ev":"started","id":"c","pid":true}',
        b'{"ev":"started","id":7,"pid":3}',
        b'{"ev":"exit","id":"c","code":7,"signal":9}',
        b'{"ev":"exit","id":"c","code":null,"signal":null}',
        b'{"ev":"exit","id":"c","code":1e400,"signal":null}',
        b'{"ev":"exit","id":"c","code":256,"signal":null}',
        b'{"ev":"spawn_failed","id":"c","error":{"x":1}}',
        json.dumps({"ev": "ready", "pad": "x" * 5000}).encode(),
    ],
)
def test_events_outside_the_protocol_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_event(data)


def test_the_supervisors_own_events_pass() -> None:
    assert parse_event(b'{"ev":"ready"}') == {"ev": "ready"}
    started = parse_event(b'{"ev":"started","id":"c","pid":12}')
    assert started == {"ev": "started", "id": "c", "pid": 12}
    exited = parse_event(b'{"ev":"exit","id":"c","code":null,"signal":9,"pid":12}')
    assert exited == {"ev": "exit", "id": "c", "code": None, "signal": 9}
    failed = parse_event(b'{"ev":"spawn_failed","id":"c","error":"No such file","errno":2}')
    assert failed == {"ev": "spawn_failed", "id": "c", "error": "No such file"}
