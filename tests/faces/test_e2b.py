"""The E2B face, driven by the unmodified `e2b` Python SDK (pinned) with E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY pointed at Corral: sandboxes, commands, files, timeouts,
pause and resume; and bad input in the face's own shapes, with plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

from tests.conftest import Server, make_data_dir
from tests.faces.conftest import FacesServer, new_token

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def e2b_env(faces_server: FacesServer) -> Iterator[FacesServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("E2B_API_URL", faces_server.url + "/e2b")
        patch.setenv("E2B_SANDBOX_URL", faces_server.url + "/e2b/envd")
        patch.setenv("E2B_API_KEY", faces_server.admin_key)
        patch.delenv("E2B_DOMAIN", raising=False)
        patch.delenv("E2B_DEBUG", raising=False)
        yield faces_server


@pytest.fixture(scope="module")
def sbx(e2b_env: FacesServer) -> Iterator[Sandbox]:
    """One sandbox for the module's tests that leave it running."""
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def envd_headers(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "X-Access-Token": sandbox._envd_access_token or "",
        **extra,
    }


def enveloped(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(data)) + data


def envelopes(body: bytes) -> list[tuple[int, dict]]:
    out = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        out.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return out


# --- sandboxes ---------------------------------------------------------------------------------


def test_create_answers_what_the_sdk_models_require(e2b_env: FacesServer, sbx: Sandbox) -> None:
    resp = httpx.post(
        e2b_env.url + "/e2b/v2/sandboxes",
        json={"templateID": "base", "timeout": 60, "metadata": {"k": "v"}},
        headers={"X-API-KEY": e2b_env.admin_key},
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert {"templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"} <= set(body)
    assert body["templateID"] == "base" and body["envdAccessToken"]
    Sandbox.kill(body["sandboxID"])

    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.state is SandboxState.RUNNING
    assert info.envd_version == "0.5.7"
    assert info.end_at > info.started_at
    assert sbx.is_running()


def test_commands_foreground_as_user_and_root(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo out; echo err >&2; id -u; pwd")
    assert result.exit_code == 0
    assert result.stdout == "out\n1000\n/workspace\n"
    assert result.stderr == "err\n"
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    assert sbx.commands.run("echo $GREETING", envs={"GREETING": "hi"}).stdout == "hi\n"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"


def test_background_command_wait_and_on_stdout(sbx: Sandbox) -> None:
    seen: list[str] = []
    handle = sbx.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 0.05; done",
        background=True,
        on_stdout=seen.append,
    )
    assert handle.pid >= 1
    result = handle.wait(on_stdout=seen.append)
    assert result.exit_code == 0
    assert result.stdout == "line1\nline2\nline3\n"
    assert "".join(seen) == "line1\nline2\nline3\n"


def test_stdin_kill_list_and_connect(sbx: Sandbox) -> None:
    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "typed\n")
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "typed\n"

    sleeper = sbx.commands.run("echo started; sleep 60", background=True)
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    # A second client re-attaches by pid and sees the output from the start.
    again = sbx.commands.connect(sleeper.pid)
    assert again.pid == sleeper.pid
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as killed:
        sleeper.wait()
    assert killed.value.exit_code == -1  # envd's code for "killed by a signal"
    assert killed.value.stdout == "started\n"
    with pytest.raises(CommandExitException) as replayed:
        again.wait()
    assert replayed.value.stdout == "started\n"
    assert sleeper.pid not in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(sleeper.pid) is False  # no longer running


def test_a_stream_deadline_does_not_end_the_command(sbx: Sandbox) -> None:
    """The SDK's `timeout` ends its stream; the command runs on and can be re-attached."""
    handle = sbx.commands.run("sleep 1; echo late", background=True, timeout=0.3)
    with pytest.raises(TimeoutException):
        handle.wait()
    assert sbx.commands.connect(handle.pid).wait().stdout == "late\n"


def test_pty(sbx: Sandbox) -> None:
    """A terminal: started with a size, resized (Update), fed through a client stream
    (StreamInput) and by SendInput; its output comes as pty data."""
    seen = bytearray()
    term = sbx.pty.create(PtySize(rows=30, cols=100))
    sbx.pty.resize(term.pid, PtySize(rows=40, cols=120))
    sbx.pty.stream_input(term.pid, [b"stty size\n"])
    sbx.pty.send_stdin(term.pid, b"exit\n")
    term.wait(on_pty=seen.extend)
    assert b"40 120\r\n" in seen, bytes(seen)

    done = sbx.commands.run("echo finished", background=True)
    done.wait()
    assert sbx.commands.connect(done.pid).wait().stdout == "finished\n"  # a finished one too


