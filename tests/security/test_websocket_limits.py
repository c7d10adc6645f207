"""Every WebSocket route holds the same limits: a start frame within the deadline (here set to
2 s), client frames of at most the size limit (else close 1009), and an error frame, in the
face's own shape, then a close for a frame it cannot parse (a 100k-deep JSON one included)."""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from corral import Client
from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox

START_TIMEOUT = 2  # CORRAL_WS_START_TIMEOUT_SECONDS for this server
MAX_FRAME = 1 << 20  # the default CORRAL_WS_MAX_FRAME_BYTES
TOO_BIG = "x" * (2 * MAX_FRAME)  # over the limit, under what the server lets reach a route
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-wslimits-")
    server = Server(data_dir, env={"CORRAL_WS_START_TIMEOUT_SECONDS": str(START_TIMEOUT)})
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def admin(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def sid(admin: httpx.Client) -> Iterator[str]:
    resp = admin.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    yield resp.json()["id"]
    admin.delete(f"/v1/sandboxes/{resp.json()['id']}")


@pytest.fixture(scope="module")
def cmdio_path(admin: httpx.Client) -> Iterator[str]:
    user = admin.post("/v1/users", json={"name": "limits", "ssh_public_keys": []})
    assert user.status_code == 201, user.text
    made = admin.post(
        "/v1/users/limits/commands", json={"name": "slow", "command": "echo up; sleep 20"}
    )
    assert made.status_code == 201, made.text
    yield "/run/limits/slow"
    admin.delete("/v1/users/limits")


@pytest.fixture(scope="module")
def running(admin: httpx.Client, sid: str) -> Iterator[str]:
    """A command with output to attach to."""
    resp = admin.post(
        f"/v1/sandboxes/{sid}/commands",
        json={"command": "while :; do echo tick; sleep 0.2; done", "interactive": True},
    )
    assert resp.status_code == 202, resp.text
    yield resp.json()["id"]
    admin.post(f"/v1/sandboxes/{sid}/commands/{resp.json()['id']}/cancel")


def connect(srv: Server, path: str) -> ClientConnection:
    url = srv.url.replace("http://", "ws://") + path
    return ws_connect(
        url, additional_headers={"Authorization": f"Bearer {srv.admin_key}"}, max_size=None
    )


def until_closed(ws: ClientConnection, limit: float = 10) -> list[Any]:
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
        return frames
    except TimeoutError:
        pass
    raise AssertionError(f"still open after {limit} s; last frames: {frames[-3:]}")


@contextmanager
def native_exec(
    srv: Server, sid: str, start: dict[str, Any] | None = None
) -> Iterator[ClientConnection]:
    with connect(srv, f"/v1/sandboxes/{sid}/exec/stream") as ws:
        if start is not None:
            ws.send(json.dumps({"type": "start", **start}))
            assert json.loads(ws.recv(timeout=30))["type"] == "started"
        yield ws


@contextmanager
def runta_exec(
    srv: Server, sid: str, start: dict[str, Any] | None = None
) -> Iterator[ClientConnection]:
    with connect(srv, f"/v2/runtimes/{sid}/exec/stream") as ws:
        if start is not None:
            ws.send(json.dumps({"type": "start", **start}))
            assert json.loads(ws.recv(timeout=30))["type"] == "stdout"
        yield ws


RUNTA_START = {"command": "sh", "args": ["-c", "echo up; cat"]}


def native_error(frames: list[Any]) -> str:
    assert frames and frames[-1]["type"] == "error" and frames[-1]["code"] == "invalid_frame"
    return str(frames[-1]["message"])


def runta_error(frames: list[Any]) -> str:
    assert frames and set(frames[-1]) == {"type", "message"} and frames[-1]["type"] == "error"
    return str(frames[-1]["message"])


# --- the start-frame deadline -------------------------------------------------------------------


@pytest.mark.parametrize("face", ["native", "runta"])
def test_a_client_that_sends_no_start_frame_is_closed(srv: Server, sid: str, face: str) -> None:
    opened = time.monotonic()
    with (native_exec if face == "native" else runta_exec)(srv, sid) as ws:
        frames = until_closed(ws, limit=START_TIMEOUT + 4)
    took = time.monotonic() - opened
    assert START_TIMEOUT - 0.2 <= took < START_TIMEOUT + 2, took
    message = native_error(frames) if face == "native" else runta_error(frames)
    assert message == f"no start frame within {START_TIMEOUT} seconds"
    assert ws.close_code == 1008 and ws.close_reason == message


# --- the frame size limit -----------------------------------------------------------------------


def test_the_size_limit_is_the_same_on_every_route(
    srv: Server, sid: str, running: str, cmdio_path: str
) -> None:
    """A frame over the limit ends the session with 1009 wherever it is sent: as a start
    frame, as input after the start, to an attached client, to cmd.io (which takes no input)."""
    big_start = json.dumps({"type": "start", "command": "true", "env": {"X": TOO_BIG}})
    cases: dict[str, tuple[Callable[[], Any], str | bytes]] = {
        "native start": (lambda: native_exec(srv, sid), big_start),
        "native input": (lambda: native_exec(srv, sid, {"command": "cat"}), TOO_BIG.encode()),
        "attach": (lambda: connect(srv, f"/v1/sandboxes/{sid}/commands/{running}/attach"), TOO_BIG),
        "runta start": (lambda: runta_exec(srv, sid), big_start),
        "runta input": (lambda: runta_exec(srv, sid, RUNTA_START), TOO_BIG),
        "cmd.io": (lambda: connect(srv, cmdio_path), TOO_BIG),
    }
    for name, (opened, frame) in cases.items():
        with opened() as ws:
            ws.send(frame)
            frames = until_closed(ws)
        assert ws.close_code == 1009, (name, ws.close_code, ws.close_reason)
        assert ws.close_reason == f"the frame is larger than {MAX_FRAME} bytes", name
        if name.startswith("native") or name == "attach":
            assert native_error(frames) == ws.close_reason
        elif name.startswith("runta"):
            assert runta_error(frames) == ws.close_reason
        else:
            assert frames[-1] == f"error: {ws.close_reason}", frames[-3:]


def test_a_giant_frame_is_dropped_by_the_server_itself(srv: Server, sid: str) -> None:
    """Past four times the limit the frame is not even buffered for the route: 1009 at once."""
    with native_exec(srv, sid, {"command": "cat"}) as ws:
        ws.send(b"z" * (5 * MAX_FRAME))
        until_closed(ws)
    assert ws.close_code == 1009
    # The server's own refusal, not the route's (which read the frame to refuse it).
    assert "exceeds limit" in ws.close_reason, ws.close_reason


def test_a_frame_within_the_limit_is_taken(srv: Server, sid: str) -> None:
    data = b"y" * (MAX_FRAME - 4096)
    with native_exec(srv, sid, {"command": "wc -c"}) as ws:
        ws.send(data)
        ws.send(json.dumps({"type": "close_stdin"}))
        frames = until_closed(ws, limit=30)
    out = "".join(f.get("data") or base64.b64decode(f.get("data_base64", "")).decode()
                  for f in frames if f["type"] == "stdout")  # fmt: skip
    assert out.strip() == str(len(data)) and frames[-1]["type"] == "exit"


# --- frames that cannot be parsed ---------------------------------------------------------------


def test_a_deeply_nested_frame_gets_an_error_frame(srv: Server, sid: str, running: str) -> None:
    cases: dict[str, Callable[[], Any]] = {
        "native start": lambda: native_exec(srv, sid),
        "native input": lambda: native_exec(srv, sid, {"command": "cat"}),
        "attach": lambda: connect(srv, f"/v1/sandboxes/{sid}/commands/{running}/attach"),
        "runta start": lambda: runta_exec(srv, sid),
        "runta input": lambda: runta_exec(srv, sid, RUNTA_START),
    }
    for name, opened in cases.items():
        with opened() as ws:
            ws.send(DEEP)
            frames = until_closed(ws)
        message = runta_error(frames) if name.startswith("runta") else native_error(frames)
        assert ws.close_code == 1008 and ws.close_reason, (name, ws.close_code)
        assert "nest" in message or "recursion" in message, (name, message)
    assert httpx.get(srv.url + "/healthz").status_code == 200


def test_frames_that_are_not_json_get_an_error_frame(srv: Server, sid: str) -> None:
    cases: dict[str, Callable[[], Any]] = {
        "native start": lambda: native_exec(srv, sid),
        "runta start": lambda: runta_exec(srv, sid),
        "runta input": lambda: runta_exec(srv, sid, RUNTA_START),
    }
    for name, opened in cases.items():
        with opened() as ws:
            ws.send("{not json")
            frames = until_closed(ws)
        message = runta_error(frames) if name.startswith("runta") else native_error(frames)
        assert message == "the frame is not JSON" and ws.close_code == 1008, (name, message)
    with runta_exec(srv, sid, RUNTA_START) as ws:
        ws.send("[1, 2]")
        frames = until_closed(ws)
    assert runta_error(frames) == "a frame must be a JSON object" and ws.close_code == 1008


def test_the_sdk_sends_large_input_in_frames_the_server_takes(srv: Server, sid: str) -> None:
    data = b"z" * (3 * MAX_FRAME + 5)
    text = "é" * (2 * MAX_FRAME)  # 4 MiB as UTF-8, more as JSON escapes
    with Client(srv.url, token=srv.admin_key) as client:
        with client.connect_exec(sid, "wc -c") as session:
            session.send_stdin(data)
            session.send_stdin(text)
            session.close_stdin()
            out = session.collect()
    assert out.result is not None and out.result.exit_code == 0, out.result
    assert out.stdout.strip() == str(len(data) + len(text.encode())).encode()
