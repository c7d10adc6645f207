"""Sandbox ports at a URL: services started inside real sandboxes (all with `"network": "none"`,
the default) reached through the path form and the host form, over HTTP and WebSocket, with a
token, a cookie, a signed URL or nothing (public); `corral port-forward` to a raw TCP service;
bad input; a large body streamed through in bounded server memory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import corral
from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox

DOMAIN = "ports.test"

# A service written with the standard library only (the sandbox runs the host's python3 and has
# nothing else): /headers answers what it was sent; /bytes?n=N streams N bytes; POST /count
# counts the body it reads; /ws is a WebSocket echo (RFC 6455 frames, by hand).
SERVICE = r"""
import base64, hashlib, json, struct, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if url.path == "/bytes":
            n = int(parse_qs(url.query)["n"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * (1 << 20)
            while n:
                piece = block[: min(n, len(block))]
                self.wfile.write(piece)
                n -= len(piece)
            return
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        if url.path == "/set-cookies":  # tries to set the server's own cookies beside its own
            for cookie in ("corral_console=evil; Path=/", "__Host-rds_session=x; Path=/",
                           "corral_port=forged; Path=/", "app=2; Path=/"):
                self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        seen = 0
        while seen < n:
            piece = self.rfile.read(min(1 << 20, n - seen))
            if not piece:
                break
            seen += len(piece)
        body = json.dumps({"received": seen}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        if "greet" in self.path:  # a frame right behind the handshake's answer
            self.wfile.write(b"\x81\x05hello")
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 15, head[1] & 127
            if length == 126:
                length = struct.unpack("!H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x02" + data[:2])
                return
            if opcode in (1, 2):
                if length < 126:
                    out = bytes([128 | opcode, length])
                else:
                    out = bytes([128 | opcode, 126]) + struct.pack("!H", length)
                self.wfile.write(out + data)
                self.wfile.flush()


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

# A raw TCP service: answers each connection's whole input, upper-cased, after its EOF.
TCP_SERVICE = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
def serve(c):
    data = b""
    while piece := c.recv(65536):
        data += piece
    c.sendall(data.upper())
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],)).start()
"""


@pytest.fixture(scope="module")
def ports_server() -> Iterator[Server]:
    data_dir = make_data_dir("corral-ports-")
    srv = Server(data_dir, env={"CORRAL_PUBLIC_DOMAIN": DOMAIN, "CORRAL_PUBLIC_SCHEME": "http"})
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api(ports_server: Server) -> Iterator[httpx.Client]:
    with ports_server.client() as client:
        yield client


def wait_listening(api: httpx.Client, sandbox: str, port: int) -> None:
    """Until the service answers through the proxy (it was just started)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if api.get(f"/v1/sandboxes/{sandbox}/ports/{port}/").status_code != 502:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} did not start listening")


@pytest.fixture(scope="module")
def sandbox(api: httpx.Client) -> Iterator[str]:
    """A sandbox running http.server on 8000 (serving /workspace), the test service on 8001
    and the TCP service on 9000; 8000 and 8001 exposed private."""
    created = api.post("/v1/sandboxes", json={"name": "web"})
    assert created.status_code == 201, created.text
    assert created.json()["network"] == "none"
    sid = created.json()["id"]
    for path, text in (("/workspace/service.py", SERVICE), ("/workspace/tcp.py", TCP_SERVICE)):
        put = api.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=text)
        assert put.status_code in (200, 201), put.text
    api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/hello.txt"}, content="hi")
    for command in (
        "cd /workspace && exec python3 -m http.server --bind 127.0.0.1 8000",
        "exec python3 /workspace/service.py 8001",
        "exec python3 /workspace/tcp.py 9000",
    ):
        started = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": command})
        assert started.status_code == 202, started.text
    for port in (8000, 8001):
        assert api.post(f"/v1/sandboxes/{sid}/ports", json={"port": port}).status_code == 201
    wait_listening(api, sid, 8000)
    wait_listening(api, sid, 8001)
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def host(sandbox: str, port: int) -> str:
    return f"{port}-{sandbox.replace('_', '-', 1)}.{DOMAIN}"


def assert_native_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["request_id"].startswith("req_")


