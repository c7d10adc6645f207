"""Acceptance: after `kill -9` of the server, sandboxes come back with their files, the history
is intact, the running command is `lost`, and nothing is left behind on the host."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.conftest import Server, make_data_dir
from tests.integration.helpers import (
    cgroup_dirs,
    processes_matching,
    sandbox_mounts,
    server_processes,
    wait_for,
)

pytestmark = pytest.mark.sandbox


def run_stdout(api: httpx.Client, sid: str, command: str) -> str:
    return api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command}).json()["stdout"]


def test_kill9_and_restart() -> None:
    srv = Server(make_data_dir("corral-test-restart-"))
    srv.start()
    try:
        with srv.client() as api:
            sandboxes = [api.post("/v1/sandboxes", json={"name": f"keep-{i}"}).json()["id"]
                         for i in range(2)]  # fmt: skip
            for i, sid in enumerate(sandboxes):
                r = api.post(f"/v1/sandboxes/{sid}/exec",
                             json={"command": f"mkdir -p d && echo file-{i} > d/f"})  # fmt: skip
                assert r.json()["exit_code"] == 0
            done = api.post(f"/v1/sandboxes/{sandboxes[0]}/exec", json={"command": "echo before"})
            running = api.post(
                f"/v1/sandboxes/{sandboxes[0]}/commands",
                json={"command": "grep '^0::' /proc/self/cgroup > sleeper-cgroup;"
                      " sleep 404 & setsid sleep 404 & sleep 404"},
            ).json()
            assert wait_for(lambda: len(processes_matching("sleep 404")) >= 3)

        assert len(server_processes(srv.uid_base)) >= 2 * 3  # 2 sandboxes: bwrap x2, supervisor
        srv.kill9()
        # The sandboxes die with the server (their init dies with its parent).
        assert wait_for(lambda: server_processes(srv.uid_base) == [])

        srv.start()
        with srv.client() as api:
            for i, sid in enumerate(sandboxes):
                sandbox = api.get(f"/v1/sandboxes/{sid}").json()
                assert sandbox["state"] == "running"
                r = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "cat d/f"}).json()
                assert r["stdout"] == f"file-{i}\n"
            lost = api.get(f"/v1/sandboxes/{sandboxes[0]}/commands/{running['id']}").json()
            assert lost["status"] == "lost"
            assert lost["finished_at"] is not None and "unknown" in lost["error"]
            before = api.get(f"/v1/sandboxes/{sandboxes[0]}/commands/{done.json()['id']}").json()
            assert before["status"] == "completed" and before["stdout"] == "before\n"
            history = api.get(f"/v1/sandboxes/{sandboxes[0]}/commands").json()["items"]
            assert [c["status"] for c in history][:2] == ["completed", "lost"]
            assert processes_matching("sleep 404") == []
            # Only the live sandboxes' cgroups exist, with those kept for their next commands
            # (cg-...): the dead command's is gone.
            dirs = cgroup_dirs(srv.cgroup_name)
            assert sorted(d for d in dirs if "/" not in d) == sorted(sandboxes)
            assert all(d.split("/")[1].startswith("cg-") for d in dirs if "/" in d), dirs
            dead = run_stdout(api, sandboxes[0], "cat sleeper-cgroup").strip().removeprefix("0::/")
            assert dead.startswith("cg-") and not [d for d in dirs if dead in d], (dead, dirs)
            # The only mounts are the live sandboxes' own: their file systems (disk_mb), the
            # idmapped views of their base layers and their overlays (docs/root-filesystem.md),
            # once each; and the node's read-only views of the supervisor, the tools and an
            # empty directory, once each; and its spare disks (made ahead, no sandbox's yet).
            mine = [m.split()[1] for m in sandbox_mounts() if str(srv.data_dir) in m]
            views = str(srv.data_dir / "runtime" / "views") + "/"
            spares = str(srv.data_dir / "runtime" / "disks")
            mine = [m for m in mine if not m.startswith(spares)]
            assert sorted(m for m in mine if not m.startswith(views)) == sorted(
                str(srv.data_dir / "sandboxes" / sid / name)
                for sid in sandboxes
                for name in ("disk", "lower", "root", "usr-lower", "usr", "ws")
            )
            assert len([m for m in mine if m.startswith(views)]) == 3
    finally:
        srv.stop()
    # A clean stop leaves no process, cgroup or mount behind either.
    assert wait_for(lambda: server_processes(srv.uid_base) == [])
    assert cgroup_dirs(srv.cgroup_name) == []
    assert [m for m in sandbox_mounts() if str(srv.data_dir) in m] == []
    shutil.rmtree(srv.data_dir, ignore_errors=True)
