"""The built-in node: runs sandboxes on this host through a runtime backend."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from corral import __version__
from corral.clock import utcnow
from corral.core.errors import Unavailable
from corral.core.models import CommandStatus, NodeCapacity, NodeInfo
from corral.node.base import (
    CommandOutcome,
    CommandSpec,
    Execution,
    HostFailure,
    Node,
    PortStream,
    SnapshotsUnsupported,
    TooManyCommands,
)
from corral.node.bus import PROTOCOL_VERSION
from corral.node.images import NodeImages
from corral.node.output_log import (
    STDERR,
    STDOUT,
    Chunk,
    OutputLog,
    check_offset,
    follow_idle,
    follow_raw,
    read_output,
)
from corral.node.port_stream import SocketPortStream
from corral.pipes import pipe_end
from corral.runtime.base import (
    ExitStatus,
    Injection,
    ProcessHandle,
    ProcessSpec,
    Runtime,
    SandboxConfig,
    SandboxDied,
    SandboxHandle,
)
from corral.runtime.images import Image, RegistryAuth
from corral.runtime.limits import Usage

log = logging.getLogger(__name__)

DRAIN_AFTER_EXIT = 0.25  # how long output is still read once the command's process has exited
EXIT_AFTER_KILL = 3.0  # how long to wait for the exit report after a kill
STDIN_BUFFER = 1 << 20  # bytes of stdin buffered for a command before writers wait
RAW_STDOUT_BUFFER = 1 << 20  # bytes of raw stdout buffered before the pipe stops being read
RAW_STDOUT_ORPHAN = 300.0  # seconds after the end before an unread raw stdout is closed
ENDED_LOG_SECONDS = 5.0  # how long an ended command's log stays in memory for its reply


# An absolute path where a message names one: not inside a word, a number (10.0.0.0/8) or a URL.
_HOST_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"`,;:()\[\]{}<>]*")


def without_host_paths(text: str) -> str:
    return _HOST_PATH.sub("<host path>", text)


def public_reason(exc: BaseException) -> str:
    """Why a host-side operation failed, fit for a client: clients and sandboxes learn nothing
    of the host's layout (data dir, cgroups, mount points) from it."""
    if isinstance(exc, subprocess.CalledProcessError):
        program = os.path.basename(str(exc.cmd[0])) if isinstance(exc.cmd, list) else "a tool"
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        first = err.strip().splitlines()[:1] or [f"exit status {exc.returncode}"]
        return f"{program} failed: {without_host_paths(first[0])[:500]}"
    if isinstance(exc, OSError) and exc.strerror:
        return without_host_paths(exc.strerror)  # without the file it names: the host's
    return without_host_paths(str(exc))


class _PipeReader(asyncio.Protocol):
    def __init__(self, log: OutputLog, stream: int) -> None:
        self.log = log
        self.stream = stream
        self.eof = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.log.append(self.stream, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)


class _StdinProtocol(asyncio.Protocol):
    """The write side of a command's stdin, with flow control (drain) for writers."""

    def __init__(self) -> None:
        self._paused = False
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def drain(self) -> None:
        while self._paused and not self._closed:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut


class _TerminalWriter:
    """Input to a terminal's master side, written without an event-loop pipe transport.

    uvloop's write-pipe transport also reads from its descriptor (to notice the reader going
    away); on a terminal that read takes the command's output, which then never reaches the
    log. This writer only writes: non-blocking, buffered, with the same flow control.
    """

    def __init__(self, fd: int, protocol: _StdinProtocol, high: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._protocol = protocol
        self._high = high
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._watching = False
        self._paused = False
        self._closing = False
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._buffer:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                pass
            except OSError:
                self.abort()
                return
        if data:
            self._buffer += data
            if not self._watching:
                self._loop.add_writer(self._fd, self._ready)
                self._watching = True
            if len(self._buffer) > self._high and not self._paused:
                self._paused = True
                self._protocol.pause_writing()

    def _ready(self) -> None:
        try:
            del self._buffer[: os.write(self._fd, self._buffer)]
        except BlockingIOError:
            return
        except OSError:
            self.abort()
            return
        if self._paused and len(self._buffer) <= self._high // 4:
            self._paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            self._watching = False
            if self._closing:
                self._finish()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        if not self._buffer:
            self._finish()

    def abort(self) -> None:
        self._buffer.clear()
        self._closing = True
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        os.close(self._fd)
        self._protocol.connection_lost(None)


class LocalExecution(Execution):
    def __init__(
        self, node: LocalNode, spec: CommandSpec, process: ProcessHandle, log: OutputLog
    ) -> None:
        self.node = node
        self.spec = spec
        self.process = process
        self.log = log
        self.started_at = utcnow()
        self._reason: CommandStatus | None = None  # timed_out or cancelled, once decided
        self._killed = asyncio.Event()
        self._terminator: asyncio.Future[None] | None = None
        self._stdin: asyncio.WriteTransport | _TerminalWriter | None = None
        self._stdin_protocol: _StdinProtocol | None = None
        self._stdin_ready = asyncio.Event()
        self._stdout: asyncio.StreamReader | None = None
        self._stdout_transport: asyncio.BaseTransport | None = None
        self._stdout_ready = asyncio.Event()
        self._done: asyncio.Future[CommandOutcome] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._supervise())

    async def outcome(self) -> CommandOutcome:
        return await asyncio.shield(self._done)

    @property
    def finished(self) -> bool:
        return self._done.done()

    async def cancel(self) -> None:
        self.cancel_now()

    def cancel_now(self) -> None:
        if self._reason is None and not self._done.done():
            self._reason = CommandStatus.cancelled
            self._terminator = asyncio.ensure_future(self._terminate(self.node.kill_grace))

    def _expire(self) -> None:
        if self._reason is None and not self._done.done():
            self._reason = CommandStatus.timed_out
            self._terminator = asyncio.ensure_future(self._terminate(0))

    async def _terminate(self, grace: float) -> None:
        with contextlib.suppress(Exception):
            if grace > 0:
                await self.process.signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._exited_event()), grace)
            await self.process.kill_tree()
        self._killed.set()

    async def _exited_event(self) -> None:
        with contextlib.suppress(Exception):
            await self.process.wait()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        readers: list[tuple[asyncio.BaseTransport, _PipeReader]] = []
        timer = loop.call_later(self.spec.timeout_ms / 1000, self._expire)
        status: ExitStatus | None = None
        error: str | None = None
        try:
            pipes = [(self.process.stdout_fd, STDOUT), (self.process.stderr_fd, STDERR)]
            for fd, stream in pipes:
                if fd is None:
                    continue
                pipe = await pipe_end(fd)
                if stream == STDOUT and self.spec.raw_stdout:
                    await self._connect_raw_stdout(pipe)
                    continue
                reader = _PipeReader(self.log, stream)
                transport, _ = await loop.connect_read_pipe(lambda r=reader: r, pipe)
                readers.append((transport, reader))
            try:
                await self._feed_stdin()
            finally:
                self._stdin_ready.set()
            status = await self._wait_exit()
        except SandboxDied as exc:
            error = (
                f"the sandbox stopped while the command ran ({public_reason(exc)}); "
                "its result is unknown"
            )
        except Exception as exc:  # a bug here must still end the command, never hang it
            log.exception("command %s supervision failed", self.spec.id)
            error = f"internal error: {public_reason(exc)}"
        finally:
            self._stdin_ready.set()
            self._stdout_ready.set()
            timer.cancel()
            eofs = [r.eof for _, r in readers]
            if eofs:
                await asyncio.wait(eofs, timeout=DRAIN_AFTER_EXIT)
            for transport, _ in readers:
                transport.close()
            if self._stdin is not None and not self._stdin.is_closing():
                self._stdin.abort()
            try:
                self.log.close()
            except Exception:  # the result must be reported whatever happened to the log
                log.exception("command %s: closing its output log failed", self.spec.id)
            usage = self.process.usage()
        if error is None and self.log.error is not None:
            error = self.log.error
        self._done.set_result(self._build_outcome(status, error, usage))
        # After the result: removing the command's cgroups is not the caller's wait.
        with contextlib.suppress(Exception):
            await self.process.release()

    async def _wait_exit(self) -> ExitStatus | None:
        wait = asyncio.ensure_future(self.process.wait())
        killed = asyncio.ensure_future(self._killed.wait())
        try:
            done, _ = await asyncio.wait({wait, killed}, return_when=asyncio.FIRST_COMPLETED)
            if wait in done:
                return wait.result()
            # Killed: the exit report should follow at once, unless the sandbox is wedged.
            try:
                return await asyncio.wait_for(wait, EXIT_AFTER_KILL)
            except TimeoutError:
                return None
        finally:
            for fut in (wait, killed):
                fut.cancel()

    async def _connect_raw_stdout(self, pipe: object) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=RAW_STDOUT_BUFFER // 2, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
        self._stdout, self._stdout_transport = reader, transport
        self._stdout_ready.set()

    async def _feed_stdin(self) -> None:
        fd = self.process.stdin_fd
        if fd is None:
            return
        if not self.spec.stdin and not self.spec.interactive:
            os.close(fd)
            return
        loop = asyncio.get_running_loop()
        protocol = _StdinProtocol()
        transport: asyncio.WriteTransport | _TerminalWriter
        if self.spec.tty:
            transport = _TerminalWriter(fd, protocol, STDIN_BUFFER)
        else:
            pipe = await pipe_end(fd)
            transport, _ = await loop.connect_write_pipe(lambda: protocol, pipe)
            transport.set_write_buffer_limits(high=STDIN_BUFFER)
        self._stdin, self._stdin_protocol = transport, protocol
        if self.spec.stdin:
            transport.write(self.spec.stdin)
        if not self.spec.interactive:
            transport.close()  # flushes what is buffered, then closes: the command sees EOF

    @property
    def stdin_open(self) -> bool:
        if not self.spec.interactive or self._done.done():
            return False
        return self._stdin is None or not self._stdin.is_closing()

    async def write_stdin(self, data: bytes) -> None:
        await self._stdin_ready.wait()
        if self._stdin is None or self._stdin.is_closing():
            raise BrokenPipeError("standard input is closed")
        self._stdin.write(data)
        # Back-pressure: do not buffer without bound for a command that does not read.
        if self._stdin_protocol is not None:
            await self._stdin_protocol.drain()

    async def read_stdout(self, n: int = 1 << 20) -> bytes:
        if not self.spec.raw_stdout:
            raise RuntimeError("standard output of this command goes to its log")
        await self._stdout_ready.wait()
        if self._stdout is None:
            return b""
        return await self._stdout.read(n)

    async def close_stdout(self) -> None:
        self.close_stdout_now()

    def close_stdout_now(self) -> None:
        if self._stdout_transport is not None and not self._stdout_transport.is_closing():
            self._stdout_transport.close()

    async def close_stdin(self) -> None:
        await self._stdin_ready.wait()
        if self._stdin is None or self._stdin.is_closing():
            return
        if self.spec.tty:
            self._stdin.write(b"\x04")  # a terminal has no EOF of its own: Ctrl-D
        else:
            self._stdin.close()

    async def signal(self, signum: int) -> None:
        if not self._done.done():
            await self.process.signal_group(signum)

    async def resize(self, rows: int, cols: int) -> None:
        if not self._done.done():
            with contextlib.suppress(OSError):
                self.process.resize(rows, cols)

    def _build_outcome(
        self, status: ExitStatus | None, error: str | None, usage: Usage
    ) -> CommandOutcome:
        if self._reason is not None:
            final = self._reason
        elif status is None:
            final = CommandStatus.lost
        else:
            final = CommandStatus.completed
        return CommandOutcome(
            status=final,
            # The shell's convention: 128+N when signal N ended it (`signal` says which).
            exit_code=status.shell_code if status else None,
            signal=status.signal if status else None,
            stdout_bytes=self.log.seen[STDOUT],
            stderr_bytes=self.log.seen[STDERR],
            stdout_truncated=self.log.truncated(STDOUT),
            stderr_truncated=self.log.truncated(STDERR),
            started_at=self.started_at,
            finished_at=utcnow(),
            error=error,
            cpu_ms=usage.cpu_ms,
            peak_memory_bytes=usage.peak_memory_bytes,
            # Killed by SIGKILL while its memory cgroup counted an OOM kill.
            oom_killed=bool(usage.oom_kills) and status is not None and status.signal == 9,
        )


