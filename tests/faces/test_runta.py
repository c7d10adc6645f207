"""Runta runtimes (seed 003): the buffered exec request as the seed writes it (with curl), every
field and `_truncated` flag, the error envelope and codes, the WebSocket exec stream, files."""

# ruff: noqa: E501  (the seeds' curl commands are kept as the seeds write them)

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.conftest import Server
from tests.faces.conftest import FacesServer, admin_request, curl_json, new_token

pytestmark = pytest.mark.sandbox

EXEC_KEYS = {"duration_ms", "exit_code", "stderr", "stderr_truncated", "stdout",
             "stdout_truncated"}  # fmt: skip


def error_of(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "request_id"}, body
    assert body["request_id"] and body["request_id"] == resp.headers["x-request-id"]
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture
def runtime(fapi: httpx.Client) -> Iterator[dict]:
    name = "rt-" + uuid.uuid4().hex[:8]
    resp = fapi.post(
        "/v1/runtimes",
        json={"name": name, "resources": {"requests": {"vcpus": 1, "memory_mib": 512}}},
    )
    assert resp.status_code == 201, resp.text
    yield resp.json()["data"]
    fapi.delete(f"/v1/runtimes/{resp.json()['data']['id']}")


def test_runtime_lifecycle(fapi: httpx.Client) -> None:
    created = fapi.post(
        "/v1/runtimes",
        json={"name": "lifecycle", "resources": {"requests": {"vcpus": 1, "memory_mib": 256,
                                                               "disk_gib": 1}}},
    )  # fmt: skip
    assert created.status_code == 201
    data = created.json()["data"]
    assert data["name"] == "lifecycle" and data["status"] == "running"
    assert data["resources"]["requests"] == {"vcpus": 1.0, "memory_mib": 256, "disk_gib": 1.0}
    listed = fapi.get("/v1/runtimes", params={"limit": 1000}).json()["data"]
    assert data["id"] in [r["id"] for r in listed]
    assert fapi.get("/v1/runtimes/lifecycle").json()["data"]["id"] == data["id"]
    error_of(fapi.post("/v1/runtimes", json={"name": "lifecycle"}), 409, "already_exists")
    assert fapi.delete(f"/v1/runtimes/{data['id']}").json()["data"]["status"] == "deleted"
    error_of(fapi.get("/v1/runtimes/lifecycle"), 404, "not_found")


def test_seed_exec_example_with_curl(faces_server: FacesServer, fapi: httpx.Client) -> None:
    """The seed's curl, as written: runtime `example`, `cwd` "example" (inside /workspace)."""
    created = fapi.post("/v1/runtimes", json={"name": "example"})
    assert created.status_code == 201, created.text
    try:
        fapi.post("/v1/runtimes/example/exec", json={"command": "mkdir example"})
        status, body = curl_json(
            """curl --request POST \\
 --url {URL}/v1/runtimes/example/exec \\
 --header 'Authorization: Bearer {TOKEN}' \\
 --header 'Content-Type: application/json' \\
 --data '{ "args": [], "command": "example", "cwd": "example", "env": { "additionalProperty": "example" }, "max_output_bytes": 1, "stdin": "example", "timeout_secs": 1 }'""",
            URL=faces_server.url, TOKEN=faces_server.admin_key,
        )  # fmt: skip
        assert status == 200 and isinstance(body, dict)
        assert set(body) == {"data"} and EXEC_KEYS <= set(body["data"])
        data = body["data"]
        assert data["exit_code"] == 127  # bash: example: command not found
        assert len(data["stderr"]) == 1 and data["stderr_truncated"] is True
        assert data["stdout"] == "" and data["stdout_truncated"] is False
        assert isinstance(data["duration_ms"], int)
    finally:
        fapi.delete("/v1/runtimes/example")


def test_seed_fetch_example_with_deno(faces_server: FacesServer, fapi: httpx.Client) -> None:
    """The seed's JavaScript example, run by Deno as written (url and token substituted)."""
    from corral.core.coderun import find_deno

    deno = find_deno()
    if deno is None:
        pytest.skip("no deno")
    script = """const url = '{URL}/v1/runtimes/example/exec';const options = { method: 'POST', headers: {Authorization: 'Bearer {TOKEN}', 'Content-Type': 'application/json'}, body: '{"args":[],"command":"example","cwd":"example","env":{"additionalProperty":"example"},"max_output_bytes":1,"stdin":"example","timeout_secs":1}'};
try { const response = await fetch(url, options); const data = await response.json(); console.log(JSON.stringify(data));} catch (error) { console.error(error);}"""
    script = script.replace("{URL}", faces_server.url).replace("{TOKEN}", faces_server.admin_key)
    assert fapi.post("/v1/runtimes", json={"name": "example"}).status_code == 201
    try:
        fapi.post("/v1/runtimes/example/exec", json={"command": "mkdir example"})
        done = subprocess.run(
            [str(deno), "eval", "--quiet", script],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "DENO_NO_UPDATE_CHECK": "1"},
        )  # fmt: skip
        assert done.returncode == 0 and not done.stderr, done.stderr
        data = json.loads(done.stdout)["data"]
        assert EXEC_KEYS <= set(data) and data["stderr_truncated"] is True
    finally:
        fapi.delete("/v1/runtimes/example")


