"""Shared pieces of the benchmarks: statistics, the server under test, host probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from corral.runtime.uids import pool_range

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Sample:
    """A figure measured as many observations.

    `kind` "latency": smaller is better; the tail is p99.
    `kind` "rate": larger is better; the tail ("p99" column) is the 1st percentile, i.e. the
    slow 1% of the windows or repetitions.
    """

    values: list[float]
    kind: str = "latency"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return percentile(self.values, 50)

    @property
    def tail(self) -> float | None:
        return percentile(self.values, 99 if self.kind == "latency" else 1)

    @classmethod
    def merged(cls, parts: list[Sample]) -> Sample:
        """Rate samples of one figure taken in several windows, as one: their observations
        together; numeric extras (totals per second, cores) averaged, errors summed."""
        sample = cls([v for p in parts for v in p.values], kind=parts[0].kind)
        for key in parts[0].extra:
            values = [p.extra.get(key) for p in parts]
            if key == "errors":
                sample.extra[key] = sum(v or 0 for v in values)
            elif all(isinstance(v, int | float) for v in values):
                sample.extra[key] = sum(values) / len(values)
        sample.extra["windows"] = len(parts)
        return sample

    def summary(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "p99": self.tail,
            "n": len(self.values),
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            **self.extra,
        }


def window_rates(stamps: list[float], start: float, end: float, width: float) -> list[float]:
    """Completions per second in consecutive windows of `width` seconds over [start, end)."""
    n = max(1, int((end - start) / width))
    counts = [0] * n
    for t in stamps:
        i = int((t - start) / width)
        if 0 <= i < n:
            counts[i] += 1
    return [c / width for c in counts]


# --- host probes --------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def mem_available() -> int:
    return meminfo()["MemAvailable"]


def proc_rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (itself, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def pids_of_uids(lo: int, hi: int) -> list[int]:
    """Processes whose real uid is in [lo, hi)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = os.stat(entry.path).st_uid
        except OSError:
            continue
        if lo <= uid < hi:
            found.append(int(entry.name))
    return found


def pss_of(pids: list[int]) -> int:
    """Summed proportional set size (bytes) of the processes: shared pages counted once."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def uid_range_free(lo: int, hi: int) -> bool:
    return not pids_of_uids(lo, hi)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_data_dir(prefix: str) -> Path:
    # Sandboxes' uids must be able to traverse to their workspaces: not under a 0700 dir.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def host_summary() -> dict[str, Any]:
    info = meminfo()
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(info["MemTotal"] / 2**30, 1),
        "mem_available_gib_at_start": round(info["MemAvailable"] / 2**30, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
    }


# --- the server under test ----------------------------------------------------------------------


class Server:
    """`corral serve` in a subprocess, as tests/conftest.py starts it, with its own uid block
    and cgroup name so that it never meets another engineer's test server."""

    def __init__(
        self,
        *,
        uid_base: int,
        uid_count: int,
        admin_key: str,
        env: dict[str, str] | None = None,
        tag: str = "bench",
        src: Path | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.data_dir = make_data_dir(f"corral-{tag}-")
        # What runs `serve ...`: the CLI, or a wrapper around it (bench.trace_fleet's timers).
        self.launcher = launcher or [PYTHON, "-m", "corral.cli.main"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        self.cgroup_name = f"corral-{tag}-{os.getpid()}-{self.data_dir.name[-8:]}"
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.extra_env = env or {}
        self.src = src or REPO / "src"  # a snapshot keeps one run on one version of the code
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def uid_range(self) -> tuple[int, int]:
        uids = pool_range(self.uid_base, self.uid_count)
        return uids.start, uids.stop

    def start(self) -> None:
        env = {
            **os.environ,
            "CORRAL_ADMIN_KEY": self.admin_key,
            "CORRAL_CGROUP_ROOT": self.cgroup_name,
            "CORRAL_UID_BASE": str(self.uid_base),
            "CORRAL_UID_COUNT": str(self.uid_count),
            "CORRAL_LOG_LEVEL": "warning",
            "CORRAL_MAX_SANDBOXES": "2000",
            **self.extra_env,
        }
        env["PYTHONPATH"] = str(self.src)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.launcher, "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become ready: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        remove_cgroups(self.cgroup_name)
        unmount_under(self.data_dir)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=120,
            **kwargs,
        )

    def async_client(self, connections: int = 64) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )


