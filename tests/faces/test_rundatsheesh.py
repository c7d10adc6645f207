"""run-dat-sheesh (seed 002): every curl of the seed as written (host, port, ids and key
substituted), the admin session cookie, the public docs, and errors as `{"message"}`."""

# ruff: noqa: E501  (the seeds' curl commands are kept as the seeds write them)

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import tempfile
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
    # start, stop and delete answer 204 with no body, as run-dat-sheesh's do.
    stopped = fapi.post(f"/v1/vms/{vm}/stop")
    assert stopped.status_code == 204 and stopped.content == b""
    assert fapi.get(f"/v1/vms/{vm}").json()["state"] == "STOPPED"
    message_of(fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "true"}), 409)
    started = fapi.post(f"/v1/vms/{vm}/start")
    assert started.status_code == 204 and started.content == b""
    assert fapi.get(f"/v1/vms/{vm}").json()["state"] == "RUNNING"
    fapi.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo two"})
    logs = fapi.get(f"/v1/vms/{vm}/exec-logs").json()
    assert [entry["cmd"] for entry in logs][:2] == ["echo two", "echo one"]
    assert {"id", "cmd", "exitCode", "startedAt", "durationMs"} <= set(logs[0])
    deleted = fapi.delete(f"/v1/vms/{vm}")
    assert deleted.status_code == 204 and deleted.content == b""
    message_of(fapi.get(f"/v1/vms/{vm}"), 404)


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
        assert httpx.get(faces_server.url + path, timeout=60).status_code == 200, path
    spec = httpx.get(faces_server.url + "/openapi.json", timeout=60).json()
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
    assert failed["error"] == {"reason": "nope"}
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


# --- what run-dat-sheesh's own clients call beyond the seed -------------------------------------


@pytest.fixture
def rds(faces_server: FacesServer) -> Iterator[httpx.Client]:
    """A client as run-dat-sheesh's own are: the key in `X-API-Key`."""
    with httpx.Client(
        base_url=faces_server.url, headers={"X-API-Key": faces_server.admin_key}, timeout=60
    ) as client:
        yield client


def test_run_js_and_the_value_of_result_error(rds: httpx.Client, vm: str) -> None:
    js = rds.post(
        f"/v1/vms/{vm}/run-js",
        json={"code": "console.log(typeof process, process.env.A); result.set({ sum: 1 + 2 })",
              "env": ["A=b"]},
    )  # fmt: skip
    assert js.status_code == 200, js.text
    assert js.json() == {"exitCode": 0, "stdout": "object b\n", "stderr": "", "result": {"sum": 3}}
    failed = rds.post(
        f"/v1/vms/{vm}/run-ts", json={"code": "result.error({ code: 'E_BAD', detail: 'no' })"}
    ).json()
    assert failed["exitCode"] == 1 and failed["error"] == {"code": "E_BAD", "detail": "no"}
    thrown = rds.post(f"/v1/vms/{vm}/run-js", json={"code": "throw new RangeError('r')"}).json()
    assert thrown["exitCode"] == 1 and thrown["error"]["name"] == "RangeError"
    assert thrown["error"]["message"] == "r"


def test_deno_reads_resolv_conf_and_writes_its_temp_dir(rds: httpx.Client, vm: str) -> None:
    code = """
    import os from "node:os";
    const resolv = Deno.readTextFileSync("/etc/resolv.conf");
    const dir = os.tmpdir();
    Deno.writeTextFileSync(`${dir}/scratch.txt`, "x");
    const made = Deno.makeTempDirSync();
    result.set({ resolv: typeof resolv, dir, tmpdir: Deno.env.get("TMPDIR"),
                 made: made.startsWith("/tmp/") });
    """
    out = rds.post(f"/v1/vms/{vm}/run-ts", json={"code": code}).json()
    assert out["exitCode"] == 0, out
    assert out["result"] == {"resolv": "string", "dir": "/tmp", "tmpdir": "/tmp", "made": True}
    # The rest of /etc stays closed.
    closed = rds.post(f"/v1/vms/{vm}/run-ts", json={"code": "Deno.readTextFileSync('/etc/passwd')"})
    assert closed.json()["error"]["name"] == "NotCapable"


