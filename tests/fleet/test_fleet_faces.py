"""Every face, code runs and the SSH front, through either of two replicas, for sandboxes on
each of three agents: what one replica starts, the other reads, streams and ends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pexpect
import pytest
import websockets
from e2b import Sandbox

from corral.core.coderun import find_deno
from tests.conftest import free_port
from tests.engines import PostgresCluster
from tests.faces.conftest import SSH_OPTIONS, keypair, ssh
from tests.fleet.fleet import Fleet

pytestmark = pytest.mark.sandbox

NODES = ["n1", "n2", "n3"]


class FacesFleet(Fleet):
    ssh_ports: list[int]


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[FacesFleet]:
    ports = [free_port(), free_port()]
    running = FacesFleet(postgres, env=lambda i: {"CORRAL_SSH_PORT": str(ports[i])})
    running.ssh_ports = ports
    running.start()
    yield running
    running.stop()


@contextlib.contextmanager
def only(fleet: Fleet, node: str) -> Iterator[None]:
    """New sandboxes go to `node` alone (the others drain), so that a face's own create, which
    names no node, lands there."""
    others = [n for n in NODES if n != node]
    with fleet.client(0) as api:
        for other in others:
            assert api.post(f"/v1/nodes/{other}/drain").status_code == 200
        try:
            yield
        finally:
            for other in others:
                api.post(f"/v1/nodes/{other}/undrain")


def node_of(api: httpx.Client, sandbox_id: str) -> str:
    resp = api.get(f"/v1/sandboxes/{sandbox_id}")
    assert resp.status_code == 200, resp.text
    return str(resp.json()["node_id"])


def native_sandbox(api: httpx.Client, node: str, **spec: object) -> str:
    resp = api.post("/v1/sandboxes", json={"node": node, **spec})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ws_url(fleet: Fleet, i: int, path: str) -> str:
    return fleet.replicas[i % 2].url.replace("http://", "ws://") + path


# --- Runta --------------------------------------------------------------------------------------


async def _runta_stream(url: str, token: str, frames: list[dict], delay: float = 0.0) -> list[dict]:
    got: list[dict] = []
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        for frame in frames:
            await ws.send(json.dumps(frame))
            await asyncio.sleep(delay)
        async for message in ws:
            got.append(json.loads(message))
        assert ws.close_code == 1000
    return got


@pytest.mark.parametrize("node", NODES)
def test_runta(fleet: Fleet, node: str) -> None:
    a, b = fleet.client(0), fleet.client(1)
    with a, b:
        with only(fleet, node):
            name = "rt-" + uuid.uuid4().hex[:8]
            created = a.post("/v1/runtimes", json={"name": name})
            assert created.status_code == 201, created.text
            rid = created.json()["data"]["id"]
        assert node_of(b, rid) == node
        assert b.get(f"/v1/runtimes/{name}").json()["data"]["id"] == rid
        ran = b.post(
            f"/v1/runtimes/{name}/exec",
            json={"command": "sh", "args": ["-c", "read x; echo got $x; echo e >&2; exit 4"],
                  "stdin": "hi\n"},
        )  # fmt: skip
        assert ran.status_code == 200, ran.text
        data = ran.json()["data"]
        assert (data["stdout"], data["stderr"], data["exit_code"]) == ("got hi\n", "e\n", 4)
        # A file written through one replica is read through the other, byte for byte.
        body = bytes(range(256)) * 64
        put = a.put(f"/v1/runtimes/{rid}/files", params={"path": "/workspace/d/f.bin"},
                    content=body)  # fmt: skip
        assert put.status_code in (200, 201, 204), put.text
        got = b.get(f"/v1/runtimes/{rid}/files", params={"path": "/workspace/d/f.bin"})
        assert got.status_code == 200 and got.content == body
        # The streaming exec, through each replica.
        for i in (0, 1):
            frames = [
                {"type": "start", "command": "sh",
                 "args": ["-c", "read x; echo got $x; echo e >&2; cat; exit 5"]},
                {"type": "stdin", "data_base64": base64.b64encode(b"hello\n").decode()},
                {"type": "stdin", "data_base64": base64.b64encode(b"rest").decode()},
                {"type": "close_stdin"},
            ]  # fmt: skip
            url = ws_url(fleet, i, f"/v2/runtimes/{rid}/exec/stream")
            frames_got = asyncio.run(_runta_stream(url, fleet.replicas[0].admin_key, frames))
            out = b"".join(
                base64.b64decode(f["data_base64"]) for f in frames_got if f["type"] == "stdout"
            )
            err = b"".join(
                base64.b64decode(f["data_base64"]) for f in frames_got if f["type"] == "stderr"
            )
            assert (out, err) == (b"got hello\nrest", b"e\n"), frames_got
            assert frames_got[-1] == {"type": "exit", "code": 5}
        # On a terminal, resized through the stream.
        frames = [
            {"type": "start", "command": "sh", "args": ["-c", "stty size; read x; stty size"],
             "tty": True, "rows": 30, "cols": 100},
            {"type": "resize", "rows": 40, "cols": 120},
            {"type": "stdin", "data_base64": base64.b64encode(b"go\n").decode()},
        ]  # fmt: skip
        url = ws_url(fleet, 1, f"/v2/runtimes/{rid}/exec/stream")
        frames_got = asyncio.run(_runta_stream(url, fleet.replicas[0].admin_key, frames, 0.3))
        out = b"".join(
            base64.b64decode(f["data_base64"]) for f in frames_got if f["type"] == "stdout"
        )
        assert out.replace(b"\r", b"").split(b"\n") == [b"30 100", b"go", b"40 120", b""]
        assert frames_got[-1] == {"type": "exit", "code": 0}
        deleted = b.delete(f"/v1/runtimes/{rid}")
        assert deleted.status_code == 200 and deleted.json()["data"]["status"] == "deleted"
        assert a.get(f"/v1/runtimes/{name}").status_code == 404


# --- run-dat-sheesh -----------------------------------------------------------------------------


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("node", NODES)
def test_rundatsheesh(fleet: Fleet, node: str) -> None:
    a, b = fleet.client(1), fleet.client(0)  # replica B first this time
    key = {"X-API-Key": fleet.replicas[0].admin_key}
    with a, b:
        with only(fleet, node):
            created = a.post("/v1/vms", json={"cpu": 1, "memMb": 256}, headers=key)
            assert created.status_code == 201, created.text
            vm = created.json()["id"]
            assert created.json()["state"] == "RUNNING"
        assert node_of(b, vm) == node
        assert b.get(f"/v1/vms/{vm}", headers=key).json()["state"] == "RUNNING"
        ran = b.post(f"/v1/vms/{vm}/exec", json={"cmd": "pwd; echo $X; exit 2", "env": {"X": "y"}},
                     headers=key)  # fmt: skip
        assert ran.json() == {"exitCode": 2, "stdout": "/workspace\ny\n", "stderr": ""}
        files = {"hello.txt": b"hello run-dat-sheesh\n", "sub/data.bin": bytes(range(256)) * 8}
        up = a.post(
            f"/v1/vms/{vm}/files/upload",
            params={"dest": "/workspace/project"},
            content=_tar_gz(files),
            headers={**key, "content-type": "application/gzip"},
        )
        assert up.status_code == 204, up.text
        down = b.get(f"/v1/vms/{vm}/files/download", params={"path": "/workspace/project"},
                     headers=key)  # fmt: skip
        assert down.status_code == 200 and down.headers["content-type"] == "application/gzip"
        with tarfile.open(fileobj=io.BytesIO(down.content)) as archive:
            got = {
                m.name.removeprefix("./"): archive.extractfile(m).read()  # type: ignore[union-attr]
                for m in archive.getmembers()
                if m.isfile()
            }
        assert got == files
        if find_deno() is not None:
            for api in (a, b):
                ts = api.post(
                    f"/v1/vms/{vm}/run-ts",
                    json={"code": "result.set({ answer: 6 * 7 }); console.log('done')"},
                    headers=key,
                )
                assert ts.status_code == 200, ts.text
                assert ts.json()["exitCode"] == 0 and ts.json()["stdout"] == "done\n", ts.text
                assert ts.json()["result"] == {"answer": 42}
        logs = a.get(f"/v1/vms/{vm}/exec-logs", headers=key).json()
        assert logs[-1]["cmd"] == "pwd; echo $X; exit 2" and logs[-1]["exitCode"] == 2
        deleted = b.delete(f"/v1/vms/{vm}", headers=key)
        assert deleted.status_code == 204 and deleted.content == b""


# --- Vercel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", NODES)
def test_vercel(fleet: Fleet, node: str) -> None:
    a, b = fleet.client(0), fleet.client(1)
    with a, b:
        with only(fleet, node):
            created = a.post("/v2/sandboxes", json={"resources": {"vcpus": 1}, "runtime": "node22"})
            assert created.status_code == 200, created.text
            session = created.json()["session"]["id"]
        assert node_of(a, session) == node
        waited = b.post(
            f"/v2/sandboxes/sessions/{session}/cmd",
            json={"command": "sh", "args": ["-c", "echo out; echo err >&2; exit 3"],
                  "wait": True, "logs": True},
        )  # fmt: skip
        lines = ndjson(waited.text)
        assert lines[0]["command"]["exitCode"] is None and lines[-1]["command"]["exitCode"] == 3
        logs = lines[1:-1]
        assert "".join(x["data"] for x in logs if x["stream"] == "stdout") == "out\n"
        assert "".join(x["data"] for x in logs if x["stream"] == "stderr") == "err\n"
        # Started through one replica, its logs followed live and awaited through the other.
        started = a.post(
            f"/v2/sandboxes/sessions/{session}/cmd",
            json={"command": "sh", "args": ["-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"]},
        )
        cid = started.json()["command"]["id"]
        live = b.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}/logs")
        assert live.headers["content-type"].startswith("application/x-ndjson")
        assert [x["data"] for x in ndjson(live.text)] == ["1\n", "2\n", "3\n"]
        done = a.get(f"/v2/sandboxes/sessions/{session}/cmd/{cid}", params={"wait": "true"})
        assert done.json()["command"]["exitCode"] == 0
        # Killed through one replica while another waits on it.
        sleep = {"command": "sleep", "args": ["30"]}
        slow = b.post(f"/v2/sandboxes/sessions/{session}/cmd", json=sleep).json()["command"]["id"]
        killed = a.post(f"/v2/sandboxes/sessions/{session}/cmd/{slow}/kill", json={"signal": 9})
        assert killed.status_code == 200, killed.text
        final = b.get(f"/v2/sandboxes/sessions/{session}/cmd/{slow}", params={"wait": "true"})
        assert final.json()["command"]["exitCode"] == 137
        stopped = b.post(f"/v2/sandboxes/{session}/stop")
        assert stopped.json()["sandbox"]["status"] == "stopped"
        assert a.delete(f"/v1/sandboxes/{session}").status_code == 200


# --- E2B ----------------------------------------------------------------------------------------


def e2b_options(fleet: Fleet, i: int) -> dict[str, str]:
    """The unmodified SDK's connection settings for replica `i`."""
    url = fleet.replicas[i % 2].url
    return {"api_url": url + "/e2b", "sandbox_url": url + "/e2b/envd",
            "api_key": fleet.replicas[0].admin_key}  # fmt: skip


