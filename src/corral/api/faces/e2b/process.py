"""`process.Process` of the E2B daemon over Corral's commands.

A process is a Corral command of the sandbox; its pid is the command's number in the sandbox
(1 for its first command, whichever face started it), so pids are small, stable and the same
on every replica. `Start` runs `cmd` with `args` (the SDK sends `/bin/bash -l -c <command>`),
`stdin: true` keeps its standard input open for `SendInput`/`StreamInput`/`CloseStdin`, and a
`pty` runs it on a terminal. Its stream is the start event with the pid, the output as it comes
(keepalives while there is none, at the SDK's `Keepalive-Ping-Interval`), and the end event.

Where Corral differs from envd:
- A command runs to its end or its sandbox's, within the server's longest command timeout
  (`CORRAL_MAX_TIMEOUT_MS`, 24 h by default) rather than Corral's default 5 minutes.
- A stream that ends early (the client's own timeout, a disconnect) leaves the command
  running: `Connect` re-attaches, and replays the output from its start, not only what comes
  after.
- A command whose result is unknown (the server stopped while it ran) ends its stream with
  `unavailable` instead of an exit code; one that could not start with `invalid_argument`.
- Processes have no tags: a tag selector finds nothing.
"""

from __future__ import annotations

import contextlib
import signal as signals
from collections.abc import AsyncIterator

from corral.api.faces.e2b.connect import Codec, ConnectError
from corral.api.faces.e2b.envd import Envd, rpc
from corral.api.faces.e2b.pb import process_pb2 as pb
from corral.core.commands import SHELL
from corral.core.errors import NotFound
from corral.core.models import CommandStatus, ExecRequest
from corral.node.base import Execution
from corral.node.output_log import STDERR
from corral.store.tables import CommandRow

SERVICE = "process.Process"
LIST_LIMIT = 1000
# What Go's os.ProcessState says of a command killed by a signal, as envd reports it.
SIGNAL_WORDS = {
    signals.SIGKILL: "killed",
    signals.SIGTERM: "terminated",
    signals.SIGINT: "interrupt",
    signals.SIGHUP: "hangup",
    signals.SIGQUIT: "quit",
    signals.SIGPIPE: "broken pipe",
}


async def _command(ctx: Envd, selector: pb.ProcessSelector) -> CommandRow:
    kind = selector.WhichOneof("selector")
    if kind == "tag":
        raise ConnectError("not_found", f"no process with tag {selector.tag!r}")
    if kind != "pid":
        raise ConnectError("invalid_argument", "select the process by pid")
    try:
        return await ctx.services.commands.by_ordinal(ctx.sandbox.id, selector.pid)
    except NotFound:
        raise ConnectError("not_found", f"process with pid {selector.pid} not found") from None


async def _running(ctx: Envd, selector: pb.ProcessSelector) -> Execution:
    row = await _command(ctx, selector)
    execution = await ctx.services.commands.execution(row)
    if execution is None or execution.finished:
        raise ConnectError("not_found", f"process with pid {selector.pid} is not running")
    return execution


def _config(row: CommandRow) -> pb.ProcessConfig:
    if row.args is None:  # a shell string (another face's)
        config = pb.ProcessConfig(cmd=SHELL, args=["-c", row.command], cwd=row.cwd)
    else:
        config = pb.ProcessConfig(cmd=row.command, args=row.args, cwd=row.cwd)
    return config


def _end(row: CommandRow) -> pb.ProcessEvent.EndEvent:
    status = CommandStatus(row.status)
    if status is CommandStatus.lost:
        raise ConnectError("unavailable", row.error or "the command's result is unknown")
    if status is CommandStatus.failed:
        raise ConnectError("invalid_argument", row.error or "the command could not start")
    end = pb.ProcessEvent.EndEvent()
    signum = row.signal
    if signum is None and status is CommandStatus.timed_out:
        signum = int(signals.SIGKILL)
    if signum is not None:  # (Corral's exit code is then 128+N, a shell's; envd says -1)
        end.exit_code = -1
        end.exited = False
        try:
            word = SIGNAL_WORDS.get(signals.Signals(signum), signals.Signals(signum).name)
        except ValueError:
            word = str(signum)
        end.status = f"signal: {word}"
    elif row.exit_code is not None:
        end.exit_code = row.exit_code
        end.exited = True
        end.status = f"exit status {row.exit_code}"
    else:
        end.exit_code = -1
        end.status = status.value
    if row.error:
        end.error = row.error
    return end


async def _events(
    ctx: Envd, row: CommandRow, pid: int, tty: bool
) -> AsyncIterator[pb.ProcessEvent]:
    services, sandbox_id = ctx.services, ctx.sandbox.id
    yield pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=pid))
    # All of the output, from its start (a finished command's too), then live.
    source = services.commands.follow_output(sandbox_id, row.id, idle=ctx.keepalive())
    async with contextlib.aclosing(source):  # type: ignore[type-var]
        async for chunk in source:
            if chunk is None:
                yield pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())
            elif tty:
                yield pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(pty=chunk.data))
            elif chunk.stream == STDERR:
                yield pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(stderr=chunk.data))
            else:
                yield pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(stdout=chunk.data))
    final = await services.commands.final_row(sandbox_id, row.id)
    yield pb.ProcessEvent(end=_end(final))


