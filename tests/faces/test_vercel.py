"""The Vercel Sandbox API (seed 004): run a command in a session, with `wait`/`logs` ND-JSON,
`timeout` (SIGKILL, 137), `sudo`, and the command endpoints; then the other routes the official
SDK calls, over plain HTTP; errors in Vercel's shape. The SDK itself: test_vercel_sdk.py."""

# ruff: noqa: E501  (the seeds' curl commands are kept as the seeds write them)

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server
from tests.faces.conftest import FacesServer, admin_request, new_token, run_curl

pytestmark = pytest.mark.sandbox

COMMAND_KEYS = {"id", "name", "args", "cwd", "sessionId", "exitCode", "startedAt"}


def error_of(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def session(fapi: httpx.Client) -> Iterator[str]:
    resp = fapi.post("/v2/sandboxes", json={"resources": {"vcpus": 1}, "runtime": "node22"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["sandbox"]["status"] == "running"
    assert body["session"]["id"] == body["sandbox"]["id"]
    yield body["session"]["id"]
    fapi.delete(f"/v1/sandboxes/{body['sandbox']['id']}")


def test_create_sandbox(fapi: httpx.Client) -> None:
    resp = fapi.post("/v2/sandboxes", json={"resources": {"vcpus": 2}, "timeout": 600_000})
    sandbox = resp.json()["sandbox"]
    try:
        assert {"id", "status", "vcpus", "timeout", "createdAt"} <= set(sandbox)
        assert sandbox["vcpus"] == 2 and sandbox["timeout"] == 600_000
        assert fapi.get(f"/v2/sandboxes/{sandbox['id']}").json()["sandbox"]["id"] == sandbox["id"]
    finally:
        fapi.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_wait_and_logs_stream_with_curl(faces_server: FacesServer, session: str) -> None:
    """The seed's request: every body field, and the query parameters of its table."""
    done = run_curl(
        """curl -sS -N -X POST "{URL}/v2/sandboxes/sessions/{SESSION}/cmd?teamId=team_1&slug=acme" \\
  -H "Authorization: Bearer {TOKEN}" \\
  -H "Content-Type: application/json" \\
  -d '{"command": "sh", "args": ["-c", "echo out; echo err >&2; sleep 0.2; echo $GREETING; pwd; exit 3"],
       "cwd": "/tmp", "env": {"GREETING": "hello"}, "sudo": false, "wait": true, "logs": true,
       "timeout": 10000}' -D /dev/stderr""",
        URL=faces_server.url, TOKEN=faces_server.admin_key, SESSION=session,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "application/x-ndjson" in done.stderr.lower()
    lines = ndjson(done.stdout)
    first, last = lines[0], lines[-1]
    assert COMMAND_KEYS <= set(first["command"]) and first["command"]["exitCode"] is None
    assert first["command"]["sessionId"] == session and first["command"]["name"] == "sh"
    logs = lines[1:-1]
    assert all(set(line) == {"stream", "data"} for line in logs)
    out = "".join(line["data"] for line in logs if line["stream"] == "stdout")
    err = "".join(line["data"] for line in logs if line["stream"] == "stderr")
    assert out == "out\nhello\n/tmp\n" and err == "err\n"
    assert last["command"]["exitCode"] == 3 and last["command"]["id"] == first["command"]["id"]
    assert isinstance(last["command"]["durationMs"], int)
    assert last["command"]["startedAt"] > 1_600_000_000_000  # epoch milliseconds


def test_wait_without_logs(fapi: httpx.Client, session: str) -> None:
    resp = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "echo", "args": ["quiet"], "wait": True},
    )
    lines = ndjson(resp.text)
    assert len(lines) == 2
    assert lines[0]["command"]["exitCode"] is None and lines[1]["command"]["exitCode"] == 0


def test_no_wait_then_get_logs_and_wait(fapi: httpx.Client, session: str) -> None:
    resp = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "sh", "args": ["-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"]},
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    command = resp.json()["command"]
    assert COMMAND_KEYS <= set(command) and command["exitCode"] is None
    cid = command["id"]
    # The logs: a replay of what was written so far, then live until the end.
    logs = fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}/logs")
    assert logs.headers["content-type"].startswith("application/x-ndjson")
    assert "".join(line["data"] for line in ndjson(logs.text)) == "1\n2\n3\n"
    waited = fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}", params={"wait": "true"})
    assert waited.json()["command"]["exitCode"] == 0
    # Logs of a finished command replay in full.
    again = fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}/logs")
    assert [line["data"] for line in ndjson(again.text)] == ["1\n", "2\n", "3\n"]


def test_timeout_is_sigkill_137(fapi: httpx.Client, session: str) -> None:
    started = time.monotonic()
    resp = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "sh", "args": ["-c", "trap '' TERM; echo before; sleep 30"],
              "wait": True, "logs": True, "timeout": 500},
    )  # fmt: skip
    lines = ndjson(resp.text)
    assert time.monotonic() - started < 5
    assert lines[1] == {"stream": "stdout", "data": "before\n"}
    assert lines[-1]["command"]["exitCode"] == 137
    # Enforced without wait too.
    cid = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "sleep", "args": ["30"], "timeout": 300},
    ).json()["command"]["id"]
    waited = fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}?wait=true").json()
    assert waited["command"]["exitCode"] == 137


