"""Bad input gets a 4xx in the error shape of the API it was sent to, never a 500: numbers past
what their type can hold, NaN and infinity, disks too small for a file system, paths nested
thousands deep, devices read as files, file operations whose sandbox stops under them, and the
body limit met before a face's route runs. The OpenAPI document lists those errors, in each
face's shape.

One server for the module, with one running sandbox shared by the read-only cases.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from corral.core.models import MIN_DISK_MB
from corral.runtime.namespaces import ETC_FILES, HOST_ETC
from tests.conftest import Server
from tests.security.helpers import dedicated_server

pytestmark = pytest.mark.sandbox

JSON = {"content-type": "application/json"}


# --- each API's error shape -----------------------------------------------------------------------


def native_shape(body: Any) -> None:
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["request_id"].startswith("req_")


def runta_shape(body: Any) -> None:
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message"}, body


def vercel_shape(body: Any) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body


def cmdop_shape(body: Any) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body


def rds_shape(body: Any) -> None:
    assert set(body) == {"message"}, body


SHAPES: dict[str, Callable[[Any], None]] = {
    "native": native_shape,
    "runta": runta_shape,
    "vercel": vercel_shape,
    "cmdop": cmdop_shape,
    "rds": rds_shape,
}


def message(body: Any) -> str:
    return str(body["message"] if "message" in body else body["error"]["message"])


def refused(resp: httpx.Response, face: str, status: int) -> str:
    """Asserts a refusal in `face`'s shape with `status`; its message."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    SHAPES[face](body)
    return message(body)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with dedicated_server("corral-test-input-") as server:
        yield server


