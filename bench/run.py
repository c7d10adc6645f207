"""Every Corral benchmark beside its bare-machine baseline, measured in the same run.

    .venv/bin/python -m bench.run            # the full run (under 10 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # a smoke run of about a minute
    .venv/bin/python -m bench.run --profile bench/profiles   # also py-spy the hot phases

Run as root from the repository root (sandboxes run under their own host uids). Prints a table
(metric | corral median | corral p99 | baseline median | baseline p99 | ratio | target | met?)
and writes bench/results.json and bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines as bare
from bench.common import (
    Sample,
    Server,
    host_summary,
    pick_uid_base,
    settings_defaults,
    snapshot_src,
)
from bench.phases import CorralBench, Missing, remove_tree, tree_for_files
from corral.runtime.uids import pool_range

HERE = Path(__file__).resolve().parent
WARM_POOL_HINTS = ("warm", "pool", "spare", "prestart", "standby")
PEER_WINDOWS = 4  # alternating 32-client windows on Corral and on the peer, each


@dataclass
class Row:
    key: str
    metric: str
    unit: str
    corral: Sample | None = None
    baseline: Sample | None = None
    baseline_name: str = ""
    ratio_kind: str = "x"  # "x": corral/baseline (latency, memory); "%": corral/baseline rates
    target: str = "—"
    check: Callable[[Row], bool] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.corral is None or self.baseline is None:
            return None
        c, b = self.corral.median, self.baseline.median
        if c is None or not b:
            return None
        return c / b

    @property
    def met(self) -> bool | None:
        if self.check is None or self.corral is None:
            return None
        try:
            return bool(self.check(self))
        except (TypeError, ValueError):
            return None

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "metric": self.metric,
            "unit": self.unit,
            "corral": self.corral.summary() if self.corral else None,
            "baseline": (
                {"name": self.baseline_name, **self.baseline.summary()} if self.baseline else None
            ),
            "ratio": self.ratio,
            "ratio_kind": self.ratio_kind,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("execs/s", "spawns/s", "sandboxes"):
        return f"{value:,.0f}"
    if unit == "MB/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(row: Row) -> str:
    r = row.ratio
    if r is None:
        return "—"
    if row.ratio_kind == "%":
        return f"{r * 100:.0f}%"
    return f"{r:.1f}x"


def fmt_client(row: Row) -> str:
    """The load generator's CPU (this process) beside a throughput figure, in cores."""
    cores = row.extra.get("client_cores")
    if cores is None:
        return "—"
    peer = row.extra.get("baseline_client_cores")
    return f"{cores:.2f}" + (f" / {peer:.2f}" if peer is not None else "") + " cores"


