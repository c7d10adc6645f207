"""No host path reaches a client or a sandbox: a sandbox's /proc/self/mountinfo (with a disk
limit and without one) says nothing of where the data dir is, and the errors of failed starts
name no host path."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.security.helpers import create_sandbox, dedicated_server, sandbox_dir

pytestmark = pytest.mark.sandbox

HOST_ROOT = f"{os.major(os.stat('/').st_dev)}:{os.minor(os.stat('/').st_dev)}"


def exec_ok(api: httpx.Client, sid: str, command: str) -> str:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["exit_code"] == 0, body
    return str(body["stdout"])


def host_path_findings(mountinfo: str, data_dir: Path) -> list[str]:
    """Lines that name any part of the data dir, or bind from the host's root file system
    anything but /usr and /etc."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if str(data_dir) in line or data_dir.name in line or "/tmp/" in line:
            found.append(line)
        elif fields[2] == HOST_ROOT and fields[3] != "/":
            if fields[3].split("/")[1] not in ("usr", "etc"):
                found.append(line)
    return found


@pytest.fixture(scope="module", params=["disk", "no-disk"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    env = {"CORRAL_DEFAULT_DISK_MB": "0"} if request.param == "no-disk" else {}
    with dedicated_server("corral-paths-", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_mountinfo_names_no_host_path(server: Server, api: httpx.Client) -> None:
    sid = create_sandbox(api)
    mountinfo = exec_ok(api, sid, "cat /proc/self/mountinfo")
    assert "/workspace" in mountinfo and "/opt/corral" in mountinfo
    assert host_path_findings(mountinfo, server.data_dir) == []
    # The tools are there all the same.
    assert exec_ok(api, sid, "test -x /opt/corral/deno && echo yes") == "yes\n"


def test_files_keep_and_lose_across_a_restart(server: Server, api: httpx.Client) -> None:
    """Writes, renames and deletions in /workspace and, by the sandbox's root, in its /etc,
    /usr and /root last across a restart: of files it made and of the template's (in the
    lower layers). Its writable layers are on its disk, or without a disk limit in its
    directory on the data dir. The host's files stay as they were."""
    sid = create_sandbox(api)
    exec_ok(api, sid, "mkdir -p d/e && echo 1 > d/e/f && echo 2 > gone && mv d d2 && rm gone")
    root = (
        "set -e; echo x > /etc/added; rm /etc/hostname /etc/nsswitch.conf; "
        "mkdir -p /usr/local/lib/p; rm /usr/bin/tac; mv /usr/bin/yes /usr/bin/yes-moved; "
        "echo r > /root/r"
    )
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": root, "user": "root"})
    assert resp.json()["exit_code"] == 0, resp.text
    assert api.post(f"/v1/sandboxes/{sid}/stop").status_code == 200
    assert api.post(f"/v1/sandboxes/{sid}/start").status_code == 200
    seen = exec_ok(
        api, sid, "cat d2/e/f; ls; cat /etc/added; ls /usr/local/lib; ls /usr/bin/yes-moved"
    )
    lines = seen.splitlines()
    assert lines[:3] == ["1", "d2", "x"] and "p" in lines[3:-1], seen
    assert lines[-1] == "/usr/bin/yes-moved", seen
    gone = ("/etc/hostname", "/etc/nsswitch.conf", "/usr/bin/tac", "/usr/bin/yes")
    assert exec_ok(api, sid, " ".join(f"test ! -e {p} &&" for p in gone) + " echo gone") == (
        "gone\n"
    )
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "cat /root/r", "user": "root"})
    assert resp.json()["stdout"] == "r\n", resp.text
    assert all(Path(p).exists() for p in ("/usr/bin/tac", "/usr/bin/yes", "/etc/nsswitch.conf"))
    assert not Path("/usr/bin/yes-moved").exists() and not Path("/usr/local/lib/p").exists()
    # Deleting the sandbox leaves nothing on the host.
    assert api.delete(f"/v1/sandboxes/{sid}").status_code == 200
    assert not sandbox_dir(server.data_dir, sid).exists()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(sandbox_dir(server.data_dir, sid)) not in mounts


def test_a_start_failure_names_no_host_path(server: Server, api: httpx.Client) -> None:
    """A sandbox whose files on the host are damaged fails to start with a reason, but without
    the host's paths (in the answer and in the sandbox's recorded error)."""
    sid = create_sandbox(api, disk_mb=64)
    assert api.post(f"/v1/sandboxes/{sid}/stop").status_code == 200
    image = sandbox_dir(server.data_dir, sid) / "disk.img"
    with open(image, "r+b") as f:
        f.write(b"\0" * (4 << 20))  # no file system any more
    resp = api.post(f"/v1/sandboxes/{sid}/start")
    assert resp.status_code == 503, resp.text
    assert "mount" in resp.json()["error"]["message"]
    error = api.get(f"/v1/sandboxes/{sid}").json()["error"]
    for text in (resp.text, error):
        assert str(server.data_dir) not in text and server.data_dir.name not in text
        assert "/tmp/" not in text


def test_too_small_a_disk_names_no_host_path(server: Server, api: httpx.Client) -> None:
    resp = api.post("/v1/sandboxes", json={"disk_mb": 1})
    assert resp.status_code in (422, 503), resp.text
    assert server.data_dir.name not in resp.text and "/tmp/" not in resp.text
    listed = api.get("/v1/sandboxes", params={"state": "error"}).text
    assert server.data_dir.name not in listed


def test_a_bad_template_names_no_host_path(server: Server, api: httpx.Client) -> None:
    """A template with nothing in it (no shell, no libraries, no python3). Its sandbox may
    start (the supervisor is the host's Python) or not; either way no answer names a host
    path: the create's, its commands' (which cannot run), the sandbox's recorded error."""
    templates = server.data_dir / "templates"
    (templates / "broken" / "usr" / "bin").mkdir(parents=True)
    try:
        resp = api.post("/v1/sandboxes", json={"template": "broken"})
        assert resp.status_code in (201, 503), resp.text
        answers = [resp.text]
        if resp.status_code == 201:
            sid = resp.json()["id"]
            url = f"/v1/sandboxes/{sid}/exec"
            for spec in (
                {"command": "true"},
                {"command": "python3", "args": ["-c", "pass"]},
                {"command": "/usr/bin/env"},
                {"command": "true", "user": "root"},
            ):
                ran = api.post(url, json=spec)
                answers.append(ran.text)
                # Nothing can run there: each fails, with a reason.
                assert ran.status_code >= 400 or (
                    ran.json()["status"] == "failed" and ran.json()["error"]
                ), (spec, ran.text)
            answers.append(api.get(f"/v1/sandboxes/{sid}").text)
            assert api.delete(f"/v1/sandboxes/{sid}").status_code == 200
        answers += [api.get("/v1/sandboxes", params={"state": "error"}).text]
        for text in answers:
            assert str(server.data_dir) not in text and server.data_dir.name not in text, text
            assert "/tmp/" not in text, text
        resp = api.post("/v1/sandboxes", json={"template": "missing"})
        assert resp.status_code in (404, 409, 422), resp.text
        assert server.data_dir.name not in resp.text
    finally:
        subprocess.run(["rm", "-rf", str(templates / "broken")], check=False)


def test_a_replaced_directory_gets_a_fresh_view(tmp_path: Path) -> None:
    """A template renamed into place is what later sandboxes see; the views show "/" and
    neutral layer names in mountinfo, and are gone once closed."""
    from corral.runtime.mounts import SharedViews, mounted_under

    views = SharedViews(tmp_path / "views")
    views.setup()
    assert views.available and views.writable
    source = tmp_path / "templates" / "t"
    source.mkdir(parents=True)
    (source / "f").write_text("old")
    try:
        first = views.view(source)
        assert (first / "f").read_text() == "old"
        assert views.view(source) == first  # unchanged: the same view
        new = tmp_path / "templates" / "t.new"
        new.mkdir()
        (new / "f").write_text("new")
        source.rename(tmp_path / "templates" / "t.old")
        new.rename(source)
        second = views.view(source)
        assert second != first and (second / "f").read_text() == "new"
        line = next(
            m for m in Path("/proc/self/mountinfo").read_text().splitlines()
            if m.split()[4] == str(second)
        )  # fmt: skip
        assert line.split()[3] == "/" and str(tmp_path) not in line.split(" - ")[1]
    finally:
        views.close()
    assert mounted_under(tmp_path) == []


def test_without_overlays_the_directories_themselves_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where overlay mounts fail (no overlay support, or an upper layer on an overlay), views
    fall back to the directories, and the runtime says so at start."""
    from corral.runtime import mounts

    def no_overlay(*_args: object) -> None:
        raise OSError(errno.ENODEV, "overlay mount refused: No such device")

    monkeypatch.setattr(mounts, "mount_overlay", no_overlay)
    views = mounts.SharedViews(tmp_path / "views")
    views.setup()
    assert not views.available and not views.writable
    assert views.view(tmp_path) == tmp_path
