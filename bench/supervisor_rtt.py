"""The in-sandbox supervisor's spawn round trip, alone: no HTTP, no database, no namespaces.

    .venv/bin/python -m bench.supervisor_rtt [--n 300] [--variants]

Starts `src/corral/runtime/supervisor.py` on the host (as root, like bwrap's child, but outside
any sandbox), sends it `spawn` messages for `true` over its socket with three pipes, and times
the `started` reply and the `exit` event, beside a bare posix_spawn + wait. With `--variants` it
also times the fork path (Python between fork and exec, which sudo, terminal and rlimit
commands still take) and the launcher with each command joining a cgroup2 and a v1 memory
cgroup, as in a sandbox (the launcher moves itself there and back around the vfork).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baselines import spawn_wait
from bench.common import REPO, Sample

SUPERVISOR = REPO / "src" / "corral" / "runtime" / "supervisor.py"
PY = "/usr/bin/python3"


def _cgroups(tag: str) -> tuple[list[Path], list[Path]]:
    """A command cgroup and its parent (the 'sandbox'), in cgroup2 and the v1 memory tree when
    they are there: (cgroup.procs to join, cgroup.procs to go back to)."""
    joins, homes = [], []
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/memory"),
                 Path("/sys/fs/cgroup")):  # fmt: skip
        if not (root / "cgroup.procs").exists() or any(h.is_relative_to(root) for h in homes):
            continue
        if root == Path("/sys/fs/cgroup") and homes:
            continue
        sandbox = root / f"corral-bench-sup-{os.getpid()}-{tag}"
        (sandbox / "cmd").mkdir(parents=True, exist_ok=True)
        joins.append(sandbox / "cmd" / "cgroup.procs")
        homes.append(sandbox / "cgroup.procs")
    return joins, homes


def measure(path: Path, n: int, mode: str, warmup: int = 20) -> tuple[Sample, Sample, Sample]:
    """(started, exit event, paired posix_spawn) in ms. mode: "fork" (no joins/homes: the
    supervisor forks with Python in the child), "launcher", or "launcher+cgroups" (the command
    joins a cgroup2 and a v1 memory cgroup, as in a sandbox)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    joins: list[Path] = []
    homes: list[Path] = []
    if mode == "launcher+cgroups":
        joins, homes = _cgroups(mode)
    # The supervisor (and its launcher) start in the 'sandbox' cgroups, as bwrap's child does.
    join_self = "".join(f'echo $$ > "{h}"; ' for h in homes)
    proc = subprocess.Popen(["/bin/sh", "-c", join_self + 'exec "$@"', "sh",
                             PY, "-I", "-S", str(path), str(child.fileno())],
                            pass_fds=[child.fileno()])  # fmt: skip
    child.close()
    try:
        ready = json.loads(parent.recv(65536))
        assert ready["ev"] == "ready", ready
        env = {"PATH": "/usr/bin:/bin"}
        started, ended, bare = [], [], []
        home_fds = [os.open(h, os.O_WRONLY | os.O_CLOEXEC) for h in homes]
        for i in range(warmup + n):
            a, b, c = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
            msg = {"op": "spawn", "id": f"c{i}", "argv": ["true"], "env": env, "cwd": "/",
                   "tty": False, "rlimits": {"core": 0}, "user": "user"}  # fmt: skip
            if mode != "fork":
                msg.update(joins=len(joins), homes=len(homes), cgroup="cmd")
            t0 = time.perf_counter()
            join_fds = [os.open(j, os.O_WRONLY | os.O_CLOEXEC) for j in joins]
            fds = [a[0], b[1], c[1], *join_fds]
            parent.sendmsg(
                [json.dumps(msg, separators=(",", ":")).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds + home_fds))],
            )
            for fd in fds:
                os.close(fd)
            first = json.loads(parent.recv(65536))
            t1 = time.perf_counter()
            if first["ev"] != "started":
                raise RuntimeError(f"supervisor: {first}")
            second = json.loads(parent.recv(65536))
            t2 = time.perf_counter()
            for fd in (a[1], b[0], c[0]):
                os.close(fd)
            assert second["ev"] == "exit", second
            t3 = time.perf_counter()
            spawn_wait("/bin/true", ["true"])
            t4 = time.perf_counter()
            if i >= warmup:
                started.append((t1 - t0) * 1000)
                ended.append((t2 - t0) * 1000)
                bare.append((t4 - t3) * 1000)
        for fd in home_fds:
            os.close(fd)
        return Sample(started), Sample(ended), Sample(bare)
    finally:
        parent.close()
        proc.wait(10)
        for h in homes:
            for d in (h.parent / "cmd", h.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()


VARIANTS = {
    "fork + Python in the child": "fork",
    "launcher: vfork, no Python in the child": "launcher",
    "launcher + cgroup2/v1 memory join": "launcher+cgroups",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--variants", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the supervisor sets its children's gid)", file=sys.stderr)
        return 2
    chosen = VARIANTS if args.variants else {"supervisor (launcher)": "launcher"}
    print(f"{'supervisor':40} {'started p50':>11} {'p99':>7} {'exit p50':>9} "
          f"{'bare spawn p50':>14} {'ratio':>6}")  # fmt: skip
    for name, mode in chosen.items():
        started, ended, bare = measure(SUPERVISOR, args.n, mode)
        print(f"{name:40} {started.median:11.2f} {started.tail:7.2f} {ended.median:9.2f} "
              f"{bare.median:14.2f} {ended.median / bare.median:5.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
