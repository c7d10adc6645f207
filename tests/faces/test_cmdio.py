"""cmd.io (seed 000): the seed's SSH and curl examples, the Run API (buffered, `?stream=1`,
WebSocket), access lists, the SSH front, and the CLI for users and named commands."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from tests.faces.conftest import FacesServer, keypair, run_curl, ssh

pytestmark = pytest.mark.sandbox

WELCOME = (
    "Hello! This is a cmd.io command. All it does is display this message.\n"
    "However, cmd.io commands can do lots more."
)


@dataclass
class Owner:
    name: str
    key: Path
    port: int


@pytest.fixture(scope="module")
def owner(faces_server: FacesServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    """A user (`progrium-...`) with a key, and their commands."""
    key, public = keypair(tmp_path_factory.mktemp("keys"))
    name = "progrium-" + uuid.uuid4().hex[:6]
    with faces_server.client() as api:
        made = api.post("/v1/users", json={"name": name, "ssh_public_keys": [public]})
        assert made.status_code == 201, made.text
        commands = {
            "welcome": f"printf '%s\\n' {shlex.quote(WELCOME)}",
            "echo": "echo",
            "upper": "tr a-z A-Z",
            "fail": "echo out; echo err >&2; exit 3",
            "slow": "for i in 1 2 3; do echo tick $i; sleep 0.3; done",
            "term": "test -t 0 && echo on a terminal; stty size; read line; echo you said $line",
        }
        for command, line in commands.items():
            resp = api.post(f"/v1/users/{name}/commands", json={"name": command, "command": line})
            assert resp.status_code == 201, resp.text
        yield Owner(name, key, faces_server.ssh_port)
        api.delete(f"/v1/users/{name}")


def user_ssh(owner: Owner, *command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return ssh(owner.port, owner.name, *command, key=owner.key, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def token(owner: Owner) -> str:
    """The seed's `cmd-tokens new` and `welcome:access add TOKEN`, over SSH with the user's key."""
    made = user_ssh(owner, "cmd-tokens", "new")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("Token created: ")
    secret = made.stdout.split(": ", 1)[1].strip()
    for command in ("welcome", "fail", "slow", "upper", "echo", "term"):
        granted = user_ssh(owner, f"{command}:access", "add", secret)
        assert granted.returncode == 0 and granted.stdout == "Access granted.\n", granted.stderr
    return secret


def run_url(server: FacesServer, owner: Owner, command: str) -> str:
    return f"{server.url}/run/{owner.name}/{command}"


# --- SSH ----------------------------------------------------------------------------------------


def test_cmd_tokens_usage(owner: Owner) -> None:
    done = user_ssh(owner, "cmd-tokens")
    assert done.returncode == 0
    assert "cmd-tokens [command]" in done.stdout
    for sub in ("ls          List tokens", "new         Create a token", "rm          Delete"):
        assert sub in done.stdout


def test_token_as_ssh_username_runs_welcome(faces_server: FacesServer, token: str) -> None:
    """Acceptance 3: `ssh -p PORT TOKEN@127.0.0.1 welcome`, no key, its exit status."""
    done = ssh(faces_server.ssh_port, token, "welcome")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello! This is a cmd.io command.")
    failed = ssh(faces_server.ssh_port, token, "fail")
    assert failed.returncode == 3
    assert failed.stdout == "out\n" and failed.stderr == "err\n"
    args = ssh(faces_server.ssh_port, token, "echo", "a b", "'c d'")
    assert args.stdout == "a b c d\n"  # ssh joins its arguments into one line, as any server
    piped = ssh(faces_server.ssh_port, token, "upper", stdin="shout\n")
    assert piped.stdout == "SHOUT\n"


def test_new_token_works_over_http_and_access_is_enforced(
    faces_server: FacesServer, owner: Owner
) -> None:
    """Acceptance 3: a token from `cmd-tokens new` works over HTTP once it has access; a token
    without access gets 401 over HTTP and a refusal over SSH."""
    made = user_ssh(owner, "cmd-tokens", "new")
    fresh = made.stdout.split(": ", 1)[1].strip()
    url = run_url(faces_server, owner, "welcome")
    refused = httpx.get(url, auth=(fresh, ""))
    assert refused.status_code == 401 and refused.text == "unauthorized token\n"
    over_ssh = ssh(faces_server.ssh_port, fresh, "welcome")
    assert over_ssh.returncode != 0 and "unauthorized token" in over_ssh.stderr
    assert user_ssh(owner, "welcome:access", "add", fresh).returncode == 0
    allowed = httpx.get(url, auth=(fresh, ""))
    assert allowed.status_code == 200 and allowed.text.startswith("Hello!")
    listed = user_ssh(owner, "welcome:access", "ls").stdout
    token_id = next(line.split()[0] for line in listed.splitlines() if fresh[:10] in line)
    # The token is still no general API token: no scopes, no sandboxes.
    api = httpx.get(
        f"{faces_server.url}/v1/sandboxes", headers={"Authorization": f"Bearer {fresh}"}
    )
    assert api.status_code == 403
    # Access taken away, then the token removed.
    assert user_ssh(owner, "welcome:access", "rm", fresh).stdout == "Access revoked.\n"
    assert httpx.get(url, auth=(fresh, "")).status_code == 401
    assert token_id in user_ssh(owner, "cmd-tokens", "ls").stdout
    assert user_ssh(owner, "cmd-tokens", "rm", token_id).returncode == 0
    assert token_id not in user_ssh(owner, "cmd-tokens", "ls").stdout
    gone = ssh(faces_server.ssh_port, fresh, "welcome")
    assert gone.returncode == 255 and "Permission denied" in gone.stderr


def test_user_runs_own_commands_with_key(owner: Owner) -> None:
    done = user_ssh(owner, "fail")
    assert done.returncode == 3 and done.stdout == "out\n"
    missing = user_ssh(owner, "nothing-here")
    assert missing.returncode == 1 and "no command" in missing.stderr


def test_unknown_user_and_wrong_key_are_refused(
    faces_server: FacesServer, owner: Owner, tmp_path: Path
) -> None:
    other, _ = keypair(tmp_path, "other")
    wrong_key = ssh(faces_server.ssh_port, owner.name, "welcome", key=other)
    assert wrong_key.returncode == 255 and "Permission denied" in wrong_key.stderr
    nobody = ssh(faces_server.ssh_port, "crl_not_a_token", "welcome")
    assert nobody.returncode == 255
    builtins = ssh(faces_server.ssh_port, faces_server.admin_key, "cmd-tokens", "new")
    assert builtins.returncode == 1 and "user" in builtins.stderr


def test_interactive_pty(faces_server: FacesServer, token: str) -> None:
    """`ssh -tt`: the command runs on a terminal of the client's size, input passed on."""
    import pexpect

    child = pexpect.spawn(
        "ssh",
        ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "-o", "PubkeyAuthentication=no", "-F", "/dev/null",
         "-p", str(faces_server.ssh_port), "-tt", f"{token}@127.0.0.1", "term"],
        dimensions=(30, 100), timeout=8, encoding="utf-8",
    )  # fmt: skip
    child.expect("on a terminal")
    child.expect("30 100")
    child.sendline("hello there")
    child.expect("you said hello there")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- the Run API --------------------------------------------------------------------------------


