"""Per-sandbox resource limits through cgroup controllers: cgroup v2 where the host has the
controllers there, cgroup v1 where it does not (Debian hosts booted with the hybrid layout).

Limits: `memory_mb` caps memory+swap (an allocation over it is OOM-killed), `pids` caps tasks
(a fork bomb stalls at it), `cpu` is a CFS quota in CPUs. What this host can enforce is found at
start-up and reported on every sandbox; a limit that cannot be enforced is said so, never faked.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    cpu: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    disk_mb: int | None = None  # everything the sandbox can write: /workspace, /tmp, /usr/local


@dataclass(frozen=True)
class Usage:
    cpu_ms: int | None = None
    peak_memory_bytes: int | None = None
    oom_kills: int = 0


def _read(path: str) -> bytes:
    """A small cgroup file's contents (they are all well under a page)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def field_value(text: bytes, key: bytes) -> int | None:
    """The value of `key` in a cgroup file's "key value" lines (cpu.stat, memory.events,
    memory.oom_control); None if there is no such line."""
    data = b"\n" + text
    at = data.find(b"\n" + key + b" ")
    if at < 0:
        return None
    return int(data[at + len(key) + 2 :].split(None, 1)[0])


def _field(path: str, key: bytes) -> int | None:
    return field_value(_read(path), key)


def _oom_kill_count(path: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        return _field(path, b"oom_kill") or 0
    return 0


def _v1_mounts() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "cgroup":
            for option in parts[3].split(","):
                if option in ("memory", "pids", "cpu"):
                    found.setdefault(option, Path(parts[1]))
    return found


class ResourceControl:
    """Limits and accounting for sandboxes (and memory accounting per command)."""

    def __init__(self, name: str, unified: Path | None) -> None:
        self.name = name
        self.unified = unified  # the node's cgroup2 tree (its base), if any
        self.v2: set[str] = set()
        self.v1: dict[str, Path] = {}
        if unified is not None:
            with contextlib.suppress(OSError):
                available = set((unified.parent / "cgroup.controllers").read_text().split())
                self.v2 = available & {"memory", "pids", "cpu"}
        for controller, mount in _v1_mounts().items():
            if controller not in self.v2 and os.access(mount, os.W_OK):
                self.v1[controller] = mount / name

    def setup(self) -> None:
        for path in self.v1.values():
            path.mkdir(exist_ok=True)
            if (path / "memory.use_hierarchy").exists():
                with contextlib.suppress(OSError):
                    (path / "memory.use_hierarchy").write_text("1")
        if self.v2 and self.unified is not None:
            wanted = " ".join(f"+{c}" for c in sorted(self.v2))
            for path in (self.unified.parent, self.unified):
                with contextlib.suppress(OSError):
                    (path / "cgroup.subtree_control").write_text(wanted)

    def enforceable(self) -> dict[str, str]:
        """Which limits this host enforces, and how."""
        found = {c: "cgroup v2" for c in self.v2}
        found.update({c: "cgroup v1" for c in self.v1})
        return {"cpu": found.get("cpu", ""), "memory_mb": found.get("memory", ""),
                "pids": found.get("pids", "")}  # fmt: skip

    # --- sandboxes ---

    def create(self, sandbox_id: str, limits: Limits) -> list[Path]:
        """Make the sandbox's v1 cgroups with its limits; returns their procs files to join."""
        procs = []
        for controller, base in self.v1.items():
            path = base / sandbox_id
            self._remove_v1(path)
            path.mkdir()
            self._apply(controller, path, limits, v2=False)
            procs.append(path / "cgroup.procs")
        if self.v2 and self.unified is not None:
            path = self.unified / sandbox_id
            for controller in self.v2:
                self._apply(controller, path, limits, v2=True)
        return procs

    @staticmethod
    def _apply(controller: str, path: Path, limits: Limits, *, v2: bool) -> None:
        if controller == "memory" and limits.memory_mb is not None:
            limit = str(limits.memory_mb * 1024 * 1024)
            if v2:
                (path / "memory.max").write_text(limit)
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(limit)
                with contextlib.suppress(OSError):  # absent without swap accounting
                    (path / "memory.memsw.limit_in_bytes").write_text(limit)
        elif controller == "pids" and limits.pids is not None:
            (path / "pids.max").write_text(str(limits.pids))
        elif controller == "cpu" and limits.cpu is not None:
            quota = max(1000, round(limits.cpu * CPU_PERIOD_US))
            if v2:
                (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            else:
                (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))

    def sandbox_oom_kills(self, sandbox_id: str) -> int:
        base = self.v1.get("memory")
        if base is not None:
            return _oom_kill_count(f"{base}/{sandbox_id}/memory.oom_control")
        if "memory" in self.v2 and self.unified is not None:
            return _oom_kill_count(f"{self.unified}/{sandbox_id}/memory.events")
        return 0

    def remove(self, sandbox_id: str) -> None:
        for base in self.v1.values():
            self._remove_v1(base / sandbox_id)

    def sweep(self) -> None:
        for base in self.v1.values():
            if base.is_dir():
                for path in [p for p in base.iterdir() if p.is_dir()]:
                    self._remove_v1(path)

    def close(self) -> None:
        self.sweep()
        for base in self.v1.values():
            with contextlib.suppress(OSError):
                base.rmdir()

    @staticmethod
    def _remove_v1(path: Path) -> None:
        """Remove a v1 cgroup whose processes are gone (the unified tree kills them)."""
        try:
            path.rmdir()  # the common case, a leaf: no walk over its files
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        if not path.is_dir():
            return
        for child in [p for p in path.iterdir() if p.is_dir()]:
            ResourceControl._remove_v1(child)
        with contextlib.suppress(OSError):
            path.rmdir()
