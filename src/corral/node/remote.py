"""A node reached over NATS: the replica's side of the node protocol (node/agent.py answers).

Every call is a request to the node's own subject. A command's result is not taken from the
node's answer but from the store, once a replica has applied the node's `ended` event: every
replica then sees the same result, and one declared lost stays lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.clock import utcnow
from corral.core.models import CommandStatus, NodeInfo
from corral.node import protocol as p
from corral.node.base import (
    CommandOutcome,
    CommandSpec,
    Execution,
    Node,
    NodeUnavailable,
    PortStream,
)
from corral.node.bus import Bus, NodeUnreachable, RemoteError, VersionMismatch, node_subject
from corral.node.output_log import Chunk
from corral.node.tunnels import RemotePortStream
from corral.runtime.base import Injection, SandboxConfig
from corral.runtime.images import Image, RegistryAuth

CALL_TIMEOUT = 5.0
START_TIMEOUT = 120.0  # starting a sandbox may mean making its file system
STOP_TIMEOUT = 60.0
SNAPSHOT_TIMEOUT = 600.0  # capturing a large workspace copies it
IMAGE_TIMEOUT = 1800.0  # a pull or import of a big image over a slow link
UPLOAD_CHUNK = 1 << 20  # bytes of an imported archive per message
RETRY_SECONDS = 0.5

# The stored result of a reported command, waited for across replicas (core/results.py).
ResultWaiter = Callable[[str], Awaitable[CommandOutcome]]


class RemoteNode(Node):
    remote = True

    def __init__(
        self, bus: Bus, node_id: str, info: NodeInfo, wait_result: ResultWaiter, lost_after: float
    ) -> None:
        self.id = node_id
        self.runtime_name = info.runtime
        self.info = info
        self.bus = bus
        self.subject = node_subject(node_id, "in", "rpc")
        self.wait_result = wait_result
        self.lost_after = lost_after

    async def call(
        self, op: str, args: dict[str, Any] | None = None, data: bytes = b"", *, timeout: float
    ) -> tuple[Any, bytes]:
        try:
            return await self.bus.request_data(self.subject, op, args, data, timeout=timeout)
        except VersionMismatch as exc:
            raise NodeUnavailable(f"node {self.id} speaks another protocol: {exc}") from None
        except NodeUnreachable:
            raise NodeUnavailable(f"node {self.id} is not answering") from None
        except RemoteError as exc:
            p.raise_remote(exc)
            raise  # not reached

    async def _call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        return (await self.call(op, args, timeout=timeout))[0]

    # --- sandboxes ---

    async def prepare(self) -> list[str]:
        return []

    async def start_sandbox(self, config: SandboxConfig) -> None:
        await self._call("start_sandbox", START_TIMEOUT, config=p.config_to_wire(config))

    async def stop_sandbox(self, sandbox_id: str) -> None:
        await self._call("stop_sandbox", STOP_TIMEOUT, sandbox_id=sandbox_id)

    async def remove_sandbox(self, config: SandboxConfig) -> None:
        await self._call("remove_sandbox", STOP_TIMEOUT, config=p.config_to_wire(config))

    async def set_network(
        self,
        sandbox_id: str,
        network: str,
        allow: tuple[str, ...],
        inject: tuple[Injection, ...] = (),
    ) -> None:
        await self._call(
            "set_network", sandbox_id=sandbox_id, network=network, allow=list(allow),
            inject=p.injections_to_wire(inject),
        )  # fmt: skip

    async def network_status(self, sandbox_id: str) -> dict[str, Any]:
        return dict(await self._call("network_status", sandbox_id=sandbox_id))

    async def set_env(self, sandbox_id: str, env: dict[str, str]) -> None:
        await self._call("set_env", sandbox_id=sandbox_id, env=env)

    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        await self._call("create_volume", START_TIMEOUT, volume_id=volume_id, size_mb=size_mb)

    async def remove_volume(self, volume_id: str) -> None:
        await self._call("remove_volume", STOP_TIMEOUT, volume_id=volume_id)

    async def snapshot_sandbox(self, sandbox_id: str, snapshot_id: str) -> int:
        return int(
            await self._call(
                "snapshot_sandbox", SNAPSHOT_TIMEOUT, sandbox_id=sandbox_id, snapshot_id=snapshot_id
            )
        )

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await self._call("remove_snapshot", STOP_TIMEOUT, snapshot_id=snapshot_id)

    # --- images ---

    async def pull_image(self, reference: str, auth: RegistryAuth | None = None) -> Image:
        creds = None
        if auth is not None:
            creds = {
                "username": auth.username,
                "password": auth.password,
                "identity_token": auth.identity_token,
            }
        answer = await self._call("pull_image", IMAGE_TIMEOUT, reference=reference, auth=creds)
        return p.image_from_wire(answer)

    async def import_image(self, archive: Path, reference: str | None = None) -> Image:
        # The archive crosses in pieces (a message is bounded), appended to one upload there.
        upload = secrets.token_hex(12)
        offset = 0
        with archive.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
                await self.call(
                    "image_upload", {"upload": upload, "offset": offset}, chunk,
                    timeout=CALL_TIMEOUT,
                )  # fmt: skip
                offset += len(chunk)
        answer = await self._call(
            "import_image", IMAGE_TIMEOUT, upload=upload, size=offset, reference=reference
        )
        return p.image_from_wire(answer)

    async def list_images(self) -> list[Image]:
        return [p.image_from_wire(i) for i in await self._call("list_images")]

    async def get_image(self, name: str) -> Image:
        return p.image_from_wire(await self._call("get_image", name=name))

    async def remove_image(self, name: str) -> Image:
        return p.image_from_wire(await self._call("remove_image", STOP_TIMEOUT, name=name))

    async def pause_sandbox(self, sandbox_id: str) -> None:
        await self._call("pause_sandbox", sandbox_id=sandbox_id)

    async def resume_sandbox(self, sandbox_id: str) -> None:
        await self._call("resume_sandbox", sandbox_id=sandbox_id)

    async def templates(self) -> list[str]:
        return list(self.info.templates)  # as registered: templates change with a restart

    async def enforceable(self) -> dict[str, str]:
        return dict(self.info.enforceable)

    async def open_port(self, sandbox_id: str, port: int) -> PortStream:
        answer = await self._call("port_open", sandbox_id=sandbox_id, port=port)
        return RemotePortStream(self.call, str(answer["tunnel"]), CALL_TIMEOUT)

    async def sandbox_running(self, sandbox_id: str) -> bool:
        return bool(await self._call("sandbox_running", sandbox_id=sandbox_id))

    async def running_count(self, sandbox_id: str) -> int:
        return int(await self._call("running_count", sandbox_id=sandbox_id))

    # --- commands ---

    async def run(self, spec: CommandSpec) -> Execution:
        answer, _ = await self.call(
            "run", {"spec": p.spec_to_wire(spec)}, spec.stdin or b"", timeout=CALL_TIMEOUT
        )
        return RemoteExecution(self, spec, datetime.fromisoformat(answer["started_at"]))

    async def execution(self, command_id: str) -> Execution | None:
        answer = await self._call("execution", command_id=command_id)
        if answer is None:
            return None
        spec = p.spec_from_wire(answer["spec"], b"")
        execution = RemoteExecution(self, spec, datetime.fromisoformat(answer["started_at"]))
        execution._stdin_open = bool(answer.get("stdin_open"))
        return execution

    # --- output ---

    async def follow_output(
        self, sandbox_id: str, command_id: str, offset: int = 0, *, idle: float | None = None
    ) -> AsyncIterator[Chunk | None]:
        wait = min(idle, p.FOLLOW_WAIT) if idle else p.FOLLOW_WAIT
        quiet_since = asyncio.get_running_loop().time()
        while True:
            answer, data = await self._read(
                "log_read", sandbox_id, command_id, offset=offset, wait=wait
            )
            view = memoryview(data)
            position = 0
            for start, nxt, stream, length in answer["frames"]:
                yield Chunk(start, nxt, stream, bytes(view[position : position + length]))
                position += length
                offset = nxt
            if answer["end"]:
                return
            now = asyncio.get_running_loop().time()
            if answer["frames"]:
                quiet_since = now
            elif idle is not None and now - quiet_since >= idle:
                quiet_since = now
                yield None

    async def follow_raw(
        self,
        sandbox_id: str,
        command_id: str,
        offset: int = 0,
        streams: frozenset[int] | None = None,
    ) -> AsyncIterator[tuple[bytes | memoryview, int]]:
        wanted = sorted(streams) if streams is not None else None
        while True:
            answer, data = await self._read(
                "raw_read",
                sandbox_id,
                command_id,
                offset=offset,
                streams=wanted,
                wait=p.FOLLOW_WAIT,
            )
            view = memoryview(data)
            position = 0
            for length, nxt in answer["pieces"]:
                yield view[position : position + length], nxt
                position += length
                offset = nxt
            if answer["end"]:
                return

    async def _read(
        self, op: str, sandbox_id: str, command_id: str, **args: Any
    ) -> tuple[dict[str, Any], bytes]:
        """One read of a log; a node that does not answer is asked again until the grace is
        over (a NATS restart, a node restarting), then NodeUnavailable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lost_after
        while True:
            try:
                answer, data = await self.call(
                    op,
                    {"sandbox_id": sandbox_id, "command_id": command_id, **args},
                    timeout=p.FOLLOW_WAIT + CALL_TIMEOUT,
                )
                return answer, data
            except NodeUnavailable:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(RETRY_SECONDS)

    async def check_offset(self, sandbox_id: str, command_id: str, offset: int) -> None:
        await self._call(
            "check_offset", sandbox_id=sandbox_id, command_id=command_id, offset=offset
        )

    async def output(self, sandbox_id: str, command_id: str) -> tuple[bytes, bytes]:
        args: dict[str, Any] = {"sandbox_id": sandbox_id, "command_id": command_id}
        answer, joined = await self.call("output", args, timeout=CALL_TIMEOUT)
        lengths = [int(answer["stdout"]), int(answer["stderr"])]
        total = sum(lengths)
        parts = [joined]
        received = len(joined)
        while received < total:
            page = {**args, "from": received, "lengths": lengths}
            _, more = await self.call("output", page, timeout=CALL_TIMEOUT)
            if not more:
                break
            parts.append(more)
            received += len(more)
        data = b"".join(parts)
        return data[: lengths[0]], data[lengths[0] : total]

    async def shutdown(self) -> None:
        pass  # the agent's own

    # --- commands on the node's host (CMDOP machines) ---

    async def host_run(
        self,
        command_id: str,
        command: str,
        *,
        env: dict[str, str],
        cwd: str | None,
        timeout_ms: int,
    ) -> dict[str, Any]:
        """Run `command` on the node's host and wait for it: its result, with `stdout` and
        `stderr` as bytes. A node that stops answering for the grace gives a `lost` result.
        HostExecRefused when the node takes no host commands."""
        answer = await self._call(
            "host_run",
            command_id=command_id,
            command=command,
            env=env,
            cwd=cwd,
            timeout_ms=timeout_ms,
        )
        started = answer["started_at"]
        loop = asyncio.get_running_loop()
        silent_since: float | None = None
        while True:
            try:
                result, data = await self.call(
                    "host_outcome",
                    {"command_id": command_id, "wait": p.FOLLOW_WAIT},
                    timeout=p.FOLLOW_WAIT + CALL_TIMEOUT,
                )
                silent_since = None
            except (NodeUnavailable, p.UnknownCommand) as exc:
                now = loop.time()
                silent_since = silent_since if silent_since is not None else now
                if isinstance(exc, p.UnknownCommand) or now - silent_since > self.lost_after:
                    return {
                        "status": "lost",
                        "exit_code": None,
                        "signal": None,
                        "started_at": started,
                        "finished_at": utcnow().isoformat(),
                        "stdout": b"",
                        "stderr": b"",
                        "error": f"node {self.id} stopped answering; the result is unknown",
                    }
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if result is not None:
                split = int(result.pop("stdout"))
                return {**result, "stdout": data[:split], "stderr": data[split:]}