def test_http_server_through_both_forms_with_a_token(
    ports_server: Server, api: httpx.Client, sandbox: str
) -> None:
    path = api.get(f"/v1/sandboxes/{sandbox}/ports/8000/hello.txt")
    assert (path.status_code, path.text) == (200, "hi")
    by_name = api.get("/v1/sandboxes/web/ports/8000/hello.txt")
    assert (by_name.status_code, by_name.text) == (200, "hi")
    hosted = api.get("/hello.txt", headers={"Host": host(sandbox, 8000)})
    assert (hosted.status_code, hosted.text) == (200, "hi")
    named = api.get("/hello.txt", headers={"Host": f"8000-web.{DOMAIN}:{ports_server.port}"})
    assert (named.status_code, named.text) == (200, "hi")
    bare = api.get(f"/v1/sandboxes/{sandbox}/ports/8000?a=1")
    assert (bare.status_code, bare.headers["location"]) == (
        302,
        f"/v1/sandboxes/{sandbox}/ports/8000/?a=1",
    )
    # One Date and one Server: the service's are not doubled with the server's own.
    assert len(path.headers.get_list("date")) == len(path.headers.get_list("server")) == 1


def test_refused_without_a_token(ports_server: Server, sandbox: str) -> None:
    with httpx.Client(base_url=ports_server.url) as anonymous:
        assert_native_error(
            anonymous.get(f"/v1/sandboxes/{sandbox}/ports/8000/hello.txt"), 401, "unauthenticated"
        )
        assert_native_error(
            anonymous.get("/hello.txt", headers={"Host": host(sandbox, 8000)}),
            401,
            "unauthenticated",
        )
        wrong = anonymous.get(
            f"/v1/sandboxes/{sandbox}/ports/8000/", headers={"Authorization": "Bearer crl_nope"}
        )
        assert_native_error(wrong, 401, "unauthenticated")


def test_a_read_only_token_is_refused(
    api: httpx.Client, ports_server: Server, sandbox: str
) -> None:
    token = api.post("/v1/tokens", json={"scopes": ["read"]}).json()["secret"]
    with ports_server.client(token) as reader:
        assert_native_error(
            reader.get(f"/v1/sandboxes/{sandbox}/ports/8000/hello.txt"), 403, "permission_denied"
        )
        assert reader.get(f"/v1/sandboxes/{sandbox}/ports").status_code == 200


def test_corral_credentials_never_reach_the_service(api: httpx.Client, sandbox: str) -> None:
    seen = api.get(
        f"/v1/sandboxes/{sandbox}/ports/8001/headers?a=1", headers={"Cookie": "app=1"}
    ).json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/headers?a=1"
    assert "authorization" not in headers
    assert headers["cookie"] == "app=1"
    assert headers["x-forwarded-prefix"] == f"/v1/sandboxes/{sandbox}/ports/8001"


def test_the_servers_cookies_neither_reach_nor_come_from_the_service(
    api: httpx.Client, sandbox: str
) -> None:
    """The console's session, run-dat-sheesh's and the port's own cookie stay the server's:
    not sent to the service, not settable by it; a path-form page gets an opaque origin."""
    jar = "corral_console=secret1; app=1; rds_session=secret2; corral_port=secret3"
    answer = api.get(f"/v1/sandboxes/{sandbox}/ports/8001/set-cookies", headers={"Cookie": jar})
    headers = {k.lower(): v for k, v in answer.json()["headers"].items()}
    assert headers["cookie"] == "app=1"
    assert answer.headers.get_list("set-cookie") == ["app=2; Path=/"]
    assert answer.headers["content-security-policy"].startswith("sandbox allow-scripts")
    assert "allow-same-origin" not in answer.headers["content-security-policy"]
    hosted = api.get("/set-cookies", headers={"Host": host(sandbox, 8001), "Cookie": jar})
    sent = {k.lower(): v for k, v in hosted.json()["headers"].items()}
    assert sent["cookie"] == "app=1"
    assert hosted.headers.get_list("set-cookie") == ["app=2; Path=/"]
    assert "content-security-policy" not in hosted.headers


