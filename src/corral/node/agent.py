"""A node on any host: the built-in node's sandboxes, served to the API replicas over NATS.

The agent dials out to NATS only (no inbound port). It registers through the replicas (which
keep the store; the agent never touches it), beats its heartbeat, answers every node call on
`corral.node.<id>.in.rpc`, and reports results and deaths as events that a replica must
acknowledge: an event stays in the outbox, retried, until one has applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from corral.core.models import NodeInfo
from corral.node import protocol as p
from corral.node.base import Execution
from corral.node.bus import Bus, BusError, RemoteError, Reply, node_subject
from corral.node.host_exec import HostExec
from corral.node.local import RAW_STDOUT_ORPHAN, LocalNode, public_reason
from corral.node.output_log import Chunk
from corral.node.tunnels import Tunnels
from corral.runtime.images import ImageTooLargeError, RegistryAuth

log = logging.getLogger(__name__)

KEEP_ENDED_SECONDS = 5.0  # an ended execution stays known a moment, for late calls (outcome)
RETRY_MIN, RETRY_MAX = 0.2, 5.0
MAX_FRAMES = 4096  # per read: keeps the JSON part of an answer small
EVENT_TIMEOUT = 5.0
EVENTS_IN_FLIGHT = 64  # events sent at once (a burst after an outage is spread out)
EVENT_GIVE_UP = 600.0  # seconds an event whose command has no row is kept trying
OUTPUT_PAGE = 768 * 1024

UPLOAD_IDLE = 600.0  # seconds after which an image upload nobody finished is dropped

T = TypeVar("T")
Op = Callable[[dict[str, Any], bytes], Awaitable[Any]]


class NodeAgent:
    def __init__(
        self,
        node: LocalNode,
        bus: Bus,
        info: Callable[[], NodeInfo],
        *,
        sandboxes_dir: Any,
        host_exec: HostExec | None = None,
    ) -> None:
        self.node = node
        self.host_exec = host_exec
        self.bus = bus
        self.info = info
        self.sandboxes_dir = sandboxes_dir
        self.epoch = 0
        self.lost_after = 15.0
        self._executions: dict[str, Execution] = {}
        self._epochs: dict[str, int] = {}  # command id -> the epoch it started in
        self._writes: dict[str, asyncio.Future[None]] = {}  # command id -> its pending write
        self._outbox: dict[str, dict[str, Any]] = {}
        self._outbox_changed = asyncio.Event()  # set on reconnect: retry what waits
        self._sending = asyncio.Semaphore(EVENTS_IN_FLIGHT)
        self._registered = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._event_seq = 0
        self._uploads: dict[str, float] = {}  # image archive uploads -> when last written
        self.tunnels = Tunnels(node.open_port)  # connections to sandbox ports
        self._ops: dict[str, Op] = {
            name.removeprefix("op_"): getattr(self, name)
            for name in dir(self)
            if name.startswith("op_")
        }
        node.on_sandbox_died = self._died

    # --- life ---

    async def start(self) -> None:
        # Back from a NATS outage: a heartbeat at once, and the events kept meanwhile.
        self.bus.reconnect_listeners.append(self._beat_now.set)
        self.bus.reconnect_listeners.append(self._outbox_changed.set)
        await self.bus.serve(node_subject(self.node.id, "in", "rpc"), self._handle)
        await self.bus.nc.flush()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_registered()),
            loop.create_task(self._sweep_tunnels()),
        ]
        await self._registered.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.tunnels.close_all()
        # Results of what ends while the node stops: one last try to report them.
        if self._outbox:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_outbox(), EVENT_TIMEOUT)

    async def _event(self, kind: str, args: dict[str, Any], timeout: float = EVENT_TIMEOUT) -> Any:
        subject = node_subject(self.node.id, "out", "event")
        return await self.bus.request(subject, kind, args, timeout=timeout)

    async def _register(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                answer = await self._event(
                    p.EVENT_REGISTER, {"info": self.info().model_dump(mode="json")}
                )
                break
            except (BusError, RemoteError) as exc:
                log.warning("registering node %s: %s; trying again", self.node.id, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
        old, self.epoch = self.epoch, int(answer["epoch"])
        self.lost_after = float(answer.get("lost_after", self.lost_after))
        log.info("node %s registered (epoch %d)", self.node.id, self.epoch)
        if old:
            # The fleet declared this node lost (a partition, a long pause): what ran under the
            # old epoch is already `lost` there, so it is stopped here too.
            for cid, epoch in list(self._epochs.items()):
                execution = self._executions.get(cid)
                if epoch < self.epoch and execution is not None and not execution.finished:
                    log.warning("command %s was declared lost: cancelling it", cid)
                    await execution.cancel()
        self._registered.set()

    async def _sweep_tunnels(self) -> None:
        """Close the port tunnels of replicas that went away (nobody asks about them)."""
        while True:
            await asyncio.sleep(p.TUNNEL_IDLE / 3)
            try:
                await self.tunnels.sweep()
            except Exception:
                log.exception("closing idle port tunnels failed")

    async def _keep_registered(self) -> None:
        await self._register()
        while True:
            interval = self.lost_after / 3
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval)
            self._beat_now.clear()
            try:
                # No longer than the interval: one stalled beat must not hold up the next.
                answer = await self._event(
                    p.EVENT_HEARTBEAT,
                    {"epoch": self.epoch, "load": self.node.load()},
                    timeout=interval,
                )
            except (BusError, RemoteError) as exc:
                log.warning("heartbeat of node %s: %s", self.node.id, exc)
                continue
            if not answer.get("ok"):
                log.warning("node %s: heartbeat refused; registering again", self.node.id)
                await self._register()

    # --- events ---

    def _post(self, kind: str, args: dict[str, Any]) -> None:
        """Send an event, each on its own: one slow answer never holds up the others."""
        self._event_seq += 1
        key = f"{kind}-{self._event_seq}"
        event = {"kind": kind, "args": args, "posted": asyncio.get_running_loop().time()}
        self._outbox[key] = event
        self._spawn(self._send(key, event))

    async def _died(self, sandbox_id: str, failure: str | None) -> None:
        self._post(
            p.EVENT_DIED, {"epoch": self.epoch, "sandbox_id": sandbox_id, "failure": failure}
        )

    async def _deliver(self, key: str, event: dict[str, Any]) -> bool:
        """One try; whether the event is done with (applied, refused for good, or dropped)."""
        try:
            async with self._sending:
                answer = await self._event(event["kind"], event["args"])
        except (BusError, RemoteError) as exc:
            log.info("event %s not delivered yet: %s", key, exc)
            return False
        if answer.get("retry"):
            # The command's row never came (its replica died before writing it): after long
            # enough nobody can be waiting for the result.
            if asyncio.get_running_loop().time() - event["posted"] <= EVENT_GIVE_UP:
                return False
            log.warning("event %s: no replica knows its command; dropped", key)
        self._outbox.pop(key, None)
        return True

    async def _send(self, key: str, event: dict[str, Any]) -> None:
        delay = RETRY_MIN
        while key in self._outbox and not await self._deliver(key, event):
            # Not taken yet: again after a while (at once when NATS comes back).
            self._outbox_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_changed.wait(), delay)
            delay = min(RETRY_MAX, delay * 2)

    async def _flush_outbox(self) -> None:
        pending = list(self._outbox.items())
        if pending:
            await asyncio.gather(*(self._deliver(k, e) for k, e in pending))

    def _ended(self, execution: Execution, epoch: int) -> None:
        async def report() -> None:
            outcome = await execution.outcome()
            spec = execution.spec
            if spec.report:
                event = {
                    "epoch": epoch,
                    "command_id": spec.id,
                    "sandbox_id": spec.sandbox_id,
                    "outcome": p.outcome_to_wire(outcome),
                }
                if outcome.stdout_bytes + outcome.stderr_bytes <= p.INLINE_OUTPUT_BYTES:
                    # Small output comes along: the replica's reply needs no `output` call.
                    with contextlib.suppress(Exception):
                        output = p.output_to_wire(await self.node.output(spec.sandbox_id, spec.id))
                        if output is not None:
                            event["output"] = output
                self._post(p.EVENT_ENDED, event)
            keep = RAW_STDOUT_ORPHAN if spec.raw_stdout else KEEP_ENDED_SECONDS
            asyncio.get_running_loop().call_later(keep, self._forget, spec.id)

        self._spawn(report())

    def _forget(self, cid: str) -> None:
        self._executions.pop(cid, None)
        self._epochs.pop(cid, None)
        self._writes.pop(cid, None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- requests ---

    async def _handle(self, op: str, args: dict[str, Any], data: bytes) -> Any:
        method = self._ops.get(op)
        if method is None:
            raise ValueError(f"unknown node call {op!r}")
        try:
            return await method(args, data)
        except RemoteError:
            raise
        except Exception as exc:
            name = p.error_name(exc)
            if name is None:
                if isinstance(exc, (KeyError, TypeError, ValueError)):
                    raise ValueError(f"bad arguments for {op}: {exc!r}") from None
                raise
            raise RemoteError(name, public_reason(exc)) from None

    def _execution(self, args: dict[str, Any]) -> Execution:
        execution = self._executions.get(str(args["command_id"]))
        if execution is None:
            raise RemoteError("unknown_command", f"no command {args['command_id']!r} on this node")
        return execution

    def _config(self, args: dict[str, Any]) -> Any:
        return p.config_from_wire(args["config"], self.sandboxes_dir)

    async def op_ping(self, args: dict[str, Any], data: bytes) -> Any:
        return {"node": self.node.id, "epoch": self.epoch}

    async def op_start_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.start_sandbox(self._config(args))

    async def op_stop_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.stop_sandbox(str(args["sandbox_id"]))

    async def op_remove_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.remove_sandbox(self._config(args))

    async def op_set_network(self, args: dict[str, Any], data: bytes) -> Any:
        allow = tuple(str(a) for a in args["allow"])
        inject = p.injections_from_wire(args.get("inject"))
        await self.node.set_network(str(args["sandbox_id"]), str(args["network"]), allow, inject)

    async def op_network_status(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.node.network_status(str(args["sandbox_id"]))

    async def op_set_env(self, args: dict[str, Any], data: bytes) -> Any:
        env = {str(k): str(v) for k, v in args["env"].items()}
        await self.node.set_env(str(args["sandbox_id"]), env)

    async def op_create_volume(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.create_volume(str(args["volume_id"]), int(args["size_mb"]))

    async def op_remove_volume(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.remove_volume(str(args["volume_id"]))

    async def op_snapshot_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        snapshot_id = p.snapshot_id(args["snapshot_id"])
        return await self.node.snapshot_sandbox(str(args["sandbox_id"]), snapshot_id)

    async def op_remove_snapshot(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.remove_snapshot(p.snapshot_id(args["snapshot_id"]))

    # --- images ---

    async def op_pull_image(self, args: dict[str, Any], data: bytes) -> Any:
        creds = args.get("auth")
        auth = None
        if isinstance(creds, dict):
            auth = RegistryAuth(
                username=_opt_str(creds.get("username")),
                password=_opt_str(creds.get("password")),
                identity_token=_opt_str(creds.get("identity_token")),
            )
        return (await self.node.pull_image(str(args["reference"]), auth)).to_json()

    def _upload_path(self, upload: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{24}", upload):
            raise ValueError(f"not an upload id: {upload[:40]!r}")
        tmp = self.node.images.store_dir / "tmp"  # emptied at the node's start
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tmp / f"upload-{upload}.tar"

    def _drop_stale_uploads(self) -> None:
        now = asyncio.get_running_loop().time()
        for upload, touched in list(self._uploads.items()):
            if now - touched > UPLOAD_IDLE:
                self._uploads.pop(upload, None)
                self._upload_path(upload).unlink(missing_ok=True)

    async def op_image_upload(self, args: dict[str, Any], data: bytes) -> Any:
        upload, offset = str(args["upload"]), int(args["offset"])
        path = self._upload_path(upload)
        limit = self.node.images.max_image_bytes
        if offset == 0:
            self._drop_stale_uploads()
            mode = "xb"
        elif upload not in self._uploads or path.stat().st_size != offset:
            raise ValueError(f"upload {upload}: a piece out of order (at {offset})")
        else:
            mode = "ab"
        if limit is not None and offset + len(data) > limit:
            self._uploads.pop(upload, None)
            path.unlink(missing_ok=True)
            raise ImageTooLargeError(f"the archive is over the limit of {limit} bytes")
        self._uploads[upload] = asyncio.get_running_loop().time()

        def append() -> None:
            with path.open(mode) as f:
                f.write(data)

        try:
            await asyncio.to_thread(append)
        except OSError:
            self._uploads.pop(upload, None)
            path.unlink(missing_ok=True)
            raise

    async def op_import_image(self, args: dict[str, Any], data: bytes) -> Any:
        upload = str(args["upload"])
        path = self._upload_path(upload)
        try:
            if upload not in self._uploads or path.stat().st_size != int(args["size"]):
                raise ValueError(f"upload {upload} is incomplete")
            reference = _opt_str(args.get("reference"))
            return (await self.node.import_image(path, reference)).to_json()
        finally:
            self._uploads.pop(upload, None)
            path.unlink(missing_ok=True)

    async def op_list_images(self, args: dict[str, Any], data: bytes) -> Any:
        return [i.to_json() for i in await self.node.list_images()]

    async def op_get_image(self, args: dict[str, Any], data: bytes) -> Any:
        return (await self.node.get_image(str(args["name"]))).to_json()

    async def op_remove_image(self, args: dict[str, Any], data: bytes) -> Any:
        return (await self.node.remove_image(str(args["name"]))).to_json()

    async def op_pause_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.pause_sandbox(str(args["sandbox_id"]))

    async def op_resume_sandbox(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.resume_sandbox(str(args["sandbox_id"]))

    async def op_templates(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.node.templates()

    async def op_enforceable(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.node.enforceable()

    async def op_sandbox_running(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.node.sandbox_running(str(args["sandbox_id"]))

    async def op_running_count(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.node.running_count(str(args["sandbox_id"]))

    async def op_run(self, args: dict[str, Any], data: bytes) -> Any:
        spec = p.spec_from_wire(args["spec"], data)
        if spec.id in self._executions:
            raise ValueError(f"command {spec.id} runs here already")
        execution = await self.node.run(spec)
        self._executions[spec.id] = execution
        self._epochs[spec.id] = self.epoch
        self._ended(execution, self.epoch)
        return {"started_at": execution.started_at.isoformat(), "epoch": self.epoch}

    async def op_execution(self, args: dict[str, Any], data: bytes) -> Any:
        execution = self._executions.get(str(args["command_id"]))
        if execution is None or execution.finished:
            return None
        return {
            "spec": p.spec_to_wire(execution.spec),
            "started_at": execution.started_at.isoformat(),
            "stdin_open": execution.stdin_open,
        }

    async def op_outcome(self, args: dict[str, Any], data: bytes) -> Any:
        execution = self._execution(args)
        wait = min(float(args.get("wait", p.FOLLOW_WAIT)), 10.0)
        with contextlib.suppress(TimeoutError):
            outcome = await asyncio.wait_for(execution.outcome(), wait)
            return p.outcome_to_wire(outcome)
        return None

    async def op_cancel(self, args: dict[str, Any], data: bytes) -> Any:
        await self._execution(args).cancel()

    async def op_write_stdin(self, args: dict[str, Any], data: bytes) -> Any:
        """With `wait`: `pending` once that many seconds passed and the command has not taken
        the data yet (it stopped reading: paused, a slow disk); the write goes on, and the
        caller asks again with no data until it is done, so that waiting for a command that
        does not read never looks like a node that does not answer."""
        execution = self._execution(args)
        if args.get("wait") is None:
            await execution.write_stdin(data)
            return None
        cid = execution.spec.id
        write = self._writes.get(cid)
        if data:
            # After any write still pending (another replica's), so that input keeps its order.
            write = asyncio.ensure_future(_write_after(write, execution, data))
            write.add_done_callback(_retrieved)
            self._writes[cid] = write
        elif write is None:
            return None  # the pending write ended in the meantime
        try:
            await asyncio.wait_for(asyncio.shield(write), min(float(args["wait"]), 10.0))
        except TimeoutError:
            return {"pending": True}
        finally:
            if write.done() and self._writes.get(cid) is write:
                del self._writes[cid]
        return None

    async def op_close_stdin(self, args: dict[str, Any], data: bytes) -> Any:
        await self._execution(args).close_stdin()

    async def op_signal(self, args: dict[str, Any], data: bytes) -> Any:
        await self._execution(args).signal(int(args["signum"]))

    async def op_resize(self, args: dict[str, Any], data: bytes) -> Any:
        await self._execution(args).resize(int(args["rows"]), int(args["cols"]))

    async def op_read_stdout(self, args: dict[str, Any], data: bytes) -> Any:
        """Up to `n` bytes; with `wait`, `pending` and no data once that many seconds passed in
        silence: a command may say nothing for longer than a call's timeout (gzip of a long run
        of zeros), which must not look like a node that does not answer."""
        n = max(1, min(int(args.get("n", p.READ_BYTES)), p.READ_BYTES))
        read = self._execution(args).read_stdout(n)
        if args.get("wait") is None:
            chunk = await read
        else:
            try:
                # Cancelling a pending read takes nothing from the stream.
                chunk = await asyncio.wait_for(read, min(float(args["wait"]), 10.0))
            except TimeoutError:
                return Reply({"eof": False, "pending": True})
        return Reply({"eof": not chunk}, chunk)

    async def op_close_stdout(self, args: dict[str, Any], data: bytes) -> Any:
        execution = self._executions.get(str(args["command_id"]))
        if execution is not None:
            await execution.close_stdout()
            if execution.finished:
                self._forget(execution.spec.id)

    # --- port tunnels (node/tunnels.py) ---

    async def op_port_open(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.tunnels.open(args)

    async def op_port_read(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.tunnels.read(args)

    async def op_port_write(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.tunnels.write(args, data)

    async def op_port_write_eof(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.tunnels.write_eof(args)

    async def op_port_close(self, args: dict[str, Any], data: bytes) -> Any:
        return await self.tunnels.close(args)

    async def op_check_offset(self, args: dict[str, Any], data: bytes) -> Any:
        await self.node.check_offset(
            str(args["sandbox_id"]), str(args["command_id"]), int(args["offset"])
        )

    async def op_output(self, args: dict[str, Any], data: bytes) -> Any:
        """A command's kept stdout and stderr, one page of OUTPUT_PAGE bytes of the two joined
        from `from` (an answer must stay under NATS's message size). Later pages name the
        lengths the first one gave, so a command still printing cannot shift them."""
        stdout, stderr = await self.node.output(str(args["sandbox_id"]), str(args["command_id"]))
        if args.get("lengths"):
            out_len, err_len = (int(n) for n in args["lengths"])
            stdout, stderr = stdout[:out_len], stderr[:err_len]
        start = max(0, int(args.get("from", 0)))
        joined = stdout + stderr
        return Reply(
            {"stdout": len(stdout), "stderr": len(stderr)}, joined[start : start + OUTPUT_PAGE]
        )

    async def op_host_run(self, args: dict[str, Any], data: bytes) -> Any:
        if self.host_exec is None:
            raise RemoteError(
                "host_exec_refused",
                f"node {self.node.id} runs no host commands (its agent has no --host-exec)",
            )
        record = await self.host_exec.start(
            str(args["command_id"]),
            str(args["command"]),
            env={str(k): str(v) for k, v in (args.get("env") or {}).items()},
            cwd=args.get("cwd"),
            timeout_ms=int(args["timeout_ms"]),
        )
        return {"started_at": record.started_at.isoformat()}

    async def op_host_outcome(self, args: dict[str, Any], data: bytes) -> Any:
        record = self.host_exec.commands.get(str(args["command_id"])) if self.host_exec else None
        if record is None:
            raise RemoteError("unknown_command", f"no host command {args['command_id']!r}")
        wait = min(float(args.get("wait", p.FOLLOW_WAIT)), 10.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(record.done.wait(), wait)
        if not record.done.is_set():
            return None
        result = {
            "status": record.status,
            "exit_code": record.exit_code,
            "signal": record.signal,
            "started_at": record.started_at.isoformat(),
            "finished_at": record.finished_at.isoformat() if record.finished_at else None,
            "stdout": len(record.stdout),
            "stdout_truncated": record.stdout_truncated,
            "stderr_truncated": record.stderr_truncated,
        }
        return Reply(result, bytes(record.stdout) + bytes(record.stderr))

    async def op_log_read(self, args: dict[str, Any], data: bytes) -> Any:
        """Frames of a log from `offset`: what is there now, or waiting up to `wait` seconds
        for the first; `end` once the command has ended and nothing is left."""
        source = self.node.follow_output(
            str(args["sandbox_id"]), str(args["command_id"]), int(args["offset"])
        )
        frames: list[list[int]] = []
        parts: list[bytes] = []
        end = await _collect(source, float(args.get("wait", 0)), frames, parts, _frame_of)
        return Reply({"frames": frames, "end": end}, b"".join(parts))

    async def op_raw_read(self, args: dict[str, Any], data: bytes) -> Any:
        streams = args.get("streams")
        source = self.node.follow_raw(
            str(args["sandbox_id"]),
            str(args["command_id"]),
            int(args["offset"]),
            frozenset(int(s) for s in streams) if streams is not None else None,
        )
        pieces: list[list[int]] = []
        parts: list[bytes] = []
        end = await _collect(source, float(args.get("wait", 0)), pieces, parts, _piece_of)
        return Reply({"pieces": pieces, "end": end}, b"".join(parts))


async def _write_after(
    previous: asyncio.Future[None] | None, execution: Execution, data: bytes
) -> None:
    if previous is not None:
        with contextlib.suppress(Exception):
            await previous  # its error went to its own caller
    await execution.write_stdin(data)


def _retrieved(write: asyncio.Future[None]) -> None:
    """A pending write whose caller went away: its error (the command ended) is nobody's."""
    if not write.cancelled():
        write.exception()


def _frame_of(chunk: Chunk) -> tuple[list[int], bytes]:
    return [chunk.offset, chunk.next_offset, chunk.stream, len(chunk.data)], chunk.data


def _piece_of(piece: tuple[bytes | memoryview, int]) -> tuple[list[int], bytes]:
    data, nxt = piece
    return [len(data), nxt], bytes(data)


async def _collect(
    source: AsyncIterator[Any],
    wait: float,
    index: list[list[int]],
    parts: list[bytes],
    split: Callable[[Any], tuple[list[int], bytes]],
) -> bool:
    """Take items from `source` while they come at once (the first may take up to `wait`),
    up to READ_BYTES; whether the source ended."""
    size = 0
    try:
        while size < p.READ_BYTES and len(index) < MAX_FRAMES:
            timeout = max(0.0, wait) if not index else 0.0
            try:
                if timeout:
                    item = await asyncio.wait_for(anext(source), timeout)
                else:
                    item = await _now(source)
            except StopAsyncIteration:
                return True
            except TimeoutError:
                return False
            if item is _PENDING:
                return False
            meta, data = split(item)
            index.append(meta)
            parts.append(data)
            size += len(data)
        return False
    finally:
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]


