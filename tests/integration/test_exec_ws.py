"""Acceptance: the WebSocket exec protocol. `cat` echoes its stdin, `signal` INT ends a sleep,
terminals resize, and the terminal frame is always last and always single."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from corral import AsyncClient, AuthenticationError, Client, PermissionDeniedError
from corral.core.models import ExitEvent, OutputEvent
from tests.conftest import Server
from tests.integration.helpers import module_sandbox_id  # noqa: F401 - a fixture

pytestmark = pytest.mark.sandbox


TERMINAL = ("exit", "error")


def connect(server: Server, path: str, token: str | None = None, **kw: Any) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + path
    headers = {"Authorization": f"Bearer {token or server.admin_key}"}
    return ws_connect(url, additional_headers=headers, **kw)


def exec_path(sid: str) -> str:
    return f"/v1/sandboxes/{sid}/exec/stream"


def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame until the server closes; asserts the protocol's ending."""
    frames = []
    try:
        for message in ws:
            frames.append(json.loads(message))
    except ConnectionClosed:
        pass
    kinds = [f["type"] for f in frames]
    assert sum(k in TERMINAL for k in kinds) == 1, kinds
    assert kinds[-1] in TERMINAL, kinds
    return frames


def output(frames: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    out = b""
    for f in frames:
        if f["type"] == stream:
            out += base64.b64decode(f["data_base64"]) if "data_base64" in f else f["data"].encode()
    return out


def test_cat_echoes_stdin(server: Server, sandbox_id: str) -> None:
    with connect(server, exec_path(sandbox_id)) as ws:
        ws.send(json.dumps({"type": "start", "command": "cat"}))
        started = json.loads(ws.recv())
        assert started["type"] == "started" and started["command_id"].startswith("cmd_")
        ws.send(json.dumps({"type": "stdin", "data": "hello\n"}))
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "stdout" and first["data"] == "hello\n"  # echoed while running
        ws.send(
            json.dumps({"type": "stdin", "data_base64": base64.b64encode(b"\x00\xff").decode()})
        )
        ws.send(b"raw binary frame\n")
        ws.send(json.dumps({"type": "heartbeat"}))
        ws.send(json.dumps({"type": "close_stdin"}))
        frames = [first, *drain(ws)]
        assert ws.close_code == 1000
    assert output(frames) == b"hello\n\x00\xffraw binary frame\n"
    assert frames[-1]["type"] == "exit" and frames[-1]["exit_code"] == 0
    assert frames[-1]["command_id"] == started["command_id"]


def test_signal_int_ends_a_sleep(server: Server, sandbox_id: str) -> None:
    with connect(server, exec_path(sandbox_id)) as ws:
        ws.send(json.dumps({"type": "start", "command": "sleep 60"}))
        assert json.loads(ws.recv())["type"] == "started"
        time.sleep(0.2)
        started = time.monotonic()
        ws.send(json.dumps({"type": "signal", "signal": "INT"}))
        frames = drain(ws)
    assert time.monotonic() - started < 3
    end = frames[-1]
    assert end["type"] == "exit" and end["status"] == "completed" and end["signal"] == 2


def test_terminal_resize_and_ctrl_c(server: Server, sandbox_id: str) -> None:
    with connect(server, exec_path(sandbox_id)) as ws:
        start = {"type": "start", "command": "stty size; read line; stty size; sleep 60",
                 "tty": True, "rows": 30, "cols": 100}  # fmt: skip
        ws.send(json.dumps(start))
        assert json.loads(ws.recv())["tty"] is True
        assert b"30 100" in output([json.loads(ws.recv(timeout=10))])
        ws.send(json.dumps({"type": "resize", "rows": 50, "cols": 132}))
        ws.send(json.dumps({"type": "stdin", "data": "\r"}))
        time.sleep(0.3)
        ws.send(json.dumps({"type": "stdin", "data": "\x03"}))  # Ctrl-C, through the terminal
        frames = drain(ws)
    text = output(frames).decode()
    assert "50 132" in text
    assert frames[-1]["signal"] == 2 or frames[-1]["exit_code"] == 130


def test_terminal_frame_is_last_and_single_in_every_ending(server: Server, sandbox_id: str) -> None:
    endings = {
        "exit": {"command": "echo out; echo err >&2; exit 3"},
        "timeout": {"command": "sleep 30", "timeout_ms": 300},
        "failed": {"command": "/nonexistent/program", "args": []},
        "flood": {"command": "head -c 3000000 /dev/zero"},
    }
    for name, start in endings.items():
        with connect(server, exec_path(sandbox_id), max_size=None) as ws:
            ws.send(json.dumps({"type": "start", **start}))
            frames = drain(ws)
        assert frames[0]["type"] == "started", name
        end = frames[-1]
        if name == "exit":
            assert end["exit_code"] == 3 and output(frames) == b"out\n"
            assert output(frames, "stderr") == b"err\n"
        elif name == "timeout":
            assert end["status"] == "timed_out"
        elif name == "failed":
            assert end["status"] == "failed" and end["error"]
        else:
            assert len(output(frames)) == 3_000_000

    # A start the server refuses: one error frame, then the close.
    with connect(server, exec_path(sandbox_id)) as ws:
        ws.send(json.dumps({"type": "start", "command": ""}))
        frames = drain(ws)
        assert frames == [frames[-1]] and frames[0]["code"] == "invalid_argument"
        assert ws.close_code == 1008
    # A frame the protocol does not know: one error frame; the command is left running.
    with connect(server, exec_path(sandbox_id)) as ws:
        ws.send(json.dumps({"type": "start", "command": "cat"}))
        cid = json.loads(ws.recv())["command_id"]
        ws.send(json.dumps({"type": "launch"}))
        frames = drain(ws)
        assert frames[-1]["code"] == "invalid_frame"
    with Client(server.url, token=server.admin_key) as client:
        assert client.get_command(sandbox_id, cid).status.value == "running"
        client.cancel_command(sandbox_id, cid)


def test_handshake_is_authenticated(server: Server, sandbox_id: str) -> None:
    for token, status in (("crl_wrong", 401), (None, 401)):
        url = server.url.replace("http://", "ws://") + exec_path(sandbox_id)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with pytest.raises(InvalidStatus) as info:
            ws_connect(url, additional_headers=headers)
        assert info.value.response.status_code == status
        assert json.loads(info.value.response.body)["error"]["code"] == "unauthenticated"
    # ?access_token= works too (browsers cannot set headers on a WebSocket).
    url = server.url.replace("http://", "ws://") + exec_path(sandbox_id)
    with ws_connect(f"{url}?access_token={server.admin_key}") as ws:
        ws.send(json.dumps({"type": "start", "command": "true"}))
        assert drain(ws)[-1]["exit_code"] == 0
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}
    ) as api:
        reader = api.post("/v1/tokens", json={"scopes": ["read"]}).json()
        try:
            with Client(server.url, token=reader["secret"]) as client:
                with pytest.raises(PermissionDeniedError):
                    client.connect_exec(sandbox_id, "true")
            with Client(server.url, token="crl_nope") as client, pytest.raises(AuthenticationError):
                client.connect_exec(sandbox_id, "true")
        finally:
            api.delete(f"/v1/tokens/{reader['id']}")