@pytest.fixture(scope="module")
def api(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def sid(api: httpx.Client) -> str:
    resp = api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def no_host_path(srv: Server, text: str) -> None:
    assert str(srv.data_dir) not in text


# --- numbers past their type, NaN and infinity ----------------------------------------------------

# (face, method, path, JSON text of the body or None, query parameters, status). Bodies are JSON
# text so that NaN and Infinity literals (which Python's JSON parser accepts) can be sent.
BIG = [
    ("native", "POST", "/v1/sandboxes", '{"ttl_seconds": 1355808266842184448}', None, 422),
    ("native", "POST", "/v1/tokens", '{"expires_in_seconds": 72057594037927936}', None, 422),
    ("runta", "POST", "/v1/runtimes", '{"resources": {"requests": {"disk_gib": 1.5e308}}}',
     None, 422),
    ("runta", "POST", "/v1/runtimes/{sid}/exec", '{"command": "true", "timeout_secs": 1e308}',
     None, 422),
    ("vercel", "POST", "/v2/sandboxes", '{"timeout": 1000000000000000000000000000000}', None,
     400),
    ("cmdop", "GET", "/v1/machines/{sid}/commands", None,
     {"offset": "1000000000000000000000000000000"}, 422),
    ("cmdop", "GET", "/v1/machines", None, {"offset": "1000000000000000000000000000000"}, 422),
    ("cmdop", "GET", "/v1/machines", None, {"offset": str(2**63 - 1)}, 422),  # + LIMIT overflows
    ("cmdop", "GET", "/v1/machines/{sid}/commands", None,
     {"since": "0001-01-01T00:00:00+14:00"}, 422),
    ("native", "GET", "/v1/sandboxes/{sid}/commands", None,
     {"since": "9999-12-31T23:59:59-14:00"}, 422),
]  # fmt: skip
NOT_FINITE = [
    ("runta", "POST", "/v1/runtimes", '{"resources": {"requests": {"disk_gib": Infinity}}}',
     None, 422),
    ("runta", "POST", "/v1/runtimes/{sid}/exec", '{"command": "true", "timeout_secs": Infinity}',
     None, 422),
    ("runta", "POST", "/v1/runtimes/{sid}/exec", '{"command": "true", "timeout_secs": 1e999}',
     None, 422),
]  # fmt: skip


@pytest.mark.parametrize(
    ("face", "method", "path", "body", "params", "status"),
    BIG + NOT_FINITE,
    ids=[f"{c[0]}-{c[2]}-{c[3] or c[4]}"[:90] for c in BIG + NOT_FINITE],
)
def test_numbers_past_their_type_and_not_finite_are_refused(
    srv: Server,
    api: httpx.Client,
    sid: str,
    face: str,
    method: str,
    path: str,
    body: str | None,
    params: dict[str, str] | None,
    status: int,
) -> None:
    resp = api.request(
        method,
        path.replace("{sid}", sid),
        content=body.replace("{sid}", sid) if body is not None else None,
        headers=JSON if body is not None else None,
        params=params,
    )
    text = refused(resp, face, status)
    assert any(word in text for word in ("less than", "finite", "out of range")), text
    no_host_path(srv, text)


# --- disks too small for a file system ------------------------------------------------------------


def test_min_disk_holds_the_sandbox_layout() -> None:
    # One inode per 64 KiB (16 per MiB), 11 reserved by ext4; the layout: /tmp, /usr/local,
    # /workspace, /etc and its generated files and links to the host's entries.
    layout = 4 + len(ETC_FILES) + len(set(HOST_ETC))
    assert 11 + layout <= MIN_DISK_MB * 16
    assert 11 + layout > (MIN_DISK_MB - 1) * 16  # the minimum, not a guess above it


@pytest.mark.parametrize(
    ("face", "path", "body"),
    [
        ("native", "/v1/sandboxes", {"disk_mb": 1}),
        ("native", "/v1/sandboxes", {"disk_mb": MIN_DISK_MB - 1}),
        ("runta", "/v1/runtimes", {"resources": {"requests": {"disk_gib": 5e-324}}}),
        ("runta", "/v1/runtimes", {"resources": {"requests": {"disk_gib": 0.001}}}),
        ("rds", "/v1/vms", {"diskSizeMb": 1}),
    ],
)
def test_a_disk_too_small_is_refused_at_create_naming_the_minimum(
    srv: Server, api: httpx.Client, face: str, path: str, body: dict[str, Any]
) -> None:
    text = refused(api.post(path, json=body), face, 422)
    minimum = str(MIN_DISK_MB) if face != "runta" else str(MIN_DISK_MB / 1024)
    assert minimum in text, text
    no_host_path(srv, text)


def test_the_smallest_disk_starts_and_takes_files(api: httpx.Client) -> None:
    resp = api.post("/v1/sandboxes", json={"disk_mb": MIN_DISK_MB})
    assert resp.status_code == 201, resp.text
    sandbox = resp.json()
    try:
        assert sandbox["state"] == "running" and sandbox["disk_mb"] == MIN_DISK_MB
        done = api.post(
            f"/v1/sandboxes/{sandbox['id']}/exec",
            json={"command": "echo ok > /workspace/f && cat /workspace/f"},
        ).json()
        assert (done["exit_code"], done["stdout"]) == (0, "ok\n"), done
        put = api.put(f"/v1/sandboxes/{sandbox['id']}/files", params={"path": "g"}, content=b"data")
        assert put.status_code == 200, put.text
    finally:
        api.delete(f"/v1/sandboxes/{sandbox['id']}")


# --- deep paths and devices through the file API --------------------------------------------------

DEEP = "/workspace/" + "d/" * 3000 + "f"


def test_a_path_of_3000_directories_is_refused(srv: Server, api: httpx.Client, sid: str) -> None:
    put = api.put(f"/v1/sandboxes/{sid}/files", params={"path": DEEP}, content=b"x")
    assert "4095" in refused(put, "native", 422)
    mkdir = api.post(f"/v1/sandboxes/{sid}/files/mkdir", json={"path": DEEP})
    assert "4095" in refused(mkdir, "native", 422)
    runta = api.put(f"/v1/runtimes/{sid}/files", params={"path": DEEP}, content=b"x")
    refused(runta, "runta", 422)
    rds = api.post(
        f"/v1/vms/{sid}/files/upload", params={"dest": DEEP}, content=b"", headers={
            "content-type": "application/gzip"
        }
    )  # fmt: skip
    refused(rds, "rds", 422)


def test_a_deep_path_within_path_max_is_created(api: httpx.Client, sid: str) -> None:
    deep = "deep/" + "d/" * 2000 + "f"  # 2,000 levels: more than Python's recursion limit
    put = api.put(f"/v1/sandboxes/{sid}/files", params={"path": deep}, content=b"x")
    assert put.status_code == 200, put.text[:500]
    assert put.json()["path"] == "/workspace/" + deep
    mkdir = api.post(f"/v1/sandboxes/{sid}/files/mkdir", json={"path": "deeper/" + "e/" * 2000})
    assert mkdir.status_code == 200, mkdir.text[:500]
    assert mkdir.json()["type"] == "directory"


def test_a_path_longer_than_path_max_inside_the_sandbox_is_refused(
    api: httpx.Client, sid: str
) -> None:
    # Under the API's 4095 characters, over the kernel's 4095 bytes once under /workspace.
    long = "l/" * 2045
    put = api.put(f"/v1/sandboxes/{sid}/files", params={"path": long}, content=b"x")
    assert put.status_code == 400, put.text[:500]
    native_shape(put.json())
    assert put.json()["error"]["code"] == "invalid_path"


def test_reading_a_device_is_refused(api: httpx.Client, sid: str) -> None:
    for device in ("/dev/tty", "/dev/zero", "/dev/null"):
        native = api.get(f"/v1/sandboxes/{sid}/files", params={"path": device})
        assert "not a regular file" in refused(native, "native", 400)
        assert native.json()["error"]["code"] == "not_a_file"
        runta = api.get(f"/v1/runtimes/{sid}/files", params={"path": device})
        assert "not a regular file" in refused(runta, "runta", 422)


# --- a file operation whose sandbox stops under it ------------------------------------------------


def upload_while(
    srv: Server, url: str, params: dict[str, str], action: Callable[[], None]
) -> httpx.Response:
    """PUT a body whose first part is sent, then `action` runs (the helper is writing), then
    the body ends."""
    acted = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"x" * 65536
        time.sleep(1)  # the server has started the file helper and fed it the first part
        action()
        acted.set()
        yield b"y" * 65536

    with httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {srv.admin_key}"}, timeout=60
    ) as client:
        resp = client.put(url, params=params, content=body())
    assert acted.is_set()
    return resp