def test_the_async_sdk(sbx: Sandbox) -> None:
    async def main() -> tuple[str, str]:
        same = await AsyncSandbox.connect(sbx.sandbox_id)
        result = await same.commands.run("echo async")
        await same.files.write("async.txt", "written")
        return result.stdout, await same.files.read("async.txt")

    assert asyncio.run(main()) == ("async\n", "written")


def test_files(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/a.txt", "hello")
    assert info.path == "/workspace/notes/a.txt"
    assert sbx.files.read("notes/a.txt") == "hello"
    sbx.files.write("/workspace/notes/b.bin", b"\x00\xffbytes")
    assert bytes(sbx.files.read("/workspace/notes/b.bin", format="bytes")) == b"\x00\xffbytes"
    assert sbx.files.make_dir("notes/sub/deeper") is True
    assert sbx.files.make_dir("notes/sub/deeper") is False  # already there
    listed = {e.name: e for e in sbx.files.list("notes")}
    assert set(listed) == {"a.txt", "b.bin", "sub"}
    assert listed["a.txt"].size == 5 and listed["sub"].type.value == "dir"
    assert {e.name for e in sbx.files.list("notes", depth=3)} >= {"sub", "deeper"}
    moved = sbx.files.rename("notes/a.txt", "notes/sub/c.txt")
    assert moved.path == "/workspace/notes/sub/c.txt"
    assert not sbx.files.exists("notes/a.txt")
    assert sbx.commands.run("cat notes/sub/c.txt").stdout == "hello"
    sbx.files.remove("notes")
    assert not sbx.files.exists("notes")
    with pytest.raises(FileNotFoundException):
        sbx.files.read("notes/sub/c.txt")


def poll_events(handle: object, wanted: set[tuple[str, str]]) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 10
    while not wanted <= seen and time.monotonic() < deadline:
        seen |= {(e.name, e.type.value) for e in handle.get_new_events()}  # type: ignore[attr-defined]
        time.sleep(0.05)
    return seen


def test_watch_dir(sbx: Sandbox) -> None:
    sbx.files.make_dir("watched/sub")
    handle = sbx.files.watch_dir("watched", recursive=True)
    sbx.files.write("watched/new.txt", "x")
    sbx.commands.run("echo more >> watched/new.txt; touch watched/sub/deep; rm watched/new.txt")
    wanted = {("new.txt", "create"), ("new.txt", "write"), ("sub/deep", "create"),
              ("new.txt", "remove")}  # fmt: skip
    assert wanted <= poll_events(handle, wanted)
    handle.stop()

    async def stream() -> list[tuple[str, str]]:
        same = await AsyncSandbox.connect(sbx.sandbox_id)
        seen: list[tuple[str, str]] = []
        got = asyncio.Event()

        def on_event(event: object) -> None:
            seen.append((event.name, event.type.value))  # type: ignore[attr-defined]
            # The write's temporary file has events of its own first, which may come apart
            # from the one awaited here.
            if seen[-1] == ("streamed.txt", "create"):
                got.set()

        watch = await same.files.watch_dir("watched", on_event=on_event)
        await same.files.write("watched/streamed.txt", "y")
        with contextlib.suppress(TimeoutError):  # the assertion shows what came instead
            await asyncio.wait_for(got.wait(), 10)
        await watch.stop()
        return seen

    assert ("streamed.txt", "create") in asyncio.run(stream())
    with pytest.raises(SandboxException):
        sbx.files.watch_dir("no/such/dir")
    sbx.files.remove("watched")


def test_timeout_list_and_connect(e2b_env: FacesServer, sbx: Sandbox) -> None:
    sbx.set_timeout(900)
    left = (sbx.get_info().end_at - datetime.now(UTC)).total_seconds()
    assert 880 < left <= 900
    running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in running]
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sbx.sandbox_id not in [s.sandbox_id for s in paused]
    later = Sandbox.list(query=SandboxQuery(started_after=datetime.now(UTC) + timedelta(hours=1)))
    assert later.next_items() == []
    same = Sandbox.connect(sbx.sandbox_id)
    assert same.commands.run("echo connected").stdout == "connected\n"
    # Pages of at most 2, chained by the X-Next-Token header, cover every sandbox once.
    pages = Sandbox.list(limit=2)
    seen: list[str] = []
    while pages.has_next:
        page = pages.next_items()
        assert len(page) <= 2
        seen += [s.sandbox_id for s in page]
    assert sbx.sandbox_id in seen and len(seen) == len(set(seen))


