"""Large transfers through the fleet: a 200 MiB directory as a tar.gz stream and a 200 MiB file,
uploaded through one replica and downloaded through the other for a sandbox on a remote node,
every byte checked, with bounded memory on both replicas, the agent and this test itself."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet

pytestmark = pytest.mark.sandbox

MIB = 1 << 20
PIECE = 1 * MIB
BIG_FILES = 4
BIG_SIZE = 47 * MIB
SMALL_FILES = 1200
SMALL_SIZE = 10 * 1024
SINGLE_SIZE = 200 * MIB
MAX_GROWTH = 100 * MIB  # of any process's peak memory, for a 200 MiB transfer
DOWNLOAD_TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres).start()
    yield running
    running.stop()


# --- memory -------------------------------------------------------------------------------------


def _status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for {pid}")


@dataclass
class Peaks:
    """Each watched process's peak RSS (VmHWM) reset to its current RSS at the start (clear_refs
    5), so that the growth is what the transfer added."""

    pids: dict[str, int]
    start: dict[str, int] = field(default_factory=dict)

    def reset(self) -> Peaks:
        for name, pid in self.pids.items():
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")
            self.start[name] = _status_kib(pid, "VmRSS")
        return self

    def growth(self) -> dict[str, int]:
        return {n: _status_kib(p, "VmHWM") - self.start[n] for n, p in self.pids.items()}


def watched(fleet: Fleet, node: str) -> Peaks:
    pids = {f"replica {'AB'[i]}": r.proc.pid for i, r in enumerate(fleet.replicas)}  # type: ignore[union-attr]
    pids[f"agent {node}"] = fleet.agents[node].proc.pid  # type: ignore[union-attr]
    pids["test"] = os.getpid()
    return Peaks(pids).reset()


def check_growth(peaks: Peaks, what: str) -> dict[str, int]:
    growth = peaks.growth()
    print(f"{what}: VmHWM growth " + ", ".join(f"{n} {g / MIB:.1f} MiB" for n, g in growth.items()))
    assert all(g < MAX_GROWTH for g in growth.values()), growth
    return growth


# --- streams on the client side ------------------------------------------------------------------


def tree() -> list[tuple[str, int]]:
    """(name, size) of the directory: a few large files and many small ones, in subdirectories."""
    files = [(f"big/blob-{i}.bin", BIG_SIZE) for i in range(BIG_FILES)]
    files += [(f"small/{i % 10:02d}/f{i:04d}.dat", SMALL_SIZE) for i in range(SMALL_FILES)]
    return files


def tar_gz(files: list[tuple[str, int]], digests: dict[str, str]) -> Iterator[bytes]:
    """A tar.gz of `files` (random, incompressible contents), made as it is sent: at most about
    a piece is held at a time. Each file's SHA-256 goes into `digests`. Level 0 (stored deflate
    blocks, still gzip): compressing random bytes would only time this test's own CPU."""
    gzip = zlib.compressobj(0, zlib.DEFLATED, 31)
    out = bytearray()
    made: set[str] = set()

    def entry(info: tarfile.TarInfo) -> bytes:
        return gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT))

    for name, size in files:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in made:
                made.add(directory)
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                out += entry(info)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        out += entry(info)
        digest = hashlib.sha256()
        left = size
        while left:
            piece = os.urandom(min(PIECE, left))
            digest.update(piece)
            left -= len(piece)
            out += gzip.compress(piece)
            if len(out) >= PIECE:
                yield bytes(out)
                out.clear()
        digests[name] = digest.hexdigest()
        out += gzip.compress(b"\0" * (-size % tarfile.BLOCKSIZE))
    out += gzip.compress(b"\0" * (2 * tarfile.BLOCKSIZE)) + gzip.flush()
    yield bytes(out)


def random_stream(size: int, digest: hashlib._Hash) -> Iterator[bytes]:  # type: ignore[name-defined]
    left = size
    while left:
        piece = os.urandom(min(PIECE, left))
        digest.update(piece)
        left -= len(piece)
        yield piece