def test_images_and_snapshots(faces_server: FacesServer, rds: httpx.Client, vm: str) -> None:
    url = faces_server.url
    for path in ("/v1/images", "/v1/snapshots"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"X-API-Key": "crl_nope"}).status_code == 401
        assert isinstance(rds.get(path).json(), list), path
    # The native routes of the same paths keep their own shape.
    native = httpx.get(
        url + "/v1/snapshots", headers={"Authorization": f"Bearer {rds.headers['x-api-key']}"}
    )
    assert set(native.json()) == {"items", "next_cursor"}
    assert rds.get(f"/v1/vms/{vm}").json()["provisionMode"] == "boot"
    rds.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo kept > /workspace/mark"})
    taken = rds.post(f"/v1/vms/{vm}/snapshots")
    assert taken.status_code == 201, taken.text
    snap = taken.json()
    assert snap["id"] and snap["vmId"] == vm and snap["createdAt"]
    assert snap["cpu"] == 1 and snap["memMb"] == 256
    assert snap["id"] in [s["id"] for s in rds.get("/v1/snapshots").json()]
    made = rds.post(
        "/v1/vms",
        json={"cpu": 1, "memMb": 256, "allowIps": ["172.16.0.1/32"], "snapshotId": snap["id"]},
    )
    assert made.status_code == 201, made.text
    new = made.json()
    try:
        assert new["provisionMode"] == "snapshot" and new["state"] == "RUNNING"
        assert "guestIp" in new
        seen = rds.post(f"/v1/vms/{new['id']}/exec", json={"cmd": "cat /workspace/mark"}).json()
        assert seen["stdout"] == "kept\n"
        message_of(rds.delete(f"/v1/snapshots/{snap['id']}"), 409)  # a VM runs from it
    finally:
        rds.delete(f"/v1/vms/{new['id']}")
    assert rds.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
    message_of(rds.post("/v1/vms", json={"snapshotId": "snap_none"}), 404)
    message_of(rds.get("/v1/images/sha256:" + "0" * 64), 404)


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_upload_is_gzip_within_the_originals_limit(rds: httpx.Client, vm: str) -> None:
    """The server's own limit is far above run-dat-sheesh's: the face's own applies."""
    upload = f"/v1/vms/{vm}/files/upload"
    gzip_type = {"content-type": "application/gzip"}
    plain = _tar({"plain.txt": b"not compressed"})
    message_of(
        rds.post(upload, params={"dest": "/workspace"}, content=plain, headers=gzip_type), 400
    )
    noise = os.urandom(1000)
    message_of(
        rds.post(upload, params={"dest": "/workspace"}, content=noise, headers=gzip_type), 400
    )
    whole = gzip.compress(_tar({"a.txt": os.urandom(4000)}))
    cut = whole[: len(whole) // 2]
    message_of(rds.post(upload, params={"dest": "/workspace"}, content=cut, headers=gzip_type), 400)
    big = gzip.compress(_tar({"big.bin": os.urandom(11 << 20)}), compresslevel=1)
    message_of(rds.post(upload, params={"dest": "/workspace"}, content=big, headers=gzip_type), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    message_of(
        rds.post(upload, params={"dest": "/workspace"}, content=chunks(), headers=gzip_type), 413
    )
    bomb = gzip.compress(_tar({"zeros.bin": bytes(60 << 20)}))  # 60 MiB of zeros, ~60 KiB
    message_of(
        rds.post(upload, params={"dest": "/workspace"}, content=bomb, headers=gzip_type), 413
    )
    fine = gzip.compress(_tar({"ok.txt": b"fine"}))
    assert (
        rds.post(upload, params={"dest": "/workspace"}, content=fine, headers=gzip_type).status_code
        == 204
    )
    assert rds.post(f"/v1/vms/{vm}/exec", json={"cmd": "cat ok.txt"}).json()["stdout"] == "fine"


# A test host in a network namespace of this machine, as tests/integration/test_network.py makes
# them (its own /24 per process), serving HTTP on <net>.2:8080.
_NET = f"10.{100 + os.getpid() % 100}.3"
_TAG = f"{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def test_host() -> Iterator[str]:
    from tests.integration.test_network import start_host_server

    ns, veth = f"corral-rds-{_TAG}", f"crlrds{_TAG}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"{_NET}.1/24", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "addr", "add", f"{_NET}.2/24", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    subprocess.run(["ip", "link", "delete", veth], capture_output=True)
    log = tempfile.TemporaryFile()
    server = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        server = start_host_server(ns, f"{_NET}.2", log)
        yield f"{_NET}.2"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        log.close()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)


def test_allow_listed_destination_is_reachable(rds: httpx.Client, test_host: str) -> None:
    probe = f"curl -s -m 2 http://{test_host}:8080/"
    fetch = f"console.log(await (await fetch('http://{test_host}:8080/')).text())"
    made = []
    try:
        for body in ({"cpu": 1, "memMb": 256, "allowIps": [f"{test_host}/32"]},
                     {"cpu": 1, "memMb": 256, "allowIps": [f"{test_host}/32"],
                      "outboundInternet": True}):  # fmt: skip
            created = rds.post("/v1/vms", json=body)
            assert created.status_code == 201, created.text
            made.append(created.json()["id"])
            vm = made[-1]
            ran = rds.post(f"/v1/vms/{vm}/exec", json={"cmd": probe}).json()
            assert ran["stdout"] == "ok", (body, ran)
            ts = rds.post(f"/v1/vms/{vm}/run-ts", json={"code": fetch}).json()
            assert ts["stdout"] == "ok\n", (body, ts)
        # Not listed: a private address stays closed, even with outbound internet.
        closed = rds.post("/v1/vms", json={"allowIps": [], "outboundInternet": True})
        made.append(closed.json()["id"])
        ran = rds.post(f"/v1/vms/{made[-1]}/exec", json={"cmd": probe}).json()
        assert ran["exitCode"] != 0 and ran["stdout"] == ""
    finally:
        for vm in made:
            rds.delete(f"/v1/vms/{vm}")


def test_images_and_a_vm_from_one(rds: httpx.Client, fapi: httpx.Client, tmp_path: Path) -> None:
    from tests.host_image import shell_layer
    from tests.oci_images import BuiltImage, layer_tar

    built = BuiltImage([shell_layer(), layer_tar({"etc/rds-image": b"from the image\n"})])
    archive = built.oci_archive(tmp_path / "image.tar").read_bytes()
    imported = fapi.post("/v1/images/import", params={"reference": "rds/test:1"}, content=archive)
    assert imported.status_code == 201, imported.text
    image_id = imported.json()["id"]
    listed = rds.get("/v1/images").json()
    assert {"id": image_id, "name": "rds/test:1"}.items() <= next(
        i for i in listed if i["id"] == image_id
    ).items()
    made = rds.post(
        "/v1/vms", json={"cpu": 1, "memMb": 256, "allowIps": [], "imageId": "rds/test:1"}
    )
    assert made.status_code == 201, made.text
    vm = made.json()
    try:
        assert vm["imageId"] == image_id and vm["provisionMode"] == "boot"
        seen = rds.post(f"/v1/vms/{vm['id']}/exec", json={"cmd": "echo $(</etc/rds-image)"}).json()
        assert seen["stdout"] == "from the image\n", seen
        message_of(rds.delete(f"/v1/images/{image_id}"), 409)  # a VM runs on it
    finally:
        rds.delete(f"/v1/vms/{vm['id']}")
    assert rds.delete(f"/v1/images/{image_id}").status_code == 204
    message_of(rds.get(f"/v1/images/{image_id}"), 404)
