"""Secrets and header injection: values go in through /v1/secrets and never come out; a sandbox's
rule adds one to its HTTPS requests to a host, on the node, so the HTTPS test host receives the
header while nothing of the sandbox (environment, /proc, files, the memory of the process that
made the request) holds the secret, nor the server's log or database file."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest

from corral.runtime.rootfs import RootLayout
from tests.conftest import Server
from tests.integration.egress_hosts import EgressHosts, curl, run, write_file

pytestmark = pytest.mark.sandbox

# Makes an HTTPS request trusting the sandbox's default store, prints the answer, then waits
# (stdin) so that its memory can be read.
REQUEST = r"""
import sys, urllib.request
print(urllib.request.urlopen("https://a.allowed.test/", timeout=5).read().decode(), flush=True)
sys.stdin.read()
"""


def token(api: httpx.Client, *scopes: str) -> str:
    resp = api.post("/v1/tokens", json={"name": "t-" + "-".join(scopes), "scopes": list(scopes)})
    assert resp.status_code == 201, resp.text
    return resp.json()["secret"]


def test_secrets_api(eapi: httpx.Client, egress_server: Server) -> None:
    created = eapi.post("/v1/secrets", json={"name": "API_A", "value": "first-value"})
    assert created.status_code == 201, created.text
    assert set(created.json()) == {"name", "created_at", "updated_at"}
    replaced = eapi.post("/v1/secrets", json={"name": "API_A", "value": "second-value"})
    assert replaced.status_code == 200
    listed = eapi.get("/v1/secrets").json()["items"]
    assert [s["name"] for s in listed if s["name"] == "API_A"] == ["API_A"]
    assert "value" not in listed[0] and "second-value" not in eapi.get("/v1/secrets").text
    # The `secrets` scope or admin; not `sandboxes`.
    with egress_server.client(token(eapi, "secrets")) as holder:
        assert holder.post("/v1/secrets", json={"name": "API_B", "value": "v"}).status_code == 201
        assert holder.get("/v1/secrets").status_code == 200
        assert holder.delete("/v1/secrets/API_B").status_code == 200
    with egress_server.client(token(eapi, "sandboxes", "read")) as other:
        assert other.get("/v1/secrets").status_code == 403
        assert other.post("/v1/secrets", json={"name": "X", "value": "v"}).status_code == 403
        # Nor may it make a sandbox send a secret anywhere.
        resp = other.post(
            "/v1/sandboxes",
            json={"network": "allow", "allow": ["a.allowed.test"], "inject": [
                {"host": "a.allowed.test", "header": "X-Api-Key", "value": "{{secret:API_A}}"}
            ]},
        )  # fmt: skip
        assert resp.status_code == 403, resp.text
    assert eapi.delete("/v1/secrets/API_A").status_code == 200
    missing = eapi.delete("/v1/secrets/API_A")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for bad in ({"name": "has space", "value": "v"}, {"name": "N", "value": ""},
                {"name": "N", "value": "a\r\nb"}, {"name": "N"}):  # fmt: skip
        resp = eapi.post("/v1/secrets", json=bad)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_argument"


def test_bad_rules(eapi: httpx.Client) -> None:
    assert eapi.post("/v1/secrets", json={"name": "RULES", "value": "v"}).status_code == 201
    rule = {"host": "a.allowed.test", "header": "X-Api-Key", "value": "{{secret:RULES}}"}
    cases = [
        ({"network": "allow", "allow": ["b.allowed.test"], "inject": [rule]}, 400),
        ({"network": "allow", "allow": ["10.0.0.0/8"], "inject": [rule]}, 400),
        ({"network": "none", "inject": [rule]}, 400),
        (
            {"network": "allow", "allow": ["*.allowed.test"],
             "inject": [{**rule, "value": "{{secret:NOPE}}"}]},
            400,
        ),
        ({"network": "allow", "allow": ["*.allowed.test"], "inject": [{**rule, "host": "*.x"}]},
         422),
        ({"network": "allow", "allow": ["*.allowed.test"],
          "inject": [{**rule, "header": "Bad Header"}]}, 422),
        ({"network": "allow", "allow": ["*.allowed.test"],
          "inject": [{**rule, "value": "a\nb"}]}, 422),
    ]  # fmt: skip
    for body, status in cases:
        resp = eapi.post("/v1/sandboxes", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert "inject" in resp.text
    sid = eapi.post("/v1/sandboxes", json={"network": "allow", "allow": ["*.allowed.test"]})
    sid = sid.json()["id"]
    try:
        resp = eapi.patch(f"/v1/sandboxes/{sid}", json={"allow": [], "inject": [rule]})
        assert resp.status_code == 400, resp.text
        resp = eapi.patch(f"/v1/sandboxes/{sid}", json={"inject": [rule]})
        assert resp.status_code == 200 and resp.json()["inject"] == [rule]
        # The rule's host must stay allowed while the rule is there.
        assert eapi.patch(f"/v1/sandboxes/{sid}", json={"allow": []}).status_code == 400
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")


def _host_pids(marker: str) -> list[int]:
    """Host pids of the processes whose environment holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _files_holding(top: Path, needle: bytes) -> list[str]:
    """Files under `top` that hold `needle`, what is mounted under it skipped."""
    # Bind mounts (the idmapped layers of its root) may share the device: by mountinfo.
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in mounts]
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
    return found