class LeanConnection:
    """One keep-alive HTTP/1.1 connection that sends a pre-encoded POST and reads the reply.

    The load generator for the throughput phase. httpx's connection pool costs the client
    several ms of CPU per request at 32 concurrent requests (on the same 2 cores as the
    server); this costs tens of microseconds, so the phase measures the server.
    """

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def request(self, path: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    async def send(self, request: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


class LeanSyncConnection:
    """The blocking twin of LeanConnection, for timing one request at a time."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.lean = LeanConnection(host, port, token)
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, path: str, body: dict[str, Any]) -> bytes:
        return self.lean.request(path, body)

    def send(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head[9:12]), body

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


CGROUP_MOUNTS = Path("/sys/fs/cgroup")


def remove_cgroups(name: str) -> None:
    """Remove the cgroup `name` from every hierarchy, children first, once its processes are
    gone (a node leaves its base cgroups behind when it stops). Anything still in them, a
    sandbox of a process that was killed, is killed by pid first."""
    if not name or "/" in name:
        return
    bases = [CGROUP_MOUNTS / name, *(p / name for p in CGROUP_MOUNTS.glob("*") if p.is_dir())]
    for base in bases:
        if not base.is_dir():
            continue
        for _ in range(50):
            left = []
            for dirpath, _dirs, _files in os.walk(base):
                try:
                    left += [int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()]
                except OSError:
                    pass
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if not base.exists():
                break
            time.sleep(0.1)


def unmount_under(root: Path) -> None:
    """Lazily unmount whatever is still mounted below `root` (sandbox disks of a node that did
    not stop cleanly), deepest first, so that removing `root` stays inside it."""
    prefix = str(root.resolve()) + "/"
    targets = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix):
            targets.append(target)
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def pick_uid_base(preferred: int, span: int) -> int:
    """A uid block no running process uses (other engineers' servers take their own)."""
    base = preferred
    for _ in range(50):
        if uid_range_free(base, base + span):
            return base
        base += span + 1000
    raise RuntimeError("no free uid block found")


def snapshot_src() -> tuple[Path, dict[str, Any]]:
    """A copy of src/ for this run (others edit the tree while it runs), with its digest."""
    import hashlib

    dest = Path(tempfile.mkdtemp(prefix="corral-bench-src-", dir="/tmp"))
    dest.chmod(0o755)
    shutil.copytree(
        REPO / "src" / "corral", dest / "corral", ignore=shutil.ignore_patterns("__pycache__")
    )
    digest = hashlib.sha256()
    newest = 0.0
    count = 0
    for path in sorted((REPO / "src" / "corral").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
            newest = max(newest, path.stat().st_mtime)
            count += 1
    info = {
        "src_sha256": digest.hexdigest()[:16],
        "src_files": count,
        "src_newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest)),
    }
    return dest, info


def settings_defaults(src: Path) -> dict[str, Any]:
    """The server's defaults that shape the figures (read from the snapshot)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from corral.settings import Settings;"
        "f = Settings.model_fields;"
        "keys = [k for k in f if k.startswith('default_') or 'pool' in k or 'warm' in k];"
        "print(json.dumps({k: f[k].default for k in keys}, default=str))"
    )
    try:
        out = subprocess.run(
            [PYTHON, "-c", code, str(src)], capture_output=True, text=True, timeout=60
        )
        return dict(__import__("json").loads(out.stdout))
    except Exception as exc:  # pragma: no cover - informative only
        return {"error": repr(exc)}
