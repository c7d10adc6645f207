"""run-dat-sheesh (seed 002): every curl of the seed as written (host, port, ids and key
substituted), the admin session cookie, the public docs, and errors as `{"message"}`."""

# ruff: noqa: E501  (the seeds' curl commands are kept as the seeds write them)

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.faces.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    FacesServer,
    admin_request,
    curl_json,
    new_token,
    run_curl,
)

pytestmark = pytest.mark.sandbox


def message_of(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"message"} and body["message"], body
    return str(body["message"])


def seed(script: str, server: FacesServer, vm: str = "") -> str:
    """A seed block: `http://localhost:3000` is the server, `dev-key` the admin key."""
    return (
        script.replace("http://localhost:3000", server.url)
        .replace("dev-key", server.admin_key)
        .replace('"<put-id-here>"', f'"{vm}"')
    )


@pytest.fixture
def vm(faces_server: FacesServer, fapi: httpx.Client) -> Iterator[str]:
    """The seed's "Create a VM", with curl."""
    status, body = curl_json(
        seed(
            """curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/json" \\
  -d '{"cpu":1,"memMb":256,"allowIps":["172.16.0.1/32"],"outboundInternet":true}' \\
  http://localhost:3000/v1/vms""",
            faces_server,
        )
    )
    assert status == 201 and isinstance(body, dict)
    assert {"id", "state", "cpu", "memMb", "outboundInternet", "createdAt"} <= set(body)
    assert body["state"] == "RUNNING" and body["cpu"] == 1 and body["memMb"] == 256
    yield body["id"]
    fapi.delete(f"/v1/vms/{body['id']}")


def test_create_vm_network(fapi: httpx.Client, vm: str) -> None:
    got = fapi.get(f"/v1/vms/{vm}").json()
    assert got["outboundInternet"] is True and got["allowIps"] == ["172.16.0.1/32"]
    assert fapi.get(f"/v1/sandboxes/{vm}").json()["network"] == "outbound"
    closed = fapi.post("/v1/vms", json={"cpu": 1, "memMb": 128})
    try:
        assert closed.status_code == 201
        assert closed.json()["outboundInternet"] is False and closed.json()["allowIps"] == []
        assert fapi.get(f"/v1/sandboxes/{closed.json()['id']}").json()["network"] == "none"
    finally:
        fapi.delete(f"/v1/vms/{closed.json()['id']}")
    message_of(fapi.post("/v1/vms", json={"allowIps": ["not-a-cidr"]}), 422)


def test_exec_example(faces_server: FacesServer, vm: str) -> None:
    done = run_curl(
        seed(
            """VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/json" \\
  -d '{"cmd":"id && echo hello","timeoutMs":30000}' \\
  "http://localhost:3000/v1/vms/${VM_ID}/exec\"""",
            faces_server,
            vm,
        )
    )
    body = json.loads(done.stdout)
    assert set(body) == {"exitCode", "stdout", "stderr"}
    assert body["exitCode"] == 0 and body["stderr"] == ""
    assert body["stdout"].startswith("uid=1000") and "gid=1000" in body["stdout"]
    assert body["stdout"].endswith("hello\n")


def test_exec_defaults_timeout_and_limits(fapi: httpx.Client, vm: str) -> None:
    where = fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "pwd; echo $X", "env": {"X": "y"}})
    assert where.json() == {"exitCode": 0, "stdout": "/workspace\ny\n", "stderr": ""}
    timed = fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo a; sleep 30", "timeoutMs": 300})
    body = timed.json()
    assert body["exitCode"] == -1 and body["stdout"] == "a\n"
    assert body["stderr"].endswith("Timeout exceeded")
    message_of(fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "true", "timeoutMs": 120_001}), 400)
    failing = fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "exit 3"})
    assert failing.json()["exitCode"] == 3


def test_vm_lifecycle_and_exec_logs(fapi: httpx.Client, vm: str) -> None:
    assert vm in [v["id"] for v in fapi.get("/v1/vms").json()]
    fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo one"})
    stopped = fapi.post(f"/v1/vms/{vm}/stop").json()
    assert stopped["state"] == "STOPPED"
    message_of(fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "true"}), 409)
    assert fapi.post(f"/v1/vms/{vm}/start").json()["state"] == "RUNNING"
    fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo two"})
    logs = fapi.get(f"/v1/vms/{vm}/exec-logs").json()
    assert [entry["cmd"] for entry in logs][:2] == ["echo two", "echo one"]
    assert {"id", "cmd", "exitCode", "startedAt", "durationMs"} <= set(logs[0])
    assert fapi.delete(f"/v1/vms/{vm}").json()["state"] == "DELETED"


