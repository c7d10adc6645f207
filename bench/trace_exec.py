"""Where one exec round trip's time goes, stage by stage.

    .venv/bin/python -m bench.trace_exec [--n 300] [--shell]

Runs the server in this process (uvicorn, uvloop, httptools, as `corral serve` does) with timers
wrapped around its stages (nothing in src/ is changed: the wrappers are installed at run time),
drives `--n` sequential `POST /v1/sandboxes/{id}/exec` of `true` from a client thread, and
prints, per stage: calls per exec, median and p90 duration, and time per exec. It also counts
the round trips to the SQLite worker thread (aiosqlite) and the hops to worker threads
(asyncio.to_thread) per exec. Stages nest (CommandService.run contains start, which contains
LocalNode.run, ...), so the per-exec times do not add up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, free_port, make_data_dir, percentile, pick_uid_base
from corral.runtime.uids import pool_range

sys.path.insert(0, str(REPO / "src"))

DURATIONS: dict[str, list[float]] = collections.defaultdict(list)
THREAD_FUNCS: collections.Counter[str] = collections.Counter()
DB_CALLS: collections.Counter[str] = collections.Counter()


def _wrap(owner: Any, attr: str, label: str) -> bool:
    fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    if fn is None:
        return False
    wrapper: Any = None
    if isinstance(fn, (staticmethod, classmethod)):
        wrapper, fn = type(fn), fn.__func__  # wrap the function, then re-wrap as it was
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                DURATIONS[label].append(time.perf_counter() - t0)

        setattr(owner, attr, wrapper(timed_async) if wrapper else timed_async)
    else:

        @functools.wraps(fn)
        def timed_sync(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                DURATIONS[label].append(time.perf_counter() - t0)

        setattr(owner, attr, wrapper(timed_sync) if wrapper else timed_sync)
    return True


def install() -> list[str]:
    import aiosqlite.core

    from corral.core import commands, sandboxes, tokens
    from corral.node import local, output_log
    from corral.runtime import cgroups, command_cgroups, limits, namespaces, rootfs

    wrapped = []
    targets = [
        (tokens.TokenService, "authenticate", "auth: TokenService.authenticate"),
        (sandboxes.SandboxService, "row", "db: SandboxService.row"),
        (sandboxes.SandboxService, "running_row", "db: SandboxService.running_row"),
        (commands.CommandService, "run", "CommandService.run (whole exec, server side)"),
        (commands.CommandService, "start", "CommandService.start (insert + spawn)"),
        (commands.CommandService, "_record", "db: CommandService._record (update + commit)"),
        (commands.CommandService, "get", "CommandService.get (row + output)"),
        (commands.CommandService, "row", "db: CommandService.row"),
        (commands.CommandService, "wait_finished", "CommandService.wait_finished"),
        (local.LocalNode, "run", "LocalNode.run (spawn + log + execution)"),
        (local.LocalExecution, "_supervise", "LocalExecution._supervise (process lifetime)"),
        (local.LocalExecution, "_wait_exit", "LocalExecution._wait_exit"),
        (namespaces.NamespacesSandbox, "spawn", "NamespacesSandbox.spawn (until 'started')"),
        (namespaces.NamespacesSandbox, "_send", "NamespacesSandbox._send (sendmsg)"),
        (namespaces.NamespacesProcess, "release", "NamespacesProcess.release (cgroups kept)"),
        (namespaces.NamespacesProcess, "usage", "NamespacesProcess.usage (cgroup reads)"),
        (cgroups.CgroupTree, "remove", "CgroupTree.remove"),
        (command_cgroups.CommandCgroups, "make", "CommandCgroups.make (mkdirs + opens)"),
        (command_cgroups.CommandCgroups, "reusable", "CommandCgroups.reusable (kept for the next)"),
        (command_cgroups.CommandCgroups, "remove", "CommandCgroups.remove (rmdirs)"),
        (output_log.OutputLog, "__init__", "OutputLog.__init__ (mkdir + open)"),
        (output_log.OutputLog, "close", "OutputLog.close"),
        # Creating a sandbox (--create).
        (sandboxes.SandboxService, "create", "create: SandboxService.create (whole)"),
        (sandboxes.SandboxService, "_boot", "create: SandboxService._boot"),
        (sandboxes.SandboxService, "_set_state", "create: SandboxService._set_state (db)"),
        (sandboxes.SandboxService, "get", "create: SandboxService.get (db)"),
        (local.LocalNode, "start_sandbox", "create: LocalNode.start_sandbox"),
        (namespaces.NamespacesRuntime, "start", "create: NamespacesRuntime.start (to 'ready')"),
        (namespaces.NamespacesRuntime, "_make_dirs", "create: NamespacesRuntime._make_dirs"),
        (namespaces.NamespacesRuntime, "_map_users", "create: _map_users (bwrap to uid_map)"),
        (limits.ResourceControl, "create", "create: ResourceControl.create (v1 cgroups)"),
        (namespaces.NamespacesRuntime, "_mount_disk", "create: _mount_disk (mkfs + loop mount)"),
        (namespaces.NamespacesRuntime, "_make_overlay_root", "create: _make_overlay_root"),
        (rootfs, "mount_root", "create: rootfs.mount_root (idmapped + overlays)"),
        (rootfs, "secure_mount_points", "create: rootfs.secure_mount_points"),
        (rootfs, "prepare_writable", "create: rootfs.prepare_writable"),
        (cgroups.CgroupTree, "kill_and_remove", "CgroupTree.kill_and_remove"),
        (sandboxes.SandboxService, "delete", "delete: SandboxService.delete"),
        (namespaces.NamespacesSandbox, "stop", "delete: NamespacesSandbox.stop"),
        (namespaces.NamespacesRuntime, "remove_files", "delete: NamespacesRuntime.remove_files"),
    ]
    for owner, attr, label in targets:
        if _wrap(owner, attr, label):
            wrapped.append(label)

    original_execute = aiosqlite.core.Connection._execute

    async def counted_execute(self: Any, fn: Any, *a: Any, **k: Any) -> Any:
        name = getattr(fn, "__name__", str(fn))
        DB_CALLS[name] += 1

        def in_thread(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                DURATIONS[f"sqlite3 {name}() in the worker thread (each)"].append(
                    time.perf_counter() - t
                )

        t0 = time.perf_counter()
        try:
            return await original_execute(self, in_thread, *a, **k)
        finally:
            DURATIONS["aiosqlite round trip (each)"].append(time.perf_counter() - t0)

    aiosqlite.core.Connection._execute = counted_execute  # type: ignore[method-assign]

    original_to_thread = asyncio.to_thread

    async def counted_to_thread(func: Any, /, *a: Any, **k: Any) -> Any:
        THREAD_FUNCS[getattr(func, "__qualname__", str(func))] += 1
        t0 = time.perf_counter()
        try:
            return await original_to_thread(func, *a, **k)
        finally:
            DURATIONS["asyncio.to_thread hop (each)"].append(time.perf_counter() - t0)

    asyncio.to_thread = counted_to_thread  # type: ignore[assignment]
    return wrapped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--shell", action="store_true", help="exec the shell string `true`")
    ap.add_argument("--uid-base", type=int, default=680_000)
    ap.add_argument(
        "--clients",
        type=int,
        default=1,
        help="concurrent clients (each on its own sandbox), from a separate process",
    )
    ap.add_argument("--duration", type=float, default=8.0, help="seconds, with --clients > 1")
    ap.add_argument(
        "--create",
        type=int,
        default=0,
        help="time N sequential create -> first exec -> delete instead",
    )
    ap.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="with --create: first create this many idle sandboxes (kept)",
    )
    ap.add_argument(
        "--load", nargs=4, metavar=("URL", "KEY", "CLIENTS", "SECONDS"), help=argparse.SUPPRESS
    )  # the load generator's own process
    args = ap.parse_args()
    if args.load:
        return load(*args.load)

    data_dir = make_data_dir("corral-trace-")
    uid_base = pick_uid_base(args.uid_base, len(pool_range(0, 2500)) + 200)
    port = free_port()
    key = "crl_trace_" + os.urandom(8).hex()
    os.environ.update(
        CORRAL_ADMIN_KEY=key,
        CORRAL_CGROUP_ROOT=f"corral-trace-{os.getpid()}",
        CORRAL_UID_BASE=str(uid_base),
        CORRAL_UID_COUNT="2500",
        CORRAL_LOG_LEVEL="warning",
    )
    wrapped = install()

    import httpx
    import uvicorn

    from corral.api.app import create_app
    from corral.settings import Settings

    settings = Settings(host="127.0.0.1", port=port, data_dir=data_dir)
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        lifespan="on", log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    rtts: list[float] = []
    errors: list[str] = []
    body = {"command": "true"} if args.shell else {"command": "true", "args": []}

    def drive() -> None:
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            ) as http:
                if args.create:
                    if args.prefill:
                        from concurrent.futures import ThreadPoolExecutor

                        def one(_: int) -> None:
                            http.post("/v1/sandboxes", json={})

                        t_fill = time.perf_counter()
                        with ThreadPoolExecutor(6) as pool:
                            list(pool.map(one, range(args.prefill)))
                        print(f"prefilled {args.prefill} sandboxes in "
                              f"{time.perf_counter() - t_fill:.0f} s")  # fmt: skip
                    creates, firsts = [], []
                    for i in range(args.create + 2):
                        if i == 2:
                            DURATIONS.clear()
                            THREAD_FUNCS.clear()
                            DB_CALLS.clear()
                            creates.clear()
                            firsts.clear()
                        t0 = time.perf_counter()
                        sid = http.post("/v1/sandboxes", json={}).json()["id"]
                        t1 = time.perf_counter()
                        http.post(f"/v1/sandboxes/{sid}/exec", json=body)
                        t2 = time.perf_counter()
                        creates.append((t1 - t0) * 1000)
                        firsts.append((t2 - t0) * 1000)
                        snapshot = (dict(DURATIONS), dict(THREAD_FUNCS), dict(DB_CALLS))
                        http.delete(f"/v1/sandboxes/{sid}")
                    print(f"\ncreate: median {percentile(creates, 50):.1f} ms; create -> first "
                          f"exec result: median {percentile(firsts, 50):.1f} ms, p99 "
                          f"{percentile(firsts, 99):.1f} ms (delete stages are of the previous "
                          "iterations)")  # fmt: skip
                    report(args.create, firsts, *snapshot, wrapped)
                    return
                sid = http.post("/v1/sandboxes", json={}).json()["id"]
                for _ in range(30):
                    http.post(f"/v1/sandboxes/{sid}/exec", json=body)
                DURATIONS.clear()
                THREAD_FUNCS.clear()
                DB_CALLS.clear()
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    r = http.post(f"/v1/sandboxes/{sid}/exec", json=body)
                    rtts.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        errors.append(r.text[:200])
                snapshot = (dict(DURATIONS), dict(THREAD_FUNCS), dict(DB_CALLS))
                http.delete(f"/v1/sandboxes/{sid}")
            report(args.n, rtts, *snapshot, wrapped)
        except Exception as exc:  # pragma: no cover - reported, then the server stops
            errors.append(repr(exc))
        finally:
            server.should_exit = True

    def drive_concurrent() -> None:
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.trace_exec", "--load", url, key,
                 str(args.clients), str(args.duration)],
                cwd=str(REPO), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "ready": sandboxes made, warm
            if line.strip() != "ready":
                raise RuntimeError(f"load generator: {line!r}")
            DURATIONS.clear()
            THREAD_FUNCS.clear()
            DB_CALLS.clear()
            proc.stdin = None
            rest = proc.stdout.read()
            proc.wait()
            snapshot = (dict(DURATIONS), dict(THREAD_FUNCS), dict(DB_CALLS))
            result = json.loads(rest.strip().splitlines()[-1])
            rtts.extend(result["latencies"])
            print(f"\n{args.clients} clients for {args.duration} s: "
                  f"{result['rate']:.1f} execs/s, errors {result['errors']}")  # fmt: skip
            report(max(len(rtts), 1), rtts, *snapshot, wrapped)
        except Exception as exc:  # pragma: no cover
            errors.append(repr(exc))
        finally:
            server.should_exit = True

    target = drive if args.clients <= 1 else drive_concurrent
    threading.Thread(target=target, daemon=True).start()
    try:
        server.run()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if errors:
        print("errors:", errors[:5])
    return 1 if errors else 0


def load(url: str, key: str, clients_s: str, seconds_s: str) -> int:
    """The load generator: `clients` loops of exec `true`, each on its own sandbox."""
    import httpx

    clients, seconds = int(clients_s), float(seconds_s)

    async def go() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
        ) as http:
            sids = []
            for _ in range(clients):
                sids.append((await http.post("/v1/sandboxes", json={})).json()["id"])
            for sid in sids:
                await http.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true", "args": []})
            print("ready", flush=True)
            await asyncio.sleep(0.2)
            end = time.monotonic() + seconds
            lats: list[float] = []
            errors = 0

            async def worker(sid: str) -> None:
                nonlocal errors
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    r = await http.post(
                        f"/v1/sandboxes/{sid}/exec", json={"command": "true", "args": []}
                    )
                    if r.status_code == 200:
                        lats.append((time.monotonic() - t0) * 1000)
                    else:
                        errors += 1

            await asyncio.gather(*(worker(s) for s in sids))
            await asyncio.gather(*(http.delete(f"/v1/sandboxes/{s}") for s in sids))
            return {"rate": len(lats) / seconds, "errors": errors, "latencies": lats}

    print(json.dumps(asyncio.run(go())), flush=True)
    return 0


def report(n: int, rtts: list[float], durations: dict[str, list[float]],
           threads: dict[str, int], db: dict[str, int], wrapped: list[str]) -> None:  # fmt: skip
    print(f"\n{n} requests: client round trip median {percentile(rtts, 50):.2f} ms, "
          f"p90 {percentile(rtts, 90):.2f} ms, p99 {percentile(rtts, 99):.2f} ms")  # fmt: skip
    print(f"host load average {os.getloadavg()}\n")
    print(f"{'stage':58} {'calls/exec':>10} {'median ms':>10} {'p90 ms':>8} {'ms/exec':>8}")
    rows = []
    for label, values in durations.items():
        ms = [v * 1000 for v in values]
        rows.append((sum(ms) / n, label, len(values) / n, percentile(ms, 50), percentile(ms, 90)))
    for per_exec, label, calls, med, p90 in sorted(rows, reverse=True):
        print(f"{label:58} {calls:10.2f} {med:10.3f} {p90:8.3f} {per_exec:8.3f}")
    print("\naiosqlite calls per exec, by operation:")
    for name, count in sorted(db.items(), key=lambda x: -x[1]):
        print(f"  {count / n:6.2f}  {name}")
    print("asyncio.to_thread hops per exec, by function:")
    for name, count in sorted(threads.items(), key=lambda x: -x[1]):
        print(f"  {count / n:6.2f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