_PENDING = object()


async def _now(source: AsyncIterator[Any]) -> Any:
    """The next item if the source has it without waiting, else _PENDING."""
    step = asyncio.ensure_future(anext(source))
    # One pass of the loop lets an item that is ready (in memory, or a file read) arrive.
    for _ in range(3):
        if step.done():
            break
        await asyncio.sleep(0)
    if step.done():
        return step.result()
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await step
    return _PENDING


async def serve_node(settings: Any, stop: asyncio.Event) -> None:
    """What `corral agent` runs: the built-in node of this host, served over NATS until `stop`."""
    from corral.core.nodes import host_capacity
    from corral.node.bus import node_inbox_prefix, tls_context
    from corral.services import lock_host, start_local_node

    if not settings.nats_url:
        raise SystemExit("corral agent: --nats-url (or CORRAL_NATS_URL) is required")
    host_lock = await asyncio.to_thread(lock_host, settings)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        node, deno = await start_local_node(settings, host_lock)
        capacity = host_capacity(min(settings.max_sandboxes, settings.uid_count))
        # A stop must end the start-up as well: NATS may not answer, nor any replica.
        bus = await _unless_stopped(
            stop,
            Bus.connect(
                settings.nats_url,
                name=f"corral-node-{node.id}",
                creds=settings.nats_creds,
                inbox_prefix=node_inbox_prefix(node.id),
                tls=tls_context(
                    settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
                ),
            ),
        )
        if bus is None:
            await node.shutdown()
            return

        def info() -> NodeInfo:
            described = node.info(capacity)
            described.host_exec = settings.host_exec_user is not None
            described.deno = deno  # replicas check it before a TypeScript or JavaScript run
            return described

        host_exec = HostExec(settings.host_exec_user) if settings.host_exec_user else None
        agent = NodeAgent(
            node, bus, info, sandboxes_dir=settings.data_dir / "sandboxes", host_exec=host_exec
        )
        try:
            if await _unless_stopped(stop, _started(agent)):
                log.info("node %s serving over NATS", node.id)
                await stop.wait()
        finally:
            # Sandboxes stop with the agent (their files stay; the fleet brings them back when
            # it registers again); what still runs ends as lost.
            await node.shutdown()
            await agent.close()
            await bus.close()
    finally:
        if host_lock is not None:
            host_lock.release()


async def _started(agent: NodeAgent) -> bool:
    await agent.start()
    return True


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """What `work` gives, or None if `stop` is set first (the work is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=EVENT_TIMEOUT)  # a NATS connect may not give up at once
    return None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
