"""The interface every sandbox backend implements.

A runtime starts long-lived sandboxes and spawns processes in them. It hands back raw pipe file
descriptors so the node can stream output without copies through the backend.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.runtime.limits import Limits, Usage


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A pseudo-terminal pair (master, slave), both close-on-exec."""
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    os.set_inheritable(slave, False)
    set_winsize(master, rows, cols)
    return master, slave


PTMX = os.makedev(5, 2)
PTY_SLAVE_MAJORS = range(136, 144)  # UNIX98 pty slaves
TIOCSPTLCK = 0x40045431  # unlockpt()
TIOCGPTPEER = 0x5441  # the slave of a master, opened through the master (Linux 4.13)
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_pty_in(root: int, rows: int, cols: int, owner: int | None = None) -> tuple[int, int]:
    """A pseudo-terminal pair of the devpts instance at `dev/pts` under the directory `root`
    (a sandbox's root, from /proc/PID/root), so that the terminal is one of the sandbox's own
    (`tty`, ttyname(3) and /dev/pts/N work inside). The path is walked without following a
    link, and its `ptmx` must be the pty multiplexer device: a sandbox that replaced its /dev
    gets an OSError (its caller falls back to `open_pty`), and nothing else is opened. The
    slave comes from the master itself, with no path at all; `owner` (a host uid) gets it."""
    opened: list[int] = []
    try:
        dev = os.open("dev", _DIR, dir_fd=root)
        opened.append(dev)
        pts = os.open("pts", _DIR, dir_fd=dev)
        opened.append(pts)
        found = os.stat("ptmx", dir_fd=pts, follow_symlinks=False)
        if not stat.S_ISCHR(found.st_mode) or found.st_rdev != PTMX:
            raise OSError(errno.ENODEV, "the sandbox's /dev/pts/ptmx is not the pty multiplexer")
        master = os.open("ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pts)
    finally:
        for fd in opened:
            os.close(fd)
    try:
        got = os.fstat(master)
        if (got.st_dev, got.st_ino) != (found.st_dev, found.st_ino):
            raise OSError(errno.ENODEV, "the sandbox's ptmx changed while it was opened")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if os.major(os.fstat(slave).st_rdev) not in PTY_SLAVE_MAJORS:
                raise OSError(errno.ENODEV, "not a pty slave")
            if owner is not None:
                os.fchown(slave, owner, -1)
            set_winsize(master, rows, cols)
        except BaseException:
            os.close(slave)
            raise
    except BaseException:
        os.close(master)
        raise
    return master, slave


# argv[0] for the node's own helpers (file operations, code runs): the node's Python, which
# each runtime starts its own way, whatever the sandbox's root holds (an image may have none).
NODE_PYTHON = "/.corral/python3"


@dataclass(frozen=True)
class VolumeBind:
    """A volume a sandbox mounts: its id on the node, where the sandbox sees it, and how."""

    id: str
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class Injection:
    """A header the node's egress proxy adds to a sandbox's HTTPS requests to `host`, its
    value complete (secrets filled in): it never enters the sandbox."""

    host: str
    header: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class SandboxConfig:
    id: str
    slot: int  # index into the host uid pool
    dir: Path  # host directory holding the sandbox's files (workspace, ...)
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    template: str = "host"  # root file system: the host's /usr, or a registered template
    network: str = "none"  # none | allow | outbound
    allow: tuple[str, ...] = ()  # CIDRs and host name patterns the sandbox may reach
    inject: tuple[Injection, ...] = field(default=(), repr=False)
    volumes: tuple[VolumeBind, ...] = ()
    # An image's root instead of the template's (its id, the config digest, in the node's image
    # store), and the image's User ("", "root", "1000", "name", "uid:gid"): who commands run as.
    image: str | None = None
    user: str = ""
    # A snapshot (its id on this node) whose files the sandbox starts from, over its image.
    snapshot: str | None = None


@dataclass(frozen=True)
class ProcessSpec:
    id: str  # command id
    argv: list[str]
    env: dict[str, str]
    cwd: str
    tty: bool = False  # run on a pseudo-terminal: one output stream, job control, resize
    rows: int = 24
    cols: int = 80
    rlimits: dict[str, int] = field(default_factory=dict)  # e.g. {"nofile": 1024, "cpu": 10}
    user: str = "user"  # "user" (uid 1000) or "root" (uid 0 of the sandbox's user namespace)


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None  # None when killed by a signal
    signal: int | None = None

    @property
    def shell_code(self) -> int:
        """The code a shell would report: 128+N for a signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


class SpawnError(Exception):
    """The process could not be started (no such program, bad cwd, ...)."""


class SandboxDied(Exception):
    """The sandbox went away while the process ran: its result is unknown."""


class NeedsRestart(Exception):
    """The change asked for takes a restart of the sandbox's processes."""


class StartUnknown(SandboxDied):
    """The sandbox went away after the process was asked to start: it may have run."""


class ProcessHandle(abc.ABC):
    """A process running in a sandbox, with the host ends of its pipes."""

    stdin_fd: int | None  # write end, owned by the caller once spawned
    stdout_fd: int  # read end, owned by the caller (the terminal's master side with a tty)
    stderr_fd: int | None  # read end, owned by the caller; None with a tty
    tty: bool = False

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size (the foreground process group gets SIGWINCH)."""
        if self.tty:
            set_winsize(self.stdout_fd, rows, cols)

    @abc.abstractmethod
    async def wait(self) -> ExitStatus:
        """The exit of the process itself; raises SandboxDied if that cannot be known."""

    @abc.abstractmethod
    async def signal(self, signum: int) -> None:
        """Send a signal to every process the command started."""

    @abc.abstractmethod
    async def signal_group(self, signum: int) -> None:
        """Send a signal to the command's process group (what Ctrl-C reaches in a shell)."""

    @abc.abstractmethod
    async def kill_tree(self) -> None:
        """SIGKILL every process the command started, however it detached itself."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Free what tracked the command (its cgroup) once nothing of it runs."""

    def usage(self) -> Usage:
        """CPU time, peak memory and OOM kills of the command, where the host measures them;
        read before release()."""
        return Usage()


class SandboxHandle(abc.ABC):
    config: SandboxConfig
    # Why the backend stopped the sandbox itself (e.g. its supervisor broke the protocol);
    # None when it died on its own or was stopped.
    failure: str | None = None

    @property
    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    async def spawn(self, spec: ProcessSpec) -> ProcessHandle: ...

    @abc.abstractmethod
    async def wait_dead(self) -> None:
        """Returns when the sandbox's processes are gone (stopped or crashed)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Kill every process of the sandbox; its files stay."""

    async def set_network(
        self, network: str, allow: tuple[str, ...], inject: tuple[Injection, ...] = ()
    ) -> None:
        """Change the policy of a running sandbox; NeedsRestart when it cannot be done live."""
        raise NeedsRestart("this backend changes network policy only by restarting")

    @abc.abstractmethod
    async def pause(self) -> None:
        """Freeze every process of the sandbox."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    async def network_status(self) -> dict[str, Any]:
        """What the sandbox's egress policy allowed and refused ({} without a network)."""
        return {}

    async def connect_port(self, port: int) -> socket.socket:
        """A connected, non-blocking TCP socket to 127.0.0.1:`port` inside the sandbox's own
        network namespace (runtime/ports.py); ports.PortRefused when nothing listens there."""
        raise NotImplementedError("this backend cannot reach a sandbox's ports")


class Runtime(abc.ABC):
    name: str

    @abc.abstractmethod
    async def prepare(self) -> list[str]:
        """Check the host and set up shared state; returns warnings to log at start-up."""

    def enforceable(self) -> dict[str, str]:
        """Which sandbox limits this host enforces (limit -> mechanism; empty: not enforced)."""
        return {}

    def templates(self) -> list[str]:
        """Root file system templates sandboxes may start from."""
        return ["host"]

    @abc.abstractmethod
    async def start(self, config: SandboxConfig) -> SandboxHandle: ...

    @abc.abstractmethod
    async def remove_files(self, config: SandboxConfig) -> None: ...

    @abc.abstractmethod
    async def sweep(self) -> None:
        """Remove what an earlier run of the node left behind (processes, cgroups)."""

    @abc.abstractmethod
    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        """A persistent file system of `size_mb` MiB that sandboxes of this node mount."""

    @abc.abstractmethod
    async def remove_volume(self, volume_id: str) -> None: ...

    async def snapshot(self, config: SandboxConfig, snapshot_id: str) -> int:
        """Capture the running sandbox's files (its writable root and /workspace), its
        processes frozen meanwhile, as snapshot `snapshot_id` of this node; returns its bytes."""
        raise NotImplementedError("this runtime cannot take snapshots")

    async def remove_snapshot(self, snapshot_id: str) -> None:
        raise NotImplementedError("this runtime cannot take snapshots")

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release shared host state once every sandbox is stopped."""
