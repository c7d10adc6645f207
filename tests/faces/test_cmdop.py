"""The CMDOP Commands API (seed 001): every example of the seed, run with curl, and its errors."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import Server
from tests.faces.conftest import FacesServer, admin_request, curl_json, new_token

pytestmark = pytest.mark.sandbox

RESULT_KEYS = {"id", "machine_id", "command", "stdout", "stderr", "exit_code", "duration",
               "started_at", "finished_at"}  # fmt: skip


def error_of(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def iso_z(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- the seed's examples, with curl -------------------------------------------------------------


def test_execute_example(faces_server: FacesServer, sandbox: str) -> None:
    status, body = curl_json(
        """curl -s -X POST {URL}/v1/commands \\
  -H "Authorization: Bearer {TOKEN}" \\
  -H "Content-Type: application/json" \\
  -d '{ "machine_id": "{MACHINE}", "command": "ls -la /var/log", "timeout": 30000 }'""",
        URL=faces_server.url, TOKEN=faces_server.admin_key, MACHINE=sandbox,
    )  # fmt: skip
    assert status == 200
    assert isinstance(body, dict) and set(body) == {"data"}
    data = body["data"]
    assert RESULT_KEYS <= set(data)
    assert data["id"].startswith("cmd_")
    assert data["machine_id"] == sandbox and data["command"] == "ls -la /var/log"
    assert isinstance(data["exit_code"], int) and isinstance(data["duration"], int)
    assert iso_z(data["started_at"]) <= iso_z(data["finished_at"])


def test_execute_with_cwd_env_and_output(fapi: httpx.Client, sandbox: str) -> None:
    resp = fapi.post(
        "/v1/commands",
        json={"machine_id": sandbox, "command": "pwd; echo $GREETING; echo oops >&2; exit 4",
              "cwd": "/tmp", "env": {"GREETING": "hi"}, "user": "user"},
    )  # fmt: skip
    data = resp.json()["data"]
    assert resp.status_code == 200, resp.text
    assert data["stdout"] == "/tmp\nhi\n" and data["stderr"] == "oops\n"
    assert data["exit_code"] == 4 and data["status"] == "completed"


def test_timeout_keeps_output(fapi: httpx.Client, sandbox: str) -> None:
    data = fapi.post(
        "/v1/commands",
        json={"machine_id": sandbox, "command": "echo before; sleep 30", "timeout": 300},
    ).json()["data"]
    assert data["status"] == "timed_out"
    assert data["stdout"] == "before\n" and data["exit_code"] == 137 and data["signal"] == 9


def test_async_status_and_cancel_examples(faces_server: FacesServer, sandbox: str) -> None:
    status, body = curl_json(
        """curl -s -X POST {URL}/v1/commands/async \\
  -H "Authorization: Bearer {TOKEN}" \\
  -H "Content-Type: application/json" \\
  -d '{ "machine_id": "{MACHINE}", "command": "sleep 0.3; echo Build successful" }'""",
        URL=faces_server.url, TOKEN=faces_server.admin_key, MACHINE=sandbox,
    )  # fmt: skip
    assert status == 202
    assert isinstance(body, dict)
    assert set(body["data"]) == {"id", "status"} and body["data"]["status"] == "running"
    cid = body["data"]["id"]
    deadline = time.monotonic() + 10
    while True:
        status, got = curl_json(
            'curl -s {URL}/v1/commands/{ID} -H "Authorization: Bearer {TOKEN}"',
            URL=faces_server.url, TOKEN=faces_server.admin_key, ID=cid,
        )  # fmt: skip
        assert status == 200 and isinstance(got, dict)
        if got["data"]["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    data = got["data"]
    assert {"id", "status", "exit_code", "stdout", "stderr", "started_at", "finished_at"} <= set(
        data
    )
    assert data["status"] == "completed" and data["exit_code"] == 0
    assert data["stdout"] == "Build successful\n" and data["stderr"] == ""

    # DELETE /commands/:id sends SIGTERM to a running command.
    with httpx.Client(base_url=faces_server.url, timeout=30) as client:
        headers = {"Authorization": f"Bearer {faces_server.admin_key}"}
        running = client.post(
            "/v1/commands/async", headers=headers,
            json={"machine_id": sandbox, "command": "sleep 60"},
        ).json()["data"]  # fmt: skip
    status, cancelled = curl_json(
        'curl -s -X DELETE {URL}/v1/commands/{ID} -H "Authorization: Bearer {TOKEN}"',
        URL=faces_server.url, TOKEN=faces_server.admin_key, ID=running["id"],
    )  # fmt: skip
    assert status == 200 and isinstance(cancelled, dict)
    assert cancelled["data"]["cancelled"] is True
    with httpx.Client(base_url=faces_server.url, timeout=30) as client:
        after = client.get(f"/v1/commands/{running['id']}", headers=headers).json()["data"]
        assert after["status"] == "cancelled"
        again = client.delete(f"/v1/commands/{running['id']}", headers=headers)
    error_of(again, 409, "conflict")


def test_batch_example(faces_server: FacesServer, fapi: httpx.Client) -> None:
    machines = [fapi.post("/v1/sandboxes", json={}).json()["id"] for _ in range(3)]
    try:
        ids = '", "'.join(machines)
        status, body = curl_json(
            """curl -s -X POST {URL}/v1/commands/batch \\
  -H "Authorization: Bearer {TOKEN}" -H "Content-Type: application/json" \\
  -d '{ "machine_ids": ["{IDS}"], "command": "apt update" }'""",
            URL=faces_server.url, TOKEN=faces_server.admin_key, IDS=ids,
        )  # fmt: skip
        assert status == 200 and isinstance(body, dict)
        assert set(body["data"]) == set(machines)
        for entry in body["data"].values():
            assert "exit_code" in entry and "stdout" in entry and "stderr" in entry
            assert entry["exit_code"] != 0  # not root: apt cannot lock its lists
        assert body["meta"] == {"total": 3, "succeeded": 3, "failed": 0}
    finally:
        for m in machines:
            fapi.delete(f"/v1/sandboxes/{m}")


def test_history_example(faces_server: FacesServer, fapi: httpx.Client, sandbox: str) -> None:
    for i in range(5):
        fapi.post("/v1/commands", json={"machine_id": sandbox, "command": f"echo {i}"})
    status, body = curl_json(
        'curl -s "{URL}/v1/machines/{MACHINE}/commands?limit=2&offset=1" '
        '-H "Authorization: Bearer {TOKEN}"',
        URL=faces_server.url, TOKEN=faces_server.admin_key, MACHINE=sandbox,
    )  # fmt: skip
    assert status == 200 and isinstance(body, dict)
    assert body["meta"] == {"total": 5, "limit": 2, "offset": 1}
    assert [c["command"] for c in body["data"]] == ["echo 3", "echo 2"]  # newest first
    for item in body["data"]:
        assert {"id", "command", "exit_code", "duration", "executed_at"} <= set(item)
        iso_z(item["executed_at"])
    future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    later = fapi.get(f"/v1/machines/{sandbox}/commands", params={"since": future}).json()
    assert later["data"] == [] and later["meta"]["total"] == 0


def test_machines(fapi: httpx.Client, sandbox: str) -> None:
    listed = fapi.get("/v1/machines", params={"limit": 1000}).json()
    assert sandbox in [m["id"] for m in listed["data"]]
    assert set(listed["meta"]) == {"total", "limit", "offset"}
    one = fapi.get(f"/v1/machines/{sandbox}").json()["data"]
    assert {"id", "name", "status", "os", "arch", "hostname", "tags", "last_seen"} <= set(one)
    assert one["status"] == "online" and one["os"] == "linux"


# --- acceptance 4: a batch over 20 machines, one deleted mid-way ---------------------------------


def test_batch_of_20_with_one_deleted_midway(fapi: httpx.Client) -> None:
    machines = [fapi.post("/v1/sandboxes", json={}).json()["id"] for _ in range(20)]
    victim = machines[7]
    try:
        outcome: dict = {}

        def run() -> None:
            outcome["resp"] = fapi.post(
                "/v1/commands/batch",
                json={"machine_ids": machines, "command": "sleep 3; echo ok"},
            )

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # mid-way: once the victim's command runs
            history = fapi.get(f"/v1/machines/{victim}/commands").json()["data"]
            if history and history[0]["status"] == "running":
                break
            time.sleep(0.05)
        assert fapi.delete(f"/v1/sandboxes/{victim}").status_code == 200
        thread.join(30)
        resp = outcome["resp"]
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert len(data) == 20
        results = {m: e for m, e in data.items() if "error" not in e}
        errors = {m: e for m, e in data.items() if "error" in e}
        assert len(results) == 19 and set(errors) == {victim}, data[victim]
        assert all(e["exit_code"] == 0 and e["stdout"] == "ok\n" for e in results.values())
        assert set(errors[victim]["error"]) == {"code", "message"}
        assert resp.json()["meta"] == {"total": 20, "succeeded": 19, "failed": 1}
    finally:
        for m in machines:
            fapi.delete(f"/v1/sandboxes/{m}")


# --- errors, in CMDOP's shape -----------------------------------------------------------------


def test_errors(faces_server: FacesServer, fapi: httpx.Client, sandbox: str) -> None:
    url = faces_server.url
    # 401: no token, a bad token.
    error_of(httpx.post(f"{url}/v1/commands", json={}), 401, "unauthorized")
    bad = httpx.get(f"{url}/v1/machines", headers={"Authorization": "Bearer crl_nope"})
    error_of(bad, 401, "unauthorized")
    # 403: a token without the exec scope. A token limited to another sandbox gets 404, as
    # for a missing machine.
    reader = new_token(faces_server, scopes=["read"])
    denied = httpx.post(
        f"{url}/v1/commands",
        headers={"Authorization": f"Bearer {reader}"},
        json={"machine_id": sandbox, "command": "true"},
    )
    error_of(denied, 403, "forbidden")
    elsewhere = new_token(faces_server, scopes=["read", "exec"], sandbox_ids=["sb_other"])
    error_of(
        httpx.get(f"{url}/v1/machines/{sandbox}", headers={"Authorization": f"Bearer {elsewhere}"}),
        404,
        "not_found",
    )
    # 404: no such machine, no such command.
    error_of(
        fapi.post("/v1/commands", json={"machine_id": "sb_nope", "command": "true"}),
        404,
        "not_found",
    )
    error_of(fapi.get("/v1/commands/cmd_nope"), 404, "not_found")
    error_of(fapi.get("/v1/machines/sb_nope/commands"), 404, "not_found")
    # 409: cancelling a finished command; running on a stopped machine.
    done = fapi.post("/v1/commands", json={"machine_id": sandbox, "command": "true"})
    error_of(fapi.delete(f"/v1/commands/{done.json()['data']['id']}"), 409, "conflict")
    stopped = fapi.post("/v1/sandboxes", json={}).json()["id"]
    fapi.post(f"/v1/sandboxes/{stopped}/stop")
    error_of(
        fapi.post("/v1/commands", json={"machine_id": stopped, "command": "true"}),
        409,
        "conflict",
    )
    fapi.delete(f"/v1/sandboxes/{stopped}")
    # 422: a missing field, a bad value, another user; 400: not JSON.
    missing = error_of(fapi.post("/v1/commands", json={"machine_id": sandbox}), 422,
                       "validation_error")  # fmt: skip
    assert missing["details"][0]["loc"] == ["body", "command"]
    error_of(
        fapi.post("/v1/commands", json={"machine_id": sandbox, "command": "x", "timeout": -1}),
        422,
        "validation_error",
    )
    error_of(
        fapi.post("/v1/commands", json={"machine_id": sandbox, "command": "x", "user": "No Body"}),
        422,
        "validation_error",
    )
    raw = fapi.post("/v1/commands", content=b"{nope", headers={"Content-Type": "application/json"})
    error_of(raw, 400, "bad_request")


def test_rate_limit_headers_and_429(limited_faces_server: Server) -> None:
    token = new_token(limited_faces_server, scopes=["read"])
    with httpx.Client(
        base_url=limited_faces_server.url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        first = client.get("/v1/machines")
        assert first.status_code == 200, first.text
        assert first.headers["X-RateLimit-Limit"] == "4"
        assert int(first.headers["X-RateLimit-Remaining"]) == 3
        assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
        statuses = [client.get("/v1/machines") for _ in range(6)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    error_of(limited[0], 429, "rate_limit_exceeded")
    assert limited[0].headers["X-RateLimit-Remaining"] == "0"
    assert int(limited[0].headers["Retry-After"]) >= 1


def test_native_errors_keep_their_shape(faces_server: FacesServer) -> None:
    resp = httpx.get(f"{faces_server.url}/v1/sandboxes")
    assert resp.status_code == 401
    assert set(resp.json()) == {"error", "request_id"}
    assert resp.json()["error"]["code"] == "unauthenticated"
    assert admin_request(faces_server, "GET", "/v1/sandboxes").status_code == 200
