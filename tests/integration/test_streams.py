"""Acceptance: every view of a command's output log (ND-JSON, SSE, raw, WebSocket) can be read
from any offset, survives disconnects without losing or repeating a byte, keeps idle streams
open with heartbeats, and ends with exactly one terminal event."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from corral import Client, ConflictError
from tests.conftest import Server, make_data_dir
from tests.integration.helpers import module_sandbox_id  # noqa: F401 - a fixture

pytestmark = pytest.mark.sandbox


# 1 MiB on stdout in 64 pieces over about 1.3 s, with progress lines on stderr.
GENERATOR = r"""
import hashlib, os, time
for i in range(64):
    os.write(1, hashlib.sha256(str(i).encode()).digest() * 512)
    if i % 8 == 7:
        os.write(2, b"progress %d\n" % i)
    time.sleep(0.02)
"""
EXPECTED_STDOUT = b"".join(hashlib.sha256(str(i).encode()).digest() * 512 for i in range(64))
EXPECTED_STDERR = b"".join(b"progress %d\n" % i for i in range(64) if i % 8 == 7)
TERMINAL = ("exit", "error")


def start(api: httpx.Client, sid: str, **body: Any) -> str:
    resp = api.post(f"/v1/sandboxes/{sid}/commands", json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def start_generator(api: httpx.Client, sid: str) -> str:
    return start(api, sid, command="python3", args=["-c", GENERATOR])


def logs_url(sid: str, cid: str) -> str:
    return f"/v1/sandboxes/{sid}/commands/{cid}/logs"


def data_of(event: dict[str, Any]) -> bytes:
    if event.get("data_base64") is not None:
        return base64.b64decode(event["data_base64"])
    return str(event["data"]).encode()


class Collected:
    def __init__(self) -> None:
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.events: list[dict[str, Any]] = []
        self.offset = 0

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["type"] in self.out:
            self.out[event["type"]] += data_of(event)
        if event.get("next_offset") is not None:
            self.offset = event["next_offset"]

    def assert_one_terminal_last(self) -> dict[str, Any]:
        terminal = [e for e in self.events if e["type"] in TERMINAL]
        assert len(terminal) == 1, terminal
        assert self.events[-1] is terminal[0]
        return terminal[0]


def read_ndjson(api: httpx.Client, sid: str, cid: str, collected: Collected, **params: Any) -> None:
    with api.stream("GET", logs_url(sid, cid), params=params) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        for line in resp.iter_lines():
            if line:
                collected.add(json.loads(line))


def read_sse(
    api: httpx.Client, sid: str, cid: str, headers: dict[str, str] | None = None
) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(id, event) pairs of a Server-Sent Events stream."""
    headers = {"accept": "text/event-stream", **(headers or {})}
    with api.stream("GET", logs_url(sid, cid), headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        event_id, data = None, None
        for line in resp.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                yield event_id, data
                event_id, data = None, None


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def ws_frames(server: Server, path: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    frames = []
    with ws_connect(ws_url(server, path), additional_headers=headers, max_size=None) as ws:
        for message in ws:
            frames.append(json.loads(message))
    return frames


# --- acceptance 1: disconnect, re-attach at the last offset, and attach after the end ----------


def test_reattach_at_last_offset_gives_exactly_the_bytes(
    api: httpx.Client, sandbox_id: str
) -> None:
    cid = start_generator(api, sandbox_id)
    first = Collected()
    with api.stream("GET", logs_url(sandbox_id, cid)) as resp:
        for line in resp.iter_lines():
            first.add(json.loads(line))
            if len(first.out["stdout"]) >= 300_000:
                break  # drop the connection in the middle of the output
    assert not any(e["type"] in TERMINAL for e in first.events)
    assert api.get(f"/v1/sandboxes/{sandbox_id}/commands/{cid}").json()["status"] == "running"

    rest = Collected()
    read_ndjson(api, sandbox_id, cid, rest, offset=first.offset)
    terminal = rest.assert_one_terminal_last()
    assert terminal["type"] == "exit" and terminal["exit_code"] == 0
    assert terminal["stdout_bytes"] == len(EXPECTED_STDOUT)
    assert bytes(first.out["stdout"] + rest.out["stdout"]) == EXPECTED_STDOUT
    assert bytes(first.out["stderr"] + rest.out["stderr"]) == EXPECTED_STDERR
    # Offsets chain: each event starts where the one before it ended.
    outputs = [e for e in first.events + rest.events if e["type"] in ("stdout", "stderr")]
    assert all(a["next_offset"] == b["offset"] for a, b in itertools.pairwise(outputs))

    # Attached after the end: the whole output, then the same terminal event.
    late = Collected()
    read_ndjson(api, sandbox_id, cid, late)
    assert late.assert_one_terminal_last() == terminal
    assert bytes(late.out["stdout"]) == EXPECTED_STDOUT
    assert bytes(late.out["stderr"]) == EXPECTED_STDERR


def test_every_view_resumes_exactly(server: Server, api: httpx.Client, sandbox_id: str) -> None:
    cid = start_generator(api, sandbox_id)

    # SSE: drop after some output, reconnect with Last-Event-ID.
    seen = Collected()
    last_id = None
    for event_id, event in read_sse(api, sandbox_id, cid):
        seen.add(event)
        last_id = event_id
        if len(seen.out["stdout"]) >= 200_000:
            break
    assert last_id is not None and last_id.isdigit()
    for event_id, event in read_sse(api, sandbox_id, cid, {"last-event-id": last_id}):
        seen.add(event)
        last_id = event_id
    assert seen.assert_one_terminal_last()["type"] == "exit"
    assert last_id == "end"
    assert bytes(seen.out["stdout"]) == EXPECTED_STDOUT
    assert bytes(seen.out["stderr"]) == EXPECTED_STDERR
    # Reconnecting after the terminal event: nothing more (EventSource stops on 204).
    ended = api.get(logs_url(sandbox_id, cid), headers={"accept": "text/event-stream",
                                                        "last-event-id": "end"})  # fmt: skip
    assert ended.status_code == 204

    # Raw: resume with skip = bytes already received.
    url = logs_url(sandbox_id, cid)
    params = {"format": "raw", "stream": "stdout"}
    received = bytearray()
    with api.stream("GET", url, params=params) as resp:
        assert resp.headers["x-corral-offset"] == "0"
        for chunk in resp.iter_bytes():
            received += chunk
            if len(received) > 100_000:
                break
    resp = api.get(url, params={**params, "skip": len(received)})
    assert bytes(received) + resp.content == EXPECTED_STDOUT
    both = api.get(url, params={"format": "raw"}).content
    assert len(both) == len(EXPECTED_STDOUT) + len(EXPECTED_STDERR)

    # WebSocket attach: from the start, and from an offset in the middle.
    frames = ws_frames(server, f"/v1/sandboxes/{sandbox_id}/commands/{cid}/attach")
    whole = Collected()
    for frame in frames:
        whole.add(frame)
    assert whole.assert_one_terminal_last()["type"] == "exit"
    assert bytes(whole.out["stdout"]) == EXPECTED_STDOUT
    middle = whole.events[len(whole.events) // 2]["offset"]
    tail = Collected()
    for frame in ws_frames(
        server, f"/v1/sandboxes/{sandbox_id}/commands/{cid}/attach?offset={middle}"
    ):
        tail.add(frame)
    tail.assert_one_terminal_last()
    assert EXPECTED_STDOUT.endswith(bytes(tail.out["stdout"])) and tail.out["stdout"]


def test_raw_from_an_offset_in_the_middle_while_the_command_runs(
    api: httpx.Client, sandbox_id: str
) -> None:
    cid = start_generator(api, sandbox_id)
    seen = Collected()
    middle = None
    with api.stream("GET", logs_url(sandbox_id, cid)) as resp:
        for line in resp.iter_lines():
            seen.add(json.loads(line))
            if len(seen.out["stdout"]) >= 300_000:
                middle = seen.offset
                break
    assert middle is not None
    before = len(seen.out["stdout"])
    url = logs_url(sandbox_id, cid)
    # Both still live: one from the middle (replay, then live), one from the start.
    with ThreadPoolExecutor(2) as pool:
        tail = pool.submit(
            lambda: api.get(url, params={"format": "raw", "stream": "stdout", "offset": middle})
        )
        whole = pool.submit(lambda: api.get(url, params={"format": "raw"}))
        tail_resp, whole_resp = tail.result(), whole.result()
    assert tail_resp.headers["x-corral-offset"] == str(middle)
    assert tail_resp.content == EXPECTED_STDOUT[before:]
    both = whole_resp.content
    for line in EXPECTED_STDERR.splitlines(keepends=True):  # frames interleave whole
        assert line in both
        both = both.replace(line, b"", 1)
    assert both == EXPECTED_STDOUT


FLOOD_LINES = 6_000_000  # `seq` output, about 47 MB: far more than a log holds in memory


def server_rss(server: Server) -> int:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_slow_raw_reader_gets_every_byte_and_the_server_does_not_buffer_it(
    server: Server, api: httpx.Client, sandbox_id: str
) -> None:
    expected = hashlib.sha256()
    size = 0
    for start_at in range(1, FLOOD_LINES + 1, 100_000):
        block = "".join(f"{i}\n" for i in range(start_at, start_at + 100_000)).encode()
        expected.update(block)
        size += len(block)
    cid = start(api, sandbox_id, command=f"seq 1 {FLOOD_LINES}", max_output_bytes=64 << 20)
    before = server_rss(server)
    got = hashlib.sha256()
    received = 0
    peak = before
    with api.stream(
        "GET", logs_url(sandbox_id, cid), params={"format": "raw", "stream": "stdout"}
    ) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw(1 << 16):
            if received == 0:
                # Stalled at the first bytes while the command writes all of its output.
                for _ in range(15):
                    time.sleep(0.1)
                    peak = max(peak, server_rss(server))
            got.update(chunk)
            received += len(chunk)
    assert received == size
    assert got.hexdigest() == expected.hexdigest()
    assert peak - before < 32 << 20, (before, peak)


def test_bad_offsets_and_parameters(api: httpx.Client, sandbox_id: str) -> None:
    result = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "echo hello"}).json()
    url = logs_url(sandbox_id, result["id"])
    assert api.get(url, params={"offset": 3}).status_code == 400
    assert api.get(url, params={"offset": 10_000}).status_code == 400
    assert api.get(url, params={"skip": 2}).status_code == 422  # raw only
    assert api.get(url, params={"format": "xml"}).status_code == 422
    assert api.get(logs_url(sandbox_id, "cmd_nope")).status_code == 404
    text = api.get(url, params={"encoding": "base64"}).text
    first = json.loads(text.splitlines()[0])
    assert base64.b64decode(first["data_base64"]) == b"hello\n" and "data" not in first


# --- the SDK resumes by itself across dropped connections --------------------------------------


class CuttingProxy:
    """A TCP proxy to the server that cuts its first `cuts` connections after `after` bytes of
    answer: what a flaky network or an impatient load balancer does."""

    def __init__(self, port: int, *, after: int, cuts: int) -> None:
        self.port = port
        self.after = after
        self.cuts_left = cuts
        self.cut = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                cut = self.cuts_left > 0
                self.cuts_left -= 1
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))

        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
                sent += len(data)
                if cut and sent >= self.after:
                    with self.lock:
                        self.cut += 1
                    break
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_sdk_streams_survive_cut_connections(server: Server, sandbox_id: str) -> None:
    proxy = CuttingProxy(server.port, after=150_000, cuts=3)
    try:
        with Client(proxy.url, token=server.admin_key) as client:
            events = client.exec_stream(sandbox_id, "python3", args=["-c", GENERATOR])
            with events:
                out = events.collect()
            assert out.result is not None and out.result.type == "exit"
            assert out.result.exit_code == 0
            assert out.stdout == EXPECTED_STDOUT and out.stderr == EXPECTED_STDERR
            assert proxy.cut == 3
            cid = events.command_id
            assert cid is not None

        proxy.cuts_left = 2
        with Client(proxy.url, token=server.admin_key) as client:
            with client.read_logs(sandbox_id, cid, stream="stdout") as raw:
                assert raw.read() == EXPECTED_STDOUT
    finally:
        proxy.close()
    assert proxy.cut == 5


