"""The in-sandbox supervisor's spawn round trip, alone: no HTTP, no database, no namespaces.

    .venv/bin/python -m bench.supervisor_rtt [--n 300] [--variants]

Starts `src/corral/runtime/supervisor.py` on the host (as root, like bwrap's child, but outside
any sandbox), sends it `spawn` messages for `true` over its socket with three pipes, and times
the `started` reply and the `exit` event, beside a bare posix_spawn + wait. With `--variants` it
also measures copies of the supervisor, written to a temp dir (src/ is never touched), changed as
the README's recommendations say, to show what each change is worth.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baselines import spawn_wait
from bench.common import REPO, Sample

SUPERVISOR = REPO / "src" / "corral" / "runtime" / "supervisor.py"
PY = "/usr/bin/python3"


def measure(path: Path, n: int, warmup: int = 20) -> tuple[Sample, Sample, Sample]:
    """(started, exit event, paired posix_spawn) in ms."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([PY, "-I", "-S", str(path), str(child.fileno())],
                            pass_fds=[child.fileno()])  # fmt: skip
    child.close()
    try:
        ready = json.loads(parent.recv(65536))
        assert ready["ev"] == "ready", ready
        env = {"PATH": "/usr/bin:/bin"}
        started, ended, bare = [], [], []
        for i in range(warmup + n):
            a, b, c = os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)
            msg = {"op": "spawn", "id": f"c{i}", "argv": ["true"], "env": env, "cwd": "/",
                   "tty": False, "rlimits": {"core": 0}, "user": "user"}  # fmt: skip
            t0 = time.perf_counter()
            parent.sendmsg(
                [json.dumps(msg, separators=(",", ":")).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a[0], b[1], c[1]]))],
            )
            for fd in (a[0], b[1], c[1]):
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
        return Sample(started), Sample(ended), Sample(bare)
    finally:
        parent.close()
        proc.wait(10)


def variants(tmp: Path) -> dict[str, Path]:
    """Copies of the supervisor with the recommended changes."""
    src = SUPERVISOR.read_text()
    out = {"stock": SUPERVISOR}
    # 1. os.execvpe -> os.get_exec_path imports `warnings` in every forked child (`-I -S` does
    #    not preload it), and _drop_capabilities loads libc with ctypes in the child: do both
    #    once, in the supervisor.
    pre = src.replace(
        "import termios\n",
        "import termios\nimport warnings  # noqa: F401 (os.execvpe imports it in the child)\n\n"
        "_LIBC = ctypes.CDLL(None, use_errno=True)\n",
        1,
    ).replace("    libc = ctypes.CDLL(None, use_errno=True)\n    libc.prctl(PR_CAP_AMBIENT",
              "    libc = _LIBC\n    libc.prctl(PR_CAP_AMBIENT")  # fmt: skip
    if pre != src:
        path = tmp / "supervisor_preimport.py"
        path.write_text(pre)
        out["warnings pre-imported, libc cached"] = path
    # 2. The lower bound of a spawn without Python in the child: subprocess's C fork_exec
    #    (vfork + exec, no preexec_fn). It leaves out what the child does today besides
    #    setsid/dup2/chdir/exec (cgroup join, setgid, capset, rlimits), so it is a bound, not a
    #    drop-in: those would move to the supervisor's start (caps, gid) or to a tiny exec'd
    #    helper / clone3(CLONE_INTO_CGROUP) (cgroups).
    guard = 'if __name__ == "__main__":'
    if guard in src:
        vfork = src.replace(
            guard,
            "def _spawn(message, fds):\n"
            "    import subprocess\n"
            "    p = subprocess.Popen([str(a) for a in message['argv']], stdin=fds[0],\n"
            "                         stdout=fds[1], stderr=fds[2], cwd=str(message['cwd']),\n"
            "                         env={str(k): str(v) for k, v in message['env'].items()},\n"
            "                         start_new_session=True, close_fds=True)\n"
            "    p._child_created = False  # the supervisor reaps it, not subprocess\n"
            "    return p.pid\n\n\n" + guard,
            1,
        )
        path = tmp / "supervisor_vfork.py"
        path.write_text(vfork)
        out["lower bound: vfork+exec, no Python in child"] = path
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--variants", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the supervisor sets its children's gid)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="corral-bench-sup-") as tmp:
        chosen = variants(Path(tmp)) if args.variants else {"stock": SUPERVISOR}
        print(f"{'supervisor':40} {'started p50':>11} {'p99':>7} {'exit p50':>9} "
              f"{'bare spawn p50':>14} {'ratio':>6}")  # fmt: skip
        for name, path in chosen.items():
            started, ended, bare = measure(path, args.n)
            print(f"{name:40} {started.median:11.2f} {started.tail:7.2f} {ended.median:9.2f} "
                  f"{bare.median:14.2f} {ended.median / bare.median:5.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