def _memory_holds(pid: int, needle: bytes) -> tuple[bool, int]:
    """Whether any readable mapping of the process holds `needle`, and how many bytes were
    read."""
    read = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            read += len(data)
            if needle in data:
                return True, read
    return False, read


def test_injection_never_enters_the_sandbox(
    eapi: httpx.Client, egress_server: Server, egress_hosts: EgressHosts
) -> None:
    secret = "sk-" + secrets.token_hex(16)
    assert eapi.post("/v1/secrets", json={"name": "API_KEY", "value": secret}).status_code == 201
    rule = {"host": "a.allowed.test", "header": "X-Api-Key", "value": "Bearer {{secret:API_KEY}}"}
    created = eapi.post(
        "/v1/sandboxes",
        json={"network": "allow", "allow": ["*.allowed.test"], "inject": [rule]},
    )
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert created.json()["inject"] == [rule]
    expected = hashlib.sha256(f"Bearer {secret}".encode()).hexdigest()
    try:
        write_file(eapi, sid, "/tmp/ca.pem", egress_hosts.ca_file.read_bytes())
        # HTTPS to the rule's host: intercepted (the sandbox's own CA, which it trusts by
        # default), and the test host gets the header.
        assert curl(eapi, sid, "https://a.allowed.test/") == (
            0,
            f"host=a.allowed.test auth={expected}",
        )
        # Not signed by the test CA: it was not the real server's certificate.
        assert curl(eapi, sid, "https://a.allowed.test/", "--cacert", "/tmp/ca.pem")[0] == 60
        # A header the sandbox sends of that name is replaced, not kept beside it.
        assert curl(eapi, sid, "https://a.allowed.test/", "-H", "X-Api-Key: mine")[1].endswith(
            expected
        )
        # Another host passes untouched: the real server's certificate, no header.
        assert curl(eapi, sid, "https://b.allowed.test/", "--cacert", "/tmp/ca.pem") == (
            0,
            "host=b.allowed.test auth=-",
        )
        # Plain HTTP to the rule's host carries no secret.
        assert curl(eapi, sid, "http://a.allowed.test/") == (0, "host=a.allowed.test auth=-")
        # A process that made a request, kept alive to read its memory from here.
        write_file(eapi, sid, "/workspace/request.py", REQUEST.encode())
        marker = "EGRESS_MARKER_" + secrets.token_hex(8)
        job = eapi.post(
            f"/v1/sandboxes/{sid}/commands",
            json={
                "command": "python3 /workspace/request.py",
                "env": {marker: "1"},
                "interactive": True,
            },
        ).json()
        url = f"/v1/sandboxes/{sid}/commands/{job['id']}"
        for _ in range(200):
            if expected in eapi.get(url).json()["stdout"]:
                break
            subprocess.run(["sleep", "0.05"])
        assert expected in eapi.get(url).json()["stdout"]
        pids = _host_pids(marker)
        assert pids, "the requesting process is not found on the host"
        for pid in pids:
            holds, read = _memory_holds(pid, secret.encode())
            assert not holds and read > 1_000_000, (holds, read)
        # The search finds what is there: the answer it got.
        assert any(_memory_holds(pid, expected.encode())[0] for pid in pids)
        # Environment, /proc, files: searched from inside.
        searches = {
            "env": "env",
            "environ": "cat /proc/[0-9]*/environ 2>/dev/null",
            "cmdline": "cat /proc/[0-9]*/cmdline 2>/dev/null",
            "files": f"grep -rl -F '{secret[:12]}' / --exclude-dir=proc --exclude-dir=sys "
            "--exclude-dir=usr --exclude-dir=dev 2>/dev/null; true",
        }
        for what, command in searches.items():
            out = run(eapi, sid, command)["stdout"]
            assert secret not in out, what
            assert secret[:12] not in out, what
        # ... and its directory on the host: its layers and workspace, not the mounts of its
        # root (which show the host's /usr).
        directory = egress_server.data_dir / "sandboxes" / sid
        disk = directory / "disk"  # its own file system, with the default disk limit
        layout = RootLayout(directory, disk if disk.is_dir() else directory / "cow")
        layers = [layout.upper, layout.workspace_upper, layout.usr_upper]
        assert [f for top in layers for f in _files_holding(top, secret.encode())] == []
        # The search finds what is there.
        assert _files_holding(layout.workspace_upper, b"urllib.request")
        # The network view counts the injections; the value is nowhere in the API's answers.
        seen = eapi.get(f"/v1/sandboxes/{sid}/network")
        assert seen.json()["inject"] == [{**rule, "count": 3}]
        assert secret not in seen.text
        assert secret not in eapi.get(f"/v1/sandboxes/{sid}").text
        eapi.post(f"{url}/cancel")
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")
    # Not logged, and encrypted at rest (the server has a secrets key) in a 0600 database.
    assert secret not in egress_server.log_path.read_text(errors="replace")
    for db in egress_server.data_dir.glob("corral.db*"):
        assert secret.encode() not in db.read_bytes(), db
    assert (egress_server.data_dir / "corral.db").stat().st_mode & 0o077 == 0
    assert re.fullmatch(r"sk-[0-9a-f]{32}", secret)