class RemoteExecution(Execution):
    def __init__(self, node: RemoteNode, spec: CommandSpec, started_at: datetime) -> None:
        self.node = node
        self.spec = spec
        self.started_at = started_at
        self._stdin_open = spec.interactive
        self._result: asyncio.Future[CommandOutcome] | None = None

    async def _on(self, op: str, data: bytes = b"", **args: Any) -> Any:
        try:
            answer, payload = await self.node.call(
                op, {"command_id": self.spec.id, **args}, data, timeout=CALL_TIMEOUT
            )
        except p.UnknownCommand:
            raise BrokenPipeError("the command has ended") from None
        return answer, payload

    def _outcome_future(self) -> asyncio.Future[CommandOutcome]:
        if self._result is None:
            waiter = self.node.wait_result if self.spec.report else self._ask_outcome
            self._result = asyncio.ensure_future(waiter(self.spec.id))
        return self._result

    async def outcome(self) -> CommandOutcome:
        return await asyncio.shield(self._outcome_future())

    async def _ask_outcome(self, command_id: str) -> CommandOutcome:
        """A helper's outcome (it is not in the store): asked of the node until it has one."""
        loop = asyncio.get_running_loop()
        silent_since: float | None = None
        while True:
            try:
                answer, _ = await self._on("outcome", wait=p.FOLLOW_WAIT)
                silent_since = None
            except BrokenPipeError:
                return _lost(self.started_at, "the node no longer knows the command")
            except NodeUnavailable:
                now = loop.time()
                silent_since = silent_since if silent_since is not None else now
                if now - silent_since > self.node.lost_after:
                    return _lost(self.started_at, f"node {self.node.id} stopped answering")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if answer is not None:
                return p.outcome_from_wire(answer)

    @property
    def finished(self) -> bool:
        return self._result is not None and self._result.done()

    @property
    def stdin_open(self) -> bool:
        return self._stdin_open and not self.finished

    async def cancel(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            await self._on("cancel")

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), p.READ_BYTES):
            try:
                piece = bytes(view[start : start + p.READ_BYTES])
                answer, _ = await self._on("write_stdin", piece, wait=p.FOLLOW_WAIT)
                while (answer or {}).get("pending"):  # the command is not reading: ask again
                    answer, _ = await self._on("write_stdin", wait=p.FOLLOW_WAIT)
            except BrokenPipeError:
                self._stdin_open = False
                raise

    async def close_stdin(self) -> None:
        self._stdin_open = False
        with contextlib.suppress(BrokenPipeError):
            await self._on("close_stdin")

    async def signal(self, signum: int) -> None:
        with contextlib.suppress(BrokenPipeError):
            await self._on("signal", signum=signum)

    async def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(BrokenPipeError):
            await self._on("resize", rows=rows, cols=cols)

    async def read_stdout(self, n: int = 1 << 20) -> bytes:
        # Asked again while the command is silent: each call answers within FOLLOW_WAIT, so
        # only a node that does not answer at all ends the read (NodeUnavailable).
        while True:
            try:
                answer, data = await self._on(
                    "read_stdout", n=min(n, p.READ_BYTES), wait=p.FOLLOW_WAIT
                )
            except BrokenPipeError:
                return b""
            if data or not (answer or {}).get("pending"):
                return bytes(data)

    async def close_stdout(self) -> None:
        with contextlib.suppress(BrokenPipeError, NodeUnavailable):
            await self._on("close_stdout")


def _lost(started_at: datetime, why: str) -> CommandOutcome:
    return CommandOutcome(
        status=CommandStatus.lost,
        exit_code=None,
        signal=None,
        stdout_bytes=0,
        stderr_bytes=0,
        stdout_truncated=False,
        stderr_truncated=False,
        started_at=started_at,
        finished_at=utcnow(),
        error=why,
    )