def test_kill(fapi: httpx.Client, session: str) -> None:
    cid = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd", json={"command": "sleep", "args": ["30"]}
    ).json()["command"]["id"]
    killed = fapi.post(f"/v2/sandboxes/sessions/{session}/cmd/{cid}/kill", json={"signal": 9})
    assert killed.status_code == 200, killed.text
    final = fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}?wait=true").json()["command"]
    assert final["exitCode"] == 137
    # A command that has ended is answered as it is, as Vercel does (not 409).
    again = fapi.post(f"/v2/sandboxes/sessions/{session}/cmd/{cid}/kill", json={"signal": 15})
    assert again.status_code == 200, again.text
    assert again.json()["command"]["exitCode"] == 137


def test_sudo(fapi: httpx.Client, session: str) -> None:
    resp = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "id", "args": ["-u"], "sudo": True, "wait": True, "logs": True},
    )
    if resp.status_code == 400:  # the runtime cannot run as root in a sandbox yet
        error_of(resp, 400, "sudo_unavailable")
        return
    lines = ndjson(resp.text)
    assert lines[1] == {"stream": "stdout", "data": "0\n"}


def test_command_that_cannot_start(fapi: httpx.Client, session: str) -> None:
    resp = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "no-such-program", "wait": True},
    )
    lines = ndjson(resp.text)
    # A result, as Vercel gives: the command finished with 127, not a stream error.
    assert lines[-1]["command"]["exitCode"] == 127 and lines[-1]["command"]["status"] == "failed"
    logged = fapi.post(
        f"/v2/sandboxes/sessions/{session}/cmd",
        json={"command": "no-such-program", "wait": True, "logs": True},
    )
    lines = ndjson(logged.text)
    assert lines[1]["stream"] == "stderr" and lines[1]["data"].startswith("no-such-program: ")
    assert lines[-1]["command"]["exitCode"] == 127


def test_errors(faces_server: FacesServer, fapi: httpx.Client, session: str) -> None:
    url = faces_server.url
    body = {"command": "true"}
    error_of(httpx.post(f"{url}/v2/sandboxes/sessions/{session}/cmd", json=body), 401,
             "unauthorized")  # fmt: skip
    reader = new_token(faces_server, scopes=["read"])
    error_of(
        httpx.post(
            f"{url}/v2/sandboxes/sessions/{session}/cmd",
            json=body,
            headers={"Authorization": f"Bearer {reader}"},
        ),
        403,
        "forbidden",
    )
    error_of(fapi.post("/v2/sandboxes/sessions/sb_nope/cmd", json=body), 404, "not_found")
    error_of(fapi.get(f"/v2/sandboxes/sessions/{session}/cmd/cmd_nope"), 404, "not_found")
    error_of(fapi.post(f"/v2/sandboxes/sessions/{session}/cmd", json={}), 400, "bad_request")
    error_of(
        fapi.post(f"/v2/sandboxes/sessions/{session}/cmd", json={"command": "x", "args": "y"}),
        400,
        "bad_request",
    )
    stopped = fapi.post(f"/v2/sandboxes/{session}/stop")
    assert stopped.json()["sandbox"]["status"] == "stopped"
    error_of(fapi.post(f"/v2/sandboxes/sessions/{session}/cmd", json=body), 410,
             "sandbox_stopped")  # fmt: skip


