"""Volumes: a named file system on the node that outlives its sandboxes and the server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from corral import Client, NotFoundError, Volume, VolumeMount
from tests.conftest import Server, make_data_dir
from tests.integration.test_sdk_cli import run_cli

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(make_data_dir("corral-test-volumes-"))
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def _sandbox(api: httpx.Client, *mounts: dict[str, object]) -> str:
    resp = api.post("/v1/sandboxes", json={"volumes": list(mounts)})
    assert resp.status_code == 201, resp.text
    shown = resp.json()["volumes"]  # by name, whether given by name or id
    assert [(v["path"], v["read_only"]) for v in shown] == [
        (m["path"], m.get("read_only", False)) for m in mounts
    ]
    assert all(v["name"] == "cache" for v in shown)
    return str(resp.json()["id"])


def _run(api: httpx.Client, sid: str, command: str) -> dict[str, object]:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_a_volume_outlives_its_sandboxes_and_the_server(server: Server) -> None:
    with server.client() as api:
        made = api.post("/v1/volumes", json={"name": "cache", "size_mb": 64})
        assert made.status_code == 201, made.text
        vid = made.json()["id"]
        assert made.json()["size_mb"] == 64 and made.json()["used_by"] == []
        assert api.post("/v1/volumes", json={"name": "cache"}).status_code == 409
        first = _sandbox(api, {"name": "cache", "path": "/data"})
        wrote = _run(api, first, "echo hello > /data/x && mkdir /data/d && df -m /data | tail -1")
        assert wrote["exit_code"] == 0, wrote
        assert 50 <= int(str(wrote["stdout"]).split()[1]) <= 64  # its own 64 MiB
        # The host's paths stay hidden: the sandbox sees the root of the volume's file system.
        info = _run(api, first, "grep ' /data ' /proc/self/mountinfo")
        assert str(server.data_dir) not in str(info["stdout"]) and "/tmp/" not in str(
            info["stdout"]
        )
        # Its size is its limit: filling it fails inside, and nothing else fills.
        full = _run(api, first, "dd if=/dev/zero of=/data/big bs=1M count=100 2>&1; rm /data/big")
        assert "No space left" in str(full["stdout"])
        assert api.get(f"/v1/volumes/{vid}").json()["used_by"] == [first]
        busy = api.delete("/v1/volumes/cache")
        assert busy.status_code == 409 and first in busy.json()["error"]["message"]
        assert api.delete(f"/v1/sandboxes/{first}").status_code == 200
        # A later sandbox (another host uid) reads it, read-only where asked.
        reader = _sandbox(api, {"name": "cache", "path": "/mnt/c", "read_only": True})
        assert _run(api, reader, "cat /mnt/c/x")["stdout"] == "hello\n"
        refused = _run(api, reader, "echo no > /mnt/c/y")
        assert refused["exit_code"] != 0 and "Read-only" in str(refused["stderr"])
        writer = _sandbox(api, {"name": vid, "path": "/workspace/cache"})
        assert _run(api, writer, "echo again >> cache/x && cat cache/x")["stdout"] == (
            "hello\nagain\n"
        )
        for sid in (reader, writer):
            api.delete(f"/v1/sandboxes/{sid}")
    server.stop()
    server.start()
    with server.client() as api:
        after = _sandbox(api, {"name": "cache", "path": "/data"})
        assert _run(api, after, "cat /data/x; ls -d /data/d")["stdout"] == "hello\nagain\n/data/d\n"
        api.delete(f"/v1/sandboxes/{after}")
        assert api.delete("/v1/volumes/cache").status_code == 204
        assert api.get(f"/v1/volumes/{vid}").status_code == 404
        assert vid not in [v["id"] for v in api.get("/v1/volumes").json()["items"]]
    assert not (server.data_dir / "volumes" / vid).exists()


def test_bad_volume_requests_get_clear_errors(server: Server) -> None:
    with server.client() as api:
        unknown = api.post("/v1/sandboxes", json={"volumes": [{"name": "nope", "path": "/d"}]})
        assert unknown.status_code == 422 and "nope" in unknown.text
        for path in ("/proc/x", "relative", "/", "/a/../etc", "/usr/lib", "/opt/corral/x"):
            bad = api.post("/v1/sandboxes", json={"volumes": [{"name": "v", "path": path}]})
            assert bad.status_code == 422, (path, bad.text)
        overlap = api.post(
            "/v1/sandboxes",
            json={"volumes": [{"name": "v", "path": "/d"}, {"name": "w", "path": "/d/e"}]},
        )
        assert overlap.status_code == 422 and "overlap" in overlap.text
        assert api.get("/v1/volumes/nope").status_code == 404
        assert api.delete("/v1/volumes/nope").status_code == 404
        assert api.post("/v1/volumes", json={"name": "../x"}).status_code == 422
        assert api.post("/v1/volumes", json={"name": "ok", "size_mb": 1}).status_code == 422
        assert api.post("/v1/volumes", json={"name": "ok", "node": "elsewhere"}).status_code == 422


def test_volumes_through_the_sdk_and_the_cli(server: Server) -> None:
    with Client(server.url, token=server.admin_key) as client:
        made = client.create_volume("sdkvol", size_mb=16, labels={"team": "a"})
        assert isinstance(made, Volume) and made.labels == {"team": "a"}
        box = client.create_sandbox(volumes=[VolumeMount(name="sdkvol", path="/v")])
        assert client.exec(box, "echo kept > /v/f").exit_code == 0
        assert client.get_volume("sdkvol").used_by == [box.id]
        client.delete_sandbox(box)
        assert made.id in [v.id for v in client.list_volumes()]
    listed = run_cli(server, "volume", "ls")
    assert listed.returncode == 0 and "sdkvol" in listed.stdout
    cli_box = run_cli(server, "sandbox", "create", "--volume", "sdkvol:/mnt/v:ro")
    assert cli_box.returncode == 0, cli_box.stderr
    sid = cli_box.stdout.strip()
    read = run_cli(server, "exec", sid, "--", "cat", "/mnt/v/f")
    assert read.returncode == 0 and read.stdout == "kept\n", read.stderr
    bad = run_cli(server, "sandbox", "create", "--volume", "sdkvol")
    assert bad.returncode != 0 and "NAME:PATH" in bad.stderr
    busy = run_cli(server, "volume", "rm", "sdkvol")
    assert busy.returncode != 0 and sid in busy.stderr
    assert run_cli(server, "sandbox", "rm", sid).returncode == 0
    made_cli = run_cli(server, "volume", "create", "clivol", "--size-mb", "8")
    assert made_cli.returncode == 0 and made_cli.stdout.startswith("vol_")
    gone = run_cli(server, "volume", "rm", "sdkvol", "clivol")
    assert gone.returncode == 0, gone.stderr
    with Client(server.url, token=server.admin_key) as client, pytest.raises(NotFoundError):
        client.get_volume("clivol")
