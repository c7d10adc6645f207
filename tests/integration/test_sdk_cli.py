"""End to end through the SDK (sync and async) and the `corral` command, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

import corral
from corral import (
    AsyncClient,
    AuthenticationError,
    Client,
    CommandError,
    CommandStatus,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    SandboxState,
    Scope,
    ValidationError,
    raise_for_status,
)
from tests.conftest import Server

pytestmark = pytest.mark.sandbox

MISSING_SANDBOX = "sb_0000000000doesnotexist00"


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ids(items: list) -> set[str]:
    return {item.id for item in items}


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, token=server.admin_key) as sdk:
        yield sdk


# --- SDK: sandboxes ----------------------------------------------------------------------------


def test_health(client: Client) -> None:
    health = client.health()
    assert health.status == "ok"
    assert health.version == corral.__version__


def test_sandbox_lifecycle(client: Client) -> None:
    name = unique_name("sdk")
    created = client.create_sandbox(
        name=name, env={"GREETING": "hello"}, labels={"suite": "sdk"}, ttl_seconds=3600
    )
    try:
        assert created.state is SandboxState.running
        assert created.name == name
        assert created.env_keys == ["GREETING"]
        assert created.labels == {"suite": "sdk"}
        assert client.get_sandbox(name).id == created.id
        assert client.get_sandbox(created).name == name
        assert created.id in ids(client.list_sandboxes())
        assert created.id in ids(client.list_sandboxes(state="running"))
        assert created.id not in ids(client.list_sandboxes(state=SandboxState.stopped))
        assert len(client.list_sandboxes(limit=1)) == 1
        assert client.exec(name, 'echo "$GREETING"').stdout == "hello\n"
        with pytest.raises(ConflictError):
            client.create_sandbox(name=name)
    finally:
        deleted = client.delete_sandbox(created.id)
    assert deleted.id == created.id
    assert deleted.state is SandboxState.deleted
    assert created.id not in ids(client.list_sandboxes())
    with pytest.raises(NotFoundError):
        client.get_sandbox(name)


def test_stop_and_start(client: Client) -> None:
    created = client.create_sandbox()
    try:
        assert client.stop_sandbox(created.id).state is SandboxState.stopped
        with pytest.raises(ConflictError):
            client.exec(created.id, "true")
        assert client.start_sandbox(created.id).state is SandboxState.running
        assert client.exec(created.id, "echo back").stdout == "back\n"
    finally:
        client.delete_sandbox(created.id)


# --- SDK: commands -----------------------------------------------------------------------------


def test_exec_results(client: Client, sandbox_id: str) -> None:
    failed = client.exec(sandbox_id, "echo out; echo err >&2; exit 3")
    assert failed.status is CommandStatus.completed
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    assert failed.sandbox_id == sandbox_id
    with pytest.raises(CommandError) as info:
        raise_for_status(failed)
    assert info.value.command.id == failed.id
    assert info.value.exit_code == 3

    succeeded = client.exec(sandbox_id, 'printf "%s|" "$FOO"', env={"FOO": "a b"})
    assert raise_for_status(succeeded) is succeeded
    assert succeeded.stdout == "a b|"


def test_exec_options(client: Client, sandbox_id: str) -> None:
    # With args there is no shell: nothing is split or expanded.
    direct = client.exec(sandbox_id, "printf", args=["%s|", "a b", "$HOME"])
    assert direct.stdout == "a b|$HOME|"
    assert direct.args == ["%s|", "a b", "$HOME"]
    assert client.exec(sandbox_id, "cat", stdin="piped\n").stdout == "piped\n"
    assert client.exec(sandbox_id, "pwd", cwd="/").stdout == "/\n"

    capped = client.exec(sandbox_id, "yes | head -c 1000", max_output_bytes=10)
    assert capped.stdout == "y\n" * 5
    assert capped.stdout_truncated

    slow = client.exec(sandbox_id, "sleep 30", timeout_ms=300)
    assert slow.status is CommandStatus.timed_out
    assert slow.timeout_ms == 300
    with pytest.raises(CommandError):
        raise_for_status(slow)


def test_background_command(client: Client, sandbox_id: str) -> None:
    started = client.start_command(sandbox_id, "sleep 0.3; echo done")
    assert started.status in (CommandStatus.queued, CommandStatus.running)
    finished = client.get_command(sandbox_id, started.id, wait=True, timeout_ms=20_000)
    assert finished.status is CommandStatus.completed
    assert (finished.exit_code, finished.stdout) == (0, "done\n")
    assert client.get_command(sandbox_id, finished).id == started.id

    listed = {command.id: command for command in client.list_commands(sandbox_id)}
    assert started.id in listed
    assert listed[started.id].stdout is None  # lists leave the output out
    assert started.id in ids(client.list_commands(sandbox_id, status="completed"))
    assert started.id not in ids(client.list_commands(sandbox_id, status=CommandStatus.running))
    minute = timedelta(minutes=1)
    assert started.id in ids(client.list_commands(sandbox_id, since=started.created_at - minute))
    assert started.id not in ids(
        client.list_commands(sandbox_id, until=started.created_at - minute)
    )
    client.exec(sandbox_id, "true")
    assert len(client.list_commands(sandbox_id, limit=1)) == 1


def test_wait_timeout_and_cancel(client: Client, sandbox_id: str) -> None:
    started = client.start_command(sandbox_id, "sleep 60")
    waited = client.get_command(sandbox_id, started.id, wait=True, timeout_ms=200)
    assert waited.status is CommandStatus.running
    client.cancel_command(sandbox_id, started.id)
    final = client.get_command(sandbox_id, started.id, wait=True, timeout_ms=10_000)
    assert final.status is CommandStatus.cancelled
    with pytest.raises(ConflictError):
        client.cancel_command(sandbox_id, started.id)


# --- SDK: tokens and errors --------------------------------------------------------------------


def test_scoped_token(client: Client, server: Server, sandbox_id: str) -> None:
    created = client.create_token(name=unique_name("reader"), scopes=[Scope.read])
    assert created.secret
    assert created.scopes == [Scope.read]
    try:
        assert created.id in ids(client.list_tokens())
        with Client(server.url, token=created.secret) as reader:
            assert reader.get_sandbox(sandbox_id).id == sandbox_id
            reader.list_commands(sandbox_id)
            with pytest.raises(PermissionDeniedError) as info:
                reader.exec(sandbox_id, "true")
            assert info.value.status_code == 403
            assert info.value.code == "permission_denied"
            assert isinstance(info.value, PermissionError)
            with pytest.raises(PermissionDeniedError):
                reader.create_sandbox()
            with pytest.raises(PermissionDeniedError):
                reader.list_tokens()
    finally:
        client.delete_token(created.id)
    assert created.id not in ids(client.list_tokens())
    with Client(server.url, token=created.secret) as revoked, pytest.raises(AuthenticationError):
        revoked.get_sandbox(sandbox_id)


def test_token_limited_to_one_sandbox(client: Client, server: Server, sandbox_id: str) -> None:
    other = client.create_sandbox()
    created = client.create_token(scopes=["read", "exec"], sandbox_ids=[sandbox_id])
    try:
        assert created.sandbox_ids is not None
        with Client(server.url, token=created.secret) as limited:
            assert limited.exec(sandbox_id, "echo ok").stdout == "ok\n"
            assert ids(limited.list_sandboxes()) == {sandbox_id}
            with pytest.raises((PermissionDeniedError, NotFoundError)):
                limited.exec(other.id, "true")
    finally:
        client.delete_token(created.id)
        client.delete_sandbox(other.id)


def test_bad_or_missing_token(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_TOKEN", raising=False)
    with Client(server.url, token="crl_not_a_real_token") as bogus:
        with pytest.raises(AuthenticationError) as info:
            bogus.list_sandboxes()
        assert (info.value.status_code, info.value.code) == (401, "unauthenticated")
    with Client(server.url) as anonymous, pytest.raises(AuthenticationError):
        anonymous.list_sandboxes()


def test_not_found(client: Client, sandbox_id: str) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_sandbox(MISSING_SANDBOX)
    assert isinstance(info.value, LookupError)
    assert (info.value.status_code, info.value.code) == (404, "not_found")
    with pytest.raises(NotFoundError):
        client.exec(MISSING_SANDBOX, "true")
    with pytest.raises(NotFoundError):
        client.get_command(sandbox_id, "cmd_0000000000doesnotexist0")
    with pytest.raises(NotFoundError):
        client.cancel_command(sandbox_id, "cmd_0000000000doesnotexist0")
    with pytest.raises(NotFoundError):
        client.delete_token("tok_0000000000doesnotexist0")


def test_invalid_arguments(client: Client, sandbox_id: str) -> None:
    with pytest.raises(ValidationError) as info:
        client.create_sandbox(name="not a valid name!")
    assert (info.value.status_code, info.value.code) == (422, "invalid_argument")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValidationError):
        client.exec(sandbox_id, "pwd", cwd="relative/path")


def test_unreachable_server() -> None:
    with Client("http://127.0.0.1:1", token="x") as nowhere:
        with pytest.raises(corral.ConnectError) as info:
            nowhere.health()
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(corral.ClientClosedError):
        nowhere.health()


# --- SDK: asyncio ------------------------------------------------------------------------------


def test_async_client(server: Server) -> None:
    async def flow() -> None:
        async with AsyncClient(server.url, token=server.admin_key) as client:
            assert (await client.health()).status == "ok"
            name = unique_name("async")
            created = await client.create_sandbox(name=name)
            try:
                assert (await client.get_sandbox(name)).id == created.id
                assert created.id in ids(await client.list_sandboxes())

                result = await client.exec(created, "echo out; echo err >&2; exit 3")
                assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")

                # Several at once over the one connection pool.
                results = await asyncio.gather(
                    *(client.exec(created.id, f"echo {i}") for i in range(8))
                )
                assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]

                started = await client.start_command(name, "sleep 0.2; echo later")
                finished = await client.get_command(name, started.id, wait=True, timeout_ms=20_000)
                assert (finished.status, finished.stdout) == (CommandStatus.completed, "later\n")
                assert started.id in ids(await client.list_commands(name))

                sleeper = await client.start_command(name, "sleep 60")
                await client.cancel_command(name, sleeper)
                final = await client.get_command(name, sleeper, wait=True, timeout_ms=10_000)
                assert final.status is CommandStatus.cancelled

                with pytest.raises(NotFoundError):
                    await client.get_sandbox(MISSING_SANDBOX)
            finally:
                deleted = await client.delete_sandbox(created.id)
            assert deleted.state is SandboxState.deleted
        assert client.is_closed

    asyncio.run(flow())


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(
    server: Server, *args: str, token: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_TOKEN": token or server.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_sandbox_and_exec(server: Server) -> None:
    name = unique_name("cli")
    created = run_cli(server, "sandbox", "create", "--name", name, "--label", "suite=cli")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    assert sandbox_id.startswith("sb_")
    try:
        shown = run_cli(server, "sandbox", "show", name, "--json")
        assert shown.returncode == 0, shown.stderr
        details = json.loads(shown.stdout)
        assert (details["id"], details["state"], details["labels"]) == (
            sandbox_id,
            "running",
            {"suite": "cli"},
        )
        assert sandbox_id in run_cli(server, "sandbox", "show", name).stdout

        table = run_cli(server, "sandbox", "ls")
        assert table.returncode == 0, table.stderr
        assert name in table.stdout and sandbox_id in table.stdout
        listed = json.loads(run_cli(server, "sandbox", "ls", "--json").stdout)
        assert sandbox_id in {item["id"] for item in listed}

        # Several CMD arguments: a program and its arguments.
        run = run_cli(server, "exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")

        # One CMD argument: a shell string.
        run = run_cli(server, "exec", name, "--", "echo $((6 * 7))")
        assert (run.returncode, run.stdout) == (0, "42\n")

        run = run_cli(server, "exec", name, "-e", "FOO=bar", "--cwd", "/", "--", 'echo "$FOO"; pwd')
        assert (run.returncode, run.stdout) == (0, "bar\n/\n")

        run = run_cli(server, "exec", name, "-i", "--", "cat", stdin="from stdin\n")
        assert (run.returncode, run.stdout) == (0, "from stdin\n")

        run = run_cli(server, "exec", name, "--timeout", "0.3", "--", "sleep", "30")
        assert run.returncode == 124
        assert "timed out" in run.stderr

        run = run_cli(server, "exec", name, "--json", "--", "true")
        assert run.returncode == 0
        assert json.loads(run.stdout)["status"] == "completed"

        stopped = run_cli(server, "sandbox", "stop", name)
        assert (stopped.returncode, stopped.stdout) == (0, f"{sandbox_id} stopped\n")
        started = run_cli(server, "sandbox", "start", name)
        assert (started.returncode, started.stdout) == (0, f"{sandbox_id} running\n")
    finally:
        removed = run_cli(server, "sandbox", "rm", name)
    assert (removed.returncode, removed.stdout) == (0, f"{sandbox_id}\n")
    gone = run_cli(server, "sandbox", "show", name)
    assert gone.returncode == 1
    assert gone.stderr.startswith("error: not_found: ")


def test_cli_tokens(server: Server, sandbox_id: str) -> None:
    name = unique_name("cli-reader")
    created = run_cli(server, "token", "new", "--name", name, "--scope", "read")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret and "\n" not in secret
    assert "once" in created.stderr

    listed = json.loads(run_cli(server, "token", "ls", "--json").stdout)
    (token,) = [item for item in listed if item["name"] == name]
    assert token["scopes"] == ["read"]
    assert "secret" not in token
    assert token["id"] in run_cli(server, "token", "ls").stdout

    assert run_cli(server, "sandbox", "show", sandbox_id, token=secret).returncode == 0
    refused = run_cli(server, "exec", sandbox_id, "--", "true", token=secret)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: permission_denied: ")
    refused = run_cli(server, "sandbox", "create", token=secret)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: permission_denied: ")

    removed = run_cli(server, "token", "rm", token["id"])
    assert (removed.returncode, removed.stdout) == (0, f"{token['id']}\n")
    revoked = run_cli(server, "sandbox", "ls", token=secret)
    assert revoked.returncode == 1
    assert revoked.stderr.startswith("error: unauthenticated: ")


def test_cli_usage_and_connection_errors(server: Server) -> None:
    assert run_cli(server, "exec").returncode == 2
    assert run_cli(server, "sandbox", "create", "--env", "NO_EQUALS_SIGN").returncode == 2
    assert run_cli(server, "token", "new", "--scope", "everything").returncode == 2

    unreachable = run_cli(server, "--url", "http://127.0.0.1:1", "sandbox", "ls")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("error: ")