def test_attach_to_a_running_command_and_send_it_input(server: Server, sandbox_id: str) -> None:
    with Client(server.url, token=server.admin_key) as client:
        command = client.start_command(sandbox_id, "cat", interactive=True)
        client.send_stdin(sandbox_id, command.id, "before\n")
        with client.attach(sandbox_id, command.id) as session:
            first = session.recv(timeout=10)
            assert isinstance(first, OutputEvent) and first.bytes == b"before\n"
            session.send_stdin(b"during\n")
            second = session.recv(timeout=10)
            assert isinstance(second, OutputEvent) and second.bytes == b"during\n"
            session.close_stdin()
            rest = session.collect()
        assert isinstance(rest.result, ExitEvent) and rest.result.exit_code == 0
        # The same output, from its second piece, by offset.
        with client.attach(sandbox_id, command.id, offset=first.next_offset) as session:
            assert session.collect().stdout == b"during\n"


def test_disconnect_leaves_the_command_running_unless_asked(
    server: Server, sandbox_id: str
) -> None:
    with Client(server.url, token=server.admin_key) as client:
        kept = client.connect_exec(sandbox_id, "sleep 0.5; echo finished")
        kept.close()
        killed = client.connect_exec(sandbox_id, "sleep 30", kill_on_disconnect=True)
        killed.close()
        assert kept.command_id and killed.command_id
        done = client.get_command(sandbox_id, kept.command_id, wait=True, timeout_ms=10_000)
        assert done.stdout == "finished\n"
        gone = client.get_command(sandbox_id, killed.command_id, wait=True, timeout_ms=10_000)
        assert gone.status.value == "cancelled"


def test_async_session(server: Server, sandbox_id: str) -> None:
    async def scenario() -> tuple[bytes, int | None]:
        async with AsyncClient(server.url, token=server.admin_key) as client:
            session = await client.connect_exec(sandbox_id, "tr a-z A-Z")
            async with session:
                await session.send_stdin("shout\n")
                await session.close_stdin()
                out = await session.collect()
            return out.stdout, out.exit_code

    assert asyncio.run(scenario()) == (b"SHOUT\n", 0)


def test_read_only_tokens_may_watch_but_not_type(server: Server, sandbox_id: str) -> None:
    with Client(server.url, token=server.admin_key) as admin:
        reader = admin.create_token(scopes=["read"])
        command = admin.start_command(sandbox_id, "cat", interactive=True)
        try:
            admin.send_stdin(sandbox_id, command.id, "visible\n")
            path = f"/v1/sandboxes/{sandbox_id}/commands/{command.id}/attach"
            with connect(server, path, token=reader.secret) as ws:
                assert output([json.loads(ws.recv(timeout=10))]) == b"visible\n"
                ws.send(json.dumps({"type": "stdin", "data": "typed"}))
                frames = drain(ws)
            assert frames[-1]["code"] == "invalid_frame" and "exec" in frames[-1]["message"]
        finally:
            admin.cancel_command(sandbox_id, command.id)
            admin.delete_token(reader.id)
