"""What the core asks of a node. The built-in local node implements it; a remote agent will
implement the same calls over its connection to the server."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.core.errors import BadGateway, Unavailable
from corral.core.models import CommandStatus
from corral.node.output_log import Chunk
from corral.runtime.base import Injection, SandboxConfig
from corral.runtime.images import Image, RegistryAuth


class NodeUnavailable(Unavailable):
    """The node does not answer (or speaks another protocol version): 503 with the reason."""


class TooManyCommands(RuntimeError):
    """The sandbox runs as many commands as it may at once."""


class HostFailure(RuntimeError):
    """Something on the host failed for a sandbox; the message says why without a host path
    (the node's log has the whole error)."""


class SnapshotsUnsupported(HostFailure):
    """The node's runtime cannot capture a sandbox's files."""


@dataclass(frozen=True)
class CommandSpec:
    id: str
    sandbox_id: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdin: bytes | None  # written first; then EOF unless interactive
    timeout_ms: int
    max_output_bytes: int
    interactive: bool = False  # standard input stays open for write_stdin()
    tty: bool = False
    rows: int = 24
    cols: int = 80
    # Standard output is not logged: the caller reads it with Execution.read_stdout() (file
    # transfers: any size, at the pace of the reader, never through the capped log).
    raw_stdout: bool = False
    keep_log: bool = True  # False: the log file is removed once the command has ended
    # A command of the store's history: a remote node reports its result as an event. Helpers
    # (file transfers, checks) report only to their caller.
    report: bool = True
    # The node refuses the command (TooManyCommands) when its sandbox runs this many already.
    max_running: int = 0
    rlimits: dict[str, int] = field(default_factory=dict)
    user: str = "user"  # or "root": uid 0 inside the sandbox's user namespace (sudo)


@dataclass(frozen=True)
class CommandOutcome:
    status: CommandStatus
    exit_code: int | None
    signal: int | None
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    started_at: datetime
    finished_at: datetime
    error: str | None = None
    cpu_ms: int | None = None
    peak_memory_bytes: int | None = None
    oom_killed: bool = False

    @property
    def duration_ms(self) -> int:
        return max(0, round((self.finished_at - self.started_at).total_seconds() * 1000))


class Execution(abc.ABC):
    """A command running on a node."""

    spec: CommandSpec
    started_at: datetime

    @abc.abstractmethod
    async def outcome(self) -> CommandOutcome: ...

    @abc.abstractmethod
    async def cancel(self) -> None:
        """SIGTERM to every process of the command, SIGKILL after the grace period."""

    @abc.abstractmethod
    async def write_stdin(self, data: bytes) -> None:
        """Append to the command's standard input (interactive commands only)."""

    @abc.abstractmethod
    async def close_stdin(self) -> None:
        """End of input: EOF on a pipe, Ctrl-D on a terminal."""

    @abc.abstractmethod
    async def signal(self, signum: int) -> None:
        """Signal the command's process group, as a terminal's Ctrl-C would."""

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @property
    @abc.abstractmethod
    def finished(self) -> bool: ...

    @property
    @abc.abstractmethod
    def stdin_open(self) -> bool:
        """Whether write_stdin() can still take input (interactive and not yet closed)."""

    @abc.abstractmethod
    async def read_stdout(self, n: int = 1 << 20) -> bytes:
        """Up to n bytes of standard output, b"" at its end (raw_stdout commands only)."""

    @abc.abstractmethod
    async def close_stdout(self) -> None:
        """Stop reading standard output (raw_stdout commands); the writer gets EPIPE."""


class PortUnreachable(BadGateway):
    """Nothing answers on the sandbox's port: 502, at once."""

    code = "port_unreachable"


class PortStream(abc.ABC):
    """A TCP connection to a port of a sandbox, opened by its node inside the sandbox's own
    network namespace. Bytes both ways, with back-pressure: write() returns once there is room
    again, so neither end ever buffers more than a socket's worth."""

    @abc.abstractmethod
    async def read(self, n: int = 1 << 16) -> bytes:
        """Up to n bytes; b"" once the sandbox's side has closed its end."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def write_eof(self) -> None:
        """No more bytes to the sandbox (a half close); reading goes on."""

    @abc.abstractmethod
    async def close(self) -> None: ...


SandboxDiedCallback = Callable[[str, str | None], Awaitable[None]]  # id, failure


class Node(abc.ABC):
    id: str
    runtime_name: str
    # Results of reported commands reach the store through the node's events (a remote node),
    # not through the caller of run().
    remote: bool = False

    @abc.abstractmethod
    async def prepare(self) -> list[str]: ...

    @abc.abstractmethod
    async def start_sandbox(self, config: SandboxConfig) -> None: ...

    @abc.abstractmethod
    async def stop_sandbox(self, sandbox_id: str) -> None: ...

    @abc.abstractmethod
    async def remove_sandbox(self, config: SandboxConfig) -> None: ...

    @abc.abstractmethod
    async def set_network(
        self,
        sandbox_id: str,
        network: str,
        allow: tuple[str, ...],
        inject: tuple[Injection, ...] = (),
    ) -> None:
        """Change a running sandbox's network policy; NeedsRestart if not possible live."""

    async def network_status(self, sandbox_id: str) -> dict[str, Any]:
        """What a running sandbox's egress policy allowed and refused (runtime/egress.py);
        {} when it has no network."""
        return {}

    @abc.abstractmethod
    async def set_env(self, sandbox_id: str, env: dict[str, str]) -> None:
        """The environment every later command of a running sandbox starts with."""

    @abc.abstractmethod
    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        """A persistent file system on this node, for its sandboxes to mount."""

    @abc.abstractmethod
    async def remove_volume(self, volume_id: str) -> None: ...

    # --- images: the node's own store (corral.runtime.images); errors are its ImageErrors ---

    @abc.abstractmethod
    async def pull_image(self, reference: str, auth: RegistryAuth | None = None) -> Image:
        """Pull from the registry (verified, layers unpacked and checked): ready to start."""

    @abc.abstractmethod
    async def import_image(self, archive: Path, reference: str | None = None) -> Image:
        """Import an OCI layout or `docker save` tarball, a file on the caller's host."""

    @abc.abstractmethod
    async def list_images(self) -> list[Image]: ...

    @abc.abstractmethod
    async def get_image(self, name: str) -> Image:
        """By id, unique id prefix or reference; ImageNotFoundError if absent."""

    @abc.abstractmethod
    async def remove_image(self, name: str) -> Image: ...

    @abc.abstractmethod
    async def snapshot_sandbox(self, sandbox_id: str, snapshot_id: str) -> int:
        """Capture a running sandbox's files as snapshot `snapshot_id` of this node (its
        processes frozen meanwhile); returns the bytes it takes. Nothing is left on failure."""

    @abc.abstractmethod
    async def remove_snapshot(self, snapshot_id: str) -> None: ...

    @abc.abstractmethod
    async def pause_sandbox(self, sandbox_id: str) -> None: ...

    @abc.abstractmethod
    async def resume_sandbox(self, sandbox_id: str) -> None: ...

    @abc.abstractmethod
    async def templates(self) -> list[str]: ...

    @abc.abstractmethod
    async def enforceable(self) -> dict[str, str]:
        """Which sandbox limits this node enforces (limit -> mechanism; empty: not enforced)."""

    @abc.abstractmethod
    async def sandbox_running(self, sandbox_id: str) -> bool: ...

    @abc.abstractmethod
    async def running_count(self, sandbox_id: str) -> int: ...

    @abc.abstractmethod
    async def run(self, spec: CommandSpec) -> Execution:
        """Start a command; raises SpawnError or SandboxDied when it cannot start."""

    @abc.abstractmethod
    async def execution(self, command_id: str) -> Execution | None:
        """The command's execution while it runs on this node (from any replica)."""

    # --- a command's output, read through the node that holds its log ---

    @abc.abstractmethod
    def follow_output(
        self, sandbox_id: str, command_id: str, offset: int = 0, *, idle: float | None = None
    ) -> AsyncIterator[Chunk | None]:
        """The log from `offset`: replayed, then followed until the command ends; None whenever
        `idle` seconds pass in silence. CorruptLog for an offset that is not a frame's."""

    @abc.abstractmethod
    def follow_raw(
        self,
        sandbox_id: str,
        command_id: str,
        offset: int = 0,
        streams: frozenset[int] | None = None,
    ) -> AsyncIterator[tuple[bytes | memoryview, int]]:
        """The raw view: (data, next_offset) pieces of `streams`, replayed then followed."""

    @abc.abstractmethod
    async def check_offset(self, sandbox_id: str, command_id: str, offset: int) -> None:
        """CorruptLog unless a frame of the log starts at `offset` (or it is the log's end)."""

    @abc.abstractmethod
    async def output(self, sandbox_id: str, command_id: str) -> tuple[bytes, bytes]:
        """All the kept stdout and stderr of a command, what it printed so far if it runs."""

    async def open_port(self, sandbox_id: str, port: int) -> PortStream:
        """A connection to 127.0.0.1:`port` inside the running sandbox's network namespace;
        PortUnreachable when nothing listens there, SandboxDied when it does not run."""
        raise Unavailable("this node does not open connections to sandbox ports")

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    on_sandbox_died: SandboxDiedCallback | None = None
