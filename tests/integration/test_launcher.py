"""Ordinary commands start from the supervisor's launcher (vfork, no Python in the child). They
run as uid 1000 like it, so they can kill or stop it: the sandbox carries on regardless."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.sandbox


def run(api: httpx.Client, sid: str, command: str, **extra: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_kill_all_and_stop_all_leave_the_sandbox_working(
    api: httpx.Client, sandbox_id: str
) -> None:
    # `kill -9 -1` reaches every uid 1000 process: the launcher, never the supervisor (uid 0).
    for _ in range(3):
        killed = run(api, sandbox_id, "kill -9 -1; echo after")
        assert killed["status"] == "completed" and killed["stdout"] == "after\n", killed
        assert run(api, sandbox_id, "echo ok")["stdout"] == "ok\n"
    stopped = run(api, sandbox_id, "kill -STOP -1; echo after")
    assert stopped["status"] == "completed" and stopped["stdout"] == "after\n", stopped
    assert run(api, sandbox_id, "echo ok")["stdout"] == "ok\n"
    # A command whose launcher dies while it runs is still waited for and reported.
    slow = run(api, sandbox_id, "sleep 0.3; exit 7")
    assert slow["exit_code"] == 7
    orphaned = run(api, sandbox_id, "kill -9 $PPID; sleep 0.2; exit 5")
    assert orphaned["status"] == "completed" and orphaned["exit_code"] == 5, orphaned


def test_commands_start_clean(api: httpx.Client, sandbox_id: str) -> None:
    # No signal ignored or blocked, no capability, core rlimit 0, own session, own cgroup.
    probe = (
        "grep -E '^(SigIgn|SigBlk|CapInh|CapPrm|CapEff|CapBnd|CapAmb)' /proc/self/status"
        " | awk '{print $2}' | sort -u; ulimit -c; ps -o sid= -p $$ | tr -d ' ';"
        " echo $$; grep '^0::' /proc/self/cgroup; ls /proc/self/fd"
    )
    result = run(api, sandbox_id, probe)
    lines = result["stdout"].split("\n")
    assert lines[0] == "0000000000000000" and lines[1] == "0", result
    assert lines[2] == lines[3], result  # session leader
    assert lines[4].startswith("0::/") and len(lines[4]) > 4, result  # not the sandbox's own
    root = run(api, sandbox_id, "grep -E '^SigIgn' /proc/self/status", user="root")
    assert root["stdout"].split() == ["SigIgn:", "0000000000000000"], root


HOG = """
import time
with open("/proc/self/cgroup") as f:
    print([line for line in f.read().splitlines() if line.startswith("0::")][0])
hog = b"x" * (80 << 20)
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
"""


def cgroup_of(result: dict) -> str:
    line = next(x for x in result["stdout"].splitlines() if x.startswith("0::"))
    return line.removeprefix("0::/")


def test_commands_one_after_another_use_the_same_cgroups_and_measure_themselves(
    api: httpx.Client, sandbox_id: str
) -> None:
    # Each command runs in cgroups of the sandbox's, named for no command in particular...
    probe = "grep '^0::' /proc/self/cgroup"
    first = cgroup_of(run(api, sandbox_id, probe))
    assert first.startswith("cg-") and len(first) == 3 + 16, first
    # ... which the next command uses once the last one has left them empty,
    assert cgroup_of(run(api, sandbox_id, probe)) == first
    hog = run(api, sandbox_id, "python3", args=["-c", HOG])
    assert hog["exit_code"] == 0 and cgroup_of(hog) == first, hog
    assert hog["cpu_ms"] >= 250, hog
    assert hog["peak_memory_bytes"] is not None and hog["peak_memory_bytes"] >= 80 << 20, hog
    # ... and each reports its own CPU and peak, not what the cgroup saw before it.
    after = run(api, sandbox_id, probe)
    assert cgroup_of(after) == first, after
    assert after["cpu_ms"] is not None and after["cpu_ms"] < 100, after
    assert after["peak_memory_bytes"] is not None, after
    assert after["peak_memory_bytes"] < 40 << 20, after


def test_overlapping_commands_get_cgroups_of_their_own(
    api: httpx.Client, sandbox_id: str
) -> None:
    probe = "grep '^0::' /proc/self/cgroup"
    slow = api.post(
        f"/v1/sandboxes/{sandbox_id}/commands", json={"command": f"{probe}; sleep 1"}
    ).json()
    beside = cgroup_of(run(api, sandbox_id, probe))
    done = api.get(f"/v1/sandboxes/{sandbox_id}/commands/{slow['id']}?wait=true").json()
    assert done["exit_code"] == 0, done
    assert beside != cgroup_of(done) and beside.startswith("cg-"), (beside, done)


def test_a_cgroup_left_charged_is_not_used_again(api: httpx.Client, sandbox_id: str) -> None:
    # A command that writes files leaves their page cache charged to its cgroup: the next
    # command gets other cgroups, so that its peak is its own.
    probe = "grep '^0::' /proc/self/cgroup"
    writer = run(
        api, sandbox_id, f"{probe}; head -c 8M /dev/zero > /tmp/eight && sync /tmp/eight"
    )
    assert writer["exit_code"] == 0, writer
    assert writer["peak_memory_bytes"] >= 8 << 20, writer
    after = run(api, sandbox_id, probe)
    assert cgroup_of(after) != cgroup_of(writer), (writer, after)
    assert after["peak_memory_bytes"] < 8 << 20, after


def test_missing_program_and_cwd(api: httpx.Client, sandbox_id: str) -> None:
    resp = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "nope-1", "args": []})
    assert resp.json()["status"] == "failed" and "No such file" in resp.json()["error"]
    resp = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"command": "true", "args": [], "cwd": "/does/not/exist"},
    )
    assert resp.json()["status"] == "failed" and "No such file" in resp.json()["error"]


def test_a_spawn_too_big_for_the_launcher_is_forked_and_spares_others(
    api: httpx.Client, sandbox_id: str
) -> None:
    # 300 KB of environment (one string may be at most 128 KiB): more than the launcher's
    # socketpair takes in one message.
    started = api.post(
        f"/v1/sandboxes/{sandbox_id}/commands", json={"command": "sleep 0.5; echo neighbour"}
    ).json()
    # uid 0 runs the supervisor, uid 1000 its launcher (a fork of it)
    launcher = "pgrep -u 1000 -f '^/.* /.corral/supervisor.py'"  # not bwrap, whose argv names it
    before = run(api, sandbox_id, launcher)["stdout"].split()
    assert len(before) == 1, before
    env = {f"BIG{i}": "x" * 100_000 for i in range(3)}
    big = run(api, sandbox_id, 'echo "$((${#BIG0} + ${#BIG1} + ${#BIG2}))"', env=env)
    assert big["status"] == "completed" and big["stdout"] == "300000\n", big
    # The neighbour, started through the launcher, was not failed with it.
    done = api.get(
        f"/v1/sandboxes/{sandbox_id}/commands/{started['id']}", params={"wait": "true"}
    ).json()
    assert done["status"] == "completed" and done["stdout"] == "neighbour\n", done
    # The launcher was not taken for broken and replaced.
    assert run(api, sandbox_id, launcher)["stdout"].split() == before
