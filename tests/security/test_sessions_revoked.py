"""Sessions end with their token: once a token is revoked (here, on another replica through the
shared store) or expires, every long-lived session it opened ends within 2 s with the reason:
exec and attach WebSockets, terminals, ND-JSON, SSE and raw log streams, the Runta and cmd.io
WebSocket streams, and SSH sessions."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import Server, free_port, make_data_dir
from tests.faces.conftest import SSH_OPTIONS
from tests.security import conftest as security_conftest

pytestmark = pytest.mark.sandbox

DEADLINE = 2.0  # seconds from the revocation (or the expiry) to the end of the session
REVOKED = "the token was revoked"
EXPIRED = "the token has expired"
TICKS = "for i in $(seq 1 300); do echo tick $i; sleep 0.1; done"  # output for 30 s


class SSHServer(Server):
    ssh_port: int


@pytest.fixture(scope="module")
def srv() -> Iterator[SSHServer]:
    data_dir = make_data_dir("corral-test-revoked-")
    ssh_port = free_port()
    server = SSHServer(data_dir, env={"CORRAL_SSH_PORT": str(ssh_port)})
    server.ssh_port = ssh_port
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def admin(srv: SSHServer) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def sid(admin: httpx.Client) -> Iterator[str]:
    resp = admin.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    yield resp.json()["id"]
    admin.delete(f"/v1/sandboxes/{resp.json()['id']}")


def new_token(admin: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = admin.post("/v1/tokens", json={"scopes": ["read", "exec"], **body})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def revoke(admin: httpx.Client, token: dict[str, Any]) -> float:
    """DELETE the token; the moment the request was sent (what is measured from it includes the
    request's own round trip)."""
    sent = time.monotonic()
    resp = admin.delete(f"/v1/tokens/{token['id']}")
    assert resp.status_code == 204, resp.text
    return sent


def revoke_elsewhere(srv: Server, token: dict[str, Any]) -> float:
    """Delete the token's row in the store, as another replica sharing it would: this server
    hears nothing of it but what the store tells."""
    with sqlite3.connect(srv.data_dir / "corral.db", timeout=10) as db:
        assert db.execute("DELETE FROM tokens WHERE id = ?", (token["id"],)).rowcount == 1
    return time.monotonic()  # committed


def connect(srv: Server, path: str, secret: str) -> ClientConnection:
    url = srv.url.replace("http://", "ws://") + path
    return ws_connect(url, additional_headers={"Authorization": f"Bearer {secret}"})


def note(session: str, took: float) -> None:
    """For the summary shown after the run: how long each kind of session outlived its token."""
    lines = security_conftest.SUMMARY.setdefault("sessions after their token ended", [])
    lines.append(f"{session}: ended {took:.2f} s after")


def until_closed(ws: ClientConnection, since: float, limit: float = 10) -> tuple[list[Any], float]:
    """Every frame until the server closes (JSON parsed when it is), and the seconds since
    `since` at which it closed."""
    frames: list[Any] = []
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            try:
                frames.append(json.loads(message))
            except ValueError:
                frames.append(message)
    except ConnectionClosed:
        return frames, time.monotonic() - since
    except TimeoutError:
        pass
    raise AssertionError(f"still open {limit} s after the token ended; frames: {frames[-3:]}")


def started_exec(ws: ClientConnection, **start: Any) -> dict[str, Any]:
    ws.send(json.dumps({"type": "start", **start}))
    while True:
        frame = json.loads(ws.recv(timeout=30))
        if frame["type"] == "started":
            return dict(frame)
        assert frame["type"] == "heartbeat", frame


def command(admin: httpx.Client, sid: str, cid: str) -> dict[str, Any]:
    return dict(admin.get(f"/v1/sandboxes/{sid}/commands/{cid}").json())


def cancel(admin: httpx.Client, sid: str, cid: str) -> None:
    admin.post(f"/v1/sandboxes/{sid}/commands/{cid}/cancel")


def assert_token_ended(ws: ClientConnection, frames: list[Any], reason: str) -> None:
    assert frames[-1] == {"type": "error", "code": "unauthenticated", "message": reason}
    assert ws.close_code == 4001 and ws.close_reason == reason


# --- native WebSockets --------------------------------------------------------------------------


def test_exec_websocket_ends_and_refuses_input(srv: Server, admin: httpx.Client, sid: str) -> None:
    token = new_token(admin)
    with connect(srv, f"/v1/sandboxes/{sid}/exec/stream", token["secret"]) as ws:
        started = started_exec(ws, command="sleep 30")
        frames, took = until_closed(ws, revoke(admin, token))
    assert took < DEADLINE, took
    note("exec WebSocket (revoked)", took)
    assert_token_ended(ws, frames, REVOKED)
    cid = started["command_id"]
    try:
        # Input is refused from then on, over any route; the command itself runs on (it was
        # not started with kill_on_disconnect), as when a client goes away.
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": token["secret"]}) as gone:
            stdin = gone.post(f"/v1/sandboxes/{sid}/commands/{cid}/stdin", content=b"x")
            signal = gone.post(f"/v1/sandboxes/{sid}/commands/{cid}/signal", json={"signal": 2})
        assert stdin.status_code == 401 and signal.status_code == 401
        assert command(admin, sid, cid)["status"] == "running"
    finally:
        cancel(admin, sid, cid)


def test_attach_websocket_ends(srv: Server, admin: httpx.Client, sid: str) -> None:
    resp = admin.post(f"/v1/sandboxes/{sid}/commands", json={"command": TICKS, "interactive": True})
    assert resp.status_code == 202, resp.text
    cid = resp.json()["id"]
    token = new_token(admin)
    try:
        with connect(srv, f"/v1/sandboxes/{sid}/commands/{cid}/attach", token["secret"]) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "stdout"
            frames, took = until_closed(ws, revoke(admin, token))
        assert took < DEADLINE, took
        note("attach WebSocket (revoked)", took)
        assert_token_ended(ws, frames, REVOKED)
    finally:
        cancel(admin, sid, cid)


def test_terminal_ends_and_its_shell_with_it(srv: Server, admin: httpx.Client, sid: str) -> None:
    """A terminal as `corral shell` opens it: a tty, and the shell killed when the session
    ends."""
    token = new_token(admin)
    with connect(srv, f"/v1/sandboxes/{sid}/exec/stream", token["secret"]) as ws:
        started = started_exec(ws, command="bash", tty=True, kill_on_disconnect=True)
        ws.send(json.dumps({"type": "stdin", "data": "echo ready-$((6*7))\n"}))
        seen = ""
        while "ready-42" not in seen:
            frame = json.loads(ws.recv(timeout=30))
            if frame["type"] == "stdout":
                seen += frame.get("data") or base64.b64decode(frame["data_base64"]).decode()
        frames, took = until_closed(ws, revoke(admin, token))
    assert took < DEADLINE, took
    note("terminal (revoked)", took)
    assert_token_ended(ws, frames, REVOKED)
    cid = started["command_id"]
    deadline = time.monotonic() + 10
    while command(admin, sid, cid)["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert command(admin, sid, cid)["status"] == "cancelled"


# --- HTTP log streams ---------------------------------------------------------------------------


class Follower(threading.Thread):
    """Reads one streamed response to its end, in a thread; notes when the first bytes came and
    when it ended."""

    def __init__(
        self,
        url: str,
        secret: str,
        params: dict[str, str],
        *,
        body: dict[str, Any] | None = None,
        marker: bytes = b"tick",
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.secret, self.params = url, secret, params
        self.json, self.marker = body, marker  # a body: POST it
        self.first = threading.Event()
        self.body = b""
        self.ended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            headers = {"Authorization": f"Bearer {self.secret}"}
            method = "GET" if self.json is None else "POST"
            with httpx.stream(
                method, self.url, params=self.params, json=self.json, headers=headers, timeout=60
            ) as resp:
                assert resp.status_code == 200, resp.read()
                for chunk in resp.iter_raw():
                    self.body += chunk
                    if self.marker in self.body:
                        self.first.set()
            self.ended_at = time.monotonic()
        except BaseException as exc:
            self.error = exc
            self.first.set()


def test_ndjson_sse_and_raw_streams_end(srv: Server, admin: httpx.Client, sid: str) -> None:
    resp = admin.post(f"/v1/sandboxes/{sid}/commands", json={"command": TICKS})
    assert resp.status_code == 202, resp.text
    cid = resp.json()["id"]
    token = new_token(admin)
    url = f"{srv.url}/v1/sandboxes/{sid}/commands/{cid}/logs"
    followers = {
        kind: Follower(url, token["secret"], {"format": kind}) for kind in ("ndjson", "sse", "raw")
    }
    try:
        for follower in followers.values():
            follower.start()
        for follower in followers.values():
            assert follower.first.wait(30) and follower.error is None, follower.error
        revoked = revoke(admin, token)
        for follower in followers.values():
            follower.join(10)
    finally:
        cancel(admin, sid, cid)
    for kind, follower in followers.items():
        assert follower.error is None, (kind, follower.error)
        assert follower.ended_at is not None and follower.ended_at - revoked < DEADLINE, kind
        note(f"{kind} log stream (revoked)", follower.ended_at - revoked)
    last_line = followers["ndjson"].body.decode().splitlines()[-1]
    assert json.loads(last_line) == {"type": "error", "code": "unauthenticated", "message": REVOKED}
    last_event = followers["sse"].body.decode().strip().split("\n\n")[-1].splitlines()
    assert last_event[0] == "event: error" and last_event[1] == "id: end", last_event
    assert json.loads(last_event[2].removeprefix("data: "))["message"] == REVOKED
    raw = followers["raw"].body.decode()
    assert raw.startswith("tick 1\n") and "error" not in raw  # the bytes only, then the end


# --- faces' WebSocket streams -------------------------------------------------------------------


def test_runta_stream_ends(srv: Server, admin: httpx.Client, sid: str) -> None:
    token = new_token(admin)
    with connect(srv, f"/v2/runtimes/{sid}/exec/stream", token["secret"]) as ws:
        ws.send(json.dumps({"type": "start", "command": "sh", "args": ["-c", "echo up; sleep 30"]}))
        assert base64.b64decode(json.loads(ws.recv(timeout=30))["data_base64"]) == b"up\n"
        frames, took = until_closed(ws, revoke(admin, token))
    assert took < DEADLINE, took
    note("Runta stream (revoked)", took)
    assert frames[-1] == {"type": "error", "message": REVOKED}  # Runta's error frame
    assert ws.close_code == 4001 and ws.close_reason == REVOKED


@pytest.fixture(scope="module")
def cmdio_user(admin: httpx.Client) -> Iterator[str]:
    name = "revoker"
    assert admin.post("/v1/users", json={"name": name, "ssh_public_keys": []}).status_code == 201
    made = admin.post(
        f"/v1/users/{name}/commands", json={"name": "slow", "command": "echo up; sleep 30"}
    )
    assert made.status_code == 201, made.text
    yield name
    admin.delete(f"/v1/users/{name}")


def cmdio_token(admin: httpx.Client, user: str) -> dict[str, Any]:
    made = admin.post(f"/v1/users/{user}/tokens")
    assert made.status_code == 201, made.text
    token = dict(made.json())
    granted = admin.post(f"/v1/users/{user}/commands/slow/access", json={"token": token["secret"]})
    assert granted.status_code == 201, granted.text
    return token


def test_cmdio_stream_ends(srv: Server, admin: httpx.Client, cmdio_user: str) -> None:
    token = cmdio_token(admin, cmdio_user)
    with connect(srv, f"/run/{cmdio_user}/slow", token["secret"]) as ws:
        assert ws.recv(timeout=60) == "up\n"
        frames, took = until_closed(ws, revoke(admin, token))
    assert took < DEADLINE, took
    note("cmd.io stream (revoked)", took)
    assert frames[-1] == f"error: {REVOKED}"  # cmd.io's frames are plain text
    assert ws.close_code == 4001 and ws.close_reason == REVOKED


def test_face_http_streams_end(srv: Server, admin: httpx.Client, sid: str, cmdio_user: str) -> None:
    """Vercel's command logs and `wait` streams and cmd.io's `?stream=1` end like the native
    log streams, each with its own last line."""
    resp = admin.post(f"/v1/sandboxes/{sid}/commands", json={"command": TICKS})
    assert resp.status_code == 202, resp.text
    cid = resp.json()["id"]
    token = new_token(admin)
    vercel = f"{srv.url}/v2/sandboxes/sessions/{sid}/cmd"
    run = {"command": "sh", "args": ["-c", TICKS], "wait": True, "logs": True}
    followers = {
        "Vercel logs stream": Follower(f"{vercel}/{cid}/logs", token["secret"], {}),
        "Vercel wait stream": Follower(vercel, token["secret"], {}, body=run),
    }
    cmdio = cmdio_token(admin, cmdio_user)
    streamed = Follower(
        f"{srv.url}/run/{cmdio_user}/slow", cmdio["secret"], {"stream": "1"}, marker=b"up"
    )
    try:
        for follower in [*followers.values(), streamed]:
            follower.start()
        for follower in [*followers.values(), streamed]:
            assert follower.first.wait(30) and follower.error is None, follower.error
        revoked = revoke(admin, token)
        cmdio_revoked = revoke(admin, cmdio)
        for follower in [*followers.values(), streamed]:
            follower.join(10)
    finally:
        cancel(admin, sid, cid)
    for kind, follower in followers.items():
        assert follower.error is None, (kind, follower.error)
        assert follower.ended_at is not None and follower.ended_at - revoked < DEADLINE, kind
        note(f"{kind} (revoked)", follower.ended_at - revoked)
        last = json.loads(follower.body.decode().splitlines()[-1])
        assert last == {"stream": "error", "data": {"code": "unauthenticated", "message": REVOKED}}
    assert streamed.error is None, streamed.error
    assert streamed.ended_at is not None and streamed.ended_at - cmdio_revoked < DEADLINE
    note("cmd.io ?stream=1 (revoked)", streamed.ended_at - cmdio_revoked)
    assert streamed.body.decode().endswith(f"error: {REVOKED}\n"), streamed.body[-80:]


# --- SSH ----------------------------------------------------------------------------------------


def test_ssh_session_ends(srv: SSHServer, admin: httpx.Client, cmdio_user: str) -> None:
    token = cmdio_token(admin, cmdio_user)
    argv = ["ssh", *SSH_OPTIONS, "-p", str(srv.ssh_port), "-F", "/dev/null", "-T",
            "-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=no",
            f"{token['secret']}@127.0.0.1", "slow"]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        revoked = revoke(admin, token)
        status = proc.wait(10)
        took = time.monotonic() - revoked
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    assert took < DEADLINE, took
    note("SSH session (revoked)", took)
    assert f"error: {REVOKED}" in stderr and status == 129, (status, stderr)


# --- expiry and revocation elsewhere ------------------------------------------------------------


def test_sessions_end_when_their_token_expires(srv: Server, admin: httpx.Client, sid: str) -> None:
    token = new_token(admin, expires_in_seconds=2)
    expires = datetime.fromisoformat(token["expires_at"]).timestamp()
    with connect(srv, f"/v1/sandboxes/{sid}/exec/stream", token["secret"]) as ws:
        started = started_exec(ws, command="sleep 30")
        frames, _ = until_closed(ws, time.monotonic())
        closed = time.time()
    cancel(admin, sid, started["command_id"])
    assert expires - 0.1 <= closed < expires + DEADLINE, (closed, expires)
    note("exec WebSocket (expired)", closed - expires)
    assert_token_ended(ws, frames, EXPIRED)


def test_a_revocation_through_the_store_ends_sessions(
    srv: Server, admin: httpx.Client, sid: str
) -> None:
    """As a revocation on another replica: the token's row goes, and nothing else is said."""
    resp = admin.post(f"/v1/sandboxes/{sid}/commands", json={"command": TICKS})
    cid = resp.json()["id"]
    token = new_token(admin)
    follower = Follower(
        f"{srv.url}/v1/sandboxes/{sid}/commands/{cid}/logs", token["secret"], {"format": "sse"}
    )
    try:
        with connect(srv, f"/v1/sandboxes/{sid}/exec/stream", token["secret"]) as ws:
            follower.start()
            started = started_exec(ws, command="sleep 30")
            assert follower.first.wait(30) and follower.error is None, follower.error
            frames, took = until_closed(ws, revoke_elsewhere(srv, token))
        follower.join(10)
        cancel(admin, sid, started["command_id"])
    finally:
        cancel(admin, sid, cid)
    assert took < DEADLINE, took
    note("exec WebSocket (revoked through the store)", took)
    assert_token_ended(ws, frames, REVOKED)
    assert follower.ended_at is not None and b"event: error" in follower.body
