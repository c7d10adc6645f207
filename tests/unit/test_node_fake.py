"""The local node on the fake runtime: output, stdin, exit codes, timeouts, cancel and loss."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from corral.core.models import CommandStatus
from corral.node.base import CommandOutcome, CommandSpec
from corral.node.local import LocalNode
from corral.node.output_log import STDOUT, read_output
from corral.runtime.base import ProcessSpec, SandboxConfig, SandboxDied, SpawnError
from corral.runtime.fake import FakeRuntime, FakeSandbox

from .helpers import eventually, run

SANDBOX = "sb_1"


@asynccontextmanager
async def local_node(tmp_path: Path) -> AsyncIterator[LocalNode]:
    node = LocalNode(node_id="local", runtime=FakeRuntime(), data_dir=tmp_path, kill_grace_ms=200)
    await node.prepare()
    await node.start_sandbox(SandboxConfig(id=SANDBOX, slot=1, dir=tmp_path / "sb"))
    try:
        yield node
    finally:
        await node.shutdown()


def spec(
    script: str,
    *,
    cid: str = "cmd_1",
    stdin: bytes | None = None,
    timeout_ms: int = 5_000,
    max_output_bytes: int = 1 << 20,
) -> CommandSpec:
    return CommandSpec(
        id=cid,
        sandbox_id=SANDBOX,
        argv=["/bin/bash", "-c", script],
        env={},
        cwd="/workspace",
        stdin=stdin,
        timeout_ms=timeout_ms,
        max_output_bytes=max_output_bytes,
    )


async def run_to_end(node: LocalNode, command: CommandSpec) -> tuple[CommandOutcome, bytes, bytes]:
    execution = await node.run(command)
    outcome = await execution.outcome()
    out, err = read_output(node.log_path(command.sandbox_id, command.id))
    return outcome, out, err


def fake_sandbox(node: LocalNode) -> FakeSandbox:
    handle = node._sandboxes[SANDBOX]
    assert isinstance(handle, FakeSandbox)
    return handle


def test_prepare_creates_a_private_logs_dir(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            assert node.logs_dir.is_dir()
            assert node.logs_dir.stat().st_mode & 0o077 == 0
            assert await node.sandbox_running(SANDBOX)
            assert not await node.sandbox_running("sb_other")

    run(main())


def test_stdout_stderr_and_exit_code(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            outcome, out, err = await run_to_end(
                node, spec("echo hello; echoerr oops; echo world; exit 3")
            )
            assert outcome.status == CommandStatus.completed
            assert (outcome.exit_code, outcome.signal, outcome.error) == (3, None, None)
            assert out == b"hello\nworld\n"
            assert err == b"oops\n"
            assert (outcome.stdout_bytes, outcome.stderr_bytes) == (12, 5)
            assert not outcome.stdout_truncated and not outcome.stderr_truncated
            assert outcome.finished_at >= outcome.started_at
            assert outcome.duration_ms >= 0

    run(main())


def test_unknown_program_exits_127(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            outcome, out, err = await run_to_end(node, spec("frobnicate; echo never"))
            assert outcome.status == CommandStatus.completed
            assert outcome.exit_code == 127
            assert out == b""
            assert b"frobnicate" in err

    run(main())


def test_stdin_reaches_the_command(tmp_path: Path) -> None:
    async def main() -> None:
        node = LocalNode(
            node_id="local", runtime=FakeRuntime(), data_dir=tmp_path, kill_grace_ms=200
        )
        await node.prepare()
        await node.start_sandbox(SandboxConfig(id=SANDBOX, slot=1, dir=tmp_path / "sb"))
        data = b"line one\nline two\n" * 1000
        execution = await node.run(spec("cat", stdin=data))
        waiter = asyncio.ensure_future(execution.outcome())
        await asyncio.wait({waiter}, timeout=1)
        if not waiter.done():
            # Stop the fake without shutdown(), which would wait for the stuck command.
            await fake_sandbox(node).stop()
            raise AssertionError("the command with stdin never finished")
        await node.shutdown()
        outcome = waiter.result()
        assert outcome.status == CommandStatus.completed
        assert outcome.exit_code == 0
        assert read_output(node.log_path(SANDBOX, "cmd_1"))[0] == data

    run(main())


def test_empty_stdin_is_closed_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            outcome, out, _ = await run_to_end(node, spec("cat; echo after", stdin=b""))
            assert (outcome.status, outcome.exit_code, out) == (
                CommandStatus.completed,
                0,
                b"after\n",
            )

    run(main())


def test_no_stdin_means_closed_stdin(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            outcome, out, _ = await run_to_end(node, spec("cat; echo after", stdin=None))
            assert outcome.status == CommandStatus.completed
            assert out == b"after\n"

    run(main())


def test_timeout_kills_the_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            started = time.monotonic()
            outcome, _, _ = await run_to_end(node, spec("echo begin; sleep 10", timeout_ms=100))
            assert time.monotonic() - started < 2
            assert outcome.status == CommandStatus.timed_out
            assert outcome.exit_code == 128 + signal.SIGKILL
            assert outcome.signal == signal.SIGKILL  # a timeout gets no grace period
            assert outcome.stdout_bytes == len(b"begin\n")

    run(main())


def test_cancel_ends_a_running_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            execution = await node.run(spec("sleep 10"))
            assert await node.execution("cmd_1") is execution
            started = time.monotonic()
            await execution.cancel()
            await execution.cancel()  # a second cancel changes nothing
            outcome = await execution.outcome()
            assert time.monotonic() - started < 2
            assert outcome.status == CommandStatus.cancelled
            assert outcome.signal == signal.SIGTERM  # asked politely first
            assert await node.execution("cmd_1") is None

    run(main())


def test_cancel_after_the_end_keeps_the_result(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            execution = await node.run(spec("exit 4"))
            first = await execution.outcome()
            await execution.cancel()
            again = await execution.outcome()
            assert first == again
            assert again.status == CommandStatus.completed
            assert again.exit_code == 4

    run(main())


def test_endless_output_is_capped_while_the_pipe_drains(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            outcome, out, err = await run_to_end(
                node, spec("yes", timeout_ms=300, max_output_bytes=1000)
            )
            assert outcome.status == CommandStatus.timed_out
            assert outcome.stdout_truncated
            assert not outcome.stderr_truncated
            assert out == b"y\n" * 500
            assert outcome.stdout_bytes > 1000
            assert err == b""
            log_file = node.log_path(SANDBOX, "cmd_1")
            assert log_file.stat().st_size == 1000 + 5  # one frame: header and the kept bytes

    run(main())


def test_spawn_error_for_a_missing_program(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            with pytest.raises(SpawnError):
                await node.run(spec("/nonexistent/program"))
            assert await node.running_count(SANDBOX) == 0
            assert await node.execution("cmd_1") is None

    run(main())


def test_run_in_an_unknown_sandbox_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            other = CommandSpec(**{**spec("echo hi").__dict__, "sandbox_id": "sb_none"})
            with pytest.raises(SandboxDied):
                await node.run(other)

    run(main())


def test_sandbox_crash_loses_running_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            died: list[str] = []

            async def on_died(sandbox_id: str, failure: str | None) -> None:
                died.append(sandbox_id)

            node.on_sandbox_died = on_died
            execution = await node.run(spec("echo partial; sleep 10"))
            await eventually(lambda: execution.log.seen[STDOUT] > 0)

            fake_sandbox(node).crash()
            outcome = await execution.outcome()
            assert outcome.status == CommandStatus.lost
            assert outcome.exit_code is None
            assert outcome.error is not None and "crashed" in outcome.error
            assert outcome.stdout_bytes == len(b"partial\n")

            await eventually(lambda: died == [SANDBOX])
            assert not await node.sandbox_running(SANDBOX)
            with pytest.raises(SandboxDied):
                await node.run(spec("echo hi", cid="cmd_2"))

    run(main())


def test_stop_sandbox_cancels_running_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            died: list[str] = []

            async def on_died(sandbox_id: str, failure: str | None) -> None:
                died.append(sandbox_id)

            node.on_sandbox_died = on_died
            first = await node.run(spec("sleep 10", cid="cmd_1"))
            second = await node.run(spec("sleep 10", cid="cmd_2"))
            assert await node.running_count(SANDBOX) == 2

            started = time.monotonic()
            await node.stop_sandbox(SANDBOX)
            assert time.monotonic() - started < 2
            for execution in (first, second):
                assert (await execution.outcome()).status == CommandStatus.cancelled
            assert await node.running_count(SANDBOX) == 0
            assert not await node.sandbox_running(SANDBOX)
            await eventually(lambda: not node._watchers)
            assert died == []  # a requested stop is no crash

    run(main())


def test_running_count_follows_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            assert await node.running_count(SANDBOX) == 0
            slow = await node.run(spec("sleep 10", cid="cmd_slow"))
            quick = await node.run(spec("echo hi", cid="cmd_quick"))
            assert await node.running_count(SANDBOX) == 2
            assert await node.running_count("sb_other") == 0
            await quick.outcome()
            assert await node.running_count(SANDBOX) == 1
            await slow.cancel()
            await slow.outcome()
            assert await node.running_count(SANDBOX) == 0

    run(main())


def test_restarting_a_sandbox_replaces_its_handle(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            died: list[str] = []

            async def on_died(sandbox_id: str, failure: str | None) -> None:
                died.append(sandbox_id)

            node.on_sandbox_died = on_died
            old = fake_sandbox(node)
            await node.start_sandbox(SandboxConfig(id=SANDBOX, slot=1, dir=tmp_path / "sb"))
            assert fake_sandbox(node) is not old
            assert not old.alive
            assert await node.sandbox_running(SANDBOX)
            await eventually(lambda: len(node._watchers) == 1)
            assert died == []
            outcome, out, _ = await run_to_end(node, spec("echo again"))
            assert (outcome.status, out) == (CommandStatus.completed, b"again\n")

    run(main())


def test_shutdown_loses_running_commands(tmp_path: Path) -> None:
    async def main() -> None:
        node = LocalNode(
            node_id="local", runtime=FakeRuntime(), data_dir=tmp_path, kill_grace_ms=200
        )
        await node.prepare()
        await node.start_sandbox(SandboxConfig(id=SANDBOX, slot=1, dir=tmp_path / "sb"))
        execution = await node.run(spec("sleep 10"))
        await node.shutdown()
        outcome = await execution.outcome()
        assert outcome.status == CommandStatus.lost
        assert not await node.sandbox_running(SANDBOX)

    run(main())


def test_fake_process_killed_at_once_closes_its_pipes(tmp_path: Path) -> None:
    async def main() -> None:
        sandbox = await FakeRuntime().start(SandboxConfig(id=SANDBOX, slot=1, dir=tmp_path))
        process = await sandbox.spawn(
            ProcessSpec(id="cmd_1", argv=["/bin/bash", "-c", "sleep 10"], env={}, cwd="/")
        )
        await sandbox.stop()
        for _ in range(10):
            await asyncio.sleep(0)
        os.set_blocking(process.stdout_fd, False)
        try:
            assert os.read(process.stdout_fd, 1) == b""  # EOF: no writer left
        except BlockingIOError:
            raise AssertionError("the write end of stdout is still open") from None
        finally:
            for fd in (process.stdout_fd, process.stderr_fd, process.stdin_fd):
                if fd is not None:
                    os.close(fd)

    run(main())


def test_a_log_that_cannot_be_written_still_ends_the_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with local_node(tmp_path) as node:
            # Where the sandbox's log directory belongs there is a file: every write fails.
            (tmp_path / "logs" / SANDBOX).write_text("not a directory")
            execution = await node.run(spec("echo hello"))
            outcome = await asyncio.wait_for(execution.outcome(), 5)
            assert outcome.status == CommandStatus.completed
            assert outcome.error is not None and "output log could not be written" in outcome.error
            assert outcome.stdout_truncated  # what it printed is not kept
            assert await node.execution("cmd_1") is None

    run(main())
