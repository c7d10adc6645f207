"""The warm pool: a create with the default spec claims a started sandbox; everything the request
asks for (name, env, labels, ttl) still applies, nothing of a pooled sandbox outlives the server,
and requests the pool cannot serve start a sandbox of their own."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, make_data_dir
from tests.integration.helpers import cgroup_dirs, sandbox_mounts, server_processes
from tests.integration.helpers import wait_for as poll

pytestmark = pytest.mark.sandbox


def wait_for(predicate) -> bool:
    """Longer than the default: the pool fills in the background, a sandbox at a time."""
    return poll(predicate, 20.0)


def warm(api: httpx.Client) -> int:
    return int(api.get("/healthz").json()["warm_sandboxes"])


def sandbox_dirs(srv: Server) -> set[str]:
    root = Path(srv.data_dir) / "sandboxes"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.fixture(scope="module")
def pooled() -> Server:
    srv = Server(make_data_dir("corral-test-pool-"), env={"CORRAL_WARM_POOL": "2"})
    srv.start()
    yield srv
    srv.stop()


def test_a_default_create_claims_a_warm_sandbox_and_the_pool_refills(pooled: Server) -> None:
    with pooled.client() as api:
        assert wait_for(lambda: warm(api) == 2)
        before = sandbox_dirs(pooled)
        created = api.post(
            "/v1/sandboxes",
            json={"name": "from-pool", "env": {"GREETING": "hi"}, "labels": {"team": "a"},
                  "ttl_seconds": 600},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        sandbox = created.json()
        # The id is one of the sandboxes that were already started.
        assert sandbox["id"] in before
        assert sandbox["state"] == "running"
        assert sandbox["name"] == "from-pool"
        assert sandbox["labels"] == {"team": "a"}
        assert sandbox["env_keys"] == ["GREETING"]
        assert sandbox["expires_at"] is not None
        result = api.post(
            f"/v1/sandboxes/{sandbox['id']}/exec",
            json={"command": 'echo "$GREETING"; id -u; pwd; df --output=size -B1M /workspace'},
        ).json()
        assert result["exit_code"] == 0, result
        lines = result["stdout"].split()
        assert lines[:3] == ["hi", "1000", "/workspace"]
        assert int(lines[-1]) > 0  # its own disk, as for a sandbox started on demand
        by_name = api.get("/v1/sandboxes/from-pool").json()
        assert by_name["id"] == sandbox["id"]
        assert wait_for(lambda: warm(api) == 2)
        assert api.delete(f"/v1/sandboxes/{sandbox['id']}").status_code == 200


def test_a_name_taken_leaves_the_pool_whole(pooled: Server) -> None:
    with pooled.client() as api:
        assert wait_for(lambda: warm(api) == 2)
        first = api.post("/v1/sandboxes", json={"name": "twice"})
        assert first.status_code == 201
        assert wait_for(lambda: warm(api) == 2)
        again = api.post("/v1/sandboxes", json={"name": "twice"})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "conflict"
        assert warm(api) == 2
        # The sandbox turned away was not used up: its environment is clean for the next one.
        other = api.post("/v1/sandboxes", json={}).json()
        env = api.post(f"/v1/sandboxes/{other['id']}/exec", json={"command": "env"}).json()
        assert "GREETING" not in env["stdout"]
        for sid in (first.json()["id"], other["id"]):
            api.delete(f"/v1/sandboxes/{sid}")


def test_a_spec_the_pool_cannot_serve_gets_a_sandbox_of_its_own(pooled: Server) -> None:
    with pooled.client() as api:
        assert wait_for(lambda: warm(api) == 2)
        before = sandbox_dirs(pooled)
        sandbox = api.post("/v1/sandboxes", json={"memory_mb": 256}).json()
        assert sandbox["id"] not in before
        assert warm(api) == 2
        result = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"command": "echo ok"}).json()
        assert result["stdout"] == "ok\n"
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_nothing_of_the_pool_outlives_the_server() -> None:
    srv = Server(make_data_dir("corral-test-pool-restart-"), env={"CORRAL_WARM_POOL": "2"})
    srv.start()
    try:
        with srv.client() as api:
            assert wait_for(lambda: warm(api) == 2)
            kept = api.post("/v1/sandboxes", json={"memory_mb": 512}).json()["id"]
            assert wait_for(lambda: len(sandbox_dirs(srv)) == 3)
            stale = sandbox_dirs(srv) - {kept}
        srv.kill9()
        assert wait_for(lambda: server_processes(srv.uid_base) == [])
        srv.start()
        with srv.client() as api:
            assert wait_for(lambda: warm(api) == 2)
            # The killed server's warm sandboxes are gone; the kept one is back.
            assert not stale & sandbox_dirs(srv)
            assert kept in sandbox_dirs(srv)
            assert api.get(f"/v1/sandboxes/{kept}").json()["state"] == "running"
            listed = [s["id"] for s in api.get("/v1/sandboxes").json()["items"]]
            assert listed == [kept]
        srv.stop()
        # A clean stop removes the pool: no processes, cgroups or mounts of its sandboxes.
        assert wait_for(lambda: server_processes(srv.uid_base) == [])
        assert sandbox_dirs(srv) == {kept}
        assert not [m for m in sandbox_mounts() if srv.data_dir.name in m]
        assert cgroup_dirs(srv.cgroup_name) == []
    finally:
        srv.stop()
