"""Pause freezes a sandbox completely: counters (a running command and a daemon a finished command
left behind) stop advancing, exec is refused with 409, and resume lets them continue."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.security.helpers import disk_dir, exec_, start, wait_until

pytestmark = pytest.mark.sandbox

COUNTER = """
import os, sys, time
path = sys.argv[1]
i = 0
while True:
    i += 1
    with open(path + ".new", "w") as f:
        f.write(str(i))
    os.replace(path + ".new", path)
    time.sleep(0.01)
"""


def read_counter(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def test_pause_stops_all_progress(api: httpx.Client, server: Server, sandbox_id: str) -> None:
    sid = sandbox_id
    # Read from the host: the sandbox's /workspace is an overlay (its writable layer on its own
    # ext4 image), mounted on the host under its directory. Exec is refused while it is paused.
    workspace = disk_dir(server.data_dir, sid).parent / "ws"
    assert workspace.is_dir(), f"no workspace at {workspace} on the host"
    command_counter, daemon_counter = workspace / "command", workspace / "daemon"
    cid = start(api, sid, "python3", args=["-c", COUNTER, "/workspace/command"], timeout_ms=60_000)
    daemon = exec_(
        api, sid, "setsid python3 -c \"$C\" /workspace/daemon </dev/null >/dev/null 2>&1 &",
        env={"C": COUNTER},
    )  # fmt: skip
    assert daemon["exit_code"] == 0, daemon
    counters = (command_counter, daemon_counter)
    # Generous bounds: the counters tick every 10 ms, but the host may be busy with other runs.
    assert wait_until(lambda: all(read_counter(c) > 5 for c in counters), 30.0), [
        read_counter(c) for c in counters
    ]

    paused = api.post(f"/v1/sandboxes/{sid}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused"
    frozen = [read_counter(c) for c in counters]
    time.sleep(1.0)
    assert [read_counter(c) for c in counters] == frozen, "a counter advanced while paused"

    refused = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
    assert refused.status_code == 409, refused.text
    refused_async = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "true"})
    assert refused_async.status_code == 409, refused_async.text
    assert api.get(f"/v1/sandboxes/{sid}/commands/{cid}").json()["status"] == "running"
    assert [read_counter(c) for c in counters] == frozen

    resumed = api.post(f"/v1/sandboxes/{sid}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] == "running"
    assert wait_until(
        lambda: all(read_counter(c) > f + 5 for c, f in zip(counters, frozen, strict=True)), 30.0
    ), ("the counters did not continue after resume", frozen, [read_counter(c) for c in counters])
    assert exec_(api, sid, "true")["exit_code"] == 0
    cancelled = api.post(f"/v1/sandboxes/{sid}/commands/{cid}/cancel")
    assert cancelled.status_code == 200, cancelled.text
