"""Acceptance: every route but health and docs needs a token; scopes and sandbox limits hold;
token secrets are stored hashed only."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.sandbox

PROTECTED = [
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/sb_x"),
    ("DELETE", "/v1/sandboxes/sb_x"),
    ("PATCH", "/v1/sandboxes/sb_x"),
    ("POST", "/v1/sandboxes/sb_x/stop"),
    ("POST", "/v1/sandboxes/sb_x/start"),
    ("POST", "/v1/sandboxes/sb_x/pause"),
    ("POST", "/v1/sandboxes/sb_x/resume"),
    ("POST", "/v1/sandboxes/sb_x/exec"),
    ("POST", "/v1/sandboxes/sb_x/commands"),
    ("GET", "/v1/sandboxes/sb_x/commands"),
    ("GET", "/v1/sandboxes/sb_x/commands/cmd_x"),
    ("POST", "/v1/sandboxes/sb_x/commands/cmd_x/cancel"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/tok_x"),
    ("GET", "/v1/templates"),
]


def test_every_documented_native_route_needs_a_token(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()  # built on first use
    documented = {
        (method.upper(), path.replace("{sandbox}", "sb_x").replace("{command_id}", "cmd_x")
         .replace("{token_id}", "tok_x"))
        for path, ops in spec["paths"].items() for method in ops
        if path.startswith(("/v1/sandboxes", "/v1/tokens", "/v1/templates"))
    }  # fmt: skip
    assert set(PROTECTED) <= documented
    for method, path in sorted(documented):
        resp = httpx.request(method, server.url + path)
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert resp.json()["error"]["code"] == "unauthenticated"


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_token_is_401(server: Server, method: str, path: str) -> None:
    resp = httpx.request(method, server.url + path, json={})
    assert resp.status_code == 401
    body = resp.json()
    assert body["error"]["code"] == "unauthenticated"
    assert body["request_id"].startswith("req_")


@pytest.mark.parametrize("path", ["/healthz", "/docs", "/openapi.json"])
def test_public_routes(server: Server, path: str) -> None:
    assert httpx.get(server.url + path, timeout=60).status_code == 200


def test_docs_served_from_the_package(server: Server) -> None:
    page = httpx.get(server.url + "/docs").text
    assert "/docs/static/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()
    asset = httpx.get(server.url + "/docs/static/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000


def test_wrong_token_is_401(server: Server) -> None:
    resp = httpx.get(server.url + "/v1/sandboxes", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401


def test_admin_key_in_every_auth_style(server: Server) -> None:
    key = server.admin_key
    basic = base64.b64encode(f"{key}:".encode()).decode()
    for kwargs in (
        {"headers": {"Authorization": f"Bearer {key}"}},
        {"headers": {"X-API-Key": key}},
        {"headers": {"Authorization": f"Basic {basic}"}},
        {"params": {"access_token": key}},
    ):
        assert httpx.get(server.url + "/v1/sandboxes", **kwargs).status_code == 200, kwargs


def new_token(api: httpx.Client, **body: object) -> dict:
    resp = api.post("/v1/tokens", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_sandbox_limited_token(api: httpx.Client, server: Server, sandbox_id: str) -> None:
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        token = new_token(api, name="limited", scopes=["read", "exec"], sandbox_ids=[sandbox_id])
        with server.client(token["secret"]) as limited:
            ok = limited.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "echo hi"})
            assert ok.status_code == 200 and ok.json()["stdout"] == "hi\n"
            # Another sandbox is as missing: 404, so that its existence cannot be probed.
            denied = limited.post(f"/v1/sandboxes/{other}/exec", json={"command": "echo hi"})
            assert denied.status_code == 404
            assert denied.json()["error"]["code"] == "not_found"
            assert limited.get(f"/v1/sandboxes/{other}").status_code == 404
            assert limited.get(f"/v1/sandboxes/{other}/commands").status_code == 404
            listed = [s["id"] for s in limited.get("/v1/sandboxes").json()["items"]]
            assert listed == [sandbox_id]
            assert limited.post("/v1/sandboxes", json={}).status_code == 403
            assert limited.get("/v1/tokens").status_code == 403
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def test_scopes(api: httpx.Client, server: Server, sandbox_id: str) -> None:
    reader = new_token(api, scopes=["read"])
    with server.client(reader["secret"]) as client:
        assert client.get(f"/v1/sandboxes/{sandbox_id}").status_code == 200
        resp = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "true"})
        assert resp.status_code == 403
        assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 403


def test_expired_and_revoked_tokens(api: httpx.Client, server: Server) -> None:
    short = new_token(api, scopes=["read"], expires_in_seconds=1)
    with server.client(short["secret"]) as client:
        assert client.get("/v1/sandboxes").status_code == 200
        time.sleep(1.2)
        assert client.get("/v1/sandboxes").status_code == 401
    revoked = new_token(api, scopes=["read"])
    with server.client(revoked["secret"]) as client:
        assert client.get("/v1/sandboxes").status_code == 200
        assert api.delete(f"/v1/tokens/{revoked['id']}").status_code == 204
        assert client.get("/v1/sandboxes").status_code == 401
    assert api.delete(f"/v1/tokens/{revoked['id']}").status_code == 404


def test_token_listing_never_shows_secrets(api: httpx.Client) -> None:
    token = new_token(api, name="listed")
    listed = api.get("/v1/tokens").json()["items"]
    mine = next(t for t in listed if t["id"] == token["id"])
    assert "secret" not in mine
    assert token["secret"].startswith(mine["prefix"])
    assert token["secret"] not in str(listed)


def test_secret_is_not_in_the_database(api: httpx.Client, server: Server) -> None:
    token = new_token(api, name="hashed")
    secret = token["secret"].encode()
    files = list(server.data_dir.glob("corral.db*"))
    assert files
    for path in files:
        assert secret not in path.read_bytes(), path
    assert server.admin_key.encode() not in b"".join(p.read_bytes() for p in files)