def test_exec_fields(fapi: httpx.Client, runtime: dict) -> None:
    rid = runtime["id"]
    shell = fapi.post(
        f"/v1/runtimes/{rid}/exec",
        json={"command": "cat; echo $A; pwd; echo e >&2", "stdin": "in\n", "env": {"A": "b"},
              "cwd": "/tmp"},
    ).json()["data"]  # fmt: skip
    assert shell["stdout"] == "in\nb\n/tmp\n" and shell["stderr"] == "e\n"
    assert shell["exit_code"] == 0
    program = fapi.post(
        f"/v1/runtimes/{runtime['name']}/exec",
        json={"command": "printf", "args": ["%s|", "a b", "$HOME"]},
    ).json()["data"]
    assert program["stdout"] == "a b|$HOME|"  # no shell: arguments as given
    capped = fapi.post(
        f"/v1/runtimes/{rid}/exec",
        json={"command": "head -c 5000 /dev/zero | tr '\\0' x; head -c 10 /dev/zero >&2",
              "max_output_bytes": 100},
    ).json()["data"]  # fmt: skip
    assert capped["stdout"] == "x" * 100 and capped["stdout_truncated"] is True
    assert len(capped["stderr"]) == 10 and capped["stderr_truncated"] is False
    lossy = fapi.post(f"/v1/runtimes/{rid}/exec", json={"command": "printf 'a\\377b'"}).json()
    assert lossy["data"]["stdout"] == "a\ufffdb"
    timed = fapi.post(
        f"/v1/runtimes/{rid}/exec", json={"command": "echo so-far; sleep 30", "timeout_secs": 0.5}
    ).json()["data"]
    assert timed["stdout"] == "so-far\n" and timed["exit_code"] == 137 and timed["timed_out"]


def test_errors(faces_server: FacesServer, fapi: httpx.Client, runtime: dict) -> None:
    url, rid = faces_server.url, runtime["id"]
    body = {"command": "true"}
    error_of(httpx.post(f"{url}/v1/runtimes/{rid}/exec", json=body), 401, "unauthenticated")
    error_of(
        httpx.post(f"{url}/v1/runtimes/{rid}/exec", json=body,
                   headers={"Authorization": "Bearer crl_wrong"}),
        401, "unauthenticated",
    )  # fmt: skip
    reader = new_token(faces_server, scopes=["read"])
    error_of(
        httpx.post(f"{url}/v1/runtimes/{rid}/exec", json=body,
                   headers={"Authorization": f"Bearer {reader}"}),
        403, "permission_denied",
    )  # fmt: skip
    error_of(fapi.post("/v1/runtimes/nope/exec", json=body), 404, "not_found")
    error_of(fapi.post(f"/v1/runtimes/{rid}/exec", json={"args": []}), 422, "invalid_argument")
    error_of(
        fapi.post(f"/v1/runtimes/{rid}/exec", json={"command": "x", "timeout_secs": -1}),
        422,
        "invalid_argument",
    )
    error_of(
        fapi.post(f"/v1/runtimes/{rid}/exec", json={"command": "no-such", "args": ["x"]}),
        422,
        "invalid_argument",
    )
    error_of(
        fapi.post(
            f"/v1/runtimes/{rid}/exec", content=b"{", headers={"content-type": "application/json"}
        ),
        422,
        "invalid_argument",
    )
    fapi.post(f"/v1/sandboxes/{rid}/stop")
    error_of(fapi.post(f"/v1/runtimes/{rid}/exec", json=body), 409, "failed_precondition")


