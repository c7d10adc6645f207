"""Corral's side of every figure, over HTTP against a server started for the run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import baselines as bare
from bench.common import (
    LeanConnection,
    LeanSyncConnection,
    Sample,
    Server,
    mem_available,
    percentile,
    pids_of_uids,
    proc_cpu_seconds,
    proc_rss,
    pss_of,
    self_cpu_seconds,
    window_rates,
)

TRUE_ARGS = {"command": "true", "args": []}  # no shell: the supervisor execs /usr/bin/true
TRUE_SHELL = {"command": "true"}  # bash -c true, as every face sends it


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Missing(Exception):
    """An endpoint or setting the server under test does not have (yet)."""


def host_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def cgroup_cpu_seconds(cgroup_name: str) -> float | None:
    """CPU used by everything in the server's cgroup tree (its sandboxes), from cgroup2's
    cpu.stat (present without the cpu controller too)."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        path = Path(root) / cgroup_name / "cpu.stat"
        try:
            for line in path.read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        except OSError:
            continue
    return None


class CpuMeter:
    """CPU used by the server process, its sandboxes, this process (the load generator), and
    the whole host, over a phase; in cores. `probes` name more of it: each gives the CPU
    seconds a part has used so far (other processes of a fleet)."""

    def __init__(
        self,
        server_pid: int,
        cgroup_name: str | None = None,
        probes: dict[str, Callable[[], float]] | None = None,
    ) -> None:
        self.pid = server_pid
        self.cgroup = cgroup_name
        self.probes = probes or {}

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.s0 = proc_cpu_seconds(self.pid)
        self.c0 = self_cpu_seconds()
        self.h0 = host_busy()
        self.g0 = cgroup_cpu_seconds(self.cgroup) if self.cgroup else None
        self.p0 = {name: probe() for name, probe in self.probes.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.monotonic() - self.t0
        h1 = host_busy()
        g1 = cgroup_cpu_seconds(self.cgroup) if self.cgroup else None
        self.result = {
            "server_cores": (proc_cpu_seconds(self.pid) - self.s0) / dt,
            "sandbox_cores": (g1 - self.g0) / dt
            if g1 is not None and self.g0 is not None
            else None,
            "client_cores": (self_cpu_seconds() - self.c0) / dt,
            "host_busy_cores": (h1[0] - self.h0[0]) / max(h1[1] - self.h0[1], 1) * os.cpu_count(),
        }
        for name, probe in self.probes.items():
            self.result[f"{name}_cores"] = (probe() - self.p0[name]) / dt


class CorralBench:
    def __init__(self, server: Server, *, quick: bool, log: Callable[[str], None]) -> None:
        self.server = server
        self.quick = quick
        self.log = log
        self.http = server.client()
        self.paths: dict[str, set[str]] = {}
        self.warm: str | None = None
        self.details: dict[str, Any] = {}
        self.uploads = 0

    # --- helpers ---

    def discover(self) -> None:
        spec = self.http.get("/openapi.json").json()
        self.paths = {p: {m.upper() for m in ops} for p, ops in spec.get("paths", {}).items()}

    def has(self, path: str, method: str = "GET") -> bool:
        return method.upper() in self.paths.get(path, set())

    def create(self, client: httpx.Client | None = None, **body: Any) -> str:
        r = (client or self.http).post("/v1/sandboxes", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"create sandbox: {r.status_code} {r.text[:300]}")
        return str(r.json()["id"])

    def delete(self, sid: str) -> None:
        self.http.delete(f"/v1/sandboxes/{sid}")

    def exec_ok(self, sid: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.http.post(f"/v1/sandboxes/{sid}/exec", json=body or TRUE_ARGS)
        data = r.json()
        if r.status_code != 200 or data.get("status") != "completed" or data.get("exit_code"):
            raise RuntimeError(f"exec failed: {r.status_code} {r.text[:300]}")
        return data

    def warm_sandbox(self) -> str:
        if self.warm is None:
            self.warm = self.create(name="bench-warm")
            for _ in range(10):
                self.exec_ok(self.warm)
        return self.warm

    @staticmethod
    def timed(fn: Callable[[], Any], n: int, warmup: int = 10,
              pair: Callable[[], Any] | None = None) -> Sample:  # fmt: skip
        """`n` timed calls of `fn` (ms). With `pair`, each call is followed by one timed call
        of `pair` (the baseline, interleaved so that both see the same host load), returned
        in `sample.extra["pair"]`."""
        for _ in range(warmup):
            fn()
        out, paired = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
            if pair is not None:
                t0 = time.perf_counter()
                pair()
                paired.append((time.perf_counter() - t0) * 1000)
        sample = Sample(out)
        if pair is not None:
            sample.extra["pair"] = Sample(paired)
        return sample

    # --- exec round trip ---

    def healthz(self, n: int, pair: Callable[[], Any] | None = None) -> Sample:
        def call() -> None:
            r = self.http.get("/healthz")
            r.raise_for_status()

        return self.timed(call, n, pair=pair)

    def exec_native(self, n: int, body: dict[str, Any],
                    pair: Callable[[], Any] | None = None) -> Sample:  # fmt: skip
        sid = self.warm_sandbox()
        phases: dict[str, list[float]] = {"queue_ms": [], "run_ms": [], "duration_ms": []}

        def call() -> None:
            data = self.exec_ok(sid, body)
            created, started, finished = (
                _ts(data.get("created_at")),
                _ts(data.get("started_at")),
                _ts(data.get("finished_at")),
            )
            if created and started and finished:
                phases["queue_ms"].append((started - created) * 1000)
                phases["run_ms"].append((finished - started) * 1000)
            if data.get("duration_ms") is not None:
                phases["duration_ms"].append(float(data["duration_ms"]))

        sample = self.timed(call, n, pair=pair)
        for key, values in phases.items():
            values = values[-n:]
            if values:
                sample.extra[f"server_{key}_median"] = percentile(values, 50)
        return sample

    def exec_lean(self, n: int, body: dict[str, Any],
                  pair: Callable[[], Any] | None = None) -> Sample:  # fmt: skip
        """As exec_native, from a minimal keep-alive HTTP/1.1 client (no httpx)."""
        sid = self.warm_sandbox()
        conn = LeanSyncConnection("127.0.0.1", self.server.port, self.server.admin_key)
        request = conn.request(f"/v1/sandboxes/{sid}/exec", body)

        def call() -> None:
            status, data = conn.send(request)
            if status != 200 or b'"status":"completed"' not in data:
                raise RuntimeError(f"exec: {status} {data[:300]!r}")

        try:
            return self.timed(call, n, pair=pair)
        finally:
            conn.close()

    def face_calls(self) -> dict[str, Callable[[], None] | str]:
        """One `true` round trip per face, or why it cannot be measured."""
        sid = self.warm_sandbox()
        key = self.server.admin_key
        http = self.http
        calls: dict[str, Callable[[], None] | str] = {}

        def check(r: httpx.Response, ok: Callable[[Any], bool]) -> None:
            if r.status_code != 200 or not ok(r):
                raise RuntimeError(f"{r.request.url.path}: {r.status_code} {r.text[:300]}")

        if self.has("/v1/runtimes/{runtime}/exec", "POST"):

            def runta() -> None:
                r = http.post(f"/v1/runtimes/{sid}/exec", json={"command": "true"})
                check(r, lambda r: r.json()["data"].get("exit_code") == 0)

            calls["Runta"] = runta
        else:
            calls["Runta"] = "n/a (endpoint missing)"

        if self.has("/v1/commands", "POST"):

            def cmdop() -> None:
                r = http.post("/v1/commands", json={"machine_id": sid, "command": "true"})
                check(r, lambda r: r.json()["data"]["exit_code"] == 0)

            calls["CMDOP"] = cmdop
        else:
            calls["CMDOP"] = "n/a (endpoint missing)"

        if self.has("/v1/vms/{vm_id}/exec", "POST"):

            def rds() -> None:
                r = http.post(
                    f"/v1/vms/{sid}/exec",
                    json={"cmd": "true"},
                    headers={"Authorization": "", "X-API-Key": key},
                )
                check(r, lambda r: r.json()["exitCode"] == 0)

            calls["run-dat-sheesh"] = rds
        else:
            calls["run-dat-sheesh"] = "n/a (endpoint missing)"

        if self.has("/v2/sandboxes/sessions/{session_id}/cmd", "POST"):

            def vercel() -> None:
                r = http.post(
                    f"/v2/sandboxes/sessions/{sid}/cmd",
                    json={"command": "true", "args": [], "wait": True},
                )
                check(r, lambda r: '"exitCode":0' in r.text.replace(" ", ""))

            calls["Vercel"] = vercel
        else:
            calls["Vercel"] = "n/a (endpoint missing)"

        if self.has("/run/{user}/{command}", "GET") and self.has("/v1/users", "POST"):
            try:
                r = http.post("/v1/users", json={"name": "bench"})
                if r.status_code not in (200, 201, 409):
                    raise Missing(f"n/a (user: {r.status_code})")
                r = http.post(
                    "/v1/users/bench/commands",
                    json={"name": "true", "command": "true", "sandbox": sid},
                )
                if r.status_code not in (200, 201, 409):
                    raise Missing(f"n/a (named command: {r.status_code} {r.text[:120]})")

                def cmdio() -> None:
                    r = http.get("/run/bench/true")
                    check(r, lambda r: r.headers.get("x-exit-code") == "0")

                calls["cmd.io"] = cmdio
            except Missing as exc:
                calls["cmd.io"] = str(exc)
        else:
            calls["cmd.io"] = "n/a (endpoint missing)"
        return calls

    # --- create to first exec ---

    def create_to_first(self, n: int, *, pause: float = 0.0, client: httpx.Client | None = None,
                        pair: Callable[[], Any] | None = None,
                        warmup: int = 2) -> Sample:  # fmt: skip
        http = client or self.http
        creates = []
        out = []
        made = []
        paired = []
        try:
            for i in range(n + warmup):
                if pause:
                    time.sleep(pause)
                t0 = time.perf_counter()
                sid = self.create(http)
                t1 = time.perf_counter()
                r = http.post(f"/v1/sandboxes/{sid}/exec", json=TRUE_ARGS)
                t2 = time.perf_counter()
                if r.status_code != 200 or r.json().get("status") != "completed":
                    raise RuntimeError(f"first exec failed: {r.status_code} {r.text[:300]}")
                made.append(sid)
                if i >= warmup:
                    creates.append((t1 - t0) * 1000)
                    out.append((t2 - t0) * 1000)
                # Delete out of the timed path, one by one (density is measured elsewhere).
                http.delete(f"/v1/sandboxes/{sid}")
                made.remove(sid)
                if pair is not None and i >= warmup:
                    t0 = time.perf_counter()
                    pair()
                    paired.append((time.perf_counter() - t0) * 1000)
        finally:
            for sid in made:
                http.delete(f"/v1/sandboxes/{sid}")
        sample = Sample(out)
        sample.extra["create_only_median_ms"] = percentile(creates, 50)
        sample.extra["create_only_p99_ms"] = percentile(creates, 99)
        if pair is not None:
            sample.extra["pair"] = Sample(paired)
        return sample

    # --- throughput ---

    def make_sandboxes(
        self, count: int, concurrency: int = 4, body: dict[str, Any] | None = None
    ) -> list[str]:
        async def go() -> list[str]:
            sem = asyncio.Semaphore(concurrency)
            async with self.server.async_client() as client:

                async def one() -> str:
                    async with sem:
                        r = await client.post("/v1/sandboxes", json=body or {})
                        if r.status_code != 201:
                            raise RuntimeError(f"create: {r.status_code} {r.text[:200]}")
                        return str(r.json()["id"])

                return list(await asyncio.gather(*(one() for _ in range(count))))

        return asyncio.run(go())

    def delete_all(self, sids: list[str], concurrency: int = 8, budget: float = 600) -> float:
        """Delete the sandboxes; returns seconds taken (stops early at `budget`)."""

        async def go() -> None:
            sem = asyncio.Semaphore(concurrency)
            deadline = time.monotonic() + budget
            async with self.server.async_client() as client:

                async def one(sid: str) -> None:
                    async with sem:
                        if time.monotonic() < deadline:
                            await client.delete(f"/v1/sandboxes/{sid}")

                await asyncio.gather(*(one(s) for s in sids))

        t0 = time.monotonic()
        asyncio.run(go())
        return time.monotonic() - t0

    def throughput(self, sids: list[str], clients: int, duration: float,
                   window: float = 0.5, *, servers: list[Server] | None = None,
                   probes: dict[str, Callable[[], float]] | None = None,
                   cgroup_name: str | None = None) -> Sample:  # fmt: skip
        """`clients` concurrent loops of exec `true`, each on its own sandbox (execs/s).
        With `servers`, client i talks to servers[i % len(servers)] (replicas of a fleet);
        `probes` and `cgroup_name` go to the CPU meter (see CpuMeter)."""
        targets = servers or [self.server]

        async def go() -> tuple[list[float], list[float], int, float, float, dict[str, float]]:
            stamps: list[float] = []
            lats: list[float] = []
            errors = 0
            # One lean keep-alive connection per client (see LeanConnection).
            conns = [LeanConnection("127.0.0.1", targets[i % len(targets)].port,
                                    self.server.admin_key)
                     for i in range(clients)]  # fmt: skip
            try:
                await asyncio.gather(*(c.open() for c in conns))
                start = time.monotonic() + 0.1
                end = start + duration

                async def worker(conn: LeanConnection, sid: str) -> None:
                    nonlocal errors
                    request = conn.request(f"/v1/sandboxes/{sid}/exec", TRUE_ARGS)
                    await asyncio.sleep(max(0.0, start - time.monotonic()))
                    while time.monotonic() < end:
                        t0 = time.monotonic()
                        status, body = await conn.send(request)
                        t1 = time.monotonic()
                        if status == 200 and b'"status":"completed"' in body:
                            stamps.append(t1)
                            lats.append((t1 - t0) * 1000)
                        else:
                            errors += 1

                meter = CpuMeter(self.server.pid, cgroup_name or self.server.cgroup_name, probes)
                with meter:
                    await asyncio.gather(
                        *(worker(c, sids[i % len(sids)]) for i, c in enumerate(conns))
                    )
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

    # --- streams ---

    def start_command(self, sid: str, command: str, max_output: int) -> str:
        r = self.http.post(
            f"/v1/sandboxes/{sid}/commands",
            json={"command": command, "max_output_bytes": max_output},
        )
        if r.status_code != 202:
            raise RuntimeError(f"start command: {r.status_code} {r.text[:300]}")
        return str(r.json()["id"])

    def stream_raw(self, size: int, reps: int) -> Sample:
        path = "/v1/sandboxes/{sandbox}/commands/{command_id}/logs"
        if not self.has(path):
            raise Missing("n/a (endpoint missing)")
        sid = self.warm_sandbox()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cid = self.start_command(sid, bare.producer(size), size)
            got = 0
            with self.http.stream(
                "GET",
                f"/v1/sandboxes/{sid}/commands/{cid}/logs",
                params={"format": "raw", "stream": "stdout"},
            ) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"raw stream: {r.status_code} {r.read()[:300]!r}")
                for chunk in r.iter_raw(1 << 20):
                    got += len(chunk)
            dt = time.perf_counter() - t0
            if got != size:
                raise RuntimeError(f"raw stream gave {got} of {size} bytes")
            out.append(size / dt / 1e6)
        return Sample(out, kind="rate")

    def stream_ws(self, size: int, reps: int) -> Sample:
        try:
            from websockets.exceptions import InvalidStatus
            from websockets.sync.client import connect
        except ImportError:
            raise Missing("n/a (no websockets client installed)") from None
        sid = self.warm_sandbox()
        base = self.server.url.replace("http://", "ws://")
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cid = self.start_command(sid, bare.producer(size), size)
            got = 0
            try:
                ws_conn = connect(
                    f"{base}/v1/sandboxes/{sid}/commands/{cid}/attach",
                    additional_headers={"Authorization": f"Bearer {self.server.admin_key}"},
                    max_size=None,
                    compression=None,
                )
            except InvalidStatus as exc:
                if exc.response.status_code in (403, 404):
                    # Starlette refuses an unknown WebSocket route with 403 or 404.
                    self.http.post(f"/v1/sandboxes/{sid}/commands/{cid}/cancel")
                    raise Missing("n/a (endpoint missing)") from None
                raise
            with ws_conn as ws:
                while True:
                    frame = json.loads(ws.recv())
                    kind = frame.get("type")
                    if kind == "stdout":
                        if "data" in frame:
                            got += len(frame["data"].encode())
                        else:
                            import base64

                            got += len(base64.b64decode(frame["data_base64"]))
                    elif kind in ("exit", "error"):
                        if kind == "error":
                            raise RuntimeError(f"ws stream error frame: {frame}")
                        break
            dt = time.perf_counter() - t0
            if got != size:
                raise RuntimeError(f"ws stream gave {got} of {size} bytes")
            out.append(size / dt / 1e6)
        return Sample(out, kind="rate")

    # --- files ---

    def archive_upload(self, archive: bytes, payload: int, reps: int) -> Sample:
        if not self.has("/v1/sandboxes/{sandbox}/archive", "PUT"):
            raise Missing("n/a (endpoint missing)")
        sid = self.warm_sandbox()
        out = []
        for _ in range(reps):
            i, self.uploads = self.uploads, self.uploads + 1  # a fresh directory each time
            t0 = time.perf_counter()
            r = self.http.put(
                f"/v1/sandboxes/{sid}/archive",
                params={"path": f"/workspace/up{i}"},
                content=archive,
                headers={"content-type": "application/gzip"},
            )
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"upload: {r.status_code} {r.text[:300]}")
            out.append(payload / dt / 1e6)
        return Sample(out, kind="rate")

    def archive_download(self, payload: int, reps: int) -> Sample:
        if not self.has("/v1/sandboxes/{sandbox}/archive", "GET"):
            raise Missing("n/a (endpoint missing)")
        sid = self.warm_sandbox()
        out = []
        sizes = []
        for _ in range(reps):
            t0 = time.perf_counter()
            got = 0
            with self.http.stream(
                "GET", f"/v1/sandboxes/{sid}/archive", params={"path": "/workspace/up0"}
            ) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"download: {r.status_code} {r.read()[:300]!r}")
                for chunk in r.iter_raw(1 << 20):
                    got += len(chunk)
            dt = time.perf_counter() - t0
            sizes.append(got)
            out.append(payload / dt / 1e6)
        sample = Sample(out, kind="rate")
        sample.extra["archive_bytes"] = sizes[-1] if sizes else None
        return sample

    # --- density ---

    def density(self, target: int, *, floor_bytes: int, budget: float, batch: int = 8,
                concurrency: int = 6, pair: Callable[[], Any] | None = None,
                ) -> dict[str, Any]:  # fmt: skip
        """Create idle sandboxes in batches until `target`, a failure, the memory floor or the
        time budget; measure what they hold; delete them all."""
        srv = self.server
        memcg = Path(f"/sys/fs/cgroup/memory/{srv.cgroup_name}/memory.usage_in_bytes")
        lo, hi = srv.uid_range

        def cg_bytes() -> int | None:
            try:
                return int(memcg.read_text())
            except OSError:
                return None

        time.sleep(1.0)
        avail0, rss0, cg0 = mem_available(), proc_rss(srv.pid), cg_bytes()
        pss0 = pss_of(pids_of_uids(lo, hi))
        sids: list[str] = []
        stop_reason = f"reached the target of {target}"
        t0 = time.monotonic()
        create_lats: list[float] = []

        async def fill() -> str:
            sem = asyncio.Semaphore(concurrency)
            async with srv.async_client(connections=concurrency + 2) as client:

                async def one() -> str | None:
                    async with sem:
                        s = time.monotonic()
                        r = await client.post("/v1/sandboxes", json={})
                        if r.status_code != 201:
                            return f"create failed: {r.status_code} {r.text[:200]}"
                        create_lats.append((time.monotonic() - s) * 1000)
                        sids.append(str(r.json()["id"]))
                        return None

                while len(sids) < target:
                    if time.monotonic() - t0 > budget:
                        return f"time budget of {budget:.0f} s"
                    if mem_available() < floor_bytes:
                        return f"host memory available under the floor ({floor_bytes >> 30} GiB)"
                    n = min(batch, target - len(sids))
                    errors = [e for e in await asyncio.gather(*(one() for _ in range(n))) if e]
                    if errors:
                        return errors[0]
                    if len(sids) % 100 < batch:
                        self.log(f"    density: {len(sids)} sandboxes, "
                                 f"{mem_available() / 2**30:.1f} GiB available")  # fmt: skip
            return f"reached the target of {target}"

        try:
            stop_reason = asyncio.run(fill())
            fill_s = time.monotonic() - t0
            time.sleep(2.0)
            count = len(sids)
            # Held at once: every one of them answers (a sample of them runs a command).
            alive = 0
            probe = random.sample(sids, min(20, count)) if count else []
            for sid in probe:
                try:
                    self.exec_ok(sid)
                    alive += 1
                except Exception:
                    pass
            listed = 0
            cursor = None
            while True:
                params: dict[str, Any] = {"state": "running", "limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                page = self.http.get("/v1/sandboxes", params=params).json()
                listed += len(page.get("items", []))
                cursor = page.get("next_cursor")
                if not cursor:
                    break
            avail1, rss1, cg1 = mem_available(), proc_rss(srv.pid), cg_bytes()
            pss1 = pss_of(pids_of_uids(lo, hi))
            procs = len(pids_of_uids(lo, hi))
            # What a new sandbox costs while they are all there, beside a bare bwrap then.
            peak = self.create_to_first(5, pair=pair)
            if sids:
                rtt = self.timed(lambda: self.exec_ok(sids[0]), 30, warmup=3)
            else:
                rtt = None
        finally:
            self.log(f"    density: deleting {len(sids)} sandboxes")
            delete_s = self.delete_all(sids, budget=240)
        held = min(listed, count) if alive == len(probe) else 0
        n = max(count, 1)
        return {
            "held": held,
            "created": count,
            "running_listed": listed,
            "probe_ok": f"{alive}/{len(probe)}",
            "stop_reason": stop_reason,
            "fill_seconds": fill_s,
            "create_per_second": count / fill_s if fill_s else None,
            "create_latency_median_ms": percentile(create_lats, 50),
            "create_latency_p99_ms": percentile(create_lats, 99),
            "delete_seconds": delete_s,
            "mem_available_per_sandbox_mib": (avail0 - avail1) / n / 2**20,
            "memcg_per_sandbox_mib": (cg1 - cg0) / n / 2**20 if cg0 is not None and cg1 else None,
            "pss_per_sandbox_mib": (pss1 - pss0) / n / 2**20,
            "server_rss_per_sandbox_kib": (rss1 - rss0) / n / 1024,
            "server_rss_mib": rss1 / 2**20,
            "processes_per_sandbox": procs / n,
            "mem_available_gib_at_peak": avail1 / 2**30,
            "peak_create_first_exec": peak,
            "peak_exec_rtt": rtt,
        }


def tree_for_files(total: int) -> tuple[Path, int, bytes]:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-tree-", dir="/tmp"))
    payload = bare.make_tree(root / "t", total)
    return root, payload, bare.make_archive(root / "t")


def remove_tree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