def test_admin_session_cookie(faces_server: FacesServer, vm: str) -> None:
    with httpx.Client(base_url=faces_server.url) as browser:
        message_of(browser.get("/v1/vms"), 401)
        message_of(browser.get("/auth/me"), 401)
        message_of(
            browser.post("/auth/login", json={"email": ADMIN_EMAIL, "password": "wrong"}), 401
        )
        login = browser.post("/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert login.status_code == 200, login.text
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/auth/me").json()["email"] == ADMIN_EMAIL
        assert browser.get(f"/v1/vms/{vm}").json()["id"] == vm
        assert browser.post(f"/v1/vms/{vm}/exec", json={"cmd": "true"}).json()["exitCode"] == 0
        session = browser.cookies["rds_session"]
        assert browser.post("/auth/logout").status_code == 200
        message_of(browser.get("/v1/vms"), 401)
    # The session is revoked on the server, not only forgotten by the browser.
    message_of(httpx.get(f"{faces_server.url}/v1/vms", cookies={"rds_session": session}), 401)


def test_public_docs(faces_server: FacesServer) -> None:
    for path in ("/docs", "/swagger", "/openapi.json", "/docs/static/swagger-ui.css"):
        assert httpx.get(faces_server.url + path).status_code == 200, path
    spec = httpx.get(faces_server.url + "/openapi.json").json()
    tags = {tag for path in spec["paths"].values() for op in path.values() for tag in op["tags"]}
    assert {
        "cmd.io (seed 000)",
        "CMDOP (seed 001)",
        "run-dat-sheesh (seed 002)",
        "Runta (seed 003)",
        "Vercel Sandbox (seed 004)",
    } <= tags


def test_errors(faces_server: FacesServer, fapi: httpx.Client, vm: str) -> None:
    url = faces_server.url
    assert message_of(httpx.get(f"{url}/v1/vms"), 401) == "Unauthorized"
    message_of(httpx.get(f"{url}/v1/vms", headers={"X-API-Key": "crl_nope"}), 401)
    reader = new_token(faces_server, scopes=["read"])
    message_of(
        httpx.post(f"{url}/v1/vms/{vm}/exec", json={"cmd": "true"},
                   headers={"X-API-Key": reader}),
        403,
    )  # fmt: skip
    message_of(fapi.get("/v1/vms/sb_nope"), 404)
    message_of(fapi.post(f"/v1/vms/{vm}/exec", json={}), 422)
    message_of(fapi.post("/v1/vms", json={"memMb": 1}), 422)
    message_of(
        fapi.post(f"/v1/vms/{vm}/exec", content=b"{", headers={"content-type": "application/json"}),
        400,
    )


def test_quota_and_rate_limit_are_429(limited_faces_server: Server) -> None:
    made: list[str] = []
    try:
        for _ in range(3):
            resp = admin_request(limited_faces_server, "POST", "/v1/vms", json={"cpu": 1})
            if resp.status_code != 201:
                message_of(resp, 429)
                break
            made.append(resp.json()["id"])
        else:
            raise AssertionError("the quota of 2 was not enforced")
    finally:
        for vm_id in made:
            admin_request(limited_faces_server, "DELETE", f"/v1/vms/{vm_id}")
    token = new_token(limited_faces_server, scopes=["read"])
    statuses = [
        httpx.get(f"{limited_faces_server.url}/v1/vms", headers={"X-API-Key": token})
        for _ in range(8)
    ]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited
    message_of(limited[0], 429)


# --- run-ts (Deno) ------------------------------------------------------------------------------


def test_run_ts_examples(faces_server: FacesServer, vm: str) -> None:
    plain = run_curl(
        seed(
            """VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/json" \\
  -d '{"code":"console.log(2 + 2)"}' \\
  "http://localhost:3000/v1/vms/${VM_ID}/run-ts\"""",
            faces_server,
            vm,
        )
    )
    body = json.loads(plain.stdout)
    assert body["exitCode"] == 0 and body["stdout"] == "4\n", body

    env = run_curl(
        seed(
            """VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/json" \\
  -d '{
    "env": ["CLICKUP_TOKEN=...","CLICKUP_BASE_URL=https://api.clickup.com/api/v2"],
    "code": "console.log(Deno.env.get(\\"CLICKUP_BASE_URL\\"))"
  }' \\
  "http://localhost:3000/v1/vms/${VM_ID}/run-ts\"""",
            faces_server,
            vm,
        )
    )
    body = json.loads(env.stdout)
    assert body["exitCode"] == 0 and body["stdout"] == "https://api.clickup.com/api/v2\n", body

    result = run_curl(
        seed(
            """VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/json" \\
  -d '{
    "code": "result.set({ ok: true, answer: 42 }); console.log(\\"done\\")"
  }' \\
  "http://localhost:3000/v1/vms/${VM_ID}/run-ts\"""",
            faces_server,
            vm,
        )
    )
    body = json.loads(result.stdout)
    assert body["exitCode"] == 0 and body["stdout"] == "done\n"
    assert body["result"] == {"ok": True, "answer": 42}


def test_run_ts_error_and_env_confinement(fapi: httpx.Client, vm: str) -> None:
    failed = fapi.post(
        f"/v1/vms/{vm}/run-ts", json={"code": "result.error({ reason: 'nope' })"}
    ).json()
    assert failed["exitCode"] != 0
    assert json.loads(failed["error"]["message"]) == {"reason": "nope"}
    thrown = fapi.post(f"/v1/vms/{vm}/run-ts", json={"code": "throw new TypeError('bad')"})
    assert thrown.json()["error"]["name"] == "TypeError"
    hidden = fapi.post(
        f"/v1/vms/{vm}/run-ts",
        json={"env": ["A=1"], "code": "console.log(Deno.env.get('A')); Deno.env.get('HOME')"},
    ).json()
    assert hidden["stdout"] == "1\n" and hidden["exitCode"] != 0  # HOME is not allowed


# --- files (tar.gz) -----------------------------------------------------------------------------


def test_upload_and_download_examples(faces_server: FacesServer, vm: str, tmp_path: Path) -> None:
    make = subprocess.run(
        ["bash", "-c", f"""mkdir -p {tmp_path}/rds-upload
echo "hello run-dat-sheesh" >{tmp_path}/rds-upload/hello.txt
tar -czf {tmp_path}/upload.tar.gz -C {tmp_path}/rds-upload ."""],
        check=True,
    )  # fmt: skip
    assert make.returncode == 0
    upload = run_curl(
        seed(
            """VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -H "content-type: application/gzip" \\
  --data-binary @{TMP}/upload.tar.gz \\
  "http://localhost:3000/v1/vms/${VM_ID}/files/upload?dest=%2Fhome%2Fuser%2Fproject" -w '%{http_code}'""",
            faces_server,
            vm,
        ),
        TMP=str(tmp_path),
    )
    assert upload.stdout.strip().endswith("204"), upload.stdout + upload.stderr
    download = run_curl(
        seed(
            """cd {TMP}; VM_ID="<put-id-here>"
curl -sS \\
  -H "X-API-Key: dev-key" \\
  -o download.tar.gz \\
  "http://localhost:3000/v1/vms/${VM_ID}/files/download?path=%2Fhome%2Fuser%2Fproject"
mkdir -p out
tar -xzf download.tar.gz -C out""",
            faces_server,
            vm,
        ),
        TMP=str(tmp_path),
    )
    assert download.returncode == 0, download.stderr
    found = list((tmp_path / "out").rglob("hello.txt"))
    assert found and found[0].read_text() == "hello run-dat-sheesh\n"
    with tarfile.open(tmp_path / "download.tar.gz") as archive:
        assert any(m.name.endswith("hello.txt") for m in archive.getmembers())


def test_upload_errors(limited_faces_server: Server, tmp_path: Path) -> None:
    made = admin_request(limited_faces_server, "POST", "/v1/vms", json={})
    assert made.status_code == 201, made.text
    vm_id = made.json()["id"]
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 << 20))  # does not compress
        with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as archive:
            archive.add(big, arcname="big.bin")
        resp = admin_request(
            limited_faces_server,
            "POST",
            f"/v1/vms/{vm_id}/files/upload",
            params={"dest": "/workspace"},
            content=(tmp_path / "big.tar.gz").read_bytes(),
            headers={"content-type": "application/gzip"},
        )
        message_of(resp, 413)
        evil = tmp_path / "evil.tar.gz"
        with tarfile.open(evil, "w:gz") as archive:
            info = tarfile.TarInfo("../../escape.txt")
            info.size = 2
            archive.addfile(info, io.BytesIO(b"hi"))
        resp = admin_request(
            limited_faces_server,
            "POST",
            f"/v1/vms/{vm_id}/files/upload",
            params={"dest": "/workspace"},
            content=evil.read_bytes(),
            headers={"content-type": "application/gzip"},
        )
        message_of(resp, 400)
        resp = admin_request(
            limited_faces_server, "GET", f"/v1/vms/{vm_id}/files/download",
            params={"path": "/workspace/nope"},
        )  # fmt: skip
        message_of(resp, 404)
    finally:
        admin_request(limited_faces_server, "DELETE", f"/v1/vms/{vm_id}")