# --- input over HTTP ---------------------------------------------------------------------------


def test_stdin_signal_and_resize_over_http(api: httpx.Client, sandbox_id: str) -> None:
    base = f"/v1/sandboxes/{sandbox_id}/commands"
    cid = start(api, sandbox_id, command="cat", interactive=True)
    first = api.post(f"{base}/{cid}/stdin", content=b"hello\n")
    assert first.status_code == 200 and first.json() == {"bytes": 6, "closed": False}
    last = api.post(f"{base}/{cid}/stdin", params={"close": "true"}, content=b"\x00binary\xff")
    assert last.json() == {"bytes": 8, "closed": True}
    done = api.get(f"{base}/{cid}", params={"wait": "true", "timeout_ms": 10_000}).json()
    assert done["status"] == "completed" and done["stdout_bytes"] == 14
    raw = api.get(logs_url(sandbox_id, cid), params={"format": "raw"}).content
    assert raw == b"hello\n\x00binary\xff"
    assert api.post(f"{base}/{cid}/stdin", content=b"late").status_code == 409

    plain = start(api, sandbox_id, command="sleep 30")
    refused = api.post(f"{base}/{plain}/stdin", content=b"x")
    assert refused.status_code == 409 and "interactive" in refused.json()["error"]["message"]
    started = time.monotonic()
    assert api.post(f"{base}/{plain}/signal", json={"signal": "INT"}).status_code == 204
    done = api.get(f"{base}/{plain}", params={"wait": "true", "timeout_ms": 10_000}).json()
    assert done["signal"] == 2 and time.monotonic() - started < 5
    assert api.post(f"{base}/{plain}/signal", json={"signal": "BOGUS"}).status_code == 422

    term = start(
        api, sandbox_id, command="stty size; read line; stty size", tty=True, rows=20, cols=70
    )
    deadline = time.monotonic() + 10  # resize once the first `stty size` has answered
    while "20 70" not in (api.get(f"{base}/{term}").json()["stdout"] or ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.post(f"{base}/{term}/resize", json={"rows": 33, "cols": 99}).status_code == 204
    api.post(f"{base}/{term}/stdin", content=b"\r")
    done = api.get(f"{base}/{term}", params={"wait": "true", "timeout_ms": 10_000}).json()
    assert done["stdout"].split() == ["20", "70", "33", "99"]
    with Client(str(api.base_url), token=api.headers["authorization"][7:]) as client:
        with pytest.raises(ConflictError):
            client.resize_command(sandbox_id, plain, 10, 10)


def test_stream_scopes(server: Server, api: httpx.Client, sandbox_id: str) -> None:
    cid = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "echo hi"}).json()["id"]
    made = api.post("/v1/tokens", json={"scopes": ["read"]}).json()
    try:
        with server.client(made["secret"]) as reader:
            assert reader.get(logs_url(sandbox_id, cid)).status_code == 200
            cat = start(api, sandbox_id, command="cat", interactive=True)
            denied = reader.post(f"/v1/sandboxes/{sandbox_id}/commands/{cat}/stdin", content=b"x")
            assert denied.status_code == 403
            api.post(f"/v1/sandboxes/{sandbox_id}/commands/{cat}/cancel")
        with httpx.Client(base_url=server.url) as anonymous:
            assert anonymous.get(logs_url(sandbox_id, cid)).status_code == 401
            with_query = anonymous.get(
                logs_url(sandbox_id, cid), params={"access_token": server.admin_key}
            )
            assert with_query.status_code == 200
    finally:
        api.delete(f"/v1/tokens/{made['id']}")


