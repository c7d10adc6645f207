"""Commands on a node's host itself (CMDOP's machines), for an agent started with
`--host-exec USER`: run as that unprivileged user, in a session of their own that a timeout
kills whole, with output kept in memory up to a cap. Never as root: the agent refuses it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
from dataclasses import dataclass, field
from datetime import datetime

from corral.clock import utcnow
from corral.node.protocol import HostExecRefused

OUTPUT_CAP = 256 * 1024  # per stream: the answer must fit in one NATS message
KILL_GRACE = 2.0


def host_user(name: str) -> pwd.struct_passwd:
    """The account host commands run as; refused when it is root or does not exist."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise HostExecRefused(f"no host user {name!r}") from None
    if account.pw_uid == 0 or account.pw_gid == 0:
        raise HostExecRefused("host commands never run as root: name an unprivileged user")
    return account


@dataclass
class HostCommand:
    id: str
    started_at: datetime = field(default_factory=utcnow)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "running"
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    finished_at: datetime | None = None
    error: str | None = None
    task: asyncio.Future[None] | None = None


class HostExec:
    def __init__(self, user: str) -> None:
        self.account = host_user(user)
        self.commands: dict[str, HostCommand] = {}

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        a = self.account
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": a.pw_dir,
            "USER": a.pw_name,
            "LOGNAME": a.pw_name,
            "SHELL": "/bin/sh",
            **extra,
        }

    async def start(
        self, cid: str, command: str, *, env: dict[str, str], cwd: str | None, timeout_ms: int
    ) -> HostCommand:
        if cid in self.commands:
            raise ValueError(f"command {cid} runs here already")
        record = HostCommand(cid)
        workdir = cwd or self.account.pw_dir
        if not await asyncio.to_thread(os.path.isdir, workdir):
            workdir = "/"
        a = self.account
        proc = await asyncio.create_subprocess_exec(
            # setpriv, not the event loop's user= (uvloop has none): the user's own uid, gid
            # and groups, and no way back to privileges.
            "setpriv", f"--reuid={a.pw_uid}", f"--regid={a.pw_gid}", "--init-groups",
            "--no-new-privs", "--", "/bin/sh", "-c", command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=self._env(env),
            start_new_session=True,  # its whole tree is one process group, killed as one
        )  # fmt: skip
        self.commands[cid] = record
        record.task = asyncio.ensure_future(self._supervise(record, proc, timeout_ms / 1000))
        return record

    async def _supervise(
        self, record: HostCommand, proc: asyncio.subprocess.Process, timeout: float
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.ensure_future(self._read(proc.stdout, record, "stdout")),
            asyncio.ensure_future(self._read(proc.stderr, record, "stderr")),
        ]
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what it left behind in its session
        await asyncio.wait(readers, timeout=KILL_GRACE)
        code = proc.returncode if proc.returncode is not None else -1
        record.status = "timed_out" if timed_out else "completed"
        record.signal = -code if code < 0 else None
        record.exit_code = 128 - code if code < 0 else code
        record.finished_at = utcnow()
        record.done.set()
        asyncio.get_running_loop().call_later(300, self.commands.pop, record.id, None)

    async def _read(self, stream: asyncio.StreamReader, record: HostCommand, name: str) -> None:
        buffer: bytearray = getattr(record, name)
        while data := await stream.read(65536):
            room = OUTPUT_CAP - len(buffer)
            if len(data) > room:
                setattr(record, f"{name}_truncated", True)
            buffer += data[: max(0, room)]