def test_e2b(fleet: Fleet) -> None:
    """Made through one replica, its commands, files and timeout through the other: the access
    token, the pids and the streams hold across replicas."""
    node = "n2"
    with only(fleet, node):
        made = Sandbox.create(**e2b_options(fleet, 0))  # type: ignore[arg-type]
    try:
        with fleet.client(0) as api:
            assert node_of(api, made.sandbox_id) == node
        other = Sandbox.connect(made.sandbox_id, **e2b_options(fleet, 1))  # type: ignore[arg-type]
        ran = other.commands.run("echo out; echo err >&2")
        assert (ran.exit_code, ran.stdout, ran.stderr) == (0, "out\n", "err\n")
        seen: list[str] = []
        background = made.commands.run("for i in 1 2 3; do echo $i; sleep 0.2; done",
                                       background=True)  # fmt: skip
        again = other.commands.connect(background.pid)
        assert again.wait(on_stdout=seen.append).stdout == "1\n2\n3\n"
        assert background.wait().exit_code == 0 and "".join(seen) == "1\n2\n3\n"
        other.files.write("/workspace/both.txt", "through replica 1")
        assert made.files.read("/workspace/both.txt") == "through replica 1"
        assert [e.name for e in made.files.list("/workspace")] == ["both.txt"]
        other.set_timeout(120)
        assert made.get_info().end_at > made.get_info().started_at
    finally:
        made.kill()
    with fleet.client(1) as api:
        assert api.get(f"/v1/sandboxes/{made.sandbox_id}").json()["state"] == "deleted"


