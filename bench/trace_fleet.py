"""Where an exec through the fleet spends its time: replica, NATS, agent, PostgreSQL.

    .venv/bin/python -m bench.trace_fleet [--n 200] [--clients 32] [--duration 6]

Starts the bench's fleet (bench/fleet.py: a throwaway PostgreSQL and nats-server, one agent,
one replica, from a copy of src/) with the replica and the agent run through
bench/trace_fleet_hooks.py, which times their stages at run time. Then `--n` sequential exec
`true` (minimal keep-alive client), and `--clients` concurrent loops for `--duration` seconds,
one sandbox each. For each it prints, per process and stage: calls per exec, median and p90
duration, time per exec; the engines' counters per exec (PostgreSQL sessions opened and
transactions, NATS messages); and the warnings the replica and the agent logged. Stages nest
(CommandService.run holds RemoteNode.run, which holds a NATS request ...): they do not add up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, percentile, pick_uid_base, snapshot_src
from bench.fleet import NODE_ID, ExecProbe, FleetRig, per_exec
from bench.phases import CorralBench
from corral.runtime.uids import pool_range

HOOKS = Path(__file__).resolve().with_name("trace_fleet_hooks.py")


def collect(rig: FleetRig, trace_dir: Path) -> dict[str, dict[str, list[float]]]:
    """What each traced process timed since the last collect (and starts them again)."""
    assert rig.agent is not None
    pids = {"replica": rig.replicas[0].pid, "agent": rig.agent.pid}
    for pid in pids.values():
        (trace_dir / f"{pid}.json").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    out: dict[str, dict[str, list[float]]] = {}
    deadline = time.monotonic() + 10
    for name, pid in pids.items():
        path = trace_dir / f"{pid}.json"
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        out[name] = json.loads(path.read_text()) if path.exists() else {}
    return out


def report(title: str, execs: int, rtts: list[float], traced: dict[str, Any],
           engines: dict[str, float]) -> None:  # fmt: skip
    print(f"\n=== {title}: {execs} execs; client round trip median "
          f"{percentile(rtts, 50):.2f} ms, p90 {percentile(rtts, 90):.2f} ms, "
          f"p99 {percentile(rtts, 99):.2f} ms; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("engines per exec: " + ", ".join(f"{k.removesuffix('_per_exec')} {v}"
                                            for k, v in engines.items()))  # fmt: skip
    for proc, durations in traced.items():
        print(f"\n{proc:64} {'calls/exec':>10} {'median ms':>10} {'p90 ms':>8} {'ms/exec':>8}")
        rows = []
        for label, values in durations.items():
            ms = [v * 1000 for v in values]
            per = sum(ms) / max(execs, 1)
            rows.append((per, label, len(ms) / max(execs, 1), percentile(ms, 50),
                         percentile(ms, 90)))  # fmt: skip
        for per, label, calls, med, p90 in sorted(rows, reverse=True):
            print(f"  {label:62} {calls:10.2f} {med:10.3f} {p90:8.3f} {per:8.3f}")


def warnings_of(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln]
    return lines[-15:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--uid-base", type=int, default=700_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("trace_fleet: run as root (sandboxes run under their own host uids)", file=sys.stderr)
        return 2
    src, info = snapshot_src()
    trace_dir = Path(tempfile.mkdtemp(prefix="corral-trace-fleet-", dir="/tmp"))
    rig = FleetRig(
        src=src, uid_count=2500,
        uid_base=pick_uid_base(args.uid_base, len(pool_range(0, 2500)) + 200),
        admin_key="crl_trace_" + os.urandom(8).hex(),
        env={"CORRAL_TRACE_DIR": str(trace_dir), "CORRAL_WARM_POOL": "0",
             "CORRAL_LOG_LEVEL": "warning"},
        launcher=[PYTHON, str(HOOKS)],
    )  # fmt: skip
    print(f"source {info['src_sha256']} (newest {info['src_newest_mtime']})")
    try:
        rig.start()
        replica = rig.replicas[0]
        fb = CorralBench(replica, quick=False, log=print)
        sids = fb.make_sandboxes(max(args.clients, 1), body={"node": NODE_ID})
        for sid in sids:
            fb.exec_ok(sid)
        probe = ExecProbe(replica, sids[0])
        for _ in range(20):
            probe()
        collect(rig, trace_dir)
        before = rig.counters()
        rtts = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            probe()
            rtts.append((time.perf_counter() - t0) * 1000)
        traced = collect(rig, trace_dir)
        time.sleep(1.2)  # PostgreSQL's backends flush their counters within 1 s
        cost = per_exec(before, rig.counters(), args.n)
        split = probe.split(args.n)
        probe.close()
        report("sequential, 1 client, replica -> NATS -> agent", args.n, rtts, traced, cost)
        print("split (server timestamps against the client's): " + ", ".join(
            f"{k.removesuffix('_median_ms')} {v:.2f} ms" for k, v in split.items() if v is not None
        ))  # fmt: skip
        if args.clients > 1:
            collect(rig, trace_dir)
            before = rig.counters()
            sample = fb.throughput(sids, args.clients, args.duration,
                                   probes=rig.cpu_probes(), cgroup_name=rig.agent.cgroup_name)  # type: ignore[union-attr]  # fmt: skip
            traced = collect(rig, trace_dir)
            time.sleep(1.2)
            done = round(sample.extra["total_per_second"] * args.duration)
            cost = per_exec(before, rig.counters(), done)
            print(f"\n{args.clients} clients for {args.duration:.0f} s: "
                  f"{sample.extra['total_per_second']:.1f} execs/s, errors "
                  f"{sample.extra['errors']}, latency p50 "
                  f"{sample.extra['latency_median_ms']:.0f} ms; cores " + json.dumps(
                      {k: round(v, 2) for k, v in sample.extra.items()
                       if k.endswith("_cores") and v is not None}))  # fmt: skip
            report(f"{args.clients} clients", done, [sample.extra["latency_median_ms"]],
                   traced, cost)  # fmt: skip
        fb.delete_all(sids, budget=60)
        print("\nreplica warnings:", *warnings_of(replica.log_tail(200_000)), sep="\n  ")
        print("agent warnings:", *warnings_of(rig.agent.log_tail(200_000)), sep="\n  ")  # type: ignore[union-attr]
    finally:
        rig.close()
        shutil.rmtree(trace_dir, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
