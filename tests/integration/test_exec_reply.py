"""The exec reply (answered without the router, api/fast_exec.py) is the route's own answer."""

from __future__ import annotations

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
