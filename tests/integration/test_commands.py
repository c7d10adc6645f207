"""Acceptance: timeouts and cancel end every process, output caps, and the command fields."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import processes_matching

pytestmark = pytest.mark.sandbox

TREE = 'sleep {n} & setsid sh -c "sleep {n} &"; sleep {n}'


def exec_(api: httpx.Client, sid: str, **body: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_gone(marker: str, seconds: float = 2.0) -> list:
    deadline = time.monotonic() + seconds
    left = processes_matching(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = processes_matching(marker)
    return left


def test_timeout_kills_setsid_and_double_forked(api: httpx.Client, sandbox_id: str) -> None:
    command = TREE.format(n="301")
    started = time.monotonic()
    result = exec_(api, sandbox_id, command=command, timeout_ms=1000)
    elapsed = time.monotonic() - started
    assert result["status"] == "timed_out"
    assert elapsed < 2.0, elapsed
    assert result["signal"] == 9 and result["exit_code"] == 137
    assert wait_gone("sleep 301", 0.5) == []


def test_cancel_kills_the_whole_tree(api: httpx.Client, sandbox_id: str) -> None:
    resp = api.post(f"/v1/sandboxes/{sandbox_id}/commands", json={"command": TREE.format(n="302")})
    assert resp.status_code == 202
    cid = resp.json()["id"]
    assert resp.json()["status"] == "running"

    # The three sleeps themselves: the shells on the way (whose command lines name them too)
    # come and go, and a process in the middle of its exec shows no command line.
    def sleeps() -> list[tuple[int, int, str]]:
        return [p for p in processes_matching("sleep 302") if p[2] == "sleep 302"]

    deadline = time.monotonic() + 5
    while len(sleeps()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sleeps()) == 3
    started = time.monotonic()
    cancelled = api.post(f"/v1/sandboxes/{sandbox_id}/commands/{cid}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert time.monotonic() - started < 4.0  # SIGTERM, then SIGKILL after the 2 s grace
    assert wait_gone("sleep 302", 0.5) == []
    again = api.post(f"/v1/sandboxes/{sandbox_id}/commands/{cid}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


def test_cancel_with_a_term_handler_still_kills(api: httpx.Client, sandbox_id: str) -> None:
    script = "trap '' TERM; sleep 303 & wait"
    cid = api.post(f"/v1/sandboxes/{sandbox_id}/commands", json={"command": script}).json()["id"]
    time.sleep(0.3)
    result = api.post(f"/v1/sandboxes/{sandbox_id}/commands/{cid}/cancel").json()
    assert result["status"] == "cancelled"
    assert wait_gone("sleep 303", 0.5) == []


def server_rss(server: Server) -> int:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    rss = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(rss.split()[1]) * 1024


def test_output_cap_and_bounded_memory(api: httpx.Client, sandbox_id: str, server: Server) -> None:
    exec_(api, sandbox_id, command="yes | head -c 1000000", max_output_bytes=1000)  # warm up
    before = server_rss(server)
    result = exec_(api, sandbox_id, command="yes | head -c 50000000", max_output_bytes=1000)
    after = server_rss(server)
    assert result["status"] == "completed" and result["exit_code"] == 0
    assert len(result["stdout"]) == 1000
    assert result["stdout"] == "y\n" * 500
    assert result["stdout_truncated"] is True and result["stderr_truncated"] is False
    assert result["stdout_bytes"] == 50_000_000
    assert after - before < 20 * 1024 * 1024, (before, after)


def test_caps_are_per_stream(api: httpx.Client, sandbox_id: str) -> None:
    result = exec_(
        api, sandbox_id, command="head -c 5000 /dev/zero | tr '\\0' o; echo e >&2",
        max_output_bytes=100,
    )  # fmt: skip
    assert result["stdout"] == "o" * 100 and result["stdout_truncated"] is True
    assert result["stderr"] == "e\n" and result["stderr_truncated"] is False


def test_stdin_env_cwd_and_streams(api: httpx.Client, sandbox_id: str) -> None:
    result = exec_(
        api,
        sandbox_id,
        command='cat; echo "$GREETING"; pwd; echo to-err >&2; exit 7',
        stdin="line one\nline two\n",
        env={"GREETING": "hello there"},
        cwd="/tmp",
    )
    assert result["stdout"] == "line one\nline two\nhello there\n/tmp\n"
    assert result["stderr"] == "to-err\n"
    assert result["exit_code"] == 7 and result["status"] == "completed"
    assert result["duration_ms"] >= 0
    assert result["started_at"] <= result["finished_at"]


def test_large_stdin(api: httpx.Client, sandbox_id: str) -> None:
    data = "x" * 3_000_000
    result = exec_(api, sandbox_id, command="wc -c", stdin=data)
    assert result["stdout"].strip() == "3000000"


def test_program_and_args_form(api: httpx.Client, sandbox_id: str) -> None:
    result = exec_(api, sandbox_id, command="printf", args=["%s|", "a b", "$HOME", "*"])
    assert result["stdout"] == "a b|$HOME|*|"


def test_signal_exit_and_missing_program(api: httpx.Client, sandbox_id: str) -> None:
    killed = exec_(api, sandbox_id, command="kill -9 $$")
    assert killed["exit_code"] == 137 and killed["signal"] == 9
    missing = exec_(api, sandbox_id, command="/no/such/program", args=[])
    assert missing["status"] == "failed"
    assert "No such file" in missing["error"]
    bad_cwd = exec_(api, sandbox_id, command="true", cwd="/no/such/dir")
    assert bad_cwd["status"] == "failed"
    not_found_in_shell = exec_(api, sandbox_id, command="no-such-command")
    assert not_found_in_shell["exit_code"] == 127


def test_async_status_polling_and_wait(api: httpx.Client, sandbox_id: str) -> None:
    resp = api.post(
        f"/v1/sandboxes/{sandbox_id}/commands", json={"command": "sleep 0.5; echo done"}
    )
    assert resp.status_code == 202
    cid = resp.json()["id"]
    polled = api.get(f"/v1/sandboxes/{sandbox_id}/commands/{cid}").json()
    assert polled["status"] == "running"
    waited = api.get(f"/v1/sandboxes/{sandbox_id}/commands/{cid}", params={"wait": "true"}).json()
    assert waited["status"] == "completed" and waited["stdout"] == "done\n"


def test_history_pagination_and_filters(api: httpx.Client, sandbox_id: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    for i in range(5):
        exec_(api, sandbox_id, command=f"exit {i % 2}")
    exec_(api, sandbox_id, command="sleep 5", timeout_ms=50)
    base = f"/v1/sandboxes/{sandbox_id}/commands"
    seen, cursor = [], None
    while True:
        page = api.get(base, params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 6
    assert [c["id"] for c in seen] == sorted((c["id"] for c in seen), reverse=True)
    assert seen[0]["status"] == "timed_out"
    timed_out = api.get(base, params={"status": "timed_out"}).json()["items"]
    assert [c["id"] for c in timed_out] == [seen[0]["id"]]
    assert len(api.get(base, params={"since": before.isoformat()}).json()["items"]) == 6
    later = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    assert api.get(base, params={"since": later}).json()["items"] == []
    assert len(api.get(base, params={"until": later}).json()["items"]) == 6
    one = api.get(f"{base}/{seen[1]['id']}").json()
    assert one["exit_code"] in (0, 1) and one["stdout"] == ""