class LocalNode(Node):
    def __init__(
        self,
        *,
        node_id: str,
        runtime: Runtime,
        data_dir: Path,
        kill_grace_ms: int,
        images: NodeImages | None = None,
    ) -> None:
        self.id = node_id
        self.images = images or NodeImages(data_dir / "images")
        self.runtime = runtime
        self.runtime_name = runtime.name
        self.logs_dir = data_dir / "logs"
        self.kill_grace = kill_grace_ms / 1000
        self._sandboxes: dict[str, SandboxHandle] = {}
        self._stopping: set[str] = set()
        self._executions: dict[str, LocalExecution] = {}
        self._ended_logs: dict[str, OutputLog] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    async def prepare(self) -> list[str]:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.chmod(0o700)
        warnings = await self.runtime.prepare()
        await self.runtime.sweep()
        await asyncio.to_thread(self.images.clean)
        return warnings

    async def start_sandbox(self, config: SandboxConfig) -> None:
        old = self._sandboxes.pop(config.id, None)
        if old is not None:
            self._stopping.add(config.id)
            await old.stop()
            self._stopping.discard(config.id)
        try:
            handle = await self.runtime.start(config)
        except Exception as exc:
            log.warning("sandbox %s did not start: %r", config.id, exc)
            raise HostFailure(public_reason(exc)) from None
        self._sandboxes[config.id] = handle
        task = asyncio.ensure_future(self._watch(config.id, handle))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, sandbox_id: str, handle: SandboxHandle) -> None:
        await handle.wait_dead()
        if self._sandboxes.get(sandbox_id) is handle and sandbox_id not in self._stopping:
            del self._sandboxes[sandbox_id]
            if handle.failure is None:
                log.warning("sandbox %s stopped unexpectedly", sandbox_id)
            await handle.stop()  # clean up what is left of it (cgroups)
            if self.on_sandbox_died is not None:
                await self.on_sandbox_died(sandbox_id, handle.failure)

    async def stop_sandbox(self, sandbox_id: str) -> None:
        for execution in list(self._executions.values()):
            if execution.spec.sandbox_id == sandbox_id:
                execution.cancel_now()
        handle = self._sandboxes.pop(sandbox_id, None)
        if handle is not None:
            self._stopping.add(sandbox_id)
            try:
                await handle.stop()
            finally:
                self._stopping.discard(sandbox_id)
        for execution in list(self._executions.values()):
            if execution.spec.sandbox_id == sandbox_id:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(execution.outcome(), EXIT_AFTER_KILL + 1)

    async def remove_sandbox(self, config: SandboxConfig) -> None:
        await self.stop_sandbox(config.id)
        try:
            await self.runtime.remove_files(config)
        except OSError as exc:
            log.warning("sandbox %s: removing its files failed: %r", config.id, exc)
            raise OSError(exc.errno, public_reason(exc)) from None

    async def set_env(self, sandbox_id: str, env: dict[str, str]) -> None:
        """The environment every later command of a running sandbox starts with."""
        handle = self._live(sandbox_id)
        handle.config = dataclasses.replace(handle.config, env=dict(env))

    async def set_network(
        self,
        sandbox_id: str,
        network: str,
        allow: tuple[str, ...],
        inject: tuple[Injection, ...] = (),
    ) -> None:
        await self._live(sandbox_id).set_network(network, allow, inject)

    async def network_status(self, sandbox_id: str) -> dict[str, Any]:
        return await self._live(sandbox_id).network_status()

    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        try:
            await self.runtime.create_volume(volume_id, size_mb)
        except (OSError, subprocess.CalledProcessError) as exc:
            log.warning("volume %s: creating it failed: %r", volume_id, exc)
            with contextlib.suppress(Exception):
                await self.runtime.remove_volume(volume_id)  # nothing half-made stays
            raise HostFailure(f"the volume could not be made: {public_reason(exc)}") from None

    async def remove_volume(self, volume_id: str) -> None:
        try:
            await self.runtime.remove_volume(volume_id)
        except OSError as exc:
            log.warning("volume %s: removing it failed: %r", volume_id, exc)
            raise HostFailure(f"the volume could not be removed: {public_reason(exc)}") from None

    async def snapshot_sandbox(self, sandbox_id: str, snapshot_id: str) -> int:
        handle = self._live(sandbox_id)
        try:
            return await self.runtime.snapshot(handle.config, snapshot_id)
        except NotImplementedError:
            raise SnapshotsUnsupported(
                f"node {self.id} ({self.runtime_name}) cannot take snapshots"
            ) from None
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            if isinstance(exc, SandboxDied):
                raise
            log.warning("sandbox %s: snapshot %s failed: %r", sandbox_id, snapshot_id, exc)
            with contextlib.suppress(Exception):
                await self.runtime.remove_snapshot(snapshot_id)  # nothing half-made stays
            raise HostFailure(f"the snapshot could not be taken: {public_reason(exc)}") from None

    async def remove_snapshot(self, snapshot_id: str) -> None:
        try:
            await self.runtime.remove_snapshot(snapshot_id)
        except NotImplementedError:
            raise SnapshotsUnsupported(
                f"node {self.id} ({self.runtime_name}) cannot take snapshots"
            ) from None
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            log.warning("snapshot %s: removing it failed: %r", snapshot_id, exc)
            raise HostFailure(f"the snapshot could not be removed: {public_reason(exc)}") from None

    async def pull_image(self, reference: str, auth: RegistryAuth | None = None) -> Image:
        return await asyncio.to_thread(self.images.pull, reference, auth)

    async def import_image(self, archive: Path, reference: str | None = None) -> Image:
        return await asyncio.to_thread(self.images.import_archive, archive, reference)

    async def list_images(self) -> list[Image]:
        return await asyncio.to_thread(self.images.list)

    async def get_image(self, name: str) -> Image:
        return await asyncio.to_thread(self.images.get, name)

    async def remove_image(self, name: str) -> Image:
        def users(image_id: str) -> list[str]:
            return [sid for sid, h in list(self._sandboxes.items()) if h.config.image == image_id]

        return await asyncio.to_thread(self.images.remove, name, users)

    async def pause_sandbox(self, sandbox_id: str) -> None:
        try:
            await self._live(sandbox_id).pause()
        except OSError as exc:
            log.warning("sandbox %s: pausing failed: %r", sandbox_id, exc)
            raise HostFailure(f"the sandbox could not be paused: {public_reason(exc)}") from None

    async def resume_sandbox(self, sandbox_id: str) -> None:
        try:
            await self._live(sandbox_id).resume()
        except OSError as exc:
            log.warning("sandbox %s: resuming failed: %r", sandbox_id, exc)
            raise HostFailure(f"the sandbox could not be resumed: {public_reason(exc)}") from None

    def info(self, capacity: NodeCapacity) -> NodeInfo:
        return NodeInfo(
            id=self.id,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            runtime=self.runtime_name,
            capacity=capacity,
            templates=self.runtime.templates(),
            enforceable=self.runtime.enforceable(),
        )

    def load(self) -> dict[str, int]:
        """What heartbeats report: sandboxes running here and commands running in them."""
        return {"sandboxes": len(self._sandboxes), "running_commands": len(self._executions)}

    async def enforceable(self) -> dict[str, str]:
        return self.runtime.enforceable()

    async def templates(self) -> list[str]:
        return self.runtime.templates()

    def _live(self, sandbox_id: str) -> SandboxHandle:
        handle = self._sandboxes.get(sandbox_id)
        if handle is None or not handle.alive:
            raise SandboxDied("the sandbox is not running")
        return handle

    async def open_port(self, sandbox_id: str, port: int) -> PortStream:
        try:
            return await SocketPortStream.open(self._live(sandbox_id), port)
        except NotImplementedError:
            raise Unavailable("this node's runtime cannot reach a sandbox's ports") from None

    async def sandbox_running(self, sandbox_id: str) -> bool:
        handle = self._sandboxes.get(sandbox_id)
        return handle is not None and handle.alive

    async def running_count(self, sandbox_id: str) -> int:
        return sum(1 for e in self._executions.values() if e.spec.sandbox_id == sandbox_id)

    def log_path(self, sandbox_id: str, command_id: str) -> Path:
        return self.logs_dir / sandbox_id / f"{command_id}.log"

    def _log(self, command_id: str) -> OutputLog | None:
        """The in-memory log of a command running here (or that ended a moment ago)."""
        execution = self._executions.get(command_id)
        if execution is not None:
            return execution.log
        return self._ended_logs.get(command_id)

    def follow_output(
        self, sandbox_id: str, command_id: str, offset: int = 0, *, idle: float | None = None
    ) -> AsyncIterator[Chunk | None]:
        live = self._log(command_id)
        return follow_idle(self.log_path(sandbox_id, command_id), offset, live, idle)

    def follow_raw(
        self,
        sandbox_id: str,
        command_id: str,
        offset: int = 0,
        streams: frozenset[int] | None = None,
    ) -> AsyncIterator[tuple[bytes | memoryview, int]]:
        live = self._log(command_id)
        return follow_raw(self.log_path(sandbox_id, command_id), offset, live, streams)

    async def check_offset(self, sandbox_id: str, command_id: str, offset: int) -> None:
        live = self._log(command_id)
        if live is not None:
            live.flush()  # the offset may come from output still being batched
        check_offset(self.log_path(sandbox_id, command_id), offset)  # one pread: no thread

    async def output(self, sandbox_id: str, command_id: str) -> tuple[bytes, bytes]:
        live = self._log(command_id)
        if live is not None:
            memory = live.memory_output()
            if memory is not None:
                return memory
            live.flush()  # what it printed so far, not what the last batch held
        return await asyncio.to_thread(read_output, self.log_path(sandbox_id, command_id))

    async def run(self, spec: CommandSpec) -> Execution:
        if spec.max_running and await self.running_count(spec.sandbox_id) >= spec.max_running:
            raise TooManyCommands(
                f"sandbox {spec.sandbox_id} already runs {spec.max_running} commands"
            )
        process = await self._live(spec.sandbox_id).spawn(
            ProcessSpec(
                id=spec.id,
                argv=spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                tty=spec.tty,
                rows=spec.rows,
                cols=spec.cols,
                rlimits=spec.rlimits,
                user=spec.user,
            )
        )
        output = OutputLog(self.log_path(spec.sandbox_id, spec.id), spec.max_output_bytes)
        execution = LocalExecution(self, spec, process, output)
        self._executions[spec.id] = execution

        def ended(_: object) -> None:
            self._executions.pop(spec.id, None)
            # Kept a moment, so that the result's reply is built from memory, not the file.
            self._ended_logs[spec.id] = output
            asyncio.get_running_loop().call_later(
                ENDED_LOG_SECONDS, self._ended_logs.pop, spec.id, None
            )
            if not spec.keep_log:
                with contextlib.suppress(OSError):
                    output.path.unlink()
            if spec.raw_stdout:
                # The reader closes raw stdout when done with it; never keep a forgotten one.
                asyncio.get_running_loop().call_later(RAW_STDOUT_ORPHAN, execution.close_stdout_now)

        execution._done.add_done_callback(ended)
        return execution

    async def execution(self, command_id: str) -> Execution | None:
        return self._executions.get(command_id)

    async def shutdown(self) -> None:
        # Commands still running end as `lost` unless they finish while their sandbox stops.
        ids = list(self._sandboxes)
        self._stopping.update(ids)
        await asyncio.gather(*(self._sandboxes[i].stop() for i in ids), return_exceptions=True)
        self._sandboxes.clear()
        pending = [e.outcome() for e in self._executions.values()]
        if pending:
            await asyncio.wait(
                [asyncio.ensure_future(p) for p in pending], timeout=EXIT_AFTER_KILL + 1
            )
        for task in list(self._watchers):
            task.cancel()
        await self.runtime.close()
