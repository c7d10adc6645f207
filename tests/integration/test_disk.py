"""disk_mb bounds everything a sandbox can write (/workspace, /tmp, /usr/local together)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import sandbox_mounts, wait_for

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


def test_a_disk_made_ahead_is_the_sandbox_own_empty_and_bounded(
    api: httpx.Client, server: Server
) -> None:
    """A start takes a disk the node made ahead of that size (disks.py): it is empty, owned by
    the sandbox's user, holds its limit, and stays the sandbox's across a stop and start."""
    spares = server.data_dir / "runtime" / "disk-images"
    first = api.post("/v1/sandboxes", json={"disk_mb": 24})  # asks for spares of 24 MiB
    assert first.status_code == 201, first.text
    made: list[str] = []
    try:
        made.append(first.json()["id"])
        run(api, made[0], "echo mine > /workspace/secret")

        def made_ahead() -> set[int]:  # spares of 24 MiB (the node keeps others too)
            found = [p.stat() for p in spares.glob("*.img")]
            return {st.st_ino for st in found if st.st_size == 24 * MiB}

        assert wait_for(lambda: bool(made_ahead()), 30.0)
        ahead = made_ahead()
        second = api.post("/v1/sandboxes", json={"disk_mb": 24})
        assert second.status_code == 201, second.text
        sid = second.json()["id"]
        made.append(sid)
        assert (server.data_dir / "sandboxes" / sid / "disk.img").stat().st_ino in ahead
        seen = run(api, sid, "ls -A /workspace; stat -c %u:%g /workspace; id -u")
        assert seen["stdout"].split() == ["1000:1000", "1000"], seen
        fill = run(api, sid, "head -c 40M /dev/zero > /workspace/x; sync; du -b /workspace/x")
        assert "No space left on device" in fill["stderr"]
        assert 18 * MiB <= int(fill["stdout"].split()[0]) <= 24 * MiB, fill
        api.post(f"/v1/sandboxes/{sid}/stop")
        assert api.post(f"/v1/sandboxes/{sid}/start").json()["state"] == "running"
        assert run(api, sid, "ls /workspace")["stdout"].split() == ["x"]
    finally:
        for sid in made:
            api.delete(f"/v1/sandboxes/{sid}")
    for sid in made:
        assert [m for m in sandbox_mounts() if sid in m] == []
