"""The core services on the fake runtime, over a real SQLite file in a temporary data dir."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from corral.core.commands import CommandService
from corral.core.errors import (
    BadRequest,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    SandboxNotRunning,
    Unauthenticated,
    Unavailable,
)
from corral.core.models import (
    CommandStatus,
    ExecRequest,
    SandboxCreate,
    SandboxState,
    Scope,
    TokenCreate,
)
from corral.core.tokens import Principal, TokenBucket
from corral.runtime.fake import FakeRuntime, FakeSandbox
from corral.services import Services
from corral.settings import Settings
from corral.store.tables import CommandRow, SandboxRow, TokenRow

from .helpers import eventually, run

ADMIN_KEY = "crl_unit_admin_key_0123456789"


@asynccontextmanager
async def corral(tmp_path: Path, **overrides: Any) -> AsyncIterator[Services]:
    overrides.setdefault("warm_pool", 0)
    settings = Settings(runtime="fake", data_dir=tmp_path, admin_key=ADMIN_KEY, **overrides)
    services = await Services.start(settings)
    try:
        yield services
    finally:
        await services.close()


def exec_req(command: str, **kwargs: Any) -> ExecRequest:
    return ExecRequest(command=command, **kwargs)


async def slot_of(services: Services, sandbox_id: str) -> int:
    return (await services.sandboxes.row(sandbox_id)).slot


def fake_runtime(services: Services) -> FakeRuntime:
    runtime = services.node.runtime
    assert isinstance(runtime, FakeRuntime)
    return runtime


def running_record(cid: str, sandbox_id: str, node_id: str = "local") -> CommandRow:
    """A command row left `running`, as a server killed mid-command leaves it."""
    return CommandRow(
        id=cid,
        sandbox_id=sandbox_id,
        node_id=node_id,
        status=CommandStatus.running.value,
        command="sleep 1",
        args=None,
        cwd="/workspace",
        user="user",
        env_keys=[],
        timeout_ms=1000,
        max_output_bytes=10,
        created_at=datetime.now(UTC),
        source="native",
    )


def abandon_unfinished(services: Services) -> None:
    """Forget commands whose supervision died, so that close() does not wait for them."""
    for cid, execution in list(services.node._executions.items()):
        if execution._task.done() and not execution.finished:
            del services.node._executions[cid]
    for task in list(services.commands._finishers):
        task.cancel()


# --- sandboxes ---------------------------------------------------------------------------------


def test_create_sandbox_is_running(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(
                SandboxCreate(name="build", env={"B": "2", "A": "1"}, labels={"team": "x"})
            )
            assert sandbox.state == SandboxState.running
            assert sandbox.id.startswith("sb_")
            assert sandbox.node_id == "local"
            assert sandbox.env_keys == ["A", "B"]  # names only, never values
            assert sandbox.labels == {"team": "x"}
            assert await services.node.sandbox_running(sandbox.id)
            assert fake_runtime(services).started == [sandbox.id]
            assert (tmp_path / "corral.db").is_file()

            assert (await services.sandboxes.get("build")).id == sandbox.id
            assert (await services.sandboxes.get(sandbox.id)).name == "build"
            with pytest.raises(NotFound):
                await services.sandboxes.get("nothing")

    run(main())


def test_unknown_template_is_refused_without_a_row(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            with pytest.raises(Conflict):
                await services.sandboxes.create(SandboxCreate(template="alpine"))
            page = await services.sandboxes.list(include_deleted=True)
            assert page.items == []

    run(main())


def test_names_are_unique_among_live_sandboxes(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            first = await services.sandboxes.create(SandboxCreate(name="dup"))
            with pytest.raises(Conflict):
                await services.sandboxes.create(SandboxCreate(name="dup"))
            # Unnamed sandboxes never clash.
            await services.sandboxes.create(SandboxCreate())
            await services.sandboxes.create(SandboxCreate())

            await services.sandboxes.delete("dup")
            second = await services.sandboxes.create(SandboxCreate(name="dup"))
            assert second.id != first.id
            assert (await services.sandboxes.get("dup")).id == second.id
            assert (await services.sandboxes.get(first.id)).state == SandboxState.deleted

    run(main())


def test_slots_are_distinct_and_reused_after_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            a, b, c = [await services.sandboxes.create(SandboxCreate()) for _ in range(3)]
            slots = [await slot_of(services, s.id) for s in (a, b, c)]
            assert sorted(slots) == [1, 2, 3]

            await services.sandboxes.delete(b.id)
            d = await services.sandboxes.create(SandboxCreate())
            assert await slot_of(services, d.id) == await slot_of(services, b.id)
            e = await services.sandboxes.create(SandboxCreate())
            assert await slot_of(services, e.id) == 4

    run(main())


def test_running_out_of_slots_or_sandboxes_is_rate_limited(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path / "uids", uid_count=2) as services:
            await services.sandboxes.create(SandboxCreate())
            await services.sandboxes.create(SandboxCreate())
            with pytest.raises(RateLimited):
                await services.sandboxes.create(SandboxCreate())
        async with corral(tmp_path / "quota", max_sandboxes=1) as services:
            only = await services.sandboxes.create(SandboxCreate())
            with pytest.raises(RateLimited):
                await services.sandboxes.create(SandboxCreate())
            await services.sandboxes.delete(only.id)  # deleted ones leave the quota
            await services.sandboxes.create(SandboxCreate())

    run(main())


def test_stop_and_start(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate(name="box"))
            stopped = await services.sandboxes.stop("box")
            assert stopped.state == SandboxState.stopped
            assert not await services.node.sandbox_running(sandbox.id)
            with pytest.raises(SandboxNotRunning):
                await services.sandboxes.running_row(sandbox.id)
            assert (await services.sandboxes.stop("box")).state == SandboxState.stopped

            started = await services.sandboxes.start("box")
            assert started.state == SandboxState.running
            assert await services.node.sandbox_running(sandbox.id)
            assert (await services.sandboxes.running_row("box")).id == sandbox.id
            # Starting a running sandbox starts nothing new.
            await services.sandboxes.start("box")
            assert fake_runtime(services).started == [sandbox.id, sandbox.id]

    run(main())


def test_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            keep = await services.sandboxes.create(SandboxCreate(name="keep"))
            gone = await services.sandboxes.create(SandboxCreate(name="gone"))
            deleted = await services.sandboxes.delete("gone")
            assert deleted.state == SandboxState.deleted
            assert not await services.node.sandbox_running(gone.id)

            with pytest.raises(NotFound):
                await services.sandboxes.get("gone")  # names only find live sandboxes
            assert (await services.sandboxes.delete(gone.id)).state == SandboxState.deleted
            with pytest.raises(Conflict):
                await services.sandboxes.start(gone.id)
            with pytest.raises(Conflict):
                await services.sandboxes.stop(gone.id)

            assert [s.id for s in (await services.sandboxes.list()).items] == [keep.id]
            everything = await services.sandboxes.list(include_deleted=True)
            assert {s.id for s in everything.items} == {keep.id, gone.id}
            only_deleted = await services.sandboxes.list(state=SandboxState.deleted)
            assert [s.id for s in only_deleted.items] == [gone.id]

    run(main())


def test_list_sandboxes_pages_with_a_cursor(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            created = [(await services.sandboxes.create(SandboxCreate())).id for _ in range(5)]
            seen: list[str] = []
            cursor = None
            for _ in range(5):
                page = await services.sandboxes.list(limit=2, cursor=cursor)
                seen.extend(s.id for s in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert seen == sorted(created)
            with pytest.raises(BadRequest):
                await services.sandboxes.list(cursor="not a cursor")

            limited = await services.sandboxes.list(only=frozenset({created[0]}))
            assert [s.id for s in limited.items] == [created[0]]

    run(main())


def test_list_sandboxes_by_name_prefix(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            for name in ("ci-1", "ci-2", "cix", "other", "ci_3"):
                await services.sandboxes.create(SandboxCreate(name=name))
            await services.sandboxes.create(SandboxCreate())

            async def names(prefix: str) -> list[str | None]:
                page = await services.sandboxes.list(name_prefix=prefix)
                return sorted(s.name for s in page.items if s.name)

            assert await names("ci-") == ["ci-1", "ci-2"]
            assert await names("ci_") == ["ci_3"]  # "_" is a character, not LIKE's wildcard
            assert await names("ci") == ["ci-1", "ci-2", "ci_3", "cix"]
            assert await names("nope") == []

    run(main())


def test_extend_lengthens_the_ttl_and_the_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate(ttl_seconds=600))
            assert sandbox.expires_at is not None
            longer = await services.sandboxes.extend(sandbox.id, 60)
            assert longer.ttl_seconds == 660
            assert longer.expires_at == sandbox.expires_at + timedelta(seconds=60)
            # Never past ten years from now, whatever is asked.
            far = await services.sandboxes.extend(sandbox.id, 10 * 366 * 24 * 3600)
            assert far.expires_at is not None
            assert far.expires_at <= datetime.now(UTC) + timedelta(days=10 * 366)
            # A sandbox without a lifetime keeps none.
            forever = await services.sandboxes.create(SandboxCreate())
            assert (await services.sandboxes.extend(forever.id, 60)).expires_at is None
            # A renewed start gives a new lifetime from now, even before the old one is over.
            await services.sandboxes.stop(sandbox.id)
            before = datetime.now(UTC)
            started = await services.sandboxes.start(sandbox.id, renew=True)
            assert started.expires_at is not None
            assert started.expires_at >= before + timedelta(seconds=started.ttl_seconds or 0)

    run(main())


def test_a_crashed_sandbox_turns_error_and_can_start_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            handle = services.node._sandboxes[sandbox.id]
            assert isinstance(handle, FakeSandbox)
            handle.crash()

            async def in_error() -> bool:
                return (await services.sandboxes.get(sandbox.id)).state == SandboxState.error

            await eventually(in_error)
            assert (await services.sandboxes.get(sandbox.id)).error
            with pytest.raises(SandboxNotRunning):
                await services.sandboxes.running_row(sandbox.id)

            again = await services.sandboxes.start(sandbox.id)
            assert again.state == SandboxState.running
            assert again.error is None
            assert await services.node.sandbox_running(sandbox.id)

    run(main())


def test_expired_sandboxes_are_stopped(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate(ttl_seconds=3600))
            assert sandbox.expires_at is not None
            survivor = await services.sandboxes.create(SandboxCreate())
            # Rather than wait an hour, move the deadline into the past.
            async with services.db.transaction() as session:
                await session.execute(
                    update(SandboxRow)
                    .where(SandboxRow.id == sandbox.id)
                    .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
                )

            async def reaped() -> bool:
                return (await services.sandboxes.get(sandbox.id)).state == SandboxState.stopped

            await eventually(reaped, timeout=3)
            assert (await services.sandboxes.get(survivor.id)).state == SandboxState.running

    run(main())


def test_restart_brings_sandboxes_back_and_loses_running_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            running = await services.sandboxes.create(SandboxCreate(name="up"))
            stopped = await services.sandboxes.create(SandboxCreate(name="down"))
            await services.sandboxes.stop(stopped.id)
            row = await services.sandboxes.running_row(running.id)
            cmd, _ = await services.commands.start(row, exec_req("sleep 10"))
            # And one the previous server never got to record, as after a kill -9.
            async with services.db.transaction() as session:
                session.add(running_record("cmd_orphan", running.id))

        async with corral(tmp_path) as services:
            assert await services.node.sandbox_running(running.id)
            assert not await services.node.sandbox_running(stopped.id)
            assert (await services.sandboxes.get("up")).state == SandboxState.running
            assert (await services.sandboxes.get("down")).state == SandboxState.stopped
            lost = await services.commands.get(running.id, cmd.id)
            assert lost.status == CommandStatus.lost
            assert lost.error
            orphan = await services.commands.get(running.id, "cmd_orphan")
            assert orphan.status == CommandStatus.lost
            assert orphan.error is not None and "unknown" in orphan.error

    run(main())


# --- commands ----------------------------------------------------------------------------------


def test_run_stores_the_result_with_output(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            result = await services.commands.run(
                row, exec_req("echo hi; echoerr oops; exit 3", env={"Z": "1", "A": "2"})
            )
            assert result.status == CommandStatus.completed
            assert (result.exit_code, result.stdout, result.stderr) == (3, "hi\n", "oops\n")
            assert (result.stdout_bytes, result.stderr_bytes) == (3, 5)
            assert result.cwd == "/workspace"
            assert result.env_keys == ["A", "Z"]
            assert result.timeout_ms == services.settings.default_timeout_ms
            assert result.duration_ms is not None and result.finished_at is not None

            # Read back from the store and the log file, as a later request would.
            stored = await services.commands.get(sandbox.id, result.id)
            assert stored.model_dump() == result.model_dump()
            with pytest.raises(NotFound):
                await services.commands.get("sb_other", result.id)

    run(main())


def test_run_with_args(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            argv = await services.commands.run(row, exec_req("echo", args=["one", "two"]))
            assert argv.stdout == "one two\n"
            assert argv.args == ["one", "two"]
            assert argv.command == "echo"

    run(main())


def test_run_with_stdin(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            cmd, _ = await services.commands.start(row, exec_req("cat", stdin="from stdin"))
            finished = await services.commands.wait_finished(cmd.id, timeout=1)
            if not finished:
                abandon_unfinished(services)
            assert finished, "the command with stdin never finished"
            piped = await services.commands.get(sandbox.id, cmd.id)
            assert (piped.status, piped.stdout) == (CommandStatus.completed, "from stdin")

    run(main())


def test_a_command_that_cannot_start_is_stored_as_failed(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            result = await services.commands.run(row, exec_req("/nonexistent/tool"))
            assert result.status == CommandStatus.failed
            assert result.error is not None and "could not start" in result.error
            assert result.exit_code is None
            stored = await services.commands.get(sandbox.id, result.id)
            assert stored.status == CommandStatus.failed

    run(main())


def test_start_then_wait_and_cancel(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)

            quick, _ = await services.commands.start(row, exec_req("echo go; sleep 0.05; echo ok"))
            assert quick.status == CommandStatus.running.value
            done = await services.commands.get(sandbox.id, quick.id, wait=True, timeout=5)
            assert (done.status, done.stdout) == (CommandStatus.completed, "go\nok\n")

            slow, _ = await services.commands.start(row, exec_req("echo begin; sleep 10"))

            async def partial() -> bool:
                return (await services.commands.get(sandbox.id, slow.id)).stdout == "begin\n"

            await eventually(partial)
            current = await services.commands.get(sandbox.id, slow.id, wait=True, timeout=0.05)
            assert current.status == CommandStatus.running

            cancelled = await services.commands.cancel(sandbox.id, slow.id)
            assert cancelled.status == CommandStatus.cancelled
            assert cancelled.stdout == "begin\n"
            with pytest.raises(Conflict):
                await services.commands.cancel(sandbox.id, slow.id)

    run(main())


def test_timeout_is_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            result = await services.commands.run(row, exec_req("sleep 10", timeout_ms=100))
            assert result.status == CommandStatus.timed_out
            assert result.timeout_ms == 100

    run(main())


def test_output_cap_is_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            result = await services.commands.run(
                row, exec_req("echo 0123456789; echoerr ab", max_output_bytes=4)
            )
            assert (result.stdout, result.stderr) == ("0123", "ab\n")
            assert result.stdout_truncated and not result.stderr_truncated
            assert result.stdout_bytes == 11
            stored = await services.commands.get(sandbox.id, result.id)
            assert (stored.stdout, stored.stdout_truncated) == ("0123", True)

    run(main())


def test_list_commands_newest_first_with_cursor_and_status(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            other = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            other_row = await services.sandboxes.running_row(other.id)
            created = []
            for script in ("echo 1", "exit 2", "/nonexistent", "echo 4", "echo 5"):
                created.append((await services.commands.run(row, exec_req(script))).id)
            await services.commands.run(other_row, exec_req("echo elsewhere"))

            seen: list[str] = []
            cursor = None
            for _ in range(5):
                page = await services.commands.list(sandbox.id, limit=2, cursor=cursor)
                assert len(page.items) <= 2
                assert all(c.stdout is None for c in page.items)  # lists carry no output
                seen.extend(c.id for c in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert seen == created[::-1]

            failed = await services.commands.list(sandbox.id, status=CommandStatus.failed)
            assert [c.id for c in failed.items] == [created[2]]
            completed = await services.commands.list(sandbox.id, status=CommandStatus.completed)
            assert [c.id for c in completed.items] == [created[i] for i in (4, 3, 1, 0)]
            assert (await services.commands.list(sandbox.id, status=CommandStatus.lost)).items == []
            with pytest.raises(BadRequest):
                await services.commands.list(sandbox.id, cursor="%%%")

    run(main())


def test_mark_lost_ends_running_rows_of_this_node(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            running, _ = await services.commands.start(row, exec_req("sleep 10"))
            finished = await services.commands.run(row, exec_req("echo done"))
            # A row another node is responsible for is not this node's to judge.
            foreign = running_record("cmd_foreign", sandbox.id, node_id="elsewhere")
            async with services.db.transaction() as session:
                session.add(foreign)

            # As at a server start, from a service that knows nothing of running commands.
            fresh = CommandService(services.db, services.directory, services.settings)
            assert await fresh.mark_lost("local") == 1

            # Read through the fresh service too: the old one still runs the command.
            lost = await fresh.get(sandbox.id, running.id)
            assert lost.status == CommandStatus.lost
            assert lost.finished_at is not None
            assert lost.error is not None and "unknown" in lost.error
            assert (await services.commands.get(sandbox.id, finished.id)).status == "completed"
            assert (await services.commands.get(sandbox.id, "cmd_foreign")).status == "running"
            assert await fresh.mark_lost("local") == 0

    run(main())


def test_too_many_running_commands_is_rate_limited(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, max_running_commands_per_sandbox=2) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            other = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            first, _ = await services.commands.start(row, exec_req("sleep 10"))
            await services.commands.start(row, exec_req("sleep 10"))
            with pytest.raises(RateLimited):
                await services.commands.start(row, exec_req("echo one too many"))
            # The limit is per sandbox.
            other_row = await services.sandboxes.running_row(other.id)
            assert (await services.commands.run(other_row, exec_req("echo ok"))).stdout == "ok\n"

            await services.commands.cancel(sandbox.id, first.id)
            assert (await services.commands.run(row, exec_req("echo now"))).stdout == "now\n"

    run(main())


def test_limits_beyond_the_maximum_are_invalid(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, max_timeout_ms=1000, max_output_bytes_limit=100) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            with pytest.raises(InvalidArgument):
                await services.commands.start(row, exec_req("echo x", timeout_ms=1001))
            with pytest.raises(InvalidArgument):
                await services.commands.start(row, exec_req("echo x", max_output_bytes=101))
            ok = await services.commands.run(
                row, exec_req("echo x", timeout_ms=1000, max_output_bytes=100)
            )
            assert ok.status == CommandStatus.completed
            # Refused requests leave no trace in the history.
            assert [c.id for c in (await services.commands.list(sandbox.id)).items] == [ok.id]

    run(main())


def test_commands_need_a_running_sandbox_and_an_accepting_server(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            await services.sandboxes.stop(sandbox.id)
            with pytest.raises(Unavailable):
                await services.commands.start(row, exec_req("echo x"))

            await services.sandboxes.start(sandbox.id)
            services.commands.stop_accepting()
            with pytest.raises(Unavailable):
                await services.commands.start(row, exec_req("echo x"))
            assert (await services.commands.list(sandbox.id)).items == []

    run(main())


def test_stopping_a_sandbox_cancels_its_commands(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            cmd, _ = await services.commands.start(row, exec_req("sleep 10"))
            await services.sandboxes.stop(sandbox.id)
            result = await services.commands.get(sandbox.id, cmd.id, wait=True, timeout=5)
            assert result.status == CommandStatus.cancelled

    run(main())


# --- tokens ------------------------------------------------------------------------------------


def test_token_create_authenticate_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            created = await services.tokens.create(TokenCreate(name="ci"))
            assert created.secret.startswith("crl_")
            assert created.secret.startswith(created.prefix)
            assert created.scopes == [Scope.exec, Scope.files, Scope.read]

            principal = await services.tokens.authenticate(created.secret)
            assert principal.token_id == created.id
            assert principal.scopes == {Scope.read, Scope.exec, Scope.files}
            assert principal.sandbox_ids is None
            assert not principal.is_admin

            # Only the hash of the secret is stored.
            async with services.db.session() as session:
                row = await session.get(TokenRow, created.id)
            assert row is not None
            assert row.secret_hash == hashlib.sha256(created.secret.encode()).hexdigest()
            listed = await services.tokens.list()
            assert [t.id for t in listed] == [created.id]
            assert listed[0].last_used_at is not None
            assert not hasattr(listed[0], "secret")

            await services.tokens.delete(created.id)
            with pytest.raises(Unauthenticated):
                await services.tokens.authenticate(created.secret)
            with pytest.raises(NotFound):
                await services.tokens.delete(created.id)

    run(main())


def test_missing_wrong_and_expired_tokens_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            for secret in (None, "", "crl_made_up"):
                with pytest.raises(Unauthenticated):
                    await services.tokens.authenticate(secret)

            created = await services.tokens.create(TokenCreate(expires_in_seconds=3600))
            assert created.expires_at is not None
            async with services.db.transaction() as session:
                await session.execute(
                    update(TokenRow)
                    .where(TokenRow.id == created.id)
                    .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
                )
            with pytest.raises(Unauthenticated):
                await services.tokens.authenticate(created.secret)

    run(main())


def test_admin_key_has_every_scope(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            admin = await services.tokens.authenticate(ADMIN_KEY)
            assert admin.token_id == "admin"
            assert admin.is_admin
            assert admin.scopes == frozenset(Scope)
            for scope in Scope:
                admin.require(scope)
            assert admin.may_use("sb_anything", live=False)
            with pytest.raises(Unauthenticated):
                await services.tokens.authenticate(ADMIN_KEY + "x")

    run(main())


def test_token_limited_to_sandboxes_and_scopes(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            created = await services.tokens.create(
                TokenCreate(scopes=[Scope.read], sandbox_ids=["sb_a", "build", "sb_a"])
            )
            assert created.sandbox_ids == ["build", "sb_a"]
            principal = await services.tokens.authenticate(created.secret)
            assert principal.sandbox_ids == {"sb_a", "build"}

            principal.require(Scope.read)
            with pytest.raises(PermissionDenied):
                principal.require(Scope.exec)
            assert principal.may_use("sb_a", live=True)
            assert principal.may_use("sb_a", live=False)  # by id, deleted or not
            assert principal.may_use("sb_other", "build", live=True)  # by its name
            # A deleted sandbox is not covered by a name it bore: the name may be reused.
            assert not principal.may_use("sb_other", "build", live=False)
            assert not principal.may_use("sb_b", live=True)
            assert not principal.may_use("sb_b", "other", live=True)

    run(main())


def test_principal_without_limits() -> None:
    principal = Principal("tok_x", frozenset({Scope.exec}))
    assert principal.may_use("sb_any", live=True)
    with pytest.raises(PermissionDenied):
        principal.require(Scope.admin)
    assert Principal("tok_y", frozenset({Scope.admin})).is_admin


def test_token_bucket_limits_after_the_burst() -> None:
    bucket = TokenBucket(rate=0.01, burst=3)
    for _ in range(3):
        bucket.take("tok_a")
    with pytest.raises(RateLimited) as info:
        bucket.take("tok_a")
    assert 0 < info.value.retry_after <= 100
    bucket.take("tok_b")  # each key has its own bucket


def test_token_bucket_refills() -> None:
    async def main() -> None:
        bucket = TokenBucket(rate=50, burst=1)
        bucket.take("k")
        with pytest.raises(RateLimited):
            bucket.take("k")
        await asyncio.sleep(0.06)
        bucket.take("k")

    run(main())


def test_authentication_is_rate_limited_per_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, rate_limit_per_second=0.01, rate_limit_burst=2) as services:
            created = await services.tokens.create(TokenCreate())
            await services.tokens.authenticate(ADMIN_KEY)
            await services.tokens.authenticate(ADMIN_KEY)
            with pytest.raises(RateLimited):
                await services.tokens.authenticate(ADMIN_KEY)
            await services.tokens.authenticate(created.secret)

    run(main())


def test_token_rows_survive_in_the_sqlite_file(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            created = await services.tokens.create(TokenCreate(name="kept"))
        async with corral(tmp_path) as services:
            assert (await services.tokens.authenticate(created.secret)).token_id == created.id
            async with services.db.session() as session:
                names = list(await session.scalars(select(TokenRow.name)))
            assert names == ["kept"]

    run(main())


def test_a_result_is_shown_only_once_stored(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            sandbox = await services.sandboxes.create(SandboxCreate())
            row = await services.sandboxes.running_row(sandbox.id)
            commands = services.commands
            real_insert = commands.writer.insert
            gate = asyncio.Event()

            async def slow_insert(table: Any, values: dict[str, Any]) -> None:
                await gate.wait()
                await real_insert(table, values)

            commands.writer.insert = slow_insert  # type: ignore[method-assign]
            reply = asyncio.ensure_future(commands.run(row, exec_req("echo hi")))
            await eventually(lambda: bool(commands._live))
            cid = next(iter(commands._live))

            async def ended() -> bool:  # ended, not yet stored
                return await services.node.execution(cid) is None

            await eventually(ended)
            assert (await commands.get(sandbox.id, cid)).status == CommandStatus.running
            gate.set()
            result = await reply
            assert result.status == CommandStatus.completed and result.stdout == "hi\n"
            assert (await commands.get(sandbox.id, cid)).status == CommandStatus.completed

    run(main())


def test_a_create_takes_a_warm_sandboxs_uid_slot_when_none_is_free(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, warm_pool=2, uid_count=3) as services:
            sandboxes = services.sandboxes
            await eventually(lambda: sandboxes.warm_count == 2)  # slots 1 and 2; 3 stays free
            # Specs the pool cannot serve: they need slots of their own.
            first = await sandboxes.create(SandboxCreate(memory_mb=64))
            second = await sandboxes.create(SandboxCreate(memory_mb=64))
            assert {await slot_of(services, first.id), await slot_of(services, second.id)} <= {
                1,
                2,
                3,
            }
            assert sandboxes.warm_count == 1
            assert (await sandboxes.get(second.id)).state == SandboxState.running

    run(main())


def test_only_marked_warm_sandboxes_without_a_row_are_removed_at_start(tmp_path: Path) -> None:
    async def main() -> None:
        root = tmp_path / "sandboxes"
        (root / "sb_lostrow").mkdir(parents=True)  # a workspace whose row the store lost
        (root / "sb_lostrow" / "workspace").mkdir()
        (root / "sb_warmleft").mkdir()
        (root / "sb_warmleft" / ".warm").touch()
        async with corral(tmp_path) as services:
            removed: list[str] = []
            real = services.node.remove_sandbox

            async def spy(config: Any) -> None:
                removed.append(config.id)
                await real(config)

            services.node.remove_sandbox = spy  # type: ignore[method-assign]
            await services.sandboxes.reconcile("local")
            assert removed == ["sb_warmleft"]

    run(main())


def test_warm_sandboxes_count_towards_the_sandbox_limit(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, warm_pool=2, max_sandboxes=4) as services:
            sandboxes = services.sandboxes
            await eventually(lambda: sandboxes.warm_count == 2)
            # Specs the pool cannot serve: each makes room by removing a warm sandbox when
            # rows and warm sandboxes together are at the limit.
            made = [await sandboxes.create(SandboxCreate(memory_mb=64)) for _ in range(4)]
            assert sandboxes.warm_count == 0
            assert len(services.node._sandboxes) == 4  # running: exactly the limit
            with pytest.raises(RateLimited):
                await sandboxes.create(SandboxCreate(memory_mb=64))
            assert len(made) == 4

    run(main())


def test_a_create_finding_the_pool_empty_takes_the_sandbox_it_is_starting(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with corral(tmp_path, warm_pool=1) as services:
            sandboxes = services.sandboxes
            runtime = fake_runtime(services)
            await eventually(lambda: sandboxes.warm_count == 1)
            fast = runtime.start

            async def slow_start(config: Any) -> Any:  # a start as long as a real one
                await asyncio.sleep(0.6)
                return await fast(config)

            runtime.start = slow_start  # type: ignore[method-assign]
            first = await sandboxes.create(SandboxCreate())
            assert first.id == runtime.started[0]  # the warm one
            # The refill starts another a moment after the claim; a create meanwhile waits
            # for it instead of starting one of its own beside it.
            await eventually(lambda: sandboxes._starting == 1)
            second = await sandboxes.create(SandboxCreate())
            assert runtime.started == [first.id, second.id]
            assert (await sandboxes.get(second.id)).state == SandboxState.running
            # One more, with nothing warm or starting for it: a start of its own.
            await eventually(lambda: sandboxes._starting == 1)
            third = await sandboxes.create(SandboxCreate(memory_mb=64))
            assert third.id not in runtime.started[:2]

    run(main())