def table(rows: list[Row]) -> str:
    head = [
        "metric", "unit", "corral median", "corral p99", "baseline", "baseline median",
        "baseline p99", "ratio", "target", "met?", "load gen CPU",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        if row.corral is None and row.note:
            cells = [row.metric, row.unit, row.note, "", row.baseline_name]
            cells += [fmt(row.baseline.median, row.unit) if row.baseline else "—"]
            cells += [fmt(row.baseline.tail, row.unit) if row.baseline else "—"]
            cells += ["—", row.target, "—", fmt_client(row)]
        else:
            met = row.met
            cells = [
                row.metric,
                row.unit,
                fmt(row.corral.median if row.corral else None, row.unit),
                fmt(row.corral.tail if row.corral else None, row.unit),
                row.baseline_name or "—",
                fmt(row.baseline.median if row.baseline else None, row.unit),
                fmt(row.baseline.tail if row.baseline else None, row.unit),
                fmt_ratio(row),
                row.target,
                "—" if met is None else ("yes" if met else "**no**"),
                fmt_client(row),
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


class Profiler:
    """py-spy record against the server while a phase runs (raw collapsed stacks)."""

    def __init__(self, out_dir: Path | None, rate: int, *, gil: bool = False) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.gil = gil
        self.pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, name: str) -> None:
        if self.out_dir is None:
            return
        self.proc = subprocess.Popen(
            [self.pyspy, "record", "--pid", str(pid), "--rate", str(self.rate),
             "--format", "raw", "--output", str(self.out_dir / f"{name}.txt"), "--nonblocking",
             *(["--gil"] if self.gil else [])],
            stdout=subprocess.DEVNULL, stderr=(self.out_dir / f"{name}.log").open("wb"),
        )  # fmt: skip
        time.sleep(0.5)  # attached before the load starts

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def warm_pool_setting(defaults: dict[str, Any]) -> str | None:
    """The name of a warm-pool setting of the server under test, if it has one."""
    for name, value in defaults.items():
        if any(h in name for h in WARM_POOL_HINTS) and isinstance(value, int):
            return name
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    ap.add_argument("--json", type=Path, default=HERE / "results.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "results.md")
    ap.add_argument("--uid-base", type=int, default=640_000)
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the server during the exec, create and 32-client phases",
    )
    ap.add_argument("--profile-rate", type=int, default=250)
    ap.add_argument(
        "--profile-gil",
        action="store_true",
        help="sample only the thread holding the GIL (what bounds a GIL-bound server)",
    )
    ap.add_argument("--density-target", type=int, default=None)
    ap.add_argument("--density-budget", type=float, default=None, help="seconds")
    ap.add_argument("--memory-floor-gib", type=float, default=4.0)
    ap.add_argument(
        "--warm-pool-env",
        default=None,
        help="NAME=VALUE for the warm-pool server (default: detected setting=4)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to fall "
        "to the CPU count (other jobs on the host skew every figure)",
    )
    ap.add_argument(
        "--peer-cache", type=Path, default=None,
        help="where the peer's venv is kept between runs (default /var/tmp/corral-bench-peers)",
    )  # fmt: skip
    ap.add_argument("--skip", action="append", default=[],
                    help="phases to leave out: exec supervisor faces create pool throughput peer "
                    "fleet streams files density")  # fmt: skip
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: run as root (sandboxes run under their own host uids)", file=sys.stderr)
        return 2
    q = args.quick
    n = {
        "spawn": 300 if q else 2000,
        "bwrap": 20 if q else 100,
        "healthz": 100 if q else 500,
        "exec": 100 if q else 400,
        "exec_shell": 50 if q else 200,
        "face": 30 if q else 150,
        "create": 8 if q else 40,
        "pool": 8 if q else 20,
        "thr_s": 2.0 if q else 8.0,
        "bare_s": 1.5 if q else 4.0,
        "stream_size": (64 if q else 256) << 20,
        "stream_reps": 2 if q else 3,
        "tree": (16 if q else 64) << 20,
        "tar_reps": 2 if q else 4,
        # 2,000 is the target; the budget keeps the whole run under 10 minutes on 2 cores, and
        # the phase stops at whichever comes first.
        "density": args.density_target or (100 if q else 2000),
        "density_budget": args.density_budget or (30.0 if q else 120.0),
        "idle_bare": 20 if q else 100,
        "fleet_exec": 40 if q else 200,
        "peer_exec": 50 if q else 200,
    }
    if args.wait_quiet:
        deadline = time.monotonic() + args.wait_quiet
        while os.getloadavg()[0] > (os.cpu_count() or 1) and time.monotonic() < deadline:
            print(f"bench: waiting for a quieter host (load {os.getloadavg()[0]:.1f})",
                  flush=True)  # fmt: skip
            time.sleep(15)
    started = time.monotonic()
    timings: dict[str, float] = {}
    loads: dict[str, list[float]] = {}

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    uid_count = 2500
    span = len(pool_range(0, uid_count)) + 200
    uid_base = pick_uid_base(args.uid_base, span)
    bare_uid = uid_base + span - 100  # outside the server's block
    admin_key = "crl_bench_admin_" + os.urandom(8).hex()
    src, src_info = snapshot_src()
    defaults = settings_defaults(src)
    # The main server runs without a warm pool, so that "create" is a cold start; the pool
    # phase measures a server with one.
    pool_name = warm_pool_setting(defaults)
    server = Server(
        uid_base=uid_base, uid_count=uid_count, admin_key=admin_key, src=src,
        env={f"CORRAL_{pool_name.upper()}": "0"} if pool_name else None,
    )  # fmt: skip
    prof = Profiler(args.profile, args.profile_rate, gil=args.profile_gil)
    rows: list[Row] = []
    failures: list[str] = []
    meta: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": q,
        "host": host_summary(),
        "iterations": n,
        "uid_base": uid_base,
        "source": src_info,
        "server_defaults": defaults,
    }

    plan: list[tuple[str, Callable[[], None]]] = []

    def phase(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
        def register(fn: Callable[[], None]) -> Callable[[], None]:
            plan.append((name, fn))
            return fn

        return register

    def run_phase(name: str, fn: Callable[[], None]) -> None:
        if name in args.skip:
            log(f"{name}: skipped")
            return
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        log(f"{name} ... (load average {load0:.1f})")
        try:
            fn()
        except Exception as exc:
            failures.append(f"{name}: {exc!r}")
            log(f"{name} FAILED: {exc!r}")
            traceback.print_exc()
        timings[name] = time.monotonic() - t0
        loads[name] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        log(f"{name} done in {timings[name]:.1f}s")

    log(f"starting the server (uids {uid_base}+, data dir {server.data_dir})")
    server.start()
    cb = CorralBench(server, quick=q, log=log)
    try:
        cb.discover()
        cb.warm_sandbox()
        spawn = bare.posix_spawn_true(n["spawn"])
        bwrap = bare.bwrap_true(bare_uid, n["bwrap"])
        log(f"bare: posix_spawn {spawn.median:.3f} ms, bwrap {bwrap.median:.2f} ms")
        meta["bare_alone"] = {"posix_spawn": spawn.summary(), "bwrap": bwrap.summary()}
        bwrap_argv = bare.bwrap_argv(bare_uid, ["/bin/true"])

        def spawn_one() -> None:
            bare.spawn_wait(bare.TRUE, ["true"])

        def bwrap_one() -> None:
            bare.spawn_wait(bwrap_argv[0], bwrap_argv, {"PATH": "/usr/bin:/bin"})

        def rtt_row(key: str, metric: str, sample: Sample | None, *, target: bool = False,
                    note: str = "") -> None:  # fmt: skip
            base = sample.extra.pop("pair", spawn) if sample is not None else spawn
            rows.append(
                Row(
                    key, metric, "ms", sample, base, "posix_spawn+wait /bin/true",
                    target="≤ 3x bare" if target else "—",
                    check=(lambda r: r.ratio is not None and r.ratio <= 3.0) if target else None,
                    note=note, extra=sample.extra if sample else {},
                )
            )  # fmt: skip

        @phase("exec")
        def _exec() -> None:
            rtt_row("http_floor", "HTTP floor: GET /healthz (no exec)",
                    cb.healthz(n["healthz"], pair=spawn_one))  # fmt: skip
            if args.profile:
                prof.start(server.pid, "exec_native")
            try:
                native = cb.exec_native(n["exec"], {"command": "true", "args": []},
                                        pair=spawn_one)  # fmt: skip
            finally:
                prof.stop()
            rtt_row("exec_native", "exec `true`, native (args, no shell)", native, target=True)
            lean = cb.exec_lean(n["exec"], {"command": "true", "args": []}, pair=spawn_one)
            rtt_row(
                "exec_native_lean", "exec `true`, native, minimal keep-alive client (no httpx)",
                lean, target=True,
            )  # fmt: skip
            shell = cb.exec_native(n["exec_shell"], {"command": "true"}, pair=spawn_one)
            rtt_row("exec_native_shell", "exec `true`, native (shell string)", shell)
            vs_bwrap = cb.exec_native(n["bwrap"], {"command": "true", "args": []}, pair=bwrap_one)
            rows.append(
                Row(
                    "exec_vs_bwrap", "exec `true` native vs a fresh bwrap per command", "ms",
                    vs_bwrap, vs_bwrap.extra.pop("pair"), "fresh `bwrap … true`",
                    extra=vs_bwrap.extra,
                )
            )  # fmt: skip

        @phase("supervisor")
        def _supervisor() -> None:
            from bench.supervisor_rtt import SUPERVISOR, measure

            # As in a sandbox: the launcher, with the command's cgroup joins.
            started, ended, base = measure(SUPERVISOR, n["exec"], "launcher+cgroups")
            ended.extra["started_median_ms"] = started.median
            rows.append(
                Row(
                    "supervisor_direct", "supervisor spawn→exit over its socket (no HTTP/DB)",
                    "ms", ended, base, "posix_spawn+wait /bin/true", extra=ended.extra,
                )
            )  # fmt: skip

        @phase("faces")
        def _faces() -> None:
            for face, call in cb.face_calls().items():
                key = "exec_face_" + face.lower().replace(".", "").replace("-", "")
                metric = f"exec `true`, {face} face"
                if isinstance(call, str):
                    rtt_row(key, metric, None, note=call)
                    continue
                try:
                    rtt_row(key, metric, cb.timed(call, n["face"], warmup=5, pair=spawn_one))
                except Missing as exc:
                    rtt_row(key, metric, None, note=str(exc))
                except Exception as exc:
                    failures.append(f"face {face}: {exc!r}")
                    rtt_row(key, metric, None, note=f"failed: {str(exc)[:80]}")

        @phase("create")
        def _create() -> None:
            if args.profile:
                prof.start(server.pid, "create")
            try:
                sample = cb.create_to_first(n["create"], pair=bwrap_one)
            finally:
                prof.stop()
            rows.append(
                Row(
                    "create_first_exec", "create sandbox → first exec result (no pool)", "ms",
                    sample, sample.extra.pop("pair"), "fresh `bwrap … true`", target="≤ 5x bare",
                    check=lambda r: r.ratio is not None and r.ratio <= 5, extra=sample.extra,
                )
            )  # fmt: skip

        @phase("pool")
        def _pool() -> None:
            metric = "create → first exec, warm pool"
            env_spec = args.warm_pool_env
            if env_spec is None:
                name = warm_pool_setting(meta["server_defaults"])
                if name is None:
                    rows.append(
                        Row(
                            "create_first_exec_pool", metric, "ms", None, bwrap,
                            "fresh `bwrap … true`", target="≤ 3x bare",
                            note="n/a (no warm-pool setting)",
                        )
                    )  # fmt: skip
                    return
                env_spec = f"CORRAL_{name.upper()}=4"
            key, _, value = env_spec.partition("=")
            pool_server = Server(
                uid_base=pick_uid_base(uid_base + span + 1000, span),
                uid_count=uid_count,
                admin_key=admin_key,
                env={key: value},
                tag="bench-pool",
                src=src,
            )
            pool_server.start()
            try:
                time.sleep(3.0)  # let the pool fill
                pool = CorralBench(pool_server, quick=q, log=log)
                sample = pool.create_to_first(n["pool"], pause=0.5, pair=bwrap_one)
                sample.extra["env"] = env_spec
                time.sleep(3.0)  # full again
                # One after another with no pause: the pool keeps up, or the cold path is
                # fast enough.
                # (its baseline right after: between the creates it would be a pause)
                burst = pool.create_to_first(20, warmup=0)
                burst.extra["env"] = env_spec
                burst.extra["pair"] = cb.timed(bwrap_one, 20, warmup=2)
            finally:
                pool_server.cleanup()
            for key, label, got in (
                ("create_first_exec_pool", f" ({env_spec})", sample),
                ("create_first_exec_pool_burst", f", 20 in a row ({env_spec})", burst),
            ):
                rows.append(
                    Row(
                        key, metric + label, "ms", got, got.extra.pop("pair"),
                        "fresh `bwrap … true`", target="≤ 3x bare",
                        check=lambda r: r.ratio is not None and r.ratio <= 3, extra=got.extra,
                    )
                )  # fmt: skip

        thr_sids: list[str] = []

        @phase("throughput")
        def _throughput() -> None:
            thr_sids.extend(cb.make_sandboxes(32))
            for sid in thr_sids:
                cb.exec_ok(sid)
            for clients in (1, 8, 32):
                base = bare.spawn_rate(clients, n["bare_s"])
                if args.profile and clients == 32:
                    prof.start(server.pid, "throughput_32")
                try:
                    sample = cb.throughput(thr_sids, clients, n["thr_s"])
                finally:
                    if clients == 32:
                        prof.stop()
                log(
                    f"  {clients} clients: corral {sample.extra['total_per_second']:.0f}/s, "
                    f"bare {base.extra['total_per_second']:.0f}/s"
                )
                rows.append(
                    Row(
                        f"throughput_{clients}", f"exec throughput, {clients} client(s)",
                        "execs/s", sample, base, f"bare spawn rate, {clients} worker(s)",
                        ratio_kind="%",
                        target="≥ 40% of bare" if clients == 32 else "—",
                        check=(lambda r: r.ratio >= 0.4) if clients == 32 else None,
                        extra={**sample.extra, "baseline_total_per_second":
                               base.extra["total_per_second"]},
                    )
                )  # fmt: skip

        @phase("peer")
        def _peer() -> None:
            from bench import peer

            bin_dir = peer.ensure_venv(args.peer_cache or peer.DEFAULT_CACHE, log)
            swerex = peer.SweRexServer(bin_dir)
            swerex.start()
            closers = []
            try:
                sid = cb.warm_sandbox()
                for keep, label in (
                    (False, "a new connection per request, as SWE-ReX's client makes them"),
                    (True, "one kept connection"),
                ):
                    # Connections opened right before their loop: an idle one is closed by
                    # the server's keep-alive timeout.
                    calls = {}
                    for name, (call, close) in (
                        ("corral", peer.corral_exec(server.port, admin_key, sid, keep_alive=keep)),
                        ("swerex", peer.swerex_exec(swerex, keep_alive=keep)),
                    ):
                        calls[name] = call
                        closers.append(close)
                    got = peer.interleaved(calls, n["peer_exec"])
                    rows.append(
                        Row(
                            f"peer_exec{'_kept' if keep else ''}",
                            f"peer: exec `true` round trip, Corral vs SWE-ReX ({label})", "ms",
                            got["corral"], got["swerex"],
                            f"swerex-remote {peer.VERSION} POST /execute (interleaved)",
                            target="ahead (< 1x)" if not keep else "—",
                            check=(lambda r: r.ratio is not None and r.ratio < 1)
                            if not keep else None,
                        )
                    )  # fmt: skip
                # 32 clients on each in alternating windows, the order swapping every round:
                # the host's speed drifts over a run, so figures taken minutes apart (the
                # throughput phase's and this phase's) compare the host as much as the servers.
                if len(thr_sids) < 32:  # the throughput phase was left out
                    thr_sids.extend(cb.make_sandboxes(32 - len(thr_sids)))
                window = n["thr_s"] / PEER_WINDOWS
                ours_parts: list[Sample] = []
                theirs_parts: list[Sample] = []
                for i in range(PEER_WINDOWS):
                    for who in ("corral", "swerex") if i % 2 == 0 else ("swerex", "corral"):
                        if who == "corral":
                            ours_parts.append(cb.throughput(thr_sids[:32], 32, window))
                        else:
                            theirs_parts.append(peer.throughput(swerex, 32, window))
                ours, got = Sample.merged(ours_parts), Sample.merged(theirs_parts)
                log(
                    f"  32 clients, alternating: corral {ours.extra['total_per_second']:.0f}/s, "
                    f"swerex {got.extra['total_per_second']:.0f}/s"
                )
                rows.append(
                    Row(
                        "peer_throughput_32", "peer: exec throughput, 32 clients, Corral vs "
                        f"SWE-ReX ({PEER_WINDOWS} alternating windows each)", "execs/s", ours,
                        got, f"swerex-remote {peer.VERSION}, 32 clients", ratio_kind="%",
                        target="ahead (> 100%)",
                        check=lambda r: r.ratio is not None and r.ratio > 1,
                        extra={"client_cores": ours.extra.get("client_cores"),
                               "baseline_client_cores": got.extra.get("client_cores"),
                               "corral": ours.extra, "swerex": got.extra},
                    )
                )  # fmt: skip
            finally:
                for close in closers:
                    close()
                swerex.stop()

        @phase("fleet")
        def _fleet() -> None:
            from bench.fleet import NODE_ID, FleetRig

            if not thr_sids:
                thr_sids.extend(cb.make_sandboxes(32))
            for sid in thr_sids:
                cb.exec_ok(sid)
            rig = FleetRig(
                src=src, uid_base=pick_uid_base(uid_base + 2 * (span + 1000), span),
                uid_count=uid_count, admin_key=admin_key,
                env={f"CORRAL_{pool_name.upper()}": "0"} if pool_name else None, log=log,
            )  # fmt: skip
            try:
                rig.start()
                log(f"  fleet up in {rig.started['fleet_s']:.1f}s "
                    f"(uids {rig.uid_base}+, {json.dumps(rig.started)})")  # fmt: skip
                replica = rig.replicas[0]
                fb = CorralBench(replica, quick=q, log=log)
                remote_sids = fb.make_sandboxes(32, body={"node": NODE_ID})
                for sid in remote_sids:
                    fb.exec_ok(sid)
                fleet_meta: dict[str, Any] = {"startup_seconds": dict(rig.started)}
                meta["fleet"] = fleet_meta
                try:
                    _fleet_figures(rig, fb, remote_sids, fleet_meta)
                finally:
                    fb.delete_all(remote_sids, budget=60)
            except Exception:
                meta.setdefault("fleet", {})["logs"] = rig.logs()
                raise
            finally:
                rig.close()

        def _fleet_figures(rig: Any, fb: CorralBench, remote_sids: list[str],
                           fleet_meta: dict[str, Any]) -> None:  # fmt: skip
            from bench.fleet import ExecProbe, interleaved, per_exec

            def counted(fn: Callable[[], Any], execs: Callable[[Any], int]) -> tuple[Any, dict]:
                """fn(), and what each of its remote execs cost PostgreSQL and NATS."""
                before = rig.counters()
                result = fn()
                time.sleep(1.2)  # PostgreSQL's backends flush their counters within 1 s
                return result, per_exec(before, rig.counters(), execs(result))

            remote = ExecProbe(rig.replicas[0], remote_sids[0])
            local = ExecProbe(server, cb.warm_sandbox())
            try:
                got, cost = counted(
                    lambda: interleaved(
                        {"remote": remote, "local": local, "spawn": spawn_one}, n["fleet_exec"]
                    ),
                    lambda _: len(remote.replies),
                )
                split_remote = remote.split(n["fleet_exec"])
                split_local = local.split(n["fleet_exec"])
            finally:
                remote.close()
                local.close()
            got["remote"].extra.update(
                split=split_remote, spawn=got["spawn"].summary(), engines=cost
            )
            got["local"].extra.update(split=split_local)
            log(f"  fleet exec: remote {got['remote'].median:.2f} ms, built-in "
                f"{got['local'].median:.2f} ms, spawn {got['spawn'].median:.2f} ms; remote "
                f"split {json.dumps(split_remote)}; per exec {json.dumps(cost)}")  # fmt: skip
            rows.append(
                Row(
                    "fleet_exec_remote", "fleet: exec `true`, replica → NATS → agent", "ms",
                    got["remote"], got["local"], "built-in node (interleaved)",
                    target="≤ 2x built-in", check=lambda r: r.ratio is not None and r.ratio <= 2,
                    extra=got["remote"].extra,
                )
            )  # fmt: skip
            rows.append(
                Row(
                    "fleet_exec_builtin", "fleet: exec `true`, built-in node (interleaved)",
                    "ms", got["local"], got["spawn"], "posix_spawn+wait /bin/true",
                    extra=got["local"].extra,
                )
            )  # fmt: skip

            # 32 clients, one sandbox each: the built-in node, the bare machine, then the
            # fleet with one replica and with two (the second started only then, so that the
            # one-replica figure has nobody else applying its results).
            def execs_of(sample: Sample) -> int:
                return round(sample.extra["total_per_second"] * n["thr_s"])

            builtin = cb.throughput(thr_sids, 32, n["thr_s"])
            base = bare.spawn_rate(32, n["bare_s"])
            probes = rig.cpu_probes()
            one, cost = counted(
                lambda: fb.throughput(remote_sids, 32, n["thr_s"], probes=probes,
                                      cgroup_name=rig.agent.cgroup_name),
                execs_of,
            )  # fmt: skip
            one.extra["engines"] = cost
            rig.add_replica()
            second = CorralBench(rig.replicas[1], quick=q, log=log)
            for sid in remote_sids[1::2]:  # the second replica's first calls, untimed
                second.exec_ok(sid)
            probes = rig.cpu_probes()
            two, cost = counted(
                lambda: fb.throughput(remote_sids, 32, n["thr_s"], servers=rig.replicas,
                                      probes=probes, cgroup_name=rig.agent.cgroup_name),
                execs_of,
            )  # fmt: skip
            two.extra["engines"] = cost
            fleet_meta["startup_seconds"] = dict(rig.started)
            for label, sample in (("built-in", builtin), ("1 replica", one), ("2 replicas", two)):
                cpu = {k: round(v, 2) for k, v in sample.extra.items()
                       if k.endswith("_cores") and v is not None}  # fmt: skip
                log(f"  fleet 32 clients, {label}: {sample.extra['total_per_second']:.0f}/s, "
                    f"latency p50 {sample.extra['latency_median_ms']:.0f} ms, "
                    f"cores {json.dumps(cpu)}, per exec "
                    f"{json.dumps(sample.extra.get('engines', {}))}")  # fmt: skip
            log(f"  bare spawn rate, 32 workers: {base.extra['total_per_second']:.0f}/s")
            rows.append(
                Row(
                    "fleet_throughput_builtin_32",
                    "fleet: exec throughput, 32 clients, built-in node", "execs/s", builtin,
                    base, "bare spawn rate, 32 worker(s)", ratio_kind="%",
                    extra={**builtin.extra,
                           "baseline_total_per_second": base.extra["total_per_second"]},
                )
            )  # fmt: skip
            for key, metric, sample in (
                ("fleet_throughput_1replica_32",
                 "fleet: exec throughput, 32 clients, 1 replica → agent", one),
                ("fleet_throughput_2replicas_32",
                 "fleet: exec throughput, 32 clients, 2 replicas (16 each) → agent", two),
            ):  # fmt: skip
                rows.append(
                    Row(
                        key, metric, "execs/s", sample, builtin,
                        "built-in node, 32 clients (same phase)", ratio_kind="%",
                        extra={**sample.extra,
                               "bare_total_per_second": base.extra["total_per_second"],
                               "builtin_total_per_second": builtin.extra["total_per_second"]},
                    )
                )  # fmt: skip

        @phase("cleanup-throughput")
        def _cleanup_thr() -> None:
            cb.delete_all(thr_sids)
            thr_sids.clear()

        @phase("streams")
        def _streams() -> None:
            size = n["stream_size"]
            pipe = Sample([], kind="rate")
            got: dict[str, Sample | None] = {"stream_raw": Sample([], kind="rate"),
                                             "stream_ws": Sample([], kind="rate")}  # fmt: skip
            notes = {"stream_raw": "", "stream_ws": ""}
            fns = {"stream_raw": cb.stream_raw, "stream_ws": cb.stream_ws}
            for _ in range(n["stream_reps"]):  # interleaved: each rep sees the same host load
                pipe.values += bare.pipe_throughput(size, 1).values
                for key, fn in fns.items():
                    if got[key] is None:
                        continue
                    try:
                        got[key].values += fn(size, 1).values  # type: ignore[union-attr]
                    except Missing as exc:
                        got[key], notes[key] = None, str(exc)
                    except Exception as exc:
                        failures.append(f"{key}: {exc!r}")
                        got[key], notes[key] = None, f"failed: {str(exc)[:80]}"
            for key, metric, target in (
                ("stream_raw", "output stream, raw (logs?format=raw)", True),
                ("stream_ws", "output stream, WebSocket (attach)", False),
            ):
                rows.append(
                    Row(
                        key, metric, "MB/s", got[key], pipe, "bare pipe (same producer)",
                        ratio_kind="%", target="≥ 300 MB/s" if target else "—",
                        check=(lambda r: r.corral.median >= 300) if target else None,
                        note=notes[key], extra={"bytes_per_rep": size},
                    )
                )  # fmt: skip

        @phase("files")
        def _files() -> None:
            root, payload, archive = tree_for_files(n["tree"])
            try:
                specs = (
                    ("upload_targz", "tar.gz upload (PUT archive), MB/s unpacked",
                     lambda: cb.archive_upload(archive, payload, 1),
                     lambda: bare.tar_extract(archive, payload, 1), "`tar -xzf -` from a pipe"),
                    ("download_targz", "tar.gz download (GET archive), MB/s unpacked",
                     lambda: cb.archive_download(payload, 1),
                     lambda: bare.tar_create(root / "t", payload, 1), "`tar -cf - | gzip -1`"),
                )  # fmt: skip
                for key, metric, fn, base_fn, base_name in specs:
                    sample: Sample | None = Sample([], kind="rate")
                    base = Sample([], kind="rate")
                    note = ""
                    for _ in range(n["tar_reps"]):
                        base.values += base_fn().values
                        if sample is None:
                            continue
                        try:
                            got = fn()
                            sample.values += got.values
                            sample.extra.update(got.extra)
                        except Missing as exc:
                            sample, note = None, str(exc)
                        except Exception as exc:
                            failures.append(f"{key}: {exc!r}")
                            sample, note = None, f"failed: {str(exc)[:80]}"
                    rows.append(
                        Row(key, metric, "MB/s", sample, base, base_name, ratio_kind="%",
                            note=note, extra={"payload_bytes": payload,
                                              "archive_bytes": len(archive)})
                    )  # fmt: skip
            finally:
                remove_tree(root)

        @phase("density")
        def _density() -> None:
            if cb.warm is not None:
                cb.delete(cb.warm)
                cb.warm = None
            idle = bare.idle_bwraps(bare_uid, n["idle_bare"])
            log(f"  bare idle bwrap: {idle}")
            result = cb.density(
                n["density"],
                floor_bytes=int(args.memory_floor_gib * 2**30),
                budget=n["density_budget"],
                pair=bwrap_one,
            )
            peak = result.pop("peak_create_first_exec")
            peak_rtt = result.pop("peak_exec_rtt")
            log(f"  density: {json.dumps(result)}")
            rows.append(
                Row(
                    "density_held", "idle sandboxes held at once", "sandboxes",
                    Sample([result["held"]], kind="rate"), None, "",
                    target="≥ 2,000", check=lambda r: r.corral.median >= 2000,
                    extra=result,
                )
            )  # fmt: skip
            memcg = result["memcg_per_sandbox_mib"]
            rows.append(
                Row(
                    "density_memory",
                    "memory charged per idle sandbox (its memory cgroup)",
                    "MiB",
                    Sample([memcg]) if memcg is not None else None,
                    Sample([idle["memcg_per_sandbox_mib"]])
                    if idle["memcg_per_sandbox_mib"] is not None
                    else None,
                    "idle `bwrap … sleep`",
                    target="≤ 5 MiB",
                    check=lambda r: r.corral.median <= 5,
                    note="" if memcg is not None else "n/a (no v1 memory cgroup)",
                    extra={"bare": idle},
                )
            )
            rows.append(
                Row(
                    "density_mem_available",
                    "host MemAvailable drop per idle sandbox (host-wide, noisy)",
                    "MiB",
                    Sample([result["mem_available_per_sandbox_mib"]]),
                    None,
                    "",
                    extra={
                        "bare_mem_available_per_sandbox_mib": idle["mem_available_per_sandbox_mib"]
                    },
                )
            )
            rows.append(
                Row(
                    "density_pss", "PSS of a sandbox's processes", "MiB",
                    Sample([result["pss_per_sandbox_mib"]]),
                    Sample([idle["pss_per_sandbox_mib"]]), "idle `bwrap … sleep`",
                )
            )  # fmt: skip
            held = result["held"]
            rows.append(
                Row(
                    "density_create_first_exec", f"create → first exec, {held} idle sandboxes up",
                    "ms", peak, peak.extra.pop("pair", None), "fresh `bwrap … true`",
                    extra=peak.extra,
                )
            )  # fmt: skip
            if peak_rtt is not None:
                rows.append(
                    Row(
                        "density_exec", f"exec `true`, {held} idle sandboxes up", "ms",
                        peak_rtt, None, "",
                    )
                )  # fmt: skip
            rows.append(
                Row(
                    "density_create_rate", "sandboxes created per second while filling",
                    "sandboxes/s", Sample([result["create_per_second"] or 0], kind="rate"),
                    None, "",
                )
            )  # fmt: skip
            rows.append(
                Row(
                    "density_server_rss", "server RSS per idle sandbox", "KiB",
                    Sample([result["server_rss_per_sandbox_kib"]]), None, "",
                )
            )  # fmt: skip

        for name, fn in plan:
            run_phase(name, fn)
    finally:
        prof.stop()
        tail = server.log_tail(4000)
        server.cleanup()
        shutil.rmtree(src, ignore_errors=True)

    total = time.monotonic() - started
    meta["seconds"] = total
    meta["phase_seconds"] = timings
    meta["phase_load_average"] = loads
    meta["load_average_at_end"] = os.getloadavg()
    meta["failures"] = failures
    out = {"meta": meta, "rows": [r.as_json() for r in rows]}
    if failures:
        out["server_log_tail"] = tail
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = table(rows)
    header = (
        f"Run {meta['started_at']} on {meta['host']['cpus']} CPUs "
        f"({meta['host']['cpu_model']}), {meta['host']['mem_total_gib']} GiB, "
        f"kernel {meta['host']['kernel']}; {'quick' if q else 'full'} run in {total:.0f} s."
    )
    args.markdown.write_text(header + "\n\n" + md + "\n")
    print()
    print(header)
    print()
    print(md)
    print()
    if failures:
        print("failures:")
        for f in failures:
            print("  -", f)
    print(f"wrote {args.json} and {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