# --- acceptance 2: heartbeats keep silent streams open; results that are lost ------------------


@pytest.fixture(scope="module")
def beating() -> Iterator[Server]:
    """A server of its own that sends heartbeats every 0.2 s (and may be killed)."""
    srv = Server(make_data_dir("corral-test-hb-"), env={"CORRAL_HEARTBEAT_SECONDS": "0.2"})
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def timed_ndjson(srv: Server, sid: str, cid: str) -> list[tuple[float, dict[str, Any]]]:
    out = []
    with srv.client() as api, api.stream("GET", logs_url(sid, cid)) as resp:
        for line in resp.iter_lines():
            out.append((time.monotonic(), json.loads(line)))
    return out


def timed_sse(srv: Server, sid: str, cid: str) -> list[tuple[float, dict[str, Any]]]:
    with srv.client() as api:
        return [(time.monotonic(), e) for _, e in read_sse(api, sid, cid)]


def timed_ws(srv: Server, sid: str, cid: str) -> list[tuple[float, dict[str, Any]]]:
    headers = {"Authorization": f"Bearer {srv.admin_key}"}
    out = []
    path = f"/v1/sandboxes/{sid}/commands/{cid}/attach"
    with ws_connect(ws_url(srv, path), additional_headers=headers) as ws:
        for message in ws:
            out.append((time.monotonic(), json.loads(message)))
    return out