def test_pause_resume_kill_with_a_scoped_token(e2b_env: FacesServer) -> None:
    token = new_token(e2b_env, scopes=["read", "exec", "files", "sandboxes"])
    meta = {"suite": "e2b pause & resume"}
    sandbox = Sandbox.create(api_key=token, timeout=120, metadata=meta)
    tagged = Sandbox.list(query=SandboxQuery(metadata=meta, template="base"), api_key=token)
    assert [s.sandbox_id for s in tagged.next_items()] == [sandbox.sandbox_id]
    assert sandbox.get_info().metadata == meta
    sandbox.files.write("kept.txt", "still here")
    sandbox.pause()
    assert sandbox.get_info().state is SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]), api_key=token)
    assert sandbox.sandbox_id in [s.sandbox_id for s in paused.next_items()]
    resumed = Sandbox.connect(sandbox.sandbox_id, api_key=token)
    assert resumed.get_info().state is SandboxState.RUNNING
    assert resumed.files.read("kept.txt") == "still here"
    sandbox.kill()
    assert not sandbox.is_running()
    assert Sandbox.kill(sandbox.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id)

    # A token that may only read cannot create.
    reader = new_token(e2b_env, scopes=["read"])
    with pytest.raises(SandboxException):
        Sandbox.create(api_key=reader)


# --- bad input ---------------------------------------------------------------------------------


def test_control_errors_in_e2b_shape(e2b_env: FacesServer) -> None:
    url = e2b_env.url + "/e2b"
    key = {"X-API-KEY": e2b_env.admin_key}
    bad = {"X-API-KEY": "wrong"}
    cases = [
        (httpx.post(url + "/v2/sandboxes", json={"templateID": "base"}), 401),
        (httpx.post(url + "/v2/sandboxes", json={"templateID": "b"}, headers=bad), 401),
        (httpx.post(url + "/v2/sandboxes", content=b"{not json", headers=key), 400),
        (httpx.post(url + "/v2/sandboxes", json={"timeout": 5}, headers=key), 400),
        (httpx.post(url + "/v2/sandboxes", json={"templateID": "nope"}, headers=key), 404),
        (httpx.get(url + "/sandboxes/sb_missing", headers=key), 404),
        (httpx.delete(url + "/sandboxes/sb_missing", headers=key), 404),
        (httpx.post(url + "/sandboxes/sb_missing/timeout", json={"timeout": 5}, headers=key), 404),
        (httpx.get(url + "/v2/sandboxes?state=gone", headers=key), 400),
    ]
    for resp, status in cases:
        assert resp.status_code == status, (resp.request.url, resp.text)
        body = resp.json()
        assert set(body) == {"code", "message"} and body["code"] == status, body
    with pytest.raises(SandboxException, match="template 'nope' not found"):
        Sandbox.create(template="nope")


def test_envd_errors_in_connect_shape(e2b_env: FacesServer, sbx: Sandbox) -> None:
    envd = e2b_env.url + "/e2b/envd"
    stat = envd + "/filesystem.Filesystem/Stat"
    wrong = envd_headers(sbx) | {"X-Access-Token": "e2b_envd_wrong"}
    resp = httpx.post(stat, json={"path": "/"}, headers=wrong)
    assert resp.status_code == 401 and resp.json()["code"] == "unauthenticated", resp.text
    resp = httpx.get(envd + "/files", params={"path": "/etc/hostname"}, headers=wrong)
    assert resp.status_code == 401 and resp.json()["code"] == 401, resp.text
    resp = httpx.post(stat, content=b"{not json", headers=envd_headers(sbx))
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_argument", resp.text
    resp = httpx.post(
        stat, content=b"{}", headers=envd_headers(sbx, **{"Content-Type": "text/csv"})
    )
    assert resp.status_code == 415 and resp.json()["code"] == "unimplemented", resp.text
    resp = httpx.post(envd + "/process.Process/Nope", json={}, headers=envd_headers(sbx))
    assert resp.status_code == 404 and resp.json()["code"] == "not_found", resp.text
    resp = httpx.post(stat, json={"path": "/no/such"}, headers=envd_headers(sbx))
    assert resp.status_code == 404 and resp.json()["code"] == "not_found", resp.text
    # A server stream's error comes in its end-of-stream message.
    resp = httpx.post(
        envd + "/process.Process/Connect",
        content=enveloped({"process": {"pid": 99999}}),
        headers=envd_headers(sbx, **{"Content-Type": "application/connect+json"}),
    )
    assert resp.status_code == 200
    assert envelopes(resp.content) == [
        (2, {"error": {"code": "not_found", "message": "process with pid 99999 not found"}})
    ]
    root = base64.b64encode(b"nobody:").decode()
    resp = httpx.post(
        stat, json={"path": "/"}, headers=envd_headers(sbx, Authorization=f"Basic {root}")
    )
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_argument", resp.text


