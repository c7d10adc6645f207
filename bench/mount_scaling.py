"""How a fresh `bwrap ... true` slows down as the host's mount table grows.

    .venv/bin/python -m bench.mount_scaling [--counts 250 1000 2000]

Every new sandbox's mount namespace starts as a copy of its creator's mount table, so every
mount the server keeps in the host namespace (a loop-mounted disk per sandbox) makes every later
sandbox start slower. This re-executes itself under `unshare -m --propagation private` and adds
tmpfs mounts in that private namespace only (the host's table is never touched), timing a bare
bwrap at each size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines as bare
from bench.common import REPO


def mounts() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def inner(base: Path, counts: list[int], uid: int, n: int) -> None:
    print(f"{'mounts':>7} {'bwrap true p50 ms':>18} {'p99 ms':>8}")
    made = 0
    for target in [0, *counts]:
        while made < target:
            d = base / str(made)
            d.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "bench", str(d)], check=True)
            made += 1
        s = bare.bwrap_true(uid, n)
        print(f"{mounts():7d} {s.median:18.2f} {s.tail:8.2f}", flush=True)
    # The namespace (and its mounts) goes away with this process.


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[250, 1000, 2000])
    ap.add_argument("--uid", type=int, default=656_565)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--inner", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args.inner, args.counts, args.uid, args.n)
        return 0
    base = Path(tempfile.mkdtemp(prefix="corral-bench-mnt-", dir="/tmp"))
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-m",
           "bench.mount_scaling", "--inner", str(base), "--uid", str(args.uid), "--n", str(args.n),
           "--counts", *map(str, args.counts)]  # fmt: skip
    try:
        return subprocess.call(cmd, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        shutil.rmtree(base, ignore_errors=True)  # the mount points (the mounts died with it)


if __name__ == "__main__":
    sys.exit(main())