def test_seed_curl_example(faces_server: FacesServer, owner: Owner, token: str) -> None:
    """`curl https://TOKEN@alpha.cmd.io/run/progrium/welcome` (the server here is plain HTTP)."""
    done = run_curl(
        "curl https://{TOKEN}@{HOST}/run/{USER}/welcome".replace("https://", "http://"),
        TOKEN=token, HOST=faces_server.url.removeprefix("http://"), USER=owner.name,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == WELCOME + "\n"


def test_buffered_output_exit_status_and_args(
    faces_server: FacesServer, owner: Owner, token: str
) -> None:
    failed = httpx.get(run_url(faces_server, owner, "fail"), params={"access_token": token})
    assert failed.status_code == 200
    assert failed.text == "out\nerr\nexit status: 3\n"
    assert failed.headers["x-exit-code"] == "3"
    args = httpx.get(run_url(faces_server, owner, "echo"), auth=(token, "ignored"),
                     params={"args": "one two  three"})  # fmt: skip
    assert args.text == "one two three\n" and args.headers["x-exit-code"] == "0"
    stdin = httpx.post(run_url(faces_server, owner, "upper"), auth=(token, ""), content=b"abc\n")
    assert stdin.text == "ABC\n"


def test_stream_is_chunked_as_written(faces_server: FacesServer, owner: Owner, token: str) -> None:
    done = run_curl(
        "curl -sS -N -D /dev/stderr '{URL}?stream=1&access_token={TOKEN}'",
        URL=run_url(faces_server, owner, "slow"), TOKEN=token,
    )  # fmt: skip
    assert "transfer-encoding: chunked" in done.stderr.lower()
    assert done.stdout == "tick 1\ntick 2\ntick 3\n"
    with httpx.stream(
        "GET", run_url(faces_server, owner, "slow"), params={"stream": "1", "access_token": token}
    ) as resp:
        pieces = list(resp.iter_raw())
    assert len(pieces) >= 3  # one chunk per write, not one at the end
    failed = httpx.get(run_url(faces_server, owner, "fail"),
                       params={"stream": "1", "access_token": token})  # fmt: skip
    assert failed.text.endswith("exit status: 3\n")


def test_a_client_going_away_does_not_end_the_run(
    faces_server: FacesServer, owner: Owner, token: str, fapi: httpx.Client
) -> None:
    with httpx.stream(
        "GET", run_url(faces_server, owner, "slow"), params={"stream": "1", "access_token": token}
    ) as resp:
        first = next(resp.iter_raw())
        assert first.startswith(b"tick 1")
    deadline = time.monotonic() + 10
    while True:  # the run's sandbox is removed once its command has ended by itself
        listed = fapi.get("/v1/sandboxes", params={"include_deleted": "true", "limit": 1000})
        runs = [
            s for s in listed.json()["items"]
            if s["labels"].get("cmdio.owner") == owner.name
            and s["labels"].get("cmdio.command") == "slow"
        ]  # fmt: skip
        newest = max(runs, key=lambda s: s["id"])
        if newest["state"] == "deleted" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert newest["state"] == "deleted"
    history = fapi.get(f"/v1/sandboxes/{newest['id']}/commands").json()["items"]
    assert history[0]["status"] == "completed" and history[0]["exit_code"] == 0


def test_websocket(faces_server: FacesServer, owner: Owner, token: str) -> None:
    url = run_url(faces_server, owner, "slow").replace("http://", "ws://")

    async def frames(target: str) -> tuple[list[str], int | None]:
        got: list[str] = []
        async with websockets.connect(target) as ws:
            async for message in ws:
                got.append(str(message))
            return got, ws.close_code

    got, code = asyncio.run(frames(f"{url}?access_token={token}"))
    assert got == ["tick 1\n", "tick 2\n", "tick 3\n"] and code == 1000
    fail_url = run_url(faces_server, owner, "fail").replace("http://", "ws://")
    got, code = asyncio.run(frames(f"{fail_url}?access_token={token}"))
    assert "".join(got[:-1]) in ("out\nerr\n", "err\nout\n") and got[-1] == "exit status: 3"
    assert code == 1000

    async def refused(target: str) -> int:
        try:
            async with websockets.connect(target):
                return 0
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(refused(f"{url}?access_token=crl_nope")) == 401
    missing = run_url(faces_server, owner, "none").replace("http://", "ws://")
    assert asyncio.run(refused(f"{missing}?access_token={token}")) == 404


def test_errors_are_plain_text(faces_server: FacesServer, owner: Owner, token: str) -> None:
    url = run_url(faces_server, owner, "welcome")
    for resp in (httpx.get(url), httpx.get(url, auth=("crl_nope", ""))):
        assert resp.status_code == 401 and resp.text == "unauthorized token\n"
        assert resp.headers["content-type"].startswith("text/plain")
    missing = httpx.get(run_url(faces_server, owner, "nothing"), auth=(token, ""))
    assert missing.status_code == 404 and missing.text == "not found\n"
    nobody = httpx.get(f"{faces_server.url}/run/nobody/welcome", auth=(token, ""))
    assert nobody.status_code == 404


def test_runs_leave_no_sandbox(faces_server: FacesServer, owner: Owner, token: str) -> None:
    with faces_server.client() as api:
        before = {s["id"] for s in api.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]}
        httpx.get(run_url(faces_server, owner, "welcome"), auth=(token, ""))
        after = {s["id"] for s in api.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]}
    assert after <= before