def test_access_token_sets_a_cookie(ports_server: Server, sandbox: str) -> None:
    prefix = f"/v1/sandboxes/{sandbox}/ports/8001"
    with httpx.Client(base_url=ports_server.url) as browser:
        first = browser.get(f"{prefix}/headers?x=1&access_token={ports_server.admin_key}")
        assert first.status_code == 302
        assert first.headers["location"] == f"{prefix}/headers?x=1"
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and f"Path={prefix}/" in cookie
        again = browser.get(first.headers["location"])  # the cookie jar sends it back
        assert again.status_code == 200, again.text
        headers = {k.lower(): v for k, v in again.json()["headers"].items()}
        assert "cookie" not in headers  # Corral's cookie is not passed on
        assert ports_server.admin_key not in json.dumps(again.json())
        # The host form: a host-only cookie.
        hosted = browser.get(
            f"/headers?access_token={ports_server.admin_key}",
            headers={"Host": host(sandbox, 8001)},
        )
        assert hosted.status_code == 302 and "Path=/;" in hosted.headers["set-cookie"]
        assert hosted.headers["location"] == "/headers"


def test_signed_url_works_and_expires(
    api: httpx.Client, ports_server: Server, sandbox: str
) -> None:
    signed = api.post(f"/v1/sandboxes/{sandbox}/port-urls", json={"port": 8000, "expires_in": 2})
    assert signed.status_code == 201, signed.text
    body = signed.json()
    assert body["host_url"].startswith(f"http://{host(sandbox, 8000)}/?corral_expires=")
    with httpx.Client(base_url=ports_server.url, follow_redirects=True) as browser:
        first = browser.get(body["url"].replace("/?", "/hello.txt?"))
        assert (first.status_code, first.text) == (200, "hi")
        assert browser.get(f"/v1/sandboxes/{sandbox}/ports/8000/hello.txt").status_code == 200
        # Another port of the same sandbox is not covered by this signature.
        other = browser.get(body["url"].replace("/ports/8000/", "/ports/8001/"))
        assert_native_error(other, 401, "unauthenticated")
        tampered = browser.get(body["url"][:-3] + "AAA")
        assert_native_error(tampered, 401, "unauthenticated")
        time.sleep(max(0.0, float(body["url"].split("corral_expires=")[1].split("&")[0]) -
                       time.time()) + 0.1)  # fmt: skip
        assert_native_error(browser.get(body["url"]), 401, "unauthenticated")
        assert_native_error(
            browser.get(f"/v1/sandboxes/{sandbox}/ports/8000/hello.txt"), 401, "unauthenticated"
        )


def test_public_port_needs_no_token(api: httpx.Client, ports_server: Server) -> None:
    # A sandbox with its own network link (a named namespace the node made) this time.
    created = api.post("/v1/sandboxes", json={"network": "outbound"})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    try:
        api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/s.py"}, content=SERVICE)
        api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "python3 /workspace/s.py 3000"})
        exposed = api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 3000, "public": True})
        assert exposed.json()["public"] is True
        wait_listening(api, sid, 3000)
        with httpx.Client(base_url=ports_server.url) as anonymous:
            seen = anonymous.get(
                "/headers", headers={"Host": host(sid, 3000), "Authorization": "Basic YXBwOng="}
            )
            assert seen.status_code == 200, seen.text
            # The service's own authentication is its business: passed on untouched.
            headers = {k.lower(): v for k, v in seen.json()["headers"].items()}
            assert headers["authorization"] == "Basic YXBwOng="
            # Credentials are not looked at, and Corral's own do not reach the service.
            stale = anonymous.get(f"/v1/sandboxes/{sid}/ports/3000/headers?access_token=x&a=1")
            assert stale.status_code == 200 and stale.json()["path"] == "/headers?a=1"
            with ws_connect(
                f"ws://127.0.0.1:{ports_server.port}/v1/sandboxes/{sid}/ports/3000/ws"
            ) as ws:
                ws.send("public")
                assert ws.recv(5) == "public"
        # Private again, then not exposed at all.
        api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 3000, "public": False})
        with httpx.Client(base_url=ports_server.url) as anonymous:
            assert anonymous.get(f"/v1/sandboxes/{sid}/ports/3000/").status_code == 401
        assert api.delete(f"/v1/sandboxes/{sid}/ports/3000").status_code == 200
        assert_native_error(api.get(f"/v1/sandboxes/{sid}/ports/3000/"), 404, "not_found")
        assert api.get(f"/v1/sandboxes/{sid}/ports").json() == []
        # A deleted sandbox's ports go with it.
        api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 3000, "public": True})
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
    assert_native_error(api.get(f"/v1/sandboxes/{sid}/ports/3000/"), 404, "not_found")
    assert api.get(f"/v1/sandboxes/{sid}/ports").json() == []