# --- CMDOP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", NODES)
def test_cmdop(fleet: Fleet, node: str) -> None:
    """CMDOP has no create: its machines are sandboxes made through the native API."""
    a, b = fleet.client(1), fleet.client(0)
    with a, b:
        machine = native_sandbox(b, node)
        assert a.get(f"/v1/machines/{machine}").json()["data"]["id"] == machine
        ran = a.post("/v1/commands", json={"machine_id": machine, "command": "echo hi; exit 4"})
        assert ran.status_code == 200, ran.text
        assert ran.json()["data"]["stdout"] == "hi\n" and ran.json()["data"]["exit_code"] == 4
        started = b.post(
            "/v1/commands/async",
            json={"machine_id": machine, "command": "sleep 0.3; echo Build successful"},
        )
        assert started.status_code == 202, started.text
        cid = started.json()["data"]["id"]
        for _ in range(100):
            got = a.get(f"/v1/commands/{cid}").json()["data"]
            if got["status"] != "running":
                break
            time.sleep(0.1)
        assert got["status"] == "completed" and got["stdout"] == "Build successful\n"
        slow = a.post("/v1/commands/async", json={"machine_id": machine, "command": "sleep 60"})
        cancelled = b.delete(f"/v1/commands/{slow.json()['data']['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["data"]["cancelled"] is True
        after = a.get(f"/v1/commands/{slow.json()['data']['id']}").json()["data"]
        assert after["status"] == "cancelled"
        history = b.get(f"/v1/machines/{machine}/commands").json()
        assert [c["id"] for c in history["data"]][1] == cid and history["meta"]["total"] == 3
        assert a.delete(f"/v1/sandboxes/{machine}").status_code == 200


# --- code runs ----------------------------------------------------------------------------------

RUNS = {
    "python": ("import sys\nprint('py', sys.argv[1:])\nresult.set({'n': 6 * 7})", "py ['x']\n"),
    "bash": ('echo "sh $1"\nresult.set \'{"n": 42}\'', "sh x\n"),
    "typescript": ("const n: number = 6 * 7; console.log('ts', Deno.args[0]); result.set({ n });",
                   "ts x\n"),
    "javascript": ("console.log('js', Deno.args[0]); result.set({ n: 42 });", "js x\n"),
}  # fmt: skip


@pytest.mark.parametrize("node", NODES)
def test_code_runs(fleet: Fleet, node: str) -> None:
    languages = [lang for lang in RUNS if find_deno() is not None or lang in ("python", "bash")]
    with fleet.client(0) as a, fleet.client(1) as b:
        sid = native_sandbox(a, node)
        for i, language in enumerate(languages * 2):  # each language through both replicas
            api = (a, b)[i % 2]
            code, stdout = RUNS[language]
            resp = api.post(
                f"/v1/sandboxes/{sid}/run", json={"language": language, "code": code, "args": ["x"]}
            )
            assert resp.status_code == 200, (language, resp.text)
            out = resp.json()
            assert out["status"] == "completed" and out["exit_code"] == 0, (language, out)
            assert out["stdout"] == stdout and out["result"] == {"n": 42}, (language, out)
            # A run is a command: in the history, seen through the other replica.
            other = (b, a)[i % 2]
            seen = other.get(f"/v1/sandboxes/{sid}/commands/{out['command_id']}")
            assert seen.status_code == 200 and seen.json()["status"] == "completed"
        assert b.delete(f"/v1/sandboxes/{sid}").status_code == 200


# --- cmd.io: the Run API and the SSH front --------------------------------------------------------


@dataclass
class Owner:
    name: str
    key: Path
    token: str


@pytest.fixture(scope="module")
def owner(fleet: FacesFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    key, public = keypair(tmp_path_factory.mktemp("keys"))
    name = "fleet-" + uuid.uuid4().hex[:6]
    with fleet.client(0) as api:
        made = api.post("/v1/users", json={"name": name, "ssh_public_keys": [public]})
        assert made.status_code == 201, made.text
        commands = {
            "slow": "for i in 1 2 3; do echo tick $i; sleep 0.2; done",
            "fail": "echo out; echo err >&2; exit 3",
            "upper": "tr a-z A-Z",
            "term": "test -t 0 && echo on a terminal; stty size; read line; echo you said $line",
        }
        for command, line in commands.items():
            resp = api.post(f"/v1/users/{name}/commands", json={"name": command, "command": line})
            assert resp.status_code == 201, resp.text
    # The token made over SSH through replica A is granted access through replica B.
    made_token = ssh(fleet.ssh_ports[0], name, "cmd-tokens", "new", key=key)
    assert made_token.returncode == 0, made_token.stderr
    token = made_token.stdout.split(": ", 1)[1].strip()
    for command in commands:
        granted = ssh(fleet.ssh_ports[1], name, f"{command}:access", "add", token, key=key)
        assert granted.returncode == 0 and granted.stdout == "Access granted.\n", granted.stderr
    yield Owner(name, key, token)
    with fleet.client(0) as api:
        api.delete(f"/v1/users/{name}")


def run_sandbox_nodes(api: httpx.Client, owner: Owner, command: str) -> list[str]:
    """The nodes of the fresh sandboxes the runs of a named command had, oldest first."""
    listed = api.get("/v1/sandboxes", params={"include_deleted": "true", "limit": 1000})
    runs = [
        s for s in listed.json()["items"]
        if s["labels"].get("cmdio.owner") == owner.name
        and s["labels"].get("cmdio.command") == command
    ]  # fmt: skip
    return [s["node_id"] for s in sorted(runs, key=lambda s: s["id"])]


async def _ws_frames(url: str) -> tuple[list[str], int | None]:
    got: list[str] = []
    async with websockets.connect(url) as ws:
        async for message in ws:
            got.append(str(message))
        return got, ws.close_code


@pytest.mark.parametrize("node", NODES)
def test_cmdio_runs(fleet: FacesFleet, owner: Owner, node: str) -> None:
    """Named commands run in a fresh sandbox placed on `node`, through either replica: buffered,
    streamed, over a WebSocket and over SSH."""
    with fleet.client(0) as admin:
        before = len(run_sandbox_nodes(admin, owner, "slow"))
    with only(fleet, node):
        for i in (0, 1):
            url = f"{fleet.replicas[i].url}/run/{owner.name}"
            failed = httpx.get(f"{url}/fail", auth=(owner.token, ""), timeout=60)
            assert failed.status_code == 200 and failed.text == "out\nerr\nexit status: 3\n"
            assert failed.headers["x-exit-code"] == "3"
            upper = httpx.post(f"{url}/upper", auth=(owner.token, ""), content=b"abc\n")
            assert upper.text == "ABC\n"
            with httpx.stream("GET", f"{url}/slow", params={"stream": "1",
                              "access_token": owner.token}, timeout=60) as resp:  # fmt: skip
                pieces = list(resp.iter_raw())
            assert b"".join(pieces) == b"tick 1\ntick 2\ntick 3\n" and len(pieces) >= 3
            frames, code = asyncio.run(
                _ws_frames(ws_url(fleet, i, f"/run/{owner.name}/slow?access_token={owner.token}"))
            )
            assert frames == ["tick 1\n", "tick 2\n", "tick 3\n"] and code == 1000
            over_ssh = ssh(fleet.ssh_ports[i], owner.token, "fail")
            assert over_ssh.returncode == 3, over_ssh.stderr
            assert (over_ssh.stdout, over_ssh.stderr) == ("out\n", "err\n")
            piped = ssh(fleet.ssh_ports[i], owner.name, "upper", key=owner.key, stdin="shout\n")
            assert piped.returncode == 0 and piped.stdout == "SHOUT\n", piped.stderr
    with fleet.client(1) as admin:
        placed = run_sandbox_nodes(admin, owner, "slow")[before:]
        assert placed == [node] * 4  # two streamed runs and two WebSocket runs, all on `node`


@pytest.mark.parametrize("node", NODES)
def test_cmdio_bound_sandbox_and_terminal_over_ssh(
    fleet: FacesFleet, owner: Owner, node: str
) -> None:
    """A named command bound to a sandbox on `node` runs there through the SSH front of each
    replica, keeping its files between runs; and an interactive session on a terminal."""
    with fleet.client(0) as api:
        name = "bound-" + uuid.uuid4().hex[:6]
        sid = native_sandbox(api, node, name=name)
        line = "echo run >> trail; wc -l < trail"
        made = api.post(f"/v1/users/{owner.name}/commands",
                        json={"name": name, "command": line, "sandbox": name})  # fmt: skip
        assert made.status_code == 201, made.text
        term = "test -t 0 && echo on a terminal; stty size; read line; echo you said $line"
        made = api.post(f"/v1/users/{owner.name}/commands",
                        json={"name": f"{name}-t", "command": term, "sandbox": name})  # fmt: skip
        assert made.status_code == 201, made.text
        try:
            for i in (0, 1, 0):
                done = ssh(fleet.ssh_ports[i], owner.name, name, key=owner.key)
                assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "3"
            # Interactive, on a terminal of the client's size, through each replica.
            for port in fleet.ssh_ports:
                child = pexpect.spawn(
                    "ssh",
                    [*SSH_OPTIONS, "-i", str(owner.key), "-p", str(port), "-tt",
                     f"{owner.name}@127.0.0.1", f"{name}-t"],
                    dimensions=(30, 100), timeout=15, encoding="utf-8",
                )  # fmt: skip
                child.expect("on a terminal")
                child.expect("30 100")
                child.sendline("hello there")
                child.expect("you said hello there")
                child.expect(pexpect.EOF)
                child.close()
                assert child.exitstatus == 0
            history = api.get(f"/v1/sandboxes/{sid}/commands").json()["items"]
            assert len(history) == 5 and all(c["exit_code"] == 0 for c in history)
        finally:
            api.delete(f"/v1/users/{owner.name}/commands/{name}")
            api.delete(f"/v1/users/{owner.name}/commands/{name}-t")
            api.delete(f"/v1/sandboxes/{sid}")