@pytest.mark.parametrize("how", ["stop", "delete"])
def test_a_file_operation_whose_sandbox_stops_answers_409_with_the_reason(
    srv: Server, api: httpx.Client, how: str
) -> None:
    target = api.post("/v1/sandboxes", json={}).json()["id"]
    try:

        def end() -> None:
            resp = (
                api.post(f"/v1/sandboxes/{target}/stop")
                if how == "stop"
                else api.delete(f"/v1/sandboxes/{target}")
            )
            assert resp.status_code == 200, resp.text

        resp = upload_while(srv, f"/v1/sandboxes/{target}/files", {"path": "big"}, end)
        text = refused(resp, "native", 409)
        assert "stopped during the file operation" in text, text
        assert resp.json()["error"]["code"] == "sandbox_not_running"
    finally:
        api.delete(f"/v1/sandboxes/{target}")


def test_a_runta_file_write_whose_runtime_stops_answers_in_runta_shape(
    srv: Server, api: httpx.Client
) -> None:
    target = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        resp = upload_while(
            srv,
            f"/v1/runtimes/{target}/files",
            {"path": "big"},
            lambda: api.post(f"/v1/sandboxes/{target}/stop").raise_for_status(),
        )
        assert "stopped during the file operation" in refused(resp, "runta", 409)
        assert resp.json()["error"]["code"] == "failed_precondition"
    finally:
        api.delete(f"/v1/sandboxes/{target}")


