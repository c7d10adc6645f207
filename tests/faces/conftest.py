"""Fixtures for the faces: one server with the SSH front and the run-dat-sheesh admin login, and
one with low limits for the 429 cases. The seeds' curl commands run with the real curl."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, make_data_dir

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "correct horse battery staple"


class FacesServer(Server):
    ssh_port: int


@pytest.fixture(scope="session")
def faces_server() -> Iterator[FacesServer]:
    data_dir = make_data_dir("corral-test-faces-")
    ssh_port = free_port()
    srv = FacesServer(
        data_dir,
        env={
            "CORRAL_SSH_PORT": str(ssh_port),
            "CORRAL_ADMIN_EMAIL": ADMIN_EMAIL,
            "CORRAL_ADMIN_PASSWORD": ADMIN_PASSWORD,
        },
    )
    srv.ssh_port = ssh_port
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def limited_faces_server() -> Iterator[Server]:
    """A per-token rate limit of 1 request/s with a burst of 4, at most 2 sandboxes, and
    uploads of at most 1 MiB."""
    data_dir = make_data_dir("corral-test-faces-limited-")
    srv = Server(
        data_dir,
        env={
            "CORRAL_RATE_LIMIT_PER_SECOND": "1",
            "CORRAL_RATE_LIMIT_BURST": "4",
            "CORRAL_MAX_SANDBOXES": "2",
            "CORRAL_MAX_UPLOAD_BYTES": str(1 << 20),
        },
    )
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def fapi(faces_server: FacesServer) -> Iterator[httpx.Client]:
    with faces_server.client() as client:
        yield client


@pytest.fixture
def sandbox(fapi: httpx.Client) -> Iterator[str]:
    resp = fapi.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    yield sid
    fapi.delete(f"/v1/sandboxes/{sid}")


def admin_request(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    """An admin request that waits out the limited server's rate limit."""
    with server.client() as client:
        for _ in range(20):
            resp = client.request(method, path, **kwargs)  # type: ignore[arg-type]
            if resp.status_code != 429 or "too many requests" not in resp.text:
                return resp  # (a quota's 429 is an answer, not a reason to wait)
            time.sleep(float(resp.headers.get("retry-after", "1")))
    raise AssertionError("still rate limited")


def new_token(server: Server, **body: object) -> str:
    resp = admin_request(server, "POST", "/v1/tokens", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["secret"])


def run_curl(script: str, **subs: str) -> subprocess.CompletedProcess[str]:
    """Run a seed's curl command as written, with `{NAME}` placeholders substituted (host,
    port, ids and keys only). Ends with the HTTP status on its own line when `-w` is absent."""
    for key, value in subs.items():
        script = script.replace("{" + key + "}", value)
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


def curl_json(script: str, **subs: str) -> tuple[int, object]:
    """A curl command with `-w '\\n%{http_code}'` appended: (status, parsed JSON body)."""
    import json

    done = run_curl(script + " -w '\\n%{http_code}'", **subs)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",
    "-o", "ConnectTimeout=10",
]  # fmt: skip


def ssh(
    port: int,
    user: str,
    *command: str,
    key: Path | None = None,
    tty: bool = False,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The system ssh client. Without a key only the "none" method is tried."""
    argv = ["ssh", *SSH_OPTIONS, "-p", str(port)]
    if key is not None:
        argv += ["-i", str(key)]
    else:
        argv += ["-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=no",
                 "-o", "KbdInteractiveAuthentication=no", "-F", "/dev/null"]  # fmt: skip
    argv.append("-tt" if tty else "-T")
    argv += [f"{user}@127.0.0.1", *command]
    return subprocess.run(
        argv,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True
    )
    return path, (directory / f"{name}.pub").read_text().strip()


def quote(value: str) -> str:
    return shlex.quote(value)