def test_envd_of_a_killed_sandbox(e2b_env: FacesServer) -> None:
    sandbox = Sandbox.create()
    headers = envd_headers(sandbox)
    sandbox.kill()
    envd = e2b_env.url + "/e2b/envd"
    resp = httpx.post(envd + "/filesystem.Filesystem/Stat", json={"path": "/"}, headers=headers)
    assert resp.status_code == 404 and resp.json()["code"] == "not_found", resp.text
    resp = httpx.get(envd + "/health", headers=headers)
    assert resp.status_code == 502 and "was not found" in resp.json()["message"]
    with pytest.raises(SandboxException):
        sandbox.commands.run("true")


def test_stream_input_and_keepalive(e2b_env: FacesServer, sbx: Sandbox) -> None:
    """StreamInput (a client stream) feeds stdin; a quiet command's stream sends keepalives at
    the interval the client asks for."""
    envd = e2b_env.url + "/e2b/envd/process.Process"
    stream = {"Content-Type": "application/connect+json"}
    start = enveloped(
        {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 1.2; cat"]}, "stdin": True}
    )
    events: list[tuple[int, dict]] = []

    def run() -> None:
        headers = envd_headers(sbx, **stream, **{"Keepalive-Ping-Interval": "1"})
        events.extend(envelopes(httpx.post(envd + "/Start", content=start, headers=headers,
                                           timeout=30).content))  # fmt: skip

    reader = threading.Thread(target=run)
    reader.start()
    deadline = time.monotonic() + 10
    script = ["-c", "sleep 1.2; cat"]
    while not (running := [p.pid for p in sbx.commands.list() if p.args == script]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = running[0]
    body = b"".join([
        enveloped({"start": {"process": {"pid": pid}}}),
        enveloped({"data": {"input": {"stdin": base64.b64encode(b"streamed").decode()}}}),
    ])  # fmt: skip
    resp = httpx.post(envd + "/StreamInput", content=body, headers=envd_headers(sbx, **stream))
    assert resp.status_code == 200 and envelopes(resp.content) == [(0, {}), (2, {})], resp.content
    sbx.commands.close_stdin(pid)
    reader.join(30)
    kinds = [next(iter(e["event"])) for flags, e in events if flags == 0]
    assert kinds[0] == "start" and kinds[-1] == "end" and "keepalive" in kinds, kinds
    out = b"".join(base64.b64decode(e["event"]["data"]["stdout"]) for f, e in events
                   if f == 0 and "data" in e["event"])  # fmt: skip
    assert out == b"streamed"
    assert events[-1] == (2, {})


# --- E2B's host names under the server's public domain -----------------------------------------

DOMAIN = "e2b.test"


@pytest.fixture(scope="module")
def domain_server() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-e2b-domain-")
    srv = Server(data_dir, env={"CORRAL_PUBLIC_DOMAIN": DOMAIN})
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_api_and_envd_host_names(domain_server: Server) -> None:
    """What an SDK given only E2B_DOMAIN calls: https://api.<domain> and
    https://49983-<id>.<domain>, here as their Host headers over plain HTTP."""
    key = {"X-API-KEY": domain_server.admin_key}
    with httpx.Client(base_url=domain_server.url, timeout=30) as http:
        made = http.post("/sandboxes", json={"templateID": "base"},
                         headers=key | {"Host": f"api.{DOMAIN}"})  # fmt: skip
        assert made.status_code == 201, made.text
        sandbox_id, access = made.json()["sandboxID"], made.json()["envdAccessToken"]
        try:
            for label in (sandbox_id, sandbox_id.replace("_", "-", 1)):
                envd = {"Host": f"49983-{label}.{DOMAIN}", "X-Access-Token": access}
                stat = http.post("/filesystem.Filesystem/Stat", json={"path": "/workspace"},
                                 headers=envd)  # fmt: skip
                assert stat.status_code == 200, stat.text
                assert stat.json()["entry"]["path"] == "/workspace"
            # The host names the sandbox: a header naming another does not move the call.
            spoofed = envd | {"E2b-Sandbox-Id": "sb_someone_else"}
            stat = http.post("/filesystem.Filesystem/Stat", json={"path": "/"}, headers=spoofed)
            assert stat.status_code == 200, stat.text
            wrong = envd | {"X-Access-Token": "e2b_envd_wrong"}
            refused = http.post("/filesystem.Filesystem/Stat", json={"path": "/"}, headers=wrong)
            assert refused.status_code == 401, refused.text
            # Another port of the sandbox is the port proxy's: not exposed, so 404.
            other = http.get("/", headers={"Host": f"8000-{sandbox_id}.{DOMAIN}"} | key)
            assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        finally:
            api_host = key | {"Host": f"api.{DOMAIN}"}
            killed = http.delete(f"/sandboxes/{sandbox_id}", headers=api_host)
            assert killed.status_code == 204, killed.text
