"""Denial of service from the network: idle and half-sent connections, oversized request heads,
and more connections than the server can hold.

The servers here start with a soft descriptor limit of 1024 (a default login shell's), as an
operator following the README would start one: the server must raise it itself.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from corral.api.http_protocol import connection_limits
from tests.conftest import Server
from tests.security.conftest import SUMMARY
from tests.security.helpers import dedicated_server, exec_, sandbox

# The shared server runs real sandboxes (the flood test execs in one).
pytestmark = pytest.mark.sandbox

HEAD_TIMEOUT = 2.0
KEEP_ALIVE = 2.0
IDLE_CONNECTIONS = 2_000


@contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft descriptor limit set to `limit` meanwhile (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def _many_descriptors() -> Iterator[None]:
    # The test itself holds thousands of client sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def started_server(prefix: str, env: dict[str, str]) -> Iterator[Server]:
    """A dedicated server, started with a soft descriptor limit of 1024."""
    real_start = Server.start

    def start(self: Server) -> None:
        with soft_nofile(1024):
            real_start(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Server, "start", start)
        with dedicated_server(prefix, env=env) as srv:
            patch.undo()
            yield srv


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    env = {
        "CORRAL_REQUEST_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
        "CORRAL_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE),
    }
    with started_server("corral-conn-", env) as server:
        yield server


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    _, headers, body = parse(data)
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        body += chunk
    return data


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_native_error(response: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = parse(response)
    assert got == status, response[:300]
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    assert "details" in payload["error"]
    assert payload["request_id"].startswith("req_")
    assert headers["x-request-id"] == payload["request_id"]
    return headers


def server_rss(srv: Server) -> int:
    assert srv.proc is not None
    with open(f"/proc/{srv.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- deadlines -------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(srv: Server) -> None:
    sock = connect(srv)
    began = time.monotonic()
    assert read_until_closed(sock) == b""
    waited = time.monotonic() - began
    assert HEAD_TIMEOUT - 0.3 < waited < HEAD_TIMEOUT + 1.5, waited


def test_a_slowloris_is_cut_at_the_deadline_counted_from_its_first_byte(srv: Server) -> None:
    # One header byte every 0.25 s: each byte would reset a timer counted from the last one.
    sock = connect(srv)
    began = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    cut_at = None
    while time.monotonic() - began < HEAD_TIMEOUT + 4:
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            cut_at = time.monotonic() - began
            break
        sock.settimeout(0.25)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        cut_at = time.monotonic() - began
        assert_native_error(answer, 408, "request_timeout")
        break
    assert cut_at is not None, "the slowloris was never cut"
    assert cut_at < HEAD_TIMEOUT + 1.0, cut_at


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    srv: Server,
) -> None:
    sock = connect(srv)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    first = read_response(sock)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    answered = time.monotonic()
    assert read_until_closed(sock) == b""
    idle = time.monotonic() - answered
    assert KEEP_ALIVE - 0.3 < idle < KEEP_ALIVE + 1.5, idle


def test_keep_alive_requests_each_get_a_fresh_head_deadline(srv: Server) -> None:
    # Requests on one connection spread over more than one head deadline all succeed.
    sock = connect(srv)
    sock.settimeout(10)
    began = time.monotonic()
    for _ in range(6):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        time.sleep(KEEP_ALIVE * 0.3)
    assert time.monotonic() - began > HEAD_TIMEOUT
    sock.close()


# --- head caps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
            + b"\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 20_000 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
            + b"\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            b"GET /healthz?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "uri_too_long",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
        (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ],
    ids=[
        "head-over-64k",
        "header-line-over-16k",
        "too-many-headers",
        "url-over-16k",
        "garbage",
        "non-ascii-target",
    ],
)
def test_oversized_heads_are_refused_in_the_native_shape(
    srv: Server, request_bytes: bytes, status: int, code: str
) -> None:
    sock = connect(srv)
    sock.sendall(request_bytes)
    assert_native_error(read_until_closed(sock), status, code)


def test_a_head_just_under_the_caps_is_served(srv: Server) -> None:
    filler = b"".join(b"X-Filler-%02d: %s\r\n" % (i, b"v" * 1000) for i in range(60))
    sock = connect(srv)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + filler + b"\r\n")
    status, _, _ = parse(read_until_closed(sock))
    assert status == 200


def test_chunked_trailers_are_capped_like_a_head(srv: Server) -> None:
    sock = connect(srv)
    sock.sendall(
        b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + srv.admin_key.encode() + b"\r\n\r\n2\r\n{}\r\n0\r\n"
    )
    # Cut after the cap; what was sent beyond it sat in the two sockets' kernel buffers.
    sent = 0
    try:
        while sent < 32 * 1024 * 1024:
            sock.sendall(b"X-Trailer: " + b"t" * 4096 + b"\r\n")
            sent += 4109
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 16 * 1024 * 1024, f"the server took {sent} bytes of trailers"


def test_a_256_mib_header_flood_leaves_the_server_memory_where_it_was(srv: Server) -> None:
    httpx.get(srv.url + "/healthz")
    before = server_rss(srv)
    peak = before
    line = b"X-Flood: " + b"f" * 1000 + b"\r\n"
    per_connection = 32 * 1024 * 1024
    total = 256 * 1024 * 1024
    accepted: list[int] = []

    def flood() -> None:
        sock = connect(srv)
        sent = 0
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while sent < per_connection:
                sock.sendall(line * 64)
                sent += len(line) * 64
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        accepted.append(sent)
        sock.close()

    # 8 connections at a time, each offering 32 MiB of header lines: 256 MiB in all. What one
    # is seen to send past the cap sat in the two sockets' kernel buffers.
    threads = [threading.Thread(target=flood) for _ in range(total // per_connection)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, server_rss(srv))
        time.sleep(0.01)
    after = server_rss(srv)
    assert max(accepted) < 12 * 1024 * 1024, "a connection was allowed to keep sending its head"
    assert peak - before < 48 * 1024 * 1024, (before, peak)
    assert after - before < 16 * 1024 * 1024, (before, after)
    assert httpx.get(srv.url + "/healthz").status_code == 200


# --- the connection bound --------------------------------------------------------------------


def test_the_descriptor_limit_is_raised_to_the_hard_limit(srv: Server) -> None:
    assert srv.proc is not None
    with open(f"/proc/{srv.proc.pid}/limits") as limits:
        row = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = row.split()[3:5]
    assert soft == hard == str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]), row


def test_the_default_bound_leaves_half_the_descriptors_to_the_rest_of_the_server() -> None:
    limits = connection_limits(20_000, head_timeout=5, max_connections=None)
    assert limits.max_connections == 8_888
    assert limits.hard_ceiling <= 10_000
    assert connection_limits(20_000, head_timeout=5, max_connections=100).hard_ceiling == 116


def test_past_the_connection_bound_new_connections_get_503() -> None:
    # Only the HTTP layer is under test here: the fake runtime starts in a moment.
    env = {
        "CORRAL_MAX_CONNECTIONS": "40",
        "CORRAL_REQUEST_HEAD_TIMEOUT_SECONDS": "30",
        "CORRAL_RUNTIME": "fake",
    }
    with started_server("corral-bound-", env) as server:
        idle = [connect(server) for _ in range(40)]
        time.sleep(0.3)
        # Past the bound: the request is read and answered 503.
        over = connect(server)
        over.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        headers = assert_native_error(read_until_closed(over), 503, "unavailable")
        assert headers["retry-after"] == "1"
        # Far past it (bound + margin): answered at once, without waiting for a request.
        crowd = [connect(server) for _ in range(40)]
        time.sleep(0.3)
        last = connect(server)
        assert_native_error(read_until_closed(last, timeout=5), 503, "unavailable")
        for sock in idle + crowd:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/healthz").status_code == 200


# --- acceptance: a flood of idle connections and a slowloris while execs run ------------------


def _attack(port: int, count: int, ready: Any, stop: Any, reopened: Any, cuts: Any) -> None:
    """Run in a process of its own (so that the measuring process keeps its GIL): hold `count`
    connections that never send a byte, reopening each one the server closes, and one slowloris
    that sends its head a byte every 0.2 s, reconnecting whenever it is cut."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    selector = selectors.DefaultSelector()

    def open_idle() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_READ, "idle")

    def open_slow() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, "slow")
        return sock

    for _ in range(count):
        open_idle()
    slow = open_slow()
    ready.set()
    next_byte = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= next_byte:
            next_byte += 0.2
            try:
                slow.send(b"a")
            except OSError:
                pass  # cut: its EOF is read below
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (ConnectionError, BlockingIOError):
                data = b""
            if key.data == "slow" and data:
                continue  # the 408; the close follows
            selector.unregister(sock)
            sock.close()
            if key.data == "idle":
                reopened.value += 1
                open_idle()
            else:
                cuts.value += 1
                slow = open_slow()
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]


