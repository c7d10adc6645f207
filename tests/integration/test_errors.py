"""Acceptance: bad input gets a clear error in the envelope, with the right status; no 500."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox


def envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body


def test_malformed_json(api: httpx.Client, sandbox_id: str) -> None:
    resp = api.post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        content=b'{"command": "echo hi"',
        headers={"content-type": "application/json"},
    )
    envelope(resp, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": 5},
        {"command": ""},
        {"command": "true", "timeout_ms": "soon"},
        {"command": "true", "timeout_ms": -1},
        {"command": "true", "env": {"BAD-KEY": "x"}},
        {"command": "true", "env": {"K": 1}},
        {"command": "true", "cwd": "relative"},
        {"command": "true", "args": "not-a-list"},
        {"command": "true", "unknown_field": 1},
        {"command": "a\u0000b"},
        {"command": "true", "user": "No Body"},
        {"command": "true", "timeout_ms": 10**12},
        {"command": "true", "max_output_bytes": 10**12},
        [1, 2, 3],
        "text",
    ],
)
def test_wrong_types_are_422(api: httpx.Client, sandbox_id: str, body: object) -> None:
    body_json = envelope(api.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body), 422)
    assert body_json["error"]["code"] == "invalid_argument"
    assert body_json["error"]["details"]


def test_bad_sandbox_specs(api: httpx.Client) -> None:
    for spec in ({"name": "has space"}, {"memory_mb": 1}, {"ttl_seconds": 0}, {"network": "x"}):
        envelope(api.post("/v1/sandboxes", json=spec), 422, "invalid_argument")
    envelope(api.post("/v1/sandboxes", json={"template": "nope"}), 409, "conflict")


def test_unknown_ids(api: httpx.Client, sandbox_id: str) -> None:
    envelope(api.get("/v1/sandboxes/sb_nope"), 404, "not_found")
    envelope(api.delete("/v1/sandboxes/sb_nope"), 404, "not_found")
    envelope(api.post("/v1/sandboxes/sb_nope/exec", json={"command": "true"}), 404, "not_found")
    envelope(api.get(f"/v1/sandboxes/{sandbox_id}/commands/cmd_nope"), 404, "not_found")
    envelope(api.post(f"/v1/sandboxes/{sandbox_id}/commands/cmd_nope/cancel"), 404, "not_found")
    envelope(api.delete("/v1/tokens/tok_nope"), 404, "not_found")
    envelope(api.get("/v1/no/such/route"), 404, "not_found")


def test_command_of_another_sandbox_is_404(api: httpx.Client, sandbox_id: str) -> None:
    cid = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "true"}).json()["id"]
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        envelope(api.get(f"/v1/sandboxes/{other}/commands/{cid}"), 404, "not_found")
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def test_oversize_bodies(api: httpx.Client, sandbox_id: str) -> None:
    big = "x" * (11 * 1024 * 1024)
    url = f"/v1/sandboxes/{sandbox_id}/exec"
    envelope(api.post(url, json={"command": "true", "stdin": big}), 413, "payload_too_large")

    def chunks():  # no content-length: the limit is counted while reading
        for _ in range(12):
            yield b"x" * (1024 * 1024)

    resp = api.post(url, content=chunks(), headers={"content-type": "application/json"})
    envelope(resp, 413, "payload_too_large")


def test_method_and_query_errors(api: httpx.Client, sandbox_id: str) -> None:
    envelope(api.put("/v1/sandboxes"), 405, "method_not_allowed")
    envelope(api.get("/v1/sandboxes", params={"limit": "many"}), 422, "invalid_argument")
    envelope(api.get("/v1/sandboxes", params={"cursor": "%%%"}), 400, "bad_request")
    envelope(api.get("/v1/sandboxes", params={"state": "sleeping"}), 422, "invalid_argument")
    base = f"/v1/sandboxes/{sandbox_id}/commands"
    envelope(api.get(base, params={"since": "yesterday"}), 422, "invalid_argument")


def test_conflicts(api: httpx.Client) -> None:
    created = api.post("/v1/sandboxes", json={"name": "conflict-test"})
    assert created.status_code == 201
    sid = created.json()["id"]
    try:
        envelope(api.post("/v1/sandboxes", json={"name": "conflict-test"}), 409, "conflict")
        assert api.post(f"/v1/sandboxes/{sid}/stop").json()["state"] == "stopped"
        resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
        envelope(resp, 409, "sandbox_not_running")
        assert api.post(f"/v1/sandboxes/{sid}/start").json()["state"] == "running"
        ok = api.post("/v1/sandboxes/conflict-test/exec", json={"command": "echo back"})
        assert ok.json()["stdout"] == "back\n"
    finally:
        assert api.delete(f"/v1/sandboxes/{sid}").json()["state"] == "deleted"
    # The name is free again once its sandbox is deleted.
    again = api.post("/v1/sandboxes", json={"name": "conflict-test"})
    assert again.status_code == 201
    api.delete(f"/v1/sandboxes/{again.json()['id']}")


def test_garbage_never_gives_500(api: httpx.Client, sandbox_id: str) -> None:
    payloads = [b"", b"null", b"{}", b"[]", b'{"command": null}', b"\xff\xfe", b"{" * 10000,
                b'{"command": "true", "env": []}', b'"' + b"a" * 1000, b"1e999999"]  # fmt: skip
    paths = ["/v1/sandboxes", f"/v1/sandboxes/{sandbox_id}/exec",
             f"/v1/sandboxes/{sandbox_id}/commands", "/v1/tokens"]  # fmt: skip
    for path in paths:
        for payload in payloads:
            resp = api.post(path, content=payload, headers={"content-type": "application/json"})
            assert resp.status_code < 500, (path, payload[:20], resp.text)
            if resp.status_code >= 400:
                envelope(resp, resp.status_code)


@pytest.fixture(scope="module")
def limited_server():
    srv = Server(
        make_data_dir("corral-test-limits-"),
        env={
            "CORRAL_RATE_LIMIT_PER_SECOND": "2",
            "CORRAL_RATE_LIMIT_BURST": "5",
            "CORRAL_MAX_SANDBOXES": "1",
        },
    )
    srv.start()
    yield srv
    srv.stop()


def test_rate_limit_and_quota_are_429(limited_server: Server) -> None:
    with limited_server.client() as api:
        first = api.post("/v1/sandboxes", json={})
        assert first.status_code == 201
        envelope(api.post("/v1/sandboxes", json={}), 429, "rate_limited")
        statuses = [api.get("/v1/sandboxes").status_code for _ in range(10)]
        assert 429 in statuses
        limited = next(
            r for r in (api.get("/v1/sandboxes") for _ in range(5)) if r.status_code == 429
        )
        envelope(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