def test_websocket_echo_through_both_forms(ports_server: Server, sandbox: str) -> None:
    auth = {"Authorization": f"Bearer {ports_server.admin_key}"}
    base = f"ws://127.0.0.1:{ports_server.port}"
    with ws_connect(f"{base}/v1/sandboxes/{sandbox}/ports/8001/ws", additional_headers=auth) as ws:
        ws.send("hello")
        assert ws.recv(5) == "hello"
        ws.send(b"\x00\xff" * 1000)
        assert ws.recv(5) == b"\x00\xff" * 1000
    with ws_connect(
        f"{base}/v1/sandboxes/{sandbox}/ports/8001/ws?greet", additional_headers=auth
    ) as ws:
        assert ws.recv(5) == "hello"
        ws.send("next")
        assert ws.recv(5) == "next"
    # The host form: the URI names the port's host, the socket goes to the server.
    sock = socket.create_connection(("127.0.0.1", ports_server.port))
    with ws_connect(f"ws://{host(sandbox, 8001)}/ws", sock=sock, additional_headers=auth) as ws:
        ws.send("by host")
        assert ws.recv(5) == "by host"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{base}/v1/sandboxes/{sandbox}/ports/8001/ws").close()
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "unauthenticated"


def test_port_forward_reaches_a_tcp_service_without_network(
    ports_server: Server, sandbox: str
) -> None:
    env = {**os.environ, "CORRAL_URL": ports_server.url, "CORRAL_TOKEN": ports_server.admin_key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "port-forward", sandbox, "0:9000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Forwarding from 127.0.0.1:"), (line, proc.stderr.read())  # type: ignore[union-attr]
        local = int(line.split(":")[1].split()[0])
        for payload in (b"select 1;", os.urandom(300_000)):
            with socket.create_connection(("127.0.0.1", local), timeout=10) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)  # the service answers after our EOF
                answer = b""
                while piece := conn.recv(65536):
                    answer += piece
            assert answer == payload.upper()
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_input(api: httpx.Client, ports_server: Server, sandbox: str) -> None:
    for port in (0, 70000, "http"):
        exposed = api.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": port})
        assert_native_error(exposed, 422, "invalid_argument")
    assert_native_error(api.get(f"/v1/sandboxes/{sandbox}/ports/70000/"), 422, "invalid_argument")
    assert_native_error(api.get(f"/v1/sandboxes/{sandbox}/ports/0/"), 422, "invalid_argument")
    assert_native_error(api.get(f"/v1/sandboxes/{sandbox}/ports/x/"), 422, "invalid_argument")
    assert_native_error(api.delete(f"/v1/sandboxes/{sandbox}/ports/70000"), 422, "invalid_argument")
    assert_native_error(api.delete(f"/v1/sandboxes/{sandbox}/ports/7777"), 404, "not_found")
    assert_native_error(api.get("/v1/sandboxes/sb_nope/ports/8000/"), 404, "not_found")
    assert_native_error(api.get("/", headers={"Host": f"8000-nope.{DOMAIN}"}), 404, "not_found")
    assert_native_error(api.get(f"/v1/sandboxes/{sandbox}/ports/8002/"), 404, "not_found")
    # Exposed, but nothing listens: 502 at once.
    assert api.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": 8002}).status_code == 201
    began = time.monotonic()
    assert_native_error(api.get(f"/v1/sandboxes/{sandbox}/ports/8002/"), 502, "port_unreachable")
    assert time.monotonic() - began < 1.0
    # The server itself listens on the host's 127.0.0.1 at this port: the sandbox's loopback is
    # another, and the host's is never reached.
    own = ports_server.port
    assert api.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": own}).status_code == 201
    assert_native_error(
        api.get(f"/v1/sandboxes/{sandbox}/ports/{own}/healthz"), 502, "port_unreachable"
    )
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            f"ws://127.0.0.1:{ports_server.port}/v1/sandboxes/{sandbox}/tcp/8002",
            additional_headers={"Authorization": f"Bearer {ports_server.admin_key}"},
        ).close()
    assert refused.value.response.status_code == 502
    assert_native_error(
        api.post(f"/v1/sandboxes/{sandbox}/port-urls", json={"port": 1}), 404, "not_found"
    )
    # The API's own host stays the API.
    assert api.get("/healthz", headers={"Host": DOMAIN}).status_code == 200


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_large_bodies_stream_in_bounded_memory(
    api: httpx.Client, ports_server: Server, sandbox: str
) -> None:
    assert ports_server.proc is not None
    pid = ports_server.proc.pid
    size = 100 << 20
    before = rss(pid)
    peak = before
    received = 0
    with api.stream("GET", f"/v1/sandboxes/{sandbox}/ports/8001/bytes?n={size}") as response:
        assert response.status_code == 200
        for piece in response.iter_bytes(1 << 20):
            received += len(piece)
            peak = max(peak, rss(pid))
    assert received == size

    def upload() -> Iterator[bytes]:
        block = b"u" * (1 << 20)
        nonlocal peak
        for _ in range(size >> 20):
            peak = max(peak, rss(pid))
            yield block

    sent = api.post(
        f"/v1/sandboxes/{sandbox}/ports/8001/count",
        content=upload(),
        headers={"Content-Length": str(size)},
    )
    assert sent.json() == {"received": size}
    assert peak - before < 48 << 20, (before, peak)


