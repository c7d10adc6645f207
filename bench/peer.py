"""A peer measured in the same run: SWE-ReX's `swerex-remote` server, started on this host.

It is installed at a pinned version into a venv of its own (`python -m venv`, then pip), so
that its dependencies never meet Corral's; the venv is kept in a cache directory and reused by
later runs. Its exec is `POST /execute` with a `Command` body, as its own client
(`swerex.runtime.remote.RemoteRuntime.execute`) sends it: headers `X-API-Key` and a fresh
`X-Request-ID` (its server answers a repeated id from a cache), and a new TCP connection per
request (the client's aiohttp connector has `force_close=True`). The keep-alive variant and the
32-client loop use one connection per client, as Corral's lean clients do.

The server runs commands directly on the host (no sandbox), as root here, in one uvicorn
process whose `execute` calls `subprocess.run` on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    LeanConnection,
    LeanSyncConnection,
    Sample,
    free_port,
    percentile,
    window_rates,
)
from bench.phases import CpuMeter

VERSION = "1.4.0"
PACKAGE = f"swe-rex=={VERSION}"
DEFAULT_CACHE = Path("/var/tmp/corral-bench-peers")
# Command(command=["true"]).model_dump() of that version: every field, as its client sends it.
EXECUTE_BODY = {
    "command": ["true"], "timeout": None, "shell": False, "check": False, "error_msg": "",
    "env": None, "cwd": None, "merge_output_streams": False,
}  # fmt: skip


def ensure_venv(cache: Path, log: Any = print) -> Path:
    """The venv holding swe-rex at VERSION (made once, then reused); returns its bin/."""
    home = cache / f"swe-rex-{VERSION}"
    marker = home / ".installed"
    if marker.exists() and (home / "bin" / "swerex-remote").exists():
        return home / "bin"
    if home.exists():
        shutil.rmtree(home)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    # The host's own interpreter, not Corral's venv: nothing of Corral's is inherited.
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(home)], check=True, capture_output=True)
    pip = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", PACKAGE],
        capture_output=True, text=True,
    )  # fmt: skip
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {PACKAGE}: {pip.stderr[-800:]}")
    marker.write_text(PACKAGE + "\n")
    log(f"  installed {PACKAGE} into {home} in {time.monotonic() - t0:.1f}s")
    return home / "bin"


class SweRexServer:
    """`swerex-remote --host 127.0.0.1 --port P --auth-token T`, stopped by `stop`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="corral-bench-swerex-", dir="/tmp"))
        self.log_path = self.workdir / "server.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(self.bin / "swerex-remote"), "--host", "127.0.0.1", "--port", str(self.port),
             "--auth-token", self.token],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workdir)},
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"swerex-remote exited: {self.log_path.read_text()[-800:]}")
            with contextlib.suppress(OSError):
                status, body = self.call("GET", "/is_alive", None)
                if status == 200 and json.loads(body).get("is_alive"):
                    return
            time.sleep(0.1)
        raise RuntimeError("swerex-remote did not become ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def request(self, method: str, path: str, body: dict[str, Any] | None,
                *, close: bool = False) -> bytes:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"X-API-Key: {self.token}\r\nX-Request-ID: {uuid.uuid4()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        return head.encode() + data

    def call(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
        """One request on a connection of its own, as swerex's client makes it."""
        return one_shot(self.port, self.request(method, path, body, close=True))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def one_shot(port: int, request: bytes) -> tuple[int, bytes]:
    """Send `request` on a new connection, read the reply (by its Content-Length), close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += _recv(sock)
        head, _, body = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += _recv(sock)
    return int(head[9:12]), body[:length]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(1 << 16)
    if not data:
        raise ConnectionError("the server closed the connection")
    return data


def _ok(status: int, body: bytes) -> bool:
    return status == 200 and b'"exit_code":0' in body.replace(b" ", b"")


def swerex_exec(server: SweRexServer, *, keep_alive: bool) -> tuple[Callable[[], None], Any]:
    """One exec of `true` through swerex's API, and what closes its connection."""
    if not keep_alive:

        def call() -> None:
            _check(*server.call("POST", "/execute", EXECUTE_BODY))

        return call, lambda: None
    conn = LeanSyncConnection("127.0.0.1", server.port, server.token)

    def kept() -> None:
        _check(*conn.send(server.request("POST", "/execute", EXECUTE_BODY)))

    return kept, conn.close


def corral_exec(port: int, token: str, sid: str, *,
                keep_alive: bool) -> tuple[Callable[[], None], Any]:  # fmt: skip
    """The same for Corral: `POST /v1/sandboxes/{sid}/exec` of `true`, args form."""
    conn = LeanSyncConnection("127.0.0.1", port, token)
    request = conn.request(f"/v1/sandboxes/{sid}/exec", {"command": "true", "args": []})

    def check(status: int, body: bytes) -> None:
        if status != 200 or b'"status":"completed"' not in body:
            raise RuntimeError(f"corral exec: {status} {body[:200]!r}")

    if not keep_alive:
        conn.close()
        return lambda: check(*one_shot(port, request)), lambda: None
    return lambda: check(*conn.send(request)), conn.close


def _check(status: int, body: bytes) -> None:
    if not _ok(status, body):
        raise RuntimeError(f"swerex execute: {status} {body[:200]!r}")


def interleaved(
    calls: dict[str, Callable[[], None]], n: int, warmup: int = 10
) -> dict[str, Sample]:
    """Each call timed `n` times (ms), round by round, the order rotating each round, so that
    every figure sees the same host load."""
    names = list(calls)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n + warmup):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            calls[name]()
            if i >= warmup:
                out[name].append((time.perf_counter() - t0) * 1000)
    return {name: Sample(values) for name, values in out.items()}


class _SweRexConnection(LeanConnection):
    def __init__(self, server: SweRexServer) -> None:
        super().__init__("127.0.0.1", server.port, server.token)
        self.server = server

    def execute(self) -> bytes:
        return self.server.request("POST", "/execute", EXECUTE_BODY)


def throughput(server: SweRexServer, clients: int, duration: float, window: float = 0.5) -> Sample:
    """`clients` concurrent loops of exec `true`, one kept connection each (execs/s), with the
    CPU of the server, of this process (the load generator) and of the host."""

    async def go() -> tuple[list[float], list[float], int, float, float, dict[str, float]]:
        stamps: list[float] = []
        lats: list[float] = []
        errors = 0
        conns = [_SweRexConnection(server) for _ in range(clients)]
        try:
            await asyncio.gather(*(c.open() for c in conns))
            start = time.monotonic() + 0.1
            end = start + duration

            async def worker(conn: _SweRexConnection) -> None:
                nonlocal errors
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    status, body = await conn.send(conn.execute())
                    t1 = time.monotonic()
                    if _ok(status, body):
                        stamps.append(t1)
                        lats.append((t1 - t0) * 1000)
                    else:
                        errors += 1

            meter = CpuMeter(server.pid)
            with meter:
                await asyncio.gather(*(worker(c) for c in conns))
            return stamps, lats, errors, start, end, meter.result
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    stamps, lats, errors, start, end, cpu = asyncio.run(go())
    sample = Sample(window_rates(stamps, start, end, window), kind="rate")
    sample.extra.update(
        total_per_second=len([t for t in stamps if t < end]) / duration,
        latency_median_ms=percentile(lats, 50),
        latency_p99_ms=percentile(lats, 99),
        errors=errors,
        **cpu,
    )
    return sample
