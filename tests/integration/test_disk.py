"""disk_mb bounds everything a sandbox can write (/workspace, /tmp, /usr/local together)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import sandbox_mounts

pytestmark = pytest.mark.sandbox
MiB = 1024 * 1024


def run(api: httpx.Client, sid: str, command: str) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, "timeout_ms": 30_000})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_disk_fills_at_its_limit_across_every_writable_place(
    api: httpx.Client, server: Server
) -> None:
    created = api.post("/v1/sandboxes", json={"disk_mb": 32})
    assert created.status_code == 201, created.text
    assert created.json()["limits_enforced"]["disk_mb"]
    sid = created.json()["id"]
    try:
        fill = run(
            api, sid,
            "head -c 12M /dev/zero > /tmp/a; head -c 12M /dev/zero > /workspace/b; "
            "head -c 12M /dev/zero > /workspace/c; sync; du -cb /tmp/a /workspace/b /workspace/c"
            " | tail -1",
        )  # fmt: skip
        assert "No space left on device" in fill["stderr"]
        written = int(fill["stdout"].split()[0])
        assert 28 * MiB <= written <= 32 * MiB, written
        # Freeing space makes room again.
        assert run(api, sid, "rm /tmp/a && head -c 8M /dev/zero > /tmp/d")["exit_code"] == 0
        # Files stay across a stop and start; /tmp starts empty, as a tmpfs would.
        api.post(f"/v1/sandboxes/{sid}/stop")
        assert api.post(f"/v1/sandboxes/{sid}/start").json()["state"] == "running"
        assert run(api, sid, "ls /workspace")["stdout"].split() == ["b", "c"]
        assert run(api, sid, "ls -A /tmp")["stdout"] == ""
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
    assert [m for m in sandbox_mounts() if sid in m] == []
    assert not (server.data_dir / "sandboxes" / sid).exists()