def test_rate_limit_and_quota(limited_faces_server: Server) -> None:
    token = new_token(limited_faces_server, scopes=["read"])
    with httpx.Client(
        base_url=limited_faces_server.url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        statuses = [client.get("/v1/runtimes") for _ in range(8)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited
    error_of(limited[0], 429, "resource_exhausted")
    # The server's sandbox quota (2) is a 429 too.
    made = []
    try:
        for _ in range(3):
            resp = admin_request(limited_faces_server, "POST", "/v1/runtimes", json={})
            if resp.status_code == 201:
                made.append(resp.json()["data"]["id"])
            else:
                error_of(resp, 429, "resource_exhausted")
                break
        else:
            raise AssertionError("no quota")
    finally:
        for rid in made:
            admin_request(limited_faces_server, "DELETE", f"/v1/runtimes/{rid}")


# --- the WebSocket exec stream ----------------------------------------------------------------


async def _stream(url: str, token: str, frames: list[dict], delay: float = 0.0) -> list[dict]:
    got: list[dict] = []
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        for frame in frames:
            await ws.send(json.dumps(frame))
            if delay:
                await asyncio.sleep(delay)
        async for message in ws:
            got.append(json.loads(message))
        assert ws.close_code == 1000
    return got


def test_exec_stream(faces_server: FacesServer, runtime: dict) -> None:
    url = faces_server.url.replace("http", "ws") + f"/v2/runtimes/{runtime['id']}/exec/stream"
    frames = [
        {"type": "start", "command": "sh", "args": ["-c", "read x; echo got $x; echo e >&2; "
                                                          "cat; exit 5"], "env": {}},
        {"type": "heartbeat"},
        {"type": "stdin", "data_base64": base64.b64encode(b"hello\n").decode()},
        {"type": "stdin", "data_base64": base64.b64encode(b"rest").decode()},
        {"type": "close_stdin"},
    ]  # fmt: skip
    got = asyncio.run(_stream(url, faces_server.admin_key, frames))
    assert {"type": "heartbeat"} in got
    out = b"".join(base64.b64decode(f["data_base64"]) for f in got if f["type"] == "stdout")
    err = b"".join(base64.b64decode(f["data_base64"]) for f in got if f["type"] == "stderr")
    assert out == b"got hello\nrest" and err == b"e\n"
    ends = [f for f in got if f["type"] in ("exit", "error")]
    assert ends == [{"type": "exit", "code": 5}] and got[-1] == ends[0]


def test_exec_stream_on_a_terminal(faces_server: FacesServer, runtime: dict) -> None:
    url = faces_server.url.replace("http", "ws") + f"/v2/runtimes/{runtime['id']}/exec/stream"
    frames = [
        {"type": "start", "command": "sh", "args": ["-c", "stty size; read x; stty size"],
         "tty": True, "rows": 30, "cols": 100},
        {"type": "resize", "rows": 40, "cols": 120},
        {"type": "stdin", "data_base64": base64.b64encode(b"go\n").decode()},
    ]  # fmt: skip
    got = asyncio.run(_stream(url, faces_server.admin_key, frames, delay=0.3))
    out = b"".join(base64.b64decode(f["data_base64"]) for f in got if f["type"] == "stdout")
    assert out.replace(b"\r", b"").split(b"\n") == [b"30 100", b"go", b"40 120", b""]
    assert not [f for f in got if f["type"] == "stderr"]  # one stream on a terminal
    assert got[-1] == {"type": "exit", "code": 0}


def test_exec_stream_signal_and_refusal(faces_server: FacesServer, runtime: dict) -> None:
    url = faces_server.url.replace("http", "ws") + f"/v2/runtimes/{runtime['id']}/exec/stream"
    frames = [
        {"type": "start", "command": "sleep", "args": ["30"]},
        {"type": "signal", "signal": "TERM"},
    ]
    got = asyncio.run(_stream(url, faces_server.admin_key, frames, delay=0.3))
    assert got[-1] == {"type": "exit", "code": 143}

    async def refused() -> int:
        try:
            async with websockets.connect(url):
                return 0
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(refused()) == 401


# --- single files -------------------------------------------------------------------------------


def test_files(fapi: httpx.Client, runtime: dict) -> None:
    rid = runtime["id"]
    put = fapi.put(
        f"/v1/runtimes/{rid}/files", params={"path": "/workspace/notes/a.txt"}, content=b"hi\x00"
    )
    assert put.status_code in (200, 201, 204), put.text
    got = fapi.get(f"/v1/runtimes/{rid}/files", params={"path": "/workspace/notes/a.txt"})
    assert got.status_code == 200 and got.content == b"hi\x00"
    seen = fapi.post(f"/v1/runtimes/{rid}/exec", json={"command": "cat notes/a.txt | od -c"})
    assert "h   i  \\0" in seen.json()["data"]["stdout"]
    error_of(
        fapi.get(f"/v1/runtimes/{rid}/files", params={"path": "/workspace/none"}),
        404,
        "not_found",
    )


# --- what the production API and its CLI call: /v2, revisions, pages ------------------------------


def test_v2_runtimes_with_display_names_and_revisions(fapi: httpx.Client) -> None:
    name = "v2-" + uuid.uuid4().hex[:8]
    created = fapi.post("/v2/runtimes", json={"display_name": name})
    assert created.status_code == 201, created.text
    data = created.json()["data"]
    assert data["display_name"] == name and isinstance(data["revision"], int)
    rid, revision = data["id"], data["revision"]
    try:
        assert fapi.get(f"/v2/runtimes/{name}").json()["data"]["id"] == rid
        ran = fapi.post(f"/v2/runtimes/{name}/exec", json={"command": "echo v2"})
        assert ran.json()["data"]["stdout"] == "v2\n"
        assert fapi.get(f"/v2/runtimes/{rid}").json()["data"]["revision"] == revision  # unchanged
        stale = revision - 1
        error_of(fapi.post(f"/v2/runtimes/{rid}/stop", json={"expected_revision": stale}), 409,
                 "failed_precondition")  # fmt: skip
        assert fapi.get(f"/v2/runtimes/{rid}").json()["data"]["status"] == "running"
        stopped = fapi.post(f"/v2/runtimes/{rid}/stop", json={"expected_revision": revision})
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["data"]["status"] == "stopped"
        after_stop = stopped.json()["data"]["revision"]
        assert after_stop > revision
        started = fapi.post(f"/v1/runtimes/{rid}/start")  # no body: no revision expected
        assert started.json()["data"]["status"] == "running"
        current = started.json()["data"]["revision"]
        assert current > after_stop
        error_of(fapi.delete(f"/v2/runtimes/{rid}", params={"expected_revision": after_stop}),
                 409, "failed_precondition")  # fmt: skip
        error_of(fapi.post(f"/v2/runtimes/{rid}/stop", content=b"{",
                           headers={"content-type": "application/json"}),
                 422, "invalid_argument")  # fmt: skip
        deleted = fapi.delete(f"/v2/runtimes/{rid}", params={"expected_revision": current})
        assert deleted.status_code == 200 and deleted.json()["data"]["status"] == "deleted"
    finally:
        fapi.delete(f"/v1/runtimes/{rid}")
    error_of(fapi.get(f"/v2/runtimes/{name}"), 404, "not_found")


def test_list_is_paged(fapi: httpx.Client) -> None:
    made = [fapi.post("/v1/runtimes", json={}).json()["data"]["id"] for _ in range(3)]
    try:
        for version in ("v1", "v2"):
            first = fapi.get(f"/{version}/runtimes", params={"limit": 2}).json()
            assert len(first["data"]) == 2
            assert first["pagination"]["has_more"] is True and first["pagination"]["next_cursor"]
            seen, cursor, pages = [r["id"] for r in first["data"]], first["pagination"], 1
            while cursor["has_more"]:
                page = fapi.get(f"/{version}/runtimes",
                                params={"limit": 2, "cursor": cursor["next_cursor"]}).json()  # fmt: skip
                assert len(page["data"]) <= 2
                seen += [r["id"] for r in page["data"]]
                cursor, pages = page["pagination"], pages + 1
            assert cursor == {"next_cursor": None, "has_more": False}
            assert set(made) <= set(seen) and len(seen) == len(set(seen)) and pages >= 2
        error_of(fapi.get("/v1/runtimes", params={"cursor": "nope"}), 422, "invalid_argument")
        error_of(fapi.get("/v1/runtimes", params={"limit": 0}), 422, "invalid_argument")
    finally:
        for rid in made:
            fapi.delete(f"/v1/runtimes/{rid}")


def test_a_tty_stream_is_a_terminal(faces_server: FacesServer, runtime: dict) -> None:
    url = faces_server.url.replace("http", "ws") + f"/v2/runtimes/{runtime['id']}/exec/stream"
    frames = [{"type": "start", "command": "tty; test -t 0 && test -t 1 && echo both",
               "tty": True}]  # fmt: skip
    got = asyncio.run(_stream(url, faces_server.admin_key, frames))
    out = b"".join(base64.b64decode(f["data_base64"]) for f in got if f["type"] == "stdout")
    lines = out.replace(b"\r", b"").split(b"\n")
    assert lines[0].startswith(b"/dev/pts/") and lines[1] == b"both", out
    assert got[-1] == {"type": "exit", "code": 0}
