"""A command's cgroups: made once, kept open, and used again by the sandbox's next command.

Every command runs in cgroups of its own: a cgroup2 one, which kills its whole tree, and, where
the host has the v1 memory hierarchy, a v1 memory one, which measures its peak memory. Making
and removing them cost the node ~140 us and ~100 us of kernel time a command (two mkdirs and
two rmdirs, the v1 memory ones the dearer), and opening their files at every start and end
another ~70 us on the exec's own path (measured on this project's 2-core hosts). So they are
kept, with the files a command's start and end need open, and once a command has ended and
left them empty, the sandbox's next command starts in them:

- its CPU time is read against what the cgroup had used before it (cpu.stat's usage_usec);
- its peak memory is measured from a peak reset to what was still charged when it started
  (v1 memory.max_usage_in_bytes, written to reset it; cgroup2 memory.peak through the same
  descriptor, kernel 6.12 and later), and that leftover is subtracted;
- they are not used again, but removed, if a process is left in them, one was OOM-killed in
  them, more than LEFTOVER_MAX stays charged to them (a command that wrote files leaves their
  page cache), or the peak cannot be reset.

Their names are their own (`cg-<16 hex>`), never a command's: cgroup2 cannot rename, and one
serves many commands in turn.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from corral.runtime.limits import Usage, field_value

PREFIX = "cg-"
# Charged memory a cgroup may keep and still be used again (a command that only ran keeps
# next to none; one that wrote files keeps their page cache, which would blur the next peak).
LEFTOVER_MAX = 1 << 20
READ_MAX = 4096  # cgroup files read here are a line or a few


def new_name() -> str:
    return PREFIX + secrets.token_hex(8)


class CommandCgroups:
    """One set of command cgroups of a sandbox, with its files open. Made by `make`; the
    sandbox hands it to one command at a time (`begin`), then either takes it back
    (`reusable`) or has it removed (`remove`)."""

    def __init__(self, name: str, unified: Path | None, memory: str | None) -> None:
        self.name = name
        self.unified = unified  # the cgroup2 directory (kills the tree), if any
        self.memory = memory  # the v1 memory directory (measures the peak), if any
        self.join_fds: list[int] = []  # cgroup.procs, write-only: the launcher joins these
        self._cpu_fd: int | None = None  # cgroup2 cpu.stat
        self._events_fd: int | None = None  # cgroup2 cgroup.events (populated)
        self._peak_fd: int | None = None  # v1 memory.max_usage_in_bytes, or cgroup2 memory.peak
        self._oom_fd: int | None = None  # v1 memory.oom_control
        self._cpu_base = 0  # usage_usec before the current command
        self._peak_base = 0  # charged bytes left from before the current command
        self._oom_kills = 0  # as last read

    @classmethod
    def make(cls, unified: Path | None, memory_parent: Path | None) -> CommandCgroups:
        """Make them under a new name: the cgroup2 one in `unified` (the sandbox's cgroup),
        the v1 memory one in `memory_parent` (the sandbox's v1 memory cgroup). A v1 memory
        cgroup that cannot be made is left out (the command then has no peak), as before."""
        name = new_name()
        unified_dir = None
        if unified is not None:
            unified_dir = unified / name
            os.mkdir(str(unified_dir))  # every command may pass here: plain strings
        memory = None
        if memory_parent is not None:
            path = f"{memory_parent}/{name}"
            try:
                os.mkdir(path)
                memory = path
            except OSError:
                memory = None
        cgroups = cls(name, unified_dir, memory)
        try:
            cgroups._open()
        except OSError:
            cgroups.remove()
            raise
        return cgroups

    def _open(self) -> None:
        flags = os.O_CLOEXEC
        if self.unified is not None:
            base = str(self.unified)
            self.join_fds.append(os.open(base + "/cgroup.procs", os.O_WRONLY | flags))
            self._events_fd = os.open(base + "/cgroup.events", os.O_RDONLY | flags)
            with contextlib.suppress(OSError):  # no cpu controller: no CPU time
                self._cpu_fd = os.open(base + "/cpu.stat", os.O_RDONLY | flags)
            if self.memory is None:
                with contextlib.suppress(OSError):  # memory in cgroup2, if it is there
                    self._peak_fd = os.open(base + "/memory.peak", os.O_RDWR | flags)
        if self.memory is not None:
            self.join_fds.append(os.open(self.memory + "/cgroup.procs", os.O_WRONLY | flags))
            self._peak_fd = os.open(self.memory + "/memory.max_usage_in_bytes", os.O_RDWR | flags)
            self._oom_fd = os.open(self.memory + "/memory.oom_control", os.O_RDONLY | flags)

    # --- one command's use ---------------------------------------------------------------------

    def begin(self) -> None:
        """A command is about to start in them: what was used before it is its baseline."""
        if self._cpu_fd is not None:
            self._cpu_base = _field(self._cpu_fd, b"usage_usec") or 0

    def usage(self) -> Usage:
        """The current command's CPU time, peak memory and OOM kills (read as it ends)."""
        cpu_ms = peak = None
        if self._cpu_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                usec = _field(self._cpu_fd, b"usage_usec")
                cpu_ms = max(0, usec - self._cpu_base) // 1000 if usec is not None else None
        if self._peak_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                peak = max(0, int(os.pread(self._peak_fd, READ_MAX, 0)) - self._peak_base)
        if self._oom_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                self._oom_kills = _field(self._oom_fd, b"oom_kill") or 0
        return Usage(cpu_ms=cpu_ms, peak_memory_bytes=peak, oom_kills=self._oom_kills)

    def reusable(self) -> bool:
        """Whether the next command can start in them (the current one has ended): nothing
        left in them, no OOM kill, the peak reset and little left charged."""
        if self._events_fd is None:
            return False  # without cgroup2 nothing tells whether they are empty
        try:
            if b"populated 0" not in os.pread(self._events_fd, READ_MAX, 0):
                return False
            if self._oom_fd is not None and (_field(self._oom_fd, b"oom_kill") or 0):
                return False
            if self._peak_fd is not None:
                os.pwrite(self._peak_fd, b"0", 0)  # the peak, reset to what is charged now
                leftover = int(os.pread(self._peak_fd, READ_MAX, 0))
                if leftover > LEFTOVER_MAX:
                    return False
                self._peak_base = leftover
        except (OSError, ValueError):
            return False  # e.g. a kernel whose memory.peak cannot be reset
        return True

    # --- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close their files (again is a no-op); the directories stay."""
        fds = [*self.join_fds, self._cpu_fd, self._events_fd, self._peak_fd, self._oom_fd]
        self.join_fds = []
        self._cpu_fd = self._events_fd = self._peak_fd = self._oom_fd = None
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def remove(self) -> bool:
        """Close their files and remove the directories; False while a process is still in
        them (try again later). Removing what is already gone is done."""
        self.close()
        if self.unified is not None:
            try:
                os.rmdir(str(self.unified))
            except FileNotFoundError:
                pass
            except OSError:
                return False  # busy: something is left in it
            self.unified = None
        if self.memory is not None:
            with contextlib.suppress(OSError):  # its processes are gone with the cgroup2 one
                os.rmdir(self.memory)
            self.memory = None
        return True


def _field(fd: int, key: bytes) -> int | None:
    """The value of `key` in an open cgroup file of "key value" lines; None if absent."""
    return field_value(os.pread(fd, READ_MAX, 0), key)
