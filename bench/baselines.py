"""The bare machine, measured in the same run: spawns, bwrap, pipes, tar, idle processes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import Sample, mem_available, pids_of_uids, pss_of, window_rates

TRUE = "/bin/true"
PRODUCER = "yes {line} | head -c {size}"
LINE = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2


def producer(size: int) -> str:
    """The shell command every streaming figure runs: `size` bytes of printable text."""
    return PRODUCER.format(line=LINE, size=size)


def spawn_wait(path: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    pid = os.posix_spawn(path, argv, env if env is not None else {})
    _, status = os.waitpid(pid, 0)
    return status


def posix_spawn_true(n: int, warmup: int = 20) -> Sample:
    """posix_spawn + waitpid of /bin/true, one at a time (ms)."""
    for _ in range(warmup):
        spawn_wait(TRUE, ["true"])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        spawn_wait(TRUE, ["true"])
        out.append((time.perf_counter() - t0) * 1000)
    return Sample(out)


def bwrap_argv(uid: int, command: list[str]) -> list[str]:
    """A fresh sandbox much like the runtime's (all namespaces, no caps, /usr read-only), run as
    an unprivileged uid through setpriv, as the runtime does."""
    return [
        "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        "/usr/bin/bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/",
        "--", *command,
    ]  # fmt: skip


def bwrap_true(uid: int, n: int, warmup: int = 3) -> Sample:
    """A fresh `bwrap ... true` per command (ms)."""
    argv = bwrap_argv(uid, ["/bin/true"])
    env = {"PATH": "/usr/bin:/bin"}
    for _ in range(warmup):
        spawn_wait(argv[0], argv, env)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status = spawn_wait(argv[0], argv, env)
        out.append((time.perf_counter() - t0) * 1000)
        if status != 0:
            raise RuntimeError(f"bwrap baseline failed with wait status {status}")
    return Sample(out)


def spawn_rate(workers: int, duration: float, window: float = 0.5) -> Sample:
    """posix_spawn + wait of /bin/true in `workers` concurrent processes (spawns per second,
    per window)."""
    start = time.monotonic() + 0.3
    end = start + duration
    children = []
    for _ in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            try:
                stamps = []
                while time.monotonic() < start:
                    pass
                while time.monotonic() < end:
                    spawn_wait(TRUE, ["true"])
                    stamps.append(time.monotonic())
                data = pickle.dumps(stamps)
                with os.fdopen(w, "wb") as f:
                    f.write(data)
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    stamps: list[float] = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            stamps += pickle.loads(f.read())
        os.waitpid(pid, 0)
    rates = window_rates(stamps, start, end, window)
    sample = Sample(rates, kind="rate")
    sample.extra["total_per_second"] = len([t for t in stamps if t < end]) / duration
    return sample


def pipe_throughput(size: int, reps: int) -> Sample:
    """MB/s of the producer's output read through a bare pipe into Python (1 MiB reads)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/bin/bash", "-c", producer(size)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        got = 0
        while chunk := os.read(fd, 1 << 20):
            got += len(chunk)
        proc.wait()
        dt = time.perf_counter() - t0
        if got != size:
            raise RuntimeError(f"pipe baseline read {got} of {size} bytes")
        out.append(size / dt / 1e6)
    return Sample(out, kind="rate")


def make_tree(root: Path, total: int, files: int = 32) -> int:
    """A directory of `files` files, half random bytes, half repetitive text; returns bytes."""
    root.mkdir(parents=True, exist_ok=True)
    per = total // files
    text = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit %d\n" * 64) % tuple(range(64))
    written = 0
    for i in range(files):
        sub = root / f"d{i % 4}"
        sub.mkdir(exist_ok=True)
        if i % 2:
            data = os.urandom(per)
        else:
            data = (text * (per // len(text) + 1))[:per]
        (sub / f"f{i}.bin").write_bytes(data)
        written += per
    return written


def make_archive(src: Path) -> bytes:
    return subprocess.run(
        ["tar", "-I", "gzip -1", "-cf", "-", "-C", str(src), "."],
        check=True, capture_output=True,
    ).stdout  # fmt: skip


def tar_extract(archive: bytes, payload: int, reps: int) -> Sample:
    """MB/s (of unpacked bytes) of `tar -xzf -` fed from memory through a pipe."""
    out = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="corral-bench-x-", dir="/tmp") as dest:
            t0 = time.perf_counter()
            subprocess.run(["tar", "-xzf", "-", "-C", dest], input=archive, check=True)
            out.append(payload / (time.perf_counter() - t0) / 1e6)
    return Sample(out, kind="rate")


def tar_create(src: Path, payload: int, reps: int) -> Sample:
    """MB/s (of unpacked bytes) of `tar -cf - | gzip -1` read through a pipe."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["tar", "-I", "gzip -1", "-cf", "-", "-C", str(src), "."], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while os.read(fd, 1 << 20):
            pass
        proc.wait()
        out.append(payload / (time.perf_counter() - t0) / 1e6)
    return Sample(out, kind="rate")


def idle_bwraps(uid: int, count: int, settle: float = 1.5) -> dict[str, float | None]:
    """Memory per idle bare sandbox: `count` x `bwrap ... sleep infinity` under one uid, in a
    memory cgroup of their own (v1, when the host has it) so that what they charge is exact."""
    argv = bwrap_argv(uid, ["/bin/sleep", "infinity"])
    memcg = Path(f"/sys/fs/cgroup/memory/corral-bench-bare-{os.getpid()}")
    try:
        memcg.mkdir(exist_ok=True)
    except OSError:
        memcg = None  # type: ignore[assignment]

    def join() -> None:  # in the child, before exec: everything it starts is charged there
        if memcg is not None:
            (memcg / "cgroup.procs").write_text("0")

    before = mem_available()
    procs = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    argv,
                    env={"PATH": "/usr/bin:/bin"},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=join,
                )
            )
        time.sleep(settle)
        alive = sum(1 for p in procs if p.poll() is None)
        after = mem_available()
        pss = pss_of(pids_of_uids(uid, uid + 1))
        charged = int((memcg / "memory.usage_in_bytes").read_text()) if memcg else None
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()
        if memcg is not None:
            for _ in range(50):
                try:
                    memcg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    n = max(alive, 1)
    return {
        "count": alive,
        "memcg_per_sandbox_mib": charged / n / 2**20 if charged is not None else None,
        "mem_available_per_sandbox_mib": (before - after) / n / 2**20,
        "pss_per_sandbox_mib": pss / n / 2**20,
    }