# --- errors met before a face's route runs --------------------------------------------------------

TOO_BIG = b"x" * (10 * 1024 * 1024 + 1)


@pytest.mark.parametrize(
    ("face", "path"),
    [
        ("native", "/v1/sandboxes"),
        ("runta", "/v1/runtimes"),
        ("vercel", "/v2/sandboxes"),
        ("cmdop", "/v1/commands"),
        ("rds", "/v1/vms"),
    ],
)
def test_the_body_limit_answers_in_the_face_shape(api: httpx.Client, face: str, path: str) -> None:
    resp = api.post(path, content=TOO_BIG, headers=JSON)
    assert "exceeds" in refused(resp, face, 413)


def test_the_body_limit_answers_cmdio_in_plain_text(api: httpx.Client) -> None:
    resp = api.post("/run/someone/something", content=TOO_BIG)
    assert resp.status_code == 413
    assert resp.headers["content-type"].startswith("text/plain")
    assert "exceeds" in resp.text


@pytest.mark.parametrize(
    ("face", "method", "path"),
    [
        ("runta", "DELETE", "/v1/runtimes/{sid}/exec"),
        ("vercel", "DELETE", "/v2/sandboxes/{sid}/stop"),
        ("cmdop", "PUT", "/v1/commands/batch"),
        ("rds", "PUT", "/v1/vms/{sid}/exec"),
    ],
)
def test_a_method_the_route_does_not_take_answers_in_the_face_shape(
    api: httpx.Client, sid: str, face: str, method: str, path: str
) -> None:
    refused(api.request(method, path.replace("{sid}", sid)), face, 405)


# --- the OpenAPI document -------------------------------------------------------------------------

ERROR_MODELS = {
    "Runta (seed 003)": "RuntaError",
    "Vercel Sandbox (seed 004)": "VercelError",
    "CMDOP (seed 001)": "CmdopError",
    "run-dat-sheesh (seed 002)": "RdsError",
    "E2B (control API)": "E2BError",
    "E2B (in-sandbox daemon)": "EnvdError",
}


def test_every_operation_documents_its_errors_in_its_face_shape(api: httpx.Client) -> None:
    document = api.get("/openapi.json").json()
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                continue
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            for status in ("401", "404", "409", "413", "429", "503"):
                assert status in responses, (where, status, sorted(responses))
            assert "422" in responses or "400" in responses, where
            tag = operation["tags"][0]
            if path.startswith("/run/"):
                wanted = {"text/plain": {"schema": {"type": "string"}}}
                assert responses["401"]["content"] == wanted, where
                native = responses["414"]["content"]["application/json"]["schema"]["$ref"]
                assert native == "#/components/schemas/ErrorResponse", where
                continue
            model = ERROR_MODELS.get(tag, "ErrorResponse")
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    # The HTTP server refuses an over-long target or head before any route (or
                    # face) is known: those two are in the native shape everywhere.
                    shape = "ErrorResponse" if status in ("414", "431") else model
                    assert ref == f"#/components/schemas/{shape}", (where, status, ref)
            checked += 1
    assert checked > 70
    assert "HTTPValidationError" not in json.dumps(document)
    schemas = document["components"]["schemas"]
    assert set(schemas["RuntaError"]["properties"]) == {"error", "request_id"}
    assert set(schemas["VercelError"]["properties"]) == {"error"}
    assert set(schemas["RdsError"]["properties"]) == {"message"}
    # Bounds are documented where numbers are taken.
    create = schemas["SandboxCreate"]["properties"]
    assert create["disk_mb"]["anyOf"][0]["minimum"] == MIN_DISK_MB
    assert create["ttl_seconds"]["anyOf"][0]["maximum"] < 2**40