def test_sdk(ports_server: Server, sandbox: str) -> None:
    with corral.Client(ports_server.url, token=ports_server.admin_key) as client:
        found = client.get_sandbox(sandbox)
        exposed = client.expose_port(found, 8001)
        assert exposed.port == 8001 and not exposed.public
        assert found.url(8001) == f"{ports_server.url}/v1/sandboxes/{sandbox}/ports/8001/"
        answer = httpx.get(
            found.url(8001) + "headers",
            headers={"Authorization": f"Bearer {ports_server.admin_key}"},
        )
        assert answer.json()["path"] == "/headers"
        assert 8001 in [p.port for p in client.list_ports(found)]
        signed = client.signed_port_url(found, 8000, expires_in=60)
        assert httpx.get(signed.url, follow_redirects=True).status_code == 200
        with pytest.raises(ValueError):
            found.url(0)


def test_a_revoked_token_ends_its_websocket(
    api: httpx.Client, ports_server: Server, sandbox: str
) -> None:
    token = api.post("/v1/tokens", json={"scopes": ["exec"]}).json()
    auth = {"Authorization": f"Bearer {token['secret']}"}
    url = f"ws://127.0.0.1:{ports_server.port}/v1/sandboxes/{sandbox}/ports/8001/ws"
    with ws_connect(url, additional_headers=auth) as ws:
        ws.send("before")
        assert ws.recv(5) == "before"
        assert api.delete(f"/v1/tokens/{token['id']}").status_code in (200, 204)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


def test_tls_by_corral_with_a_wildcard_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}", "-keyout", str(key), "-out", str(cert),
         "-addext", f"subjectAltName=DNS:{DOMAIN},DNS:*.{DOMAIN},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chmod(key, 0o600)
    data_dir = make_data_dir("corral-ports-tls-")
    srv = Server(
        data_dir,
        env={"CORRAL_PUBLIC_DOMAIN": DOMAIN, "CORRAL_TLS_CERT": str(cert),
             "CORRAL_TLS_KEY": str(key)},
    )  # fmt: skip
    srv.url = srv.url.replace("http://", "https://")
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cert)  # what the readiness poll trusts
    try:
        srv.start()
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=srv.url, verify=trust, timeout=30) as api:
            api.headers["Authorization"] = f"Bearer {srv.admin_key}"
            sid = api.post("/v1/sandboxes", json={}).json()["id"]
            api.put(
                f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/s.py"}, content=SERVICE
            )
            api.post(
                f"/v1/sandboxes/{sid}/commands", json={"command": "python3 /workspace/s.py 8000"}
            )
            exposed = api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 8000}).json()
            assert exposed["host_url"] == f"https://{host(sid, 8000)}/"
            wait_listening(api, sid, 8000)
            # As a browser would reach https://8000-sb-....ports.test/: the name in SNI, checked
            # against the wildcard certificate.
            name = host(sid, 8000)
            seen = api.get("/headers", headers={"Host": name}, extensions={"sni_hostname": name})
            assert seen.status_code == 200, seen.text
            assert seen.json()["headers"]["x-forwarded-proto"] == "https"
            del api.headers["Authorization"]
            first = api.get(
                f"/headers?access_token={srv.admin_key}",
                headers={"Host": name},
                extensions={"sni_hostname": name},
            )
            assert first.status_code == 302 and "Secure" in first.headers["set-cookie"]
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
