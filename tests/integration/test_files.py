"""Acceptance: files in and out of sandboxes. Directories round-trip as tar.gz streams with
identical bytes and a server whose memory does not grow with the transfer; hostile archives
write nothing outside their destination and get clear errors; limits answer 413."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from corral import Client, ConflictError, NotFoundError, PermissionDeniedError
from corral.client import ArchiveError
from tests.conftest import Server, make_data_dir
from tests.integration.helpers import (
    module_sandbox_id,  # noqa: F401 - a fixture
    processes_matching,
)

pytestmark = pytest.mark.sandbox


MiB = 1 << 20


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, token=server.admin_key, timeout=120) as sdk:
        yield sdk


def sh(api: httpx.Client, sid: str, command: str) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command})
    assert resp.status_code == 200, resp.text
    return resp.json()


def targz(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        add(tf)
    return buf.getvalue()


def member(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"x",
           link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def put_archive(api: httpx.Client, sid: str, path: str, body: bytes) -> httpx.Response:
    return api.put(f"/v1/sandboxes/{sid}/archive", params={"path": path}, content=body)


# --- the API -----------------------------------------------------------------------------------


def test_single_files_and_metadata(client: Client, api: httpx.Client, sandbox_id: str) -> None:
    payload = os.urandom(3 * MiB + 17)
    info = client.write_file(sandbox_id, "notes/data.bin", payload, mode=0o600)
    assert info.path == "/workspace/notes/data.bin" and info.size == len(payload)
    assert info.mode == 0o600 and info.uid == 1000 and info.type == "file"
    assert client.read_file(sandbox_id, "/workspace/notes/data.bin") == payload
    raw = api.get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "notes/data.bin"})
    assert raw.headers["content-length"] == str(len(payload))
    assert raw.headers["x-corral-mode"] == "0600" and raw.content == payload
    # Written by the sandbox's user, as the sandbox sees it.
    seen = sh(api, sandbox_id, "stat -c '%u %a %s' notes/data.bin; sha256sum < notes/data.bin")
    assert seen["stdout"].split()[:3] == ["1000", "600", str(len(payload))]
    assert seen["stdout"].split()[3] == hashlib.sha256(payload).hexdigest()

    assert client.make_dir(sandbox_id, "notes/a/b").type == "directory"
    listing = client.list_files(sandbox_id, "notes")
    assert [(e.name, e.type) for e in listing.entries] == [("a", "directory"), ("data.bin", "file")]
    moved = client.move_file(sandbox_id, "notes/data.bin", "notes/a/moved.bin")
    assert moved.path == "/workspace/notes/a/moved.bin"
    client.write_file(sandbox_id, "notes/other", b"o")
    with pytest.raises(ConflictError):
        client.move_file(sandbox_id, "notes/other", "notes/a/moved.bin")
    client.move_file(sandbox_id, "notes/other", "notes/a/moved.bin", overwrite=True)
    assert client.read_file(sandbox_id, "notes/a/moved.bin") == b"o"
    with pytest.raises(ConflictError):
        client.delete_file(sandbox_id, "notes/a")  # not empty
    client.delete_file(sandbox_id, "notes", recursive=True)
    with pytest.raises(NotFoundError):
        client.stat_file(sandbox_id, "notes")
    with pytest.raises(NotFoundError):
        client.read_file(sandbox_id, "notes/a/moved.bin")

    # A symlink at the target is replaced, not written through; reads follow links.
    sh(api, sandbox_id, "echo original > /tmp/target; ln -s /tmp/target link")
    assert client.stat_file(sandbox_id, "link").link_target == "/tmp/target"
    assert client.read_file(sandbox_id, "link") == b"original\n"
    client.write_file(sandbox_id, "link", b"replaced")
    assert sh(api, sandbox_id, "cat /tmp/target; test -L link || echo regular")["stdout"] == (
        "original\nregular\n"
    )
    errors = {
        "dir": api.get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/workspace"}),
        "device": api.get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/dev/zero"}),
        "readonly": api.put(
            f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/usr/x"}, content=b"x"
        ),
        "archive-of-file": api.get(f"/v1/sandboxes/{sandbox_id}/archive", params={"path": "link"}),
    }
    assert {k: (r.status_code, r.json()["error"]["code"]) for k, r in errors.items()} == {
        "dir": (400, "is_a_directory"),
        "device": (400, "not_a_file"),
        "readonly": (403, "forbidden_path"),
        "archive-of-file": (400, "not_a_directory"),
    }


def test_directory_round_trip_keeps_links_modes_and_bytes(
    client: Client, tmp_path: Path, sandbox_id: str
) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "deep").mkdir(parents=True)
    (src / "pkg" / "module.py").write_text("print('hi')\n")
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "pkg" / "deep" / "blob").write_bytes(os.urandom(5 * MiB))
    (src / "pkg" / "link").symlink_to("deep/blob")
    (src / "empty").mkdir()
    uploaded = client.upload_dir(sandbox_id, src, "/workspace/project")
    assert uploaded.entries == 7 and uploaded.bytes == 5 * MiB + 31
    assert client.exec(sandbox_id, "./project/run.sh").stdout == "run\n"
    back = tmp_path / "back"
    assert client.download_dir(sandbox_id, "/workspace/project", back) == 7
    for path in src.rglob("*"):
        twin = back / path.relative_to(src)
        assert twin.is_symlink() == path.is_symlink()
        if path.is_symlink():
            assert os.readlink(twin) == os.readlink(path)
        elif path.is_file():
            assert twin.read_bytes() == path.read_bytes()
            assert twin.stat().st_mode & 0o777 == path.stat().st_mode & 0o777
    assert {p.relative_to(back) for p in back.rglob("*")} == {
        p.relative_to(src) for p in src.rglob("*")
    }


def test_files_need_the_files_scope(server: Server, api: httpx.Client, sandbox_id: str) -> None:
    made = api.post("/v1/tokens", json={"scopes": ["read", "exec"]}).json()
    try:
        with Client(server.url, token=made["secret"]) as limited:
            with pytest.raises(PermissionDeniedError):
                limited.read_file(sandbox_id, "x")
            with pytest.raises(PermissionDeniedError):
                limited.write_file(sandbox_id, "x", b"x")
            with pytest.raises(PermissionDeniedError):
                limited.list_files(sandbox_id, "/workspace")
    finally:
        api.delete(f"/v1/tokens/{made['id']}")


# --- the hostile battery -----------------------------------------------------------------------

HOSTILE: dict[str, tuple[Callable[[tarfile.TarFile], None], str]] = {
    "dotdot": (lambda tf: member(tf, "../escaped"), "'..'"),
    "absolute": (lambda tf: member(tf, "/tmp/escaped"), "absolute"),
    "symlink-out-absolute": (
        lambda tf: member(tf, "l", tarfile.SYMTYPE, link="/workspace"),
        "absolute",
    ),
    "symlink-out-relative": (
        lambda tf: member(tf, "l", tarfile.SYMTYPE, link="../.."),
        "outside",
    ),
    "symlink-then-write-through": (
        lambda tf: (member(tf, "l", tarfile.SYMTYPE, link="."), member(tf, "l/escaped")),
        "symlink",
    ),
    "hardlink-out": (lambda tf: member(tf, "h", tarfile.LNKTYPE, link="../victim"), "'..'"),
    "hardlink-absolute": (
        lambda tf: member(tf, "h", tarfile.LNKTYPE, link="/workspace/victim"),
        "absolute",
    ),
    "char-device": (lambda tf: member(tf, "zero", tarfile.CHRTYPE), "device"),
    "block-device": (lambda tf: member(tf, "disk", tarfile.BLKTYPE), "device"),
    "fifo": (lambda tf: member(tf, "pipe", tarfile.FIFOTYPE), "FIFO"),
    "planted-symlink": (lambda tf: member(tf, "planted/escaped"), "symlink"),
}


def test_hostile_archives_write_nothing_outside(api: httpx.Client, sandbox_id: str) -> None:
    setup = (
        "mkdir -p dest elsewhere && echo keep > victim && "
        "ln -s /workspace/elsewhere dest/planted && ln -s /workspace/elsewhere linked-dest && "
        "sleep 1.1 && touch /tmp/mark"
    )
    sh(api, sandbox_id, setup)
    for name, (build, words) in HOSTILE.items():
        resp = put_archive(api, sandbox_id, "/workspace/dest", targz(build))
        assert resp.status_code == 400, (name, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "unsafe_archive", (name, error)
        assert words in error["message"], (name, error)
    # A destination that is (or passes through) a symlink.
    for dest in ("/workspace/linked-dest", "/workspace/linked-dest/sub", "/workspace/dest/planted"):
        resp = put_archive(api, sandbox_id, dest, targz(lambda tf: member(tf, "escaped")))
        assert resp.status_code == 400 and "symlink" in resp.json()["error"]["message"], dest
    # Not archives at all.
    for body, code in ((b"", "bad_archive"), (b"garbage" * 100, "bad_archive")):
        resp = put_archive(api, sandbox_id, "/workspace/dest", body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, code)
    truncated = targz(lambda tf: member(tf, "big", data=os.urandom(200_000)))[:100_000]
    resp = put_archive(api, sandbox_id, "/workspace/dest", truncated)
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "bad_archive")

    # Nothing anywhere the sandbox can write changed: not a file outside the destination, and
    # inside it no file either (the truncated one was never renamed into place).
    changed = sh(api, sandbox_id, "find /workspace /tmp /dev/shm -newer /tmp/mark")["stdout"]
    assert set(changed.split()) <= {"/workspace/dest"}, changed
    # (`l -> .` is a valid entry, kept: entries before a refused one stay.)
    assert sh(api, sandbox_id, "ls -A dest; readlink dest/l")["stdout"] == "l\nplanted\n.\n"
    assert sh(api, sandbox_id, "cat victim; ls -A elsewhere | wc -l")["stdout"] == "keep\n0\n"


def test_downloads_refuse_hostile_trees_locally(
    client: Client, api: httpx.Client, sandbox_id: str, tmp_path: Path
) -> None:
    sh(api, sandbox_id, "mkdir -p t && ln -s /etc/passwd t/out && echo x > t/file")
    with pytest.raises(ArchiveError) as info:
        client.download_dir(sandbox_id, "/workspace/t", tmp_path / "local")
    assert info.value.code == "unsafe_archive" and "absolute" in info.value.message
    assert not (tmp_path / "local" / "out").exists()


# --- limits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limits() -> Iterator[Server]:
    srv = Server(
        make_data_dir("corral-test-limits-"),
        env={
            "CORRAL_MAX_UPLOAD_BYTES": str(2 * MiB),
            "CORRAL_MAX_UPLOAD_EXPANDED_BYTES": str(8 * MiB),
            "CORRAL_MAX_UPLOAD_ENTRIES": "100",
        },
    )
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def test_upload_limits(small_limits: Server) -> None:
    with small_limits.client() as api:
        sid = api.post("/v1/sandboxes", json={}).json()["id"]
        try:
            # Compressed size, announced (Content-Length) and streamed (chunked).
            big = os.urandom(3 * MiB)
            resp = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "f"}, content=big)
            assert (resp.status_code, resp.json()["error"]["code"]) == (413, "payload_too_large")
            archive = targz(lambda tf: member(tf, "r", data=big))
            chunks = (archive[i : i + 65536] for i in range(0, len(archive), 65536))
            resp = api.put(f"/v1/sandboxes/{sid}/archive", params={"path": "d"}, content=chunks)
            assert (resp.status_code, resp.json()["error"]["code"]) == (413, "payload_too_large")
            # A tar bomb: 64 MiB of zeros in a few kilobytes.
            bomb = targz(lambda tf: member(tf, "zeros", data=bytes(64 * MiB)))
            assert len(bomb) < 200_000
            resp = put_archive(api, sid, "/workspace/bomb", bomb)
            assert (resp.status_code, resp.json()["error"]["code"]) == (413, "too_large")
            assert "uncompressed" in resp.json()["error"]["message"]
            # Too many entries.
            many = targz(lambda tf: [member(tf, f"f{i}") for i in range(150)])
            resp = put_archive(api, sid, "/workspace/many", many)
            assert (resp.status_code, resp.json()["error"]["code"]) == (413, "too_large")
            assert "entries" in resp.json()["error"]["message"]
            # Under every limit: accepted.
            fine = targz(lambda tf: [member(tf, f"f{i}", data=b"y" * 1000) for i in range(50)])
            resp = put_archive(api, sid, "/workspace/fine", fine)
            assert resp.status_code == 200 and resp.json()["entries"] == 50
            # The JSON body limit does not apply to uploads, which have their own.
            assert (
                api.put(f"/v1/sandboxes/{sid}/files", params={"path": "ok"}, content=b"z" * MiB)
            ).status_code == 200
        finally:
            api.delete(f"/v1/sandboxes/{sid}")


# --- 500 MB, in constant memory ----------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_500_mb_round_trip_in_bounded_memory(server: Server, sandbox_id: str) -> None:
    assert server.proc is not None
    work = Path(tempfile.mkdtemp(prefix="corral-test-big-", dir="/var/tmp"))
    try:
        src = work / "src"
        (src / "sub").mkdir(parents=True)
        digests = {}
        for i in range(5):  # 5 x 100 MiB of incompressible bytes
            path = src / ("sub" if i % 2 else "") / f"part{i}"
            h = hashlib.sha256()
            with path.open("wb") as f:
                for _ in range(100):
                    block = os.urandom(MiB)
                    h.update(block)
                    f.write(block)
            digests[path.relative_to(src)] = h.hexdigest()

        baseline = rss(server.proc.pid)
        peak = baseline
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss(server.proc.pid))  # type: ignore[union-attr]
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        try:
            with Client(server.url, token=server.admin_key, timeout=300) as client:
                # gzip level 0 (stored): random bytes do not compress, and the server's path is
                # the same whatever the level.
                up = client.upload_dir(sandbox_id, src, "/workspace/big", level=0)
                assert up.bytes == 500 * MiB and up.compressed_bytes > 500 * MiB
                entries = client.download_dir(sandbox_id, "/workspace/big", work / "back", level=0)
        finally:
            stop.set()
            sampler.join()
        elapsed = time.monotonic() - started
        assert entries == up.entries == 6  # 5 files and a directory
        for relative, digest in digests.items():
            h = hashlib.sha256()
            with (work / "back" / relative).open("rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
            assert h.hexdigest() == digest, relative
        with Client(server.url, token=server.admin_key) as client:
            client.delete_file(sandbox_id, "/workspace/big", recursive=True)
        growth = peak - baseline
        print(f"500 MiB up and down in {elapsed:.1f} s; server RSS {baseline >> 20} MiB, "
              f"peak +{growth >> 20} MiB")  # fmt: skip
        assert growth < 150 * MiB
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_abandoned_transfers_leave_no_helper_behind(
    server: Server, api: httpx.Client, sandbox_id: str
) -> None:
    sh(api, sandbox_id, "mkdir -p bulk && head -c 60M /dev/urandom > bulk/data")
    url = f"/v1/sandboxes/{sandbox_id}"
    with api.stream("GET", f"{url}/archive", params={"path": "bulk", "level": 0}) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw())  # then go away mid-download
    with api.stream("GET", f"{url}/files", params={"path": "bulk/data"}) as resp:
        assert resp.headers["content-length"] == str(60 * MiB)
        next(resp.iter_raw())

    def upload() -> Iterator[bytes]:
        yield targz(lambda tf: member(tf, "x", data=b"x"))[:100]
        raise RuntimeError("the client gives up mid-upload")

    with pytest.raises(RuntimeError):
        api.put(f"{url}/archive", params={"path": "up"}, content=upload())
    deadline = time.monotonic() + 10
    while processes_matching("/opt/corral/files.py") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_matching("/opt/corral/files.py") == []


def test_a_tree_with_entries_the_user_cannot_read_downloads_without_them(
    server: Server, api: httpx.Client, sandbox_id: str
) -> None:
    """As tar does: what the sandbox user may not read is left out, the rest arrives whole
    (natively and through run-dat-sheesh), rather than a stream that breaks off half-way."""
    made = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={
            "user": "root",
            "command": "mkdir -p /workspace/mixed/open /workspace/mixed/shut && "
            "echo visible > /workspace/mixed/open/a && echo hidden > /workspace/mixed/secret && "
            "echo inside > /workspace/mixed/shut/b && "
            "chmod 000 /workspace/mixed/secret && chmod 700 /workspace/mixed/shut && "
            "chown root /workspace/mixed/secret /workspace/mixed/shut",
        },
    ).json()
    assert made["exit_code"] == 0, made
    urls = {
        "native": (f"/v1/sandboxes/{sandbox_id}/archive", {"path": "/workspace/mixed"}),
        "run-dat-sheesh": (f"/v1/vms/{sandbox_id}/files/download", {"path": "/workspace/mixed"}),
    }
    for face, (url, params) in urls.items():
        with api.stream("GET", url, params=params) as resp:
            assert resp.status_code == 200, (face, resp.read())
            body = resp.read()  # raises if the stream broke off
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
            names = {m.name.rstrip("/").split("mixed/")[-1] for m in archive.getmembers()}
            opened = archive.extractfile(next(m for m in archive if m.name.endswith("open/a")))
            assert opened is not None and opened.read() == b"visible\n", face
        assert "open/a" in names, (face, names)
        assert not any(n.endswith(("secret", "shut/b")) for n in names), (face, names)
