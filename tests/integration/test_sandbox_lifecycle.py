"""Sandboxes: a sandbox that breaks itself is noticed and can be started again; ttl; delete."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import cgroup_dirs, server_processes

pytestmark = pytest.mark.sandbox


def wait_state(api: httpx.Client, sid: str, state: str, seconds: float = 5.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        sandbox = api.get(f"/v1/sandboxes/{sid}").json()
        if sandbox["state"] == state or time.monotonic() > deadline:
            return sandbox
        time.sleep(0.05)


def test_sandbox_that_kills_its_supervisor(api: httpx.Client, sandbox_id: str) -> None:
    base = f"/v1/sandboxes/{sandbox_id}"
    api.post(f"{base}/exec", json={"command": "echo survived > kept"})
    # Only its root can: the supervisor is uid 0 inside, out of reach of ordinary commands.
    resp = api.post(f"{base}/exec", json={"command": "kill -9 $PPID; sleep 5", "user": "root"})
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["status"] == "lost"
    assert "sandbox stopped" in result["error"] and "unknown" in result["error"]
    sandbox = wait_state(api, sandbox_id, "error")
    assert sandbox["state"] == "error" and "unexpectedly" in sandbox["error"]
    refused = api.post(f"{base}/exec", json={"command": "true"})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "sandbox_not_running"
    assert api.post(f"{base}/start").json()["state"] == "running"
    again = api.post(f"{base}/exec", json={"command": "cat kept"}).json()
    assert again["stdout"] == "survived\n"


def test_ttl_stops_the_sandbox(api: httpx.Client) -> None:
    created = api.post("/v1/sandboxes", json={"ttl_seconds": 1}).json()
    assert created["expires_at"] is not None
    sid = created["id"]
    try:
        api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo kept > f"})
        assert wait_state(api, sid, "stopped", 5.0)["state"] == "stopped"
        # Started again, it gets a new lifetime and its files.
        restarted = api.post(f"/v1/sandboxes/{sid}/start").json()
        assert restarted["state"] == "running" and restarted["expires_at"] > created["expires_at"]
        kept = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "cat f"}).json()
        assert kept["stdout"] == "kept\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def listed_ids(api: httpx.Client, **params: str) -> list[str]:
    """Every page of the list: the server is shared, and may hold more than one page."""
    ids: list[str] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/sandboxes", params=query).json()
        ids += [s["id"] for s in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return ids


def test_delete_kills_everything_and_keeps_history(api: httpx.Client, server: Server) -> None:
    sid = api.post("/v1/sandboxes", json={"name": "to-delete"}).json()["id"]
    job = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 600"}).json()
    time.sleep(0.2)
    deleted = api.delete(f"/v1/sandboxes/{sid}")
    assert deleted.status_code == 200 and deleted.json()["state"] == "deleted"
    command = api.get(f"/v1/sandboxes/{sid}/commands/{job['id']}").json()
    assert command["status"] == "cancelled"
    assert sid not in cgroup_dirs(server.cgroup_name)
    assert not (server.data_dir / "sandboxes" / sid).exists()
    assert api.get("/v1/sandboxes/to-delete").status_code == 404
    assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "deleted"
    assert sid not in listed_ids(api)
    assert sid in listed_ids(api, include_deleted="true")
    assert api.delete(f"/v1/sandboxes/{sid}").json()["state"] == "deleted"  # idempotent


def test_stopped_sandbox_has_no_processes(api: httpx.Client, server: Server) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        before = len(server_processes(server.uid_base))
        api.post(f"/v1/sandboxes/{sid}/stop")
        after = len(server_processes(server.uid_base))
        assert after <= before - 3  # bwrap (two) and the supervisor are gone
        assert sid not in cgroup_dirs(server.cgroup_name)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
