"""The node's cgroup2 tree: one cgroup per sandbox, one below it per command.

Used for what only a cgroup can do reliably: kill a whole process tree (`cgroup.kill` takes
setsid'd, double-forked and ptrace-stopped processes alike), and account CPU time. On hosts with
cgroup v1 the controller-less cgroup2 at /sys/fs/cgroup/unified serves this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

_CANDIDATES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
FAVOR_DYNMODS = "favordynmods"


def find_cgroup2() -> Path | None:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    cgroup2 = {Path(line.split()[1]) for line in mounts if line.split()[2:3] == ["cgroup2"]}
    for path in _CANDIDATES:
        if path in cgroup2 and os.access(path, os.W_OK):
            return path
    return None


def super_options(mount: Path) -> set[str] | None:
    """The super block options of the file system mounted at `mount` (None: not a mount)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(mount) and "-" in fields:
            rest = fields[fields.index("-") + 1 :]
            return set(rest[2].split(",")) if len(rest) > 2 else set()
    return None


def favor_dynamic_modifications(mount: Path) -> str | None:
    """Remount the cgroup hierarchy at `mount` with favordynmods; why not, if it could not be.

    Every command's start moves its launcher into the command's cgroups and back. A move takes
    the kernel's cgroup threadgroup lock for writing, which, unless a hierarchy favors dynamic
    modifications, first waits for an RCU grace period whenever no move happened for a while:
    15-25 ms on the first exec after a quiet spell (a claimed warm sandbox's first command, any
    command after a pause), against 0.04 ms for the next. With the option, that wait is gone;
    forks and exits pay a little more (not measurable here: posix_spawn of /bin/true 0.70 ms
    either way). util-linux's remount keeps every other option of the mount.
    """
    options = super_options(mount)
    if options is None or FAVOR_DYNMODS in options:
        return None
    done = subprocess.run(
        ["mount", "-o", f"remount,{FAVOR_DYNMODS}", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0 and FAVOR_DYNMODS in (super_options(mount) or set()):
        return None
    why = done.stderr.strip().splitlines()[-1:] or ["the kernel kept it off"]
    return (
        f"the cgroup hierarchy could not be set to favor dynamic modifications ({why[0]}): "
        "the first command after a quiet spell waits for the kernel (an RCU grace period)"
    )


class CgroupTree:
    def __init__(self, mount: Path, name: str) -> None:
        self.base = mount / name
        self.has_kill = (mount / "cgroup.kill").exists() or self._probe_kill(mount)

    @staticmethod
    def _probe_kill(mount: Path) -> bool:
        probe = mount / f"corral-probe-{os.getpid()}"
        try:
            probe.mkdir()
            return (probe / "cgroup.kill").exists()
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()

    def setup(self) -> None:
        self.base.mkdir(exist_ok=True)

    def sandbox(self, sandbox_id: str) -> Path:
        return self.base / sandbox_id

    @staticmethod
    def procs(path: Path) -> list[int]:
        try:
            text = (path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def signal_all(self, path: Path, signum: int) -> None:
        """Signal every process in the cgroup and below it."""
        for dirpath, _dirs, _files in os.walk(path):
            for pid in self.procs(Path(dirpath)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def kill(self, path: Path) -> None:
        if not path.exists():
            return
        if self.has_kill:
            with contextlib.suppress(FileNotFoundError):
                (path / "cgroup.kill").write_text("1")
            return
        # No cgroup.kill (kernel < 5.14): freeze, kill, thaw, so nothing forks in between.
        freeze = path / "cgroup.freeze"
        with contextlib.suppress(OSError):
            freeze.write_text("1")
        self.signal_all(path, signal.SIGKILL)
        with contextlib.suppress(OSError):
            freeze.write_text("0")

    def remove(self, path: Path) -> bool:
        """Remove a cgroup whose processes are gone, children first. False if still busy."""
        try:
            path.rmdir()  # the common case, a leaf: no walk over its files
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        ok = True
        for child in [p for p in path.iterdir() if p.is_dir()]:
            ok = self.remove(child) and ok
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return ok

    async def kill_and_remove(self, path: Path, wait_s: float = 5.0) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            self.kill(path)
            if self.remove(path):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
