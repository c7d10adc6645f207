"""The exec reply (answered without the router, api/fast_exec.py) is the route's own answer."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.sandbox


def test_exec_reply_is_the_stored_command(api: httpx.Client, sandbox_id: str) -> None:
    resp = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"command": "printf 'h\\303\\251 \\342\\234\\223'; echo oops >&2; exit 3"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-request-id"].startswith("req_")
    body = resp.json()
    assert body["stdout"] == "hé ✓" and body["stderr"] == "oops\n" and body["exit_code"] == 3
    # The same command through the router: the very same document, field for field.
    stored = api.get(f"/v1/sandboxes/{sandbox_id}/commands/{body['id']}")
    assert stored.status_code == 200
    assert stored.json() == body


def test_exec_with_a_charset_and_by_name(api: httpx.Client) -> None:
    created = api.post("/v1/sandboxes", json={"name": "fast-path-by-name"}).json()
    try:
        resp = api.post(
            "/v1/sandboxes/fast-path-by-name/exec",
            content=b'{"command": "echo", "args": ["by", "name"]}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["stdout"] == "by name\n"
        assert resp.json()["sandbox_id"] == created["id"]
    finally:
        api.delete(f"/v1/sandboxes/{created['id']}")


def test_exec_refusals_keep_the_native_shape(
    server: Server, api: httpx.Client, sandbox_id: str
) -> None:
    url = f"/v1/sandboxes/{sandbox_id}/exec"
    # Not JSON by its content type: the route's answer, whatever the body says.
    plain = api.post(url, content=b'{"command": "true"}', headers={"content-type": "text/plain"})
    assert plain.status_code == 422 and plain.json()["error"]["code"] == "invalid_argument"
    # A read-only token may not exec: 403, nothing run.
    token = api.post("/v1/tokens", json={"name": "reader", "scopes": ["read"]}).json()["secret"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as ro:
        refused = ro.post(url, json={"command": "touch /workspace/ran"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "permission_denied"
        assert refused.json()["request_id"] == refused.headers["x-request-id"]
    check = api.post(url, json={"command": "test", "args": ["-e", "/workspace/ran"]}).json()
    assert check["exit_code"] == 1
    # No token at all.
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.post(url, json={"command": "true"}).status_code == 401

    # A body past the request limit, sent without a length (chunked).
    def chunks():
        yield b'{"command": "true", "stdin": "'
        for _ in range(11):
            yield b"x" * (1 << 20)
        yield b'"}'

    big = api.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert big.status_code == 413, big.text
    assert big.json()["error"]["code"] == "payload_too_large"


def _raw_request(server: Server, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(head.encode() + b"\r\n\r\n" + body)
    return sock


def _head_of(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, rest


def test_the_reply_comes_as_one_write(server: Server, sandbox_id: str) -> None:
    # The head is held for the body's first write: a client's first read after the request
    # gets the whole answer, not a head to wait on the body after.
    body = json.dumps({"command": "true", "args": []}).encode()
    request = (
        f"POST /v1/sandboxes/{sandbox_id}/exec HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {server.admin_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # one kept connection, as a client would use it
            sock.sendall(request)
            first = sock.recv(1 << 16)
            status, fields, rest = _head_of(first)
            assert status == 200
            assert len(rest) == int(fields["content-length"]), first
            assert json.loads(rest)["exit_code"] == 0


def test_a_streamed_reply_sends_its_head_before_any_output(
    server: Server, api: httpx.Client, sandbox_id: str
) -> None:
    # Nothing follows the head for seconds: it is not held back waiting for a body.
    resp = api.post(f"/v1/sandboxes/{sandbox_id}/commands", json={"command": "sleep 3; echo late"})
    assert resp.status_code == 202, resp.text
    cid = resp.json()["id"]
    sock = _raw_request(
        server,
        f"GET /v1/sandboxes/{sandbox_id}/commands/{cid}/logs?format=raw HTTP/1.1\r\n"
        f"Host: t\r\nAuthorization: Bearer {server.admin_key}",
    )
    with sock:
        sock.settimeout(2.0)
        first = sock.recv(1 << 16)
        status, fields, rest = _head_of(first)
        assert status == 200 and fields["transfer-encoding"] == "chunked"
        assert b"late" not in rest
        later = b""
        sock.settimeout(10)
        while b"late" not in later:
            chunk = sock.recv(1 << 16)
            assert chunk, later
            later += chunk