def test_silent_command_keeps_every_view_alive(beating: Server) -> None:
    with beating.client() as api:
        sid = api.post("/v1/sandboxes", json={}).json()["id"]
        try:
            cid = start(api, sid, command="sleep 3; echo done")
            with ThreadPoolExecutor(3) as pool:
                views = [pool.submit(view, beating, sid, cid)
                         for view in (timed_ndjson, timed_sse, timed_ws)]  # fmt: skip
                results = [view.result(timeout=30) for view in views]
        finally:
            api.delete(f"/v1/sandboxes/{sid}")
    for timed in results:
        events = [e for _, e in timed]
        kinds = [e["type"] for e in events]
        assert kinds.count("heartbeat") >= 8, kinds
        assert kinds[-2:] == ["stdout", "exit"], kinds
        assert events[-2]["data"] == "done\n" and events[-1]["exit_code"] == 0
        assert sum(k in TERMINAL for k in kinds) == 1
        # Never silent for long: every gap is about one heartbeat interval.
        times = [t for t, _ in timed]
        assert max(b - a for a, b in itertools.pairwise(times)) < 1.5


def test_lost_result_ends_the_stream_with_an_error(beating: Server) -> None:
    with beating.client() as api:
        sid = api.post("/v1/sandboxes", json={}).json()["id"]
        cid = start(api, sid, command="echo before; sleep 300")
        with api.stream("GET", logs_url(sid, cid)) as resp:
            first = json.loads(next(resp.iter_lines()))
            assert first["type"] == "stdout"
    beating.kill9()
    beating.start()
    try:
        with beating.client() as api:
            replay = Collected()
            read_ndjson(api, sid, cid, replay)
            terminal = replay.assert_one_terminal_last()
            assert terminal["type"] == "error" and terminal["code"] == "lost"
            assert "unknown" in terminal["message"]
            assert bytes(replay.out["stdout"]) == b"before\n"
            frames = ws_frames(beating, f"/v1/sandboxes/{sid}/commands/{cid}/attach")
            assert [f["type"] for f in frames][-1] == "error"
            assert sum(f["type"] in TERMINAL for f in frames) == 1
    finally:
        with beating.client() as api:
            api.delete(f"/v1/sandboxes/{sid}")
