"""Acceptance: commands run as uid 1000 in /workspace, host secrets are out of reach, and the
sandbox's processes run on the host under an unprivileged uid."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import UID_BASE, sandbox_processes

pytestmark = pytest.mark.sandbox


def run(api: httpx.Client, sid: str, command: str, **extra: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_identity_and_host_secrets(api: httpx.Client, sandbox_id: str) -> None:
    result = run(api, sandbox_id, "id -u; pwd; cat /etc/shadow; touch /usr/x; ls /root")
    lines = result["stdout"].splitlines()
    assert lines[:2] == ["1000", "/workspace"]
    assert "/etc/shadow" in result["stderr"]
    # /usr is the sandbox root's (copy-on-write), /root its root's home: not the user's.
    assert "touch: cannot touch '/usr/x': Permission denied" in result["stderr"]
    assert "cannot open directory '/root': Permission denied" in result["stderr"]
    assert result["exit_code"] != 0


@pytest.mark.parametrize(
    "probe",
    [
        "cat /etc/shadow",
        "cat /etc/gshadow",
        "ls /root",
        "touch /usr/bin/x",
        "touch /etc/passwd",
        "mkdir /newdir",
        "touch /bin/x",
        "ls /sys/fs/cgroup/unified",
        "cat /etc/ssh/ssh_host_rsa_key",
        "ls /work",
        "ls /tmp/..//var/lib",
        "mount -t tmpfs none /tmp",
        "unshare -r true",
        "ping -c1 127.0.0.1",
    ],
)
def test_host_reads_and_writes_fail(api: httpx.Client, sandbox_id: str, probe: str) -> None:
    result = run(api, sandbox_id, probe)
    assert result["exit_code"] != 0, (probe, result["stdout"])


def test_root_and_home_are_the_sandboxs_own(api: httpx.Client, sandbox_id: str) -> None:
    """/root and /home are the sandbox's own, empty at first (the host's are not), and what
    its root writes there stays in it: not in the host's, nor in another sandbox."""
    host_entries = set(os.listdir("/root")) | set(os.listdir("/home"))
    assert host_entries  # the host's have entries: an empty listing tells them apart
    assert run(api, sandbox_id, "ls -A /home")["stdout"] == ""
    seen = run(api, sandbox_id, "ls -A /root /home", user="root")
    assert seen["exit_code"] == 0 and seen["stdout"].split() == ["/home:", "/root:"], seen
    wrote = run(api, sandbox_id, "touch /root/corral-own /home/corral-own", user="root")
    assert wrote["exit_code"] == 0, wrote
    assert not os.path.lexists("/root/corral-own") and not os.path.lexists("/home/corral-own")
    assert run(api, sandbox_id, "ls /root", user="root")["stdout"] == "corral-own\n"
    resp = api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    other = resp.json()["id"]
    try:
        assert run(api, other, "ls -A /root /home", user="root")["stdout"].split() == [
            "/home:",
            "/root:",
        ]
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def test_no_host_environment_or_secrets_in_proc(
    api: httpx.Client, sandbox_id: str, server: Server
) -> None:
    result = run(api, sandbox_id, "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline | tr '\\0' '\\n'")
    seen = result["stdout"]
    assert "PATH=" in seen  # it did read something
    assert server.admin_key not in seen
    assert "CORRAL_" not in seen
    assert "PYTEST" not in seen
    assert "/work/main" not in seen and str(server.data_dir) not in seen


def test_no_capabilities_and_no_new_privs(api: httpx.Client, sandbox_id: str) -> None:
    status = run(api, sandbox_id, "cat /proc/self/status")["stdout"]
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for name in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert fields[name].strip() == "0000000000000000", name
    # The bounding set keeps only what sudo commands get inside the user namespace, and
    # no_new_privs means nothing can be regained through exec.
    assert int(fields["CapBnd"], 16) & ~0xCB == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_sandbox_sees_only_its_own_processes(api: httpx.Client, sandbox_id: str) -> None:
    out = run(api, sandbox_id, "ls /proc | grep -c '^[0-9]'")["stdout"]
    assert int(out) < 10  # bwrap's init, the supervisor, this shell and its children


def test_processes_run_under_unprivileged_host_uid(api: httpx.Client, sandbox_id: str) -> None:
    marker = "sleep 31.4159"
    started = api.post(f"/v1/sandboxes/{sandbox_id}/commands", json={"command": marker})
    assert started.status_code == 202
    try:
        procs = []
        for _ in range(50):
            procs = [p for p in sandbox_processes() if marker in p[2]]
            if procs:
                break
            time.sleep(0.05)
        assert procs, "the command's process was not found on the host"
        assert all(uid >= UID_BASE for _, uid, _ in procs)
    finally:
        api.post(f"/v1/sandboxes/{sandbox_id}/commands/{started.json()['id']}/cancel")


def test_workspace_persists_between_commands_and_not_across_sandboxes(
    api: httpx.Client, sandbox_id: str
) -> None:
    run(api, sandbox_id, "echo data > /workspace/f; echo tmp > /tmp/t")
    assert run(api, sandbox_id, "cat /workspace/f /tmp/t")["stdout"] == "data\ntmp\n"
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        result = run(api, other, "ls /workspace; cat /tmp/t")
        assert result["stdout"] == ""
        assert result["exit_code"] != 0
    finally:
        api.delete(f"/v1/sandboxes/{other}")