class IterReader(io.RawIOBase):
    """A readable file over an iterator of bytes (a streamed response body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.total += n
        return n


def sandbox_digests(api: httpx.Client, sid: str, directory: str) -> dict[str, str]:
    """sha256sum of every file under `directory`, run in the sandbox."""
    script = f"cd {directory} && find . -type f -print0 | xargs -0 sha256sum"
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": script, "timeout_ms": 120_000})
    assert resp.status_code == 200 and resp.json()["exit_code"] == 0, resp.text
    digests = {}
    for line in resp.json()["stdout"].splitlines():
        digest, name = line.split("  ", 1)
        digests[name.removeprefix("./")] = digest
    return digests


def remote_sandbox(fleet: Fleet, node: str) -> str:
    with fleet.client(0) as api:
        resp = api.post("/v1/sandboxes", json={"node": node, "disk_mb": 1024})
        assert resp.status_code == 201, resp.text
        assert resp.json()["node_id"] == node
        return str(resp.json()["id"])


def rate(size: int, seconds: float) -> str:
    return f"{size / MIB:.0f} MiB in {seconds:.1f} s = {size / MIB / seconds:.1f} MiB/s"


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_200_mib_directory_as_tar_gz_through_both_replicas(fleet: Fleet) -> None:
    node = "n2"
    sid = remote_sandbox(fleet, node)
    files = tree()
    total = sum(size for _, size in files)
    assert total > 199 * MIB
    a = fleet.replicas[0].client()
    b = fleet.replicas[1].client()
    a.timeout = b.timeout = DOWNLOAD_TIMEOUT
    with a, b:
        # Up through replica A, made on the fly.
        sent: dict[str, str] = {}
        peaks = watched(fleet, node)
        started = time.monotonic()
        up = a.put(
            f"/v1/sandboxes/{sid}/archive",
            params={"path": "/workspace/tree"},
            content=tar_gz(files, sent),
            headers={"content-type": "application/gzip"},
        )
        up_seconds = time.monotonic() - started
        assert up.status_code == 200, up.text
        assert up.json()["entries"] >= len(files) and up.json()["bytes"] == total, up.json()
        print("archive up through A:", rate(total, up_seconds))
        check_growth(peaks, "archive up")
        assert len(sent) == len(files)
        # Every byte is there, as the sandbox sees it.
        assert sandbox_digests(b, sid, "/workspace/tree") == sent

        # Down through replica B, read as it comes.
        peaks = watched(fleet, node)
        started = time.monotonic()
        got: dict[str, str] = {}
        # Level 0 (stored): the default level spends its time compressing random bytes in the
        # sandbox, which is no part of the path through the fleet.
        where = {"path": "/workspace/tree", "level": "0"}
        with b.stream("GET", f"/v1/sandboxes/{sid}/archive", params=where) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["content-type"] == "application/gzip"
            reader = IterReader(resp.iter_raw(PIECE))
            with tarfile.open(fileobj=io.BufferedReader(reader, PIECE), mode="r|gz") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    digest = hashlib.sha256()
                    while piece := extracted.read(PIECE):
                        digest.update(piece)
                    got[member.name.removeprefix("./")] = digest.hexdigest()
        down_seconds = time.monotonic() - started
        print(f"archive down through B: {rate(total, down_seconds)} ({reader.total / MIB:.0f} MiB"
              " compressed)")  # fmt: skip
        check_growth(peaks, "archive down")
        assert got == sent
        assert a.delete(f"/v1/sandboxes/{sid}").status_code == 200


@pytest.mark.timeout(300)
def test_200_mib_file_through_both_replicas(fleet: Fleet) -> None:
    node = "n3"
    sid = remote_sandbox(fleet, node)
    a = fleet.replicas[0].client()
    b = fleet.replicas[1].client()
    a.timeout = b.timeout = DOWNLOAD_TIMEOUT
    with a, b:
        sent = hashlib.sha256()
        peaks = watched(fleet, node)
        started = time.monotonic()
        up = a.put(
            f"/v1/sandboxes/{sid}/files",
            params={"path": "/workspace/one.bin"},
            content=random_stream(SINGLE_SIZE, sent),
        )
        up_seconds = time.monotonic() - started
        assert up.status_code == 200, up.text
        assert up.json()["size"] == SINGLE_SIZE
        print("file up through A:", rate(SINGLE_SIZE, up_seconds))
        check_growth(peaks, "file up")
        assert sandbox_digests(b, sid, "/workspace") == {"one.bin": sent.hexdigest()}

        peaks = watched(fleet, node)
        started = time.monotonic()
        got = hashlib.sha256()
        size = 0
        where = {"path": "/workspace/one.bin"}
        with b.stream("GET", f"/v1/sandboxes/{sid}/files", params=where) as resp:
            assert resp.status_code == 200, resp.read()
            assert int(resp.headers["content-length"]) == SINGLE_SIZE
            for piece in resp.iter_raw(PIECE):
                got.update(piece)
                size += len(piece)
        down_seconds = time.monotonic() - started
        print("file down through B:", rate(SINGLE_SIZE, down_seconds))
        check_growth(peaks, "file down")
        assert size == SINGLE_SIZE and got.hexdigest() == sent.hexdigest()
        assert b.delete(f"/v1/sandboxes/{sid}").status_code == 200


@pytest.mark.timeout(300)
def test_download_outlasts_a_helper_silent_for_longer_than_a_node_call(fleet: Fleet) -> None:
    """A download whose helper says nothing for a while (here: its sandbox paused; gzip of a
    long run of zeros does the same) goes on once it speaks again, as on a single server."""
    node = "n1"
    sid = remote_sandbox(fleet, node)
    size = 32 * MIB
    a = fleet.replicas[0].client()
    b = fleet.replicas[1].client()
    a.timeout = b.timeout = DOWNLOAD_TIMEOUT
    with a, b:
        sent = hashlib.sha256()
        where = {"path": "/workspace/some.bin"}
        up = a.put(f"/v1/sandboxes/{sid}/files", params=where, content=random_stream(size, sent))
        assert up.status_code == 200, up.text
        got = hashlib.sha256()
        received = 0
        resumer = None
        with b.stream("GET", f"/v1/sandboxes/{sid}/files", params=where) as resp:
            assert resp.status_code == 200
            for piece in resp.iter_raw(256 * 1024):
                got.update(piece)
                received += len(piece)
                if resumer is None:
                    assert a.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
                    resumer = threading.Timer(8.0, lambda: a.post(f"/v1/sandboxes/{sid}/resume"))
                    paused_at = time.monotonic()
                    resumer.start()
        assert resumer is not None
        resumer.join()
        assert time.monotonic() - paused_at >= 8.0
        assert received == size and got.hexdigest() == sent.hexdigest()
        assert b.delete(f"/v1/sandboxes/{sid}").status_code == 200


@pytest.mark.timeout(300)
def test_upload_outlasts_a_helper_not_reading_for_longer_than_a_node_call(fleet: Fleet) -> None:
    """An upload whose helper stops reading for a while (its sandbox paused; a slow disk does
    the same) goes on once it reads again."""
    node = "n3"
    sid = remote_sandbox(fleet, node)
    size = 32 * MIB
    a = fleet.replicas[0].client()
    b = fleet.replicas[1].client()
    a.timeout = b.timeout = DOWNLOAD_TIMEOUT
    with a, b:
        sent = hashlib.sha256()
        timers: list[threading.Timer] = []

        def body() -> Iterator[bytes]:
            for i, piece in enumerate(random_stream(size, sent)):
                if i == 4:
                    assert b.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
                    timers.append(
                        threading.Timer(8.0, lambda: b.post(f"/v1/sandboxes/{sid}/resume"))
                    )
                    timers[0].start()
                yield piece

        started = time.monotonic()
        where = {"path": "/workspace/some.bin"}
        up = a.put(f"/v1/sandboxes/{sid}/files", params=where, content=body())
        assert timers
        timers[0].join()
        assert up.status_code == 200, up.text
        assert time.monotonic() - started >= 8.0
        assert sandbox_digests(a, sid, "/workspace") == {"some.bin": sent.hexdigest()}
        assert b.delete(f"/v1/sandboxes/{sid}").status_code == 200