@rpc(SERVICE, "Start", "server_stream", pb.StartRequest)
async def start(ctx: Envd, message: pb.StartRequest) -> AsyncIterator[pb.StartResponse]:
    config = message.process
    if not config.cmd:
        raise ConnectError("invalid_argument", "process.cmd is required")
    tty = message.HasField("pty")
    size = message.pty.size
    req = ExecRequest(
        command=config.cmd,
        args=list(config.args),
        cwd=ctx.path(config.cwd) if config.HasField("cwd") and config.cwd else None,
        env=dict(config.envs),
        user=ctx.exec_user,
        # The SDK's `timeout` bounds its stream only; the command runs to its end or its
        # sandbox's (at most the server's longest command timeout), as a process in a VM does.
        timeout_ms=ctx.services.commands.settings.max_timeout_ms,
    )
    row, _ = await ctx.services.commands.start(
        ctx.sandbox,
        req,
        source="e2b",
        interactive=message.stdin or tty,
        tty=tty,
        rows=size.rows or 24,
        cols=size.cols or 80,
    )
    if row.status == CommandStatus.failed.value:
        raise ConnectError("invalid_argument", row.error or "the command could not start")
    pid = await ctx.services.commands.ordinal(ctx.sandbox.id, row.id)
    async for event in _events(ctx, row, pid, tty):
        yield pb.StartResponse(event=event)


@rpc(SERVICE, "Connect", "server_stream", pb.ConnectRequest)
async def connect(ctx: Envd, message: pb.ConnectRequest) -> AsyncIterator[pb.ConnectResponse]:
    row = await _command(ctx, message.process)
    execution = await ctx.services.commands.execution(row)
    tty = execution is not None and execution.spec.tty
    async for event in _events(ctx, row, message.process.pid, tty):
        yield pb.ConnectResponse(event=event)


@rpc(SERVICE, "List", "unary", pb.ListRequest)
async def list_processes(ctx: Envd, message: pb.ListRequest) -> pb.ListResponse:
    page = await ctx.services.commands.list(
        ctx.sandbox.id, status=CommandStatus.running, limit=LIST_LIMIT
    )
    out = pb.ListResponse()
    for command in page.items:
        row = await ctx.services.commands.row(ctx.sandbox.id, command.id)
        pid = await ctx.services.commands.ordinal(ctx.sandbox.id, command.id)
        out.processes.append(pb.ProcessInfo(config=_config(row), pid=pid))
    return out


def _input(data: pb.ProcessInput) -> bytes:
    kind = data.WhichOneof("input")
    return data.stdin if kind == "stdin" else data.pty if kind == "pty" else b""


async def _write(ctx: Envd, selector: pb.ProcessSelector, data: bytes) -> None:
    execution = await _running(ctx, selector)
    if not execution.stdin_open:
        raise ConnectError(
            "failed_precondition",
            f"process with pid {selector.pid} has no open stdin (start it with stdin=True)",
        )
    try:
        await execution.write_stdin(data)
    except (BrokenPipeError, ValueError):
        raise ConnectError("failed_precondition", "the process no longer reads stdin") from None


@rpc(SERVICE, "SendInput", "unary", pb.SendInputRequest)
async def send_input(ctx: Envd, message: pb.SendInputRequest) -> pb.SendInputResponse:
    await _write(ctx, message.process, _input(message.input))
    return pb.SendInputResponse()


@rpc(SERVICE, "StreamInput", "client_stream", None)
async def stream_input(
    ctx: Envd, messages: AsyncIterator[bytes], codec: Codec
) -> pb.StreamInputResponse:
    selector: pb.ProcessSelector | None = None
    async for data in messages:
        message = codec.decode(data, pb.StreamInputRequest)
        kind = message.WhichOneof("event")
        if kind == "start":
            selector = message.start.process
            await _running(ctx, selector)
        elif kind == "data":
            if selector is None:
                raise ConnectError(
                    "failed_precondition", "the stream must start with a start event"
                )
            await _write(ctx, selector, _input(message.data.input))
    return pb.StreamInputResponse()


@rpc(SERVICE, "CloseStdin", "unary", pb.CloseStdinRequest)
async def close_stdin(ctx: Envd, message: pb.CloseStdinRequest) -> pb.CloseStdinResponse:
    execution = await _running(ctx, message.process)
    with contextlib.suppress(BrokenPipeError, ValueError):
        await execution.close_stdin()
    return pb.CloseStdinResponse()


@rpc(SERVICE, "SendSignal", "unary", pb.SendSignalRequest)
async def send_signal(ctx: Envd, message: pb.SendSignalRequest) -> pb.SendSignalResponse:
    if message.signal not in (pb.SIGNAL_SIGKILL, pb.SIGNAL_SIGTERM):
        raise ConnectError("invalid_argument", "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
    execution = await _running(ctx, message.process)
    await execution.signal(int(message.signal))  # the enum's numbers are the signals'
    return pb.SendSignalResponse()


@rpc(SERVICE, "Update", "unary", pb.UpdateRequest)
async def update(ctx: Envd, message: pb.UpdateRequest) -> pb.UpdateResponse:
    execution = await _running(ctx, message.process)
    if message.HasField("pty"):
        size = message.pty.size
        try:
            await execution.resize(size.rows or 24, size.cols or 80)
        except (ValueError, RuntimeError):
            raise ConnectError("failed_precondition", "the process has no terminal") from None
    return pb.UpdateResponse()