def test_rate_limit(limited_faces_server: Server) -> None:
    token = new_token(limited_faces_server, scopes=["read", "exec", "sandboxes"])
    resp = admin_request(limited_faces_server, "GET", "/v2/sandboxes/sb_nope")
    error_of(resp, 404, "not_found")
    with httpx.Client(
        base_url=limited_faces_server.url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        statuses = [client.get("/v2/sandboxes/sb_nope") for _ in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited
    error_of(limited[0], 429, "too_many_requests")


# --- the routes the official SDK calls, in its shapes (tests/faces/test_vercel_sdk.py runs it) ---

SESSION_NUMBERS = ("memory", "vcpus", "timeout", "requestedAt", "createdAt", "updatedAt")


def test_create_answers_the_sdk_shapes(fapi: httpx.Client) -> None:
    for path in ("/v2/sandboxes", "/v3/sandboxes"):
        resp = fapi.post(path, json={"runtime": "node22"} if path.startswith("/v2") else {})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        sandbox, session = body["sandbox"], body["session"]
        try:
            assert sandbox["name"] == sandbox["id"] and sandbox["persistent"] is True
            assert sandbox["currentSessionId"] == session["id"] == sandbox["id"]
            assert all(isinstance(session[key], int | float) for key in SESSION_NUMBERS)
            assert session["timeout"] == 300_000  # Vercel's default lifetime
            assert session["region"] == "local" and session["cwd"] == "/workspace"
            assert body["routes"] == []
        finally:
            fapi.delete(f"/v1/sandboxes/{sandbox['id']}")


def test_ports_become_routes(fapi: httpx.Client) -> None:
    made = fapi.post("/v3/sandboxes", json={"ports": [3001, 3000]})
    assert made.status_code == 200, made.text
    sid = made.json()["sandbox"]["id"]
    try:
        assert [r["port"] for r in made.json()["routes"]] == [3000, 3001]
        exposed = fapi.get(f"/v1/sandboxes/{sid}/ports").json()
        assert all(p["public"] for p in exposed) and len(exposed) == 2
        changed = fapi.patch(f"/v2/sandboxes/{sid}", json={"ports": [3001, 8080]})
        assert [r["port"] for r in changed.json()["routes"]] == [3001, 8080], changed.text
        session = fapi.get(f"/v2/sandboxes/sessions/{sid}").json()
        assert session["routes"] == changed.json()["routes"]
    finally:
        fapi.delete(f"/v1/sandboxes/{sid}")
    for bad in ([0], [70000], ["x"]):
        refused = fapi.post("/v3/sandboxes", json={"ports": bad})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "bad_request"


def test_get_list_resume_and_delete(fapi: httpx.Client, session: str) -> None:
    got = fapi.get(f"/v2/sandboxes/{session}").json()
    assert got["session"]["id"] == session and got["routes"] == [] and got["resumed"] is False
    names = [
        s["name"] for s in fapi.get("/v2/sandboxes", params={"limit": 200}).json()["sandboxes"]
    ]
    assert session in names
    sessions = fapi.get("/v2/sandboxes/sessions", params={"name": session}).json()
    assert [s["id"] for s in sessions["sessions"]] == [session]
    assert sessions["pagination"] == {"count": 1, "next": None}
    assert fapi.get("/v2/sandboxes/sessions").json()["sessions"]
    stopped = fapi.post(f"/v2/sandboxes/sessions/{session}/stop")
    assert stopped.json()["session"]["status"] == "stopped", stopped.text
    body = {"path": "x"}
    error_of(fapi.post(f"/v2/sandboxes/sessions/{session}/fs/read", json=body), 410,
             "sandbox_stopped")  # fmt: skip
    assert fapi.get(f"/v2/sandboxes/{session}").json()["session"]["status"] == "stopped"
    resumed = fapi.get(f"/v2/sandboxes/{session}", params={"resume": "true"}).json()
    assert resumed["resumed"] is True and resumed["session"]["status"] == "running"
    # Paused through the native API: a 410 for the SDK to resume it, which thaws it.
    assert fapi.post(f"/v1/sandboxes/{session}/pause").status_code == 200
    error_of(fapi.post(f"/v2/sandboxes/sessions/{session}/cmd", json={"command": "true"}), 410,
             "sandbox_stopped")  # fmt: skip
    thawed = fapi.get(f"/v2/sandboxes/{session}", params={"resume": "true"}).json()
    assert thawed["resumed"] is True and thawed["session"]["status"] == "running"
    deleted = fapi.delete(f"/v2/sandboxes/{session}")
    assert deleted.status_code == 200, deleted.text
    error_of(fapi.get(f"/v2/sandboxes/{session}"), 404, "not_found")
    error_of(fapi.post(f"/v2/sandboxes/sessions/{session}/cmd", json={"command": "true"}), 404,
             "not_found")  # fmt: skip
    error_of(fapi.delete(f"/v2/sandboxes/{session}"), 404, "not_found")


def test_session_routes_errors(fapi: httpx.Client, session: str) -> None:
    base = f"/v2/sandboxes/sessions/{session}"
    missing = fapi.post(f"{base}/fs/read", json={"path": "/workspace/none"})
    error_of(missing, 404, "file_not_found")
    error_of(fapi.post(f"{base}/fs/read", json={}), 400, "bad_request")
    error_of(fapi.post(f"{base}/fs/mkdir", json={"path": "a/b/c"}), 404, "not_found")
    not_gzip = fapi.post(f"{base}/fs/write", content=b"plain", headers={"x-cwd": "/"})
    error_of(not_gzip, 400, "bad_request")
    error_of(fapi.post(f"{base}/extend-timeout", json={}), 400, "bad_request")
    error_of(fapi.post(f"{base}/network-policy", json={"mode": "sometimes"}), 400, "bad_request")
    denied = fapi.post(f"{base}/network-policy", json={"subnets": {"deny": ["10.0.0.0/8"]}})
    error_of(denied, 400, "unsupported")
    for bad in (["bad..example.com"], ["*"], ["a.*.example.com"], [""]):
        malformed = fapi.post(f"{base}/network-policy", json={"allow": bad})
        error_of(malformed, 400, "bad_request")
    git = fapi.post("/v3/sandboxes", json={"source": {"type": "git", "url": "https://x/y.git"}})
    error_of(git, 400, "unsupported")
    error_of(fapi.get("/v2/sandboxes/snapshots/snap_nope"), 404, "not_found")
    error_of(fapi.post("/v2/sandboxes/sb_nope/fork", json={}), 404, "not_found")
    error_of(fapi.get("/v2/sandboxes", params={"limit": 0}), 400, "bad_request")
    error_of(fapi.post("/v2/sandboxes/sessions/sb_nope/stop"), 404, "not_found")
