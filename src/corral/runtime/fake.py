"""An in-process stand-in for unit tests of the node and the core. Never used to run user code.

Its "sandbox" understands a handful of shell-like commands, enough to exercise output, stdin,
exit codes, timeouts and cancellation: `echo TEXT`, `echoerr TEXT`, `cat`, `exit N`,
`sleep SECONDS`, `yes` (writes until killed), `true`, joined with `;`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from corral.runtime.base import (
    ExitStatus,
    ProcessHandle,
    ProcessSpec,
    Runtime,
    SandboxConfig,
    SandboxDied,
    SandboxHandle,
    SpawnError,
)

FAKE_SNAPSHOT_BYTES = 4096


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.volumes: set[str] = set()
        self.snapshots: dict[str, str] = {}  # snapshot id -> the sandbox it was taken of

    async def prepare(self) -> list[str]:
        return ["the fake runtime runs no real sandboxes"]

    async def start(self, config: SandboxConfig) -> SandboxHandle:
        if config.snapshot is not None and config.snapshot not in self.snapshots:
            raise RuntimeError(f"snapshot {config.snapshot} is not on this node")
        self.started.append(config.id)
        return FakeSandbox(config)

    async def remove_files(self, config: SandboxConfig) -> None:
        return None

    async def sweep(self) -> None:
        return None

    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        self.volumes.add(volume_id)

    async def remove_volume(self, volume_id: str) -> None:
        self.volumes.discard(volume_id)

    async def snapshot(self, config: SandboxConfig, snapshot_id: str) -> int:
        self.snapshots[snapshot_id] = config.id
        return FAKE_SNAPSHOT_BYTES

    async def remove_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.pop(snapshot_id, None)


class FakeSandbox(SandboxHandle):
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._dead = asyncio.Event()
        self.processes: list[FakeProcess] = []
        self.paused = False

    @property
    def alive(self) -> bool:
        return not self._dead.is_set()

    async def spawn(self, spec: ProcessSpec) -> ProcessHandle:
        if not self.alive:
            raise SandboxDied("stopped")
        script = spec.argv[-1] if spec.argv[:2] == ["/bin/bash", "-c"] else " ".join(spec.argv)
        if script.startswith("/nonexistent"):
            raise SpawnError("No such file or directory")
        process = FakeProcess(self, script)
        self.processes.append(process)
        return process

    async def wait_dead(self) -> None:
        await self._dead.wait()

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.paused = False

    async def stop(self) -> None:
        for process in self.processes:
            process.die(SandboxDied("stopped"))
        self._dead.set()

    def crash(self) -> None:
        """Simulate the sandbox's processes dying on their own."""
        for process in self.processes:
            process.die(SandboxDied("crashed"))
        self._dead.set()


class FakeProcess(ProcessHandle):
    def __init__(self, sandbox: FakeSandbox, script: str) -> None:
        self.sandbox = sandbox
        stdin_r, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
        self.stdout_fd, out_w = os.pipe2(os.O_CLOEXEC)
        self.stderr_fd, err_w = os.pipe2(os.O_CLOEXEC)
        self.signals: list[int] = []
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._child_fds = (stdin_r, out_w, err_w)
        self._task = asyncio.ensure_future(self._run(script, stdin_r, out_w, err_w))
        # A task cancelled before it first runs skips its finally: close the ends here too.
        self._task.add_done_callback(lambda _: self._close_child_fds())

    async def _run(self, script: str, stdin_r: int, out_w: int, err_w: int) -> None:
        loop = asyncio.get_running_loop()
        code = 0
        try:
            for part in (p.strip() for p in script.split(";")):
                word, _, rest = part.partition(" ")
                if word == "echo":
                    await loop.run_in_executor(None, os.write, out_w, rest.encode() + b"\n")
                elif word == "echoerr":
                    await loop.run_in_executor(None, os.write, err_w, rest.encode() + b"\n")
                elif word == "cat":
                    while data := await loop.run_in_executor(None, os.read, stdin_r, 65536):
                        await loop.run_in_executor(None, os.write, out_w, data)
                elif word in ("true", "/bin/true"):
                    pass
                elif word == "exit":
                    code = int(rest or 0)
                    break
                elif word == "sleep":
                    await asyncio.sleep(float(rest))
                elif word == "yes":
                    block = b"y\n" * 32768
                    while True:
                        await loop.run_in_executor(None, os.write, out_w, block)
                else:
                    code = 127
                    await loop.run_in_executor(
                        None, os.write, err_w, f"{word}: not found\n".encode()
                    )
                    break
            self._finish(ExitStatus(code))
        except asyncio.CancelledError:
            pass
        except OSError:
            self._finish(ExitStatus(None, signal.SIGPIPE))
        finally:
            self._close_child_fds()

    def _close_child_fds(self) -> None:
        fds, self._child_fds = self._child_fds, ()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _finish(self, status: ExitStatus) -> None:
        if not self._exit.done():
            self._exit.set_result(status)

    def die(self, exc: Exception) -> None:
        self._task.cancel()
        if not self._exit.done():
            self._exit.set_exception(exc)
            self._exit.exception()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    async def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            self._task.cancel()
            self._finish(ExitStatus(None, signum))

    async def signal_group(self, signum: int) -> None:
        await self.signal(signum)

    async def kill_tree(self) -> None:
        await self.signal(signal.SIGKILL)

    async def release(self) -> None:
        return None