# --- management over HTTP, and the CLI ----------------------------------------------------------


def test_management_api(fapi: httpx.Client, owner: Owner) -> None:
    assert owner.name in [u["name"] for u in fapi.get("/v1/users").json()]
    listed = fapi.get(f"/v1/users/{owner.name}/commands").json()
    assert {"welcome", "fail"} <= {c["name"] for c in listed}
    one = fapi.get(f"/v1/users/{owner.name}/commands/welcome").json()
    assert one["owner"] == owner.name and one["template"] == "host"
    dup = fapi.post(f"/v1/users/{owner.name}/commands", json={"name": "welcome", "command": "x"})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"
    bad = fapi.post(f"/v1/users/{owner.name}/commands", json={"name": "a:b", "command": "x"})
    assert bad.status_code == 422
    assert fapi.post("/v1/users", json={"name": "crl_x"}).status_code == 422
    assert fapi.get("/v1/users/nobody-here").status_code == 404
    made = fapi.post(f"/v1/users/{owner.name}/tokens").json()
    grant = fapi.post(
        f"/v1/users/{owner.name}/commands/echo/access", json={"token": made["secret"]}
    )
    assert grant.status_code == 201 and grant.json()["token_id"] == made["id"]
    access = fapi.get(f"/v1/users/{owner.name}/commands/echo/access").json()
    assert made["id"] in [a["token_id"] for a in access]
    assert (
        fapi.delete(f"/v1/users/{owner.name}/commands/echo/access/{made['id']}").status_code == 204
    )
    assert fapi.delete(f"/v1/users/{owner.name}/tokens/{made['id']}").status_code == 204


def test_cli(faces_server: FacesServer, tmp_path: Path) -> None:
    _, public = keypair(tmp_path, "cli")
    env = {**os.environ, "CORRAL_URL": faces_server.url, "CORRAL_TOKEN": faces_server.admin_key}
    name = "cli-" + uuid.uuid4().hex[:6]

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral.cli.main", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    assert corral("user", "create", name, "--key", public).returncode == 0
    assert name in corral("user", "ls").stdout
    made = corral("user", "command", "create", name, "hello", "--", "echo hello from cli")
    assert made.returncode == 0, made.stderr
    assert "hello" in corral("user", "command", "ls", name).stdout
    shown = corral("user", "command", "show", name, "hello", "--json")
    assert '"command": "echo hello from cli"' in shown.stdout
    missing = corral("user", "command", "show", name, "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr
    with httpx.Client() as client:
        ran = client.get(f"{faces_server.url}/run/{name}/hello", auth=(faces_server.admin_key, ""))
    assert ran.text == "hello from cli\n"
    assert corral("user", "command", "rm", name, "hello").returncode == 0
    assert "hello" not in corral("user", "command", "ls", name).stdout
    assert corral("user", "rm", name).returncode == 0
    assert name not in corral("user", "ls").stdout