@contextmanager
def idle_flood_and_slowloris(port: int, count: int) -> Iterator[tuple[Any, Any]]:
    """The attack of `_attack` while the block runs; yields its (reopened, cuts) counters."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    reopened, cuts = ctx.Value("i", 0), ctx.Value("i", 0)
    proc = ctx.Process(target=_attack, args=(port, count, ready, stop, reopened, cuts))
    proc.start()
    try:
        assert ready.wait(60), "could not open the idle connections"
        yield reopened, cuts
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


class HealthProbe:
    """GET /healthz on a fresh connection every 50 ms, on a plain socket (no client library's
    set-up in the figure); keeps each latency and each failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = read_until_closed(sock, timeout=5)
                if not answer.startswith(b"HTTP/1.1 200"):
                    self.failures.append(answer[:200].decode("latin-1"))
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - began)
            self._stop.wait(0.05)


def test_2000_idle_connections_and_a_slowloris_leave_execs_and_healthz_working(
    srv: Server,
) -> None:
    with srv.client() as api, sandbox(api) as sid:
        exec_(api, sid, "true")
        with (
            idle_flood_and_slowloris(srv.port, IDLE_CONNECTIONS) as (reopened, cuts),
            HealthProbe(srv.port) as health,
        ):
            time.sleep(0.5)
            began = time.monotonic()
            errors = []
            for i in range(100):
                try:
                    result = exec_(api, sid, f"echo {i}")
                    if result["exit_code"] != 0 or result["stdout"] != f"{i}\n":
                        errors.append(result)
                except (AssertionError, httpx.HTTPError) as exc:
                    errors.append(repr(exc))
            # Hold the flood through at least two head deadlines (each one recycles it).
            while time.monotonic() - began < 2 * HEAD_TIMEOUT + 0.5:
                time.sleep(0.1)
        latencies = sorted(health.latencies)
    worst = latencies[-1]
    p99 = latencies[int(len(latencies) * 0.99)]
    line = (
        f"{IDLE_CONNECTIONS} idle connections ({reopened.value} reopened after the server closed "
        f"them) and a slowloris (cut {cuts.value} times): 100 execs, {len(errors)} errors; "
        f"/healthz over {len(latencies)} probes: median {statistics.median(latencies) * 1000:.1f}"
        f" ms, p99 {p99 * 1000:.1f} ms, worst {worst * 1000:.1f} ms"
    )
    print("\n" + line)
    SUMMARY.setdefault("connection flood", []).append(line)
    assert errors == []
    assert health.failures == []
    assert reopened.value >= IDLE_CONNECTIONS, "the server never closed the idle connections"
    assert cuts.value >= 1
    # The target is 100 ms on a quiet machine; the bounds allow for a loaded, shared test host
    # (the worst probes are those that meet the flood's reconnect bursts).
    assert statistics.median(latencies) < 0.25, line
    assert worst < 2.5, line
