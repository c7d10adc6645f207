"""The audit log: every state-changing call stored (who, what, on what, result, when, from
where), filtered and paged by `GET /v1/audit`, read by the SDK and `corral audit`."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import websockets

from corral.client import Client, PermissionDeniedError
from tests.conftest import Server
from tests.integration.helpers import wait_for
from tests.integration.test_sdk_cli import run_cli
from tests.ops.conftest import new_token

pytestmark = pytest.mark.sandbox


def entries(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    resp = api.get("/v1/audit", params={"limit": 1000, **params})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"items", "next_cursor"}
    return list(resp.json()["items"])


def eventually(api: httpx.Client, check: Callable[[list[dict[str, Any]]], bool],
               **params: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The entries matching `params` once `check` holds for them (they are written in the
    background, within a fraction of a second)."""
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = entries(api, **params)
        return check(found)

    assert wait_for(ready, 10), found
    return found


def test_create_exec_delete_and_revoke_are_recorded(
    ops_server: Server, ops_api: httpx.Client
) -> None:
    actor = new_token(ops_api, ["read", "exec", "sandboxes"], name="audit-actor")
    with httpx.Client(
        base_url=ops_server.url, timeout=60, headers={"Authorization": f"Bearer {actor['secret']}"}
    ) as http:
        created = http.post("/v1/sandboxes", json={})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert http.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"}).status_code == 200
        assert (
            http.post(f"/v1/sandboxes/{sid}/commands", json={"command": "true"}).status_code == 202
        )
        missing = http.post("/v1/sandboxes/sb_nosuchsandbox/exec", json={"command": "true"})
        assert missing.status_code == 404
        assert http.get(f"/v1/sandboxes/{sid}").status_code == 200  # a read: not audited
        assert http.delete(f"/v1/sandboxes/{sid}").status_code == 200
        # The access_token form: recorded with the query's secret masked.
        revoked = new_token(ops_api, ["read"], name="audit-revoked")
        resp = httpx.delete(
            f"{ops_server.url}/v1/tokens/{revoked['id']}",
            params={"access_token": ops_server.admin_key},
            timeout=30,
        )
        assert resp.status_code == 204

    mine = eventually(ops_api, lambda found: len(found) >= 5, token=actor["id"])
    actions = [(e["action"], e["target"], e["status"], e["result"]) for e in reversed(mine)]
    assert actions == [
        ("sandbox.create", sid, 201, "ok"),
        ("command.exec", sid, 200, "ok"),
        ("command.start", sid, 202, "ok"),
        ("command.exec", "sb_nosuchsandbox", 404, "error"),
        ("sandbox.delete", sid, 200, "ok"),
    ], mine
    first = mine[-1]
    assert first["token_name"] == "audit-actor" and first["method"] == "POST"
    assert first["path"] == "/v1/sandboxes" and first["address"] == "127.0.0.1"
    assert first["request_id"] == created.headers["x-request-id"]
    at = datetime.fromisoformat(first["at"])
    assert at.tzinfo is not None and abs(datetime.now(UTC) - at) < timedelta(minutes=5)

    about_token = eventually(ops_api, lambda found: len(found) == 2, target=revoked["id"])
    assert [e["action"] for e in about_token] == ["token.revoke", "token.create"]
    revokes = about_token[:1]
    assert revokes[0]["token_id"] == "admin" and revokes[0]["status"] == 204
    assert ops_server.admin_key not in revokes[0]["path"]
    assert revokes[0]["path"] == f"/v1/tokens/{revoked['id']}?access_token=[redacted]"
    # Filters: by the console's `sandbox=`, action, result, time.
    about = entries(ops_api, sandbox=sid)
    assert {e["action"] for e in about} == {"sandbox.create", "command.exec", "command.start",
                                            "sandbox.delete"}  # fmt: skip
    assert [e["target"] for e in entries(ops_api, token=actor["id"], result="error")] == [
        "sb_nosuchsandbox"
    ]
    assert {e["action"] for e in entries(ops_api, token=actor["id"], action="sandbox.*")} == {
        "sandbox.create", "sandbox.delete"
    }  # fmt: skip
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert entries(ops_api, token=actor["id"], since=later) == []
    assert len(entries(ops_api, token=actor["id"], until=later)) == 5


def test_websocket_exec_is_recorded(ops_server: Server, ops_api: httpx.Client) -> None:
    created = ops_api.post("/v1/sandboxes", json={})
    sid = created.json()["id"]
    try:

        async def run() -> None:
            url = f"ws://127.0.0.1:{ops_server.port}/v1/sandboxes/{sid}/exec/stream"
            headers = {"Authorization": f"Bearer {ops_server.admin_key}"}
            async with websockets.connect(url, additional_headers=headers) as ws:
                await ws.send(json.dumps({"type": "start", "command": "echo hi"}))
                async for message in ws:
                    if json.loads(message).get("type") == "exit":
                        break

        asyncio.run(run())
        found = eventually(
            ops_api, lambda found: len(found) == 1, sandbox=sid, action="command.start"
        )
        assert found[0]["method"] == "GET" and found[0]["status"] == 101
        assert found[0]["token_id"] == "admin"
    finally:
        ops_api.delete(f"/v1/sandboxes/{sid}")


def test_paging_with_cursor(ops_server: Server, ops_api: httpx.Client) -> None:
    actor = new_token(ops_api, ["read"], name="audit-pager")
    auth = {"Authorization": f"Bearer {actor['secret']}"}
    for _ in range(7):  # refused (no sandboxes scope), and recorded as errors
        resp = httpx.post(f"{ops_server.url}/v1/sandboxes", json={}, headers=auth, timeout=30)
        assert resp.status_code == 403
    everything = eventually(ops_api, lambda found: len(found) == 7, token=actor["id"])
    assert all(e["result"] == "error" and e["status"] == 403 for e in everything)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"token": actor["id"], "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = ops_api.get("/v1/audit", params=params).json()
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in everything]  # newest first, each once
    bad = ops_api.get("/v1/audit", params={"cursor": "not-a-cursor!"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    bad = ops_api.get("/v1/audit", params={"result": "maybe"})
    assert bad.status_code == 422 and "request_id" in bad.json()


def test_who_may_read_the_audit_log(ops_server: Server, ops_api: httpx.Client) -> None:
    reader = new_token(ops_api, ["read", "exec", "files", "sandboxes"])
    auditor = new_token(ops_api, ["audit"])
    with httpx.Client(base_url=ops_server.url, timeout=30) as http:
        resp = http.get("/v1/audit")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthenticated"
        resp = http.get("/v1/audit", headers={"Authorization": f"Bearer {reader['secret']}"})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "permission_denied"
        resp = http.get("/v1/audit", headers={"Authorization": f"Bearer {auditor['secret']}"})
        assert resp.status_code == 200 and resp.json()["items"]
    with Client(ops_server.url, token=auditor["secret"]) as client:
        listed = client.list_audit(action="token.create", limit=2)
        assert len(listed) == 2 and all(e.action == "token.create" for e in listed)
    with Client(ops_server.url, token=reader["secret"]) as client, pytest.raises(
        PermissionDeniedError
    ):  # fmt: skip
        client.list_audit()


def test_cli_audit(ops_server: Server, ops_api: httpx.Client) -> None:
    name = "cli-audit-" + os.urandom(4).hex()
    made = new_token(ops_api, ["read"], name=name)
    eventually(ops_api, lambda found: len(found) >= 1, action="token.create")
    shown = run_cli(ops_server, "audit", "--action", "token.create", "--limit", "200", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert any(r["action"] == "token.create" and r["target"] == made["id"] for r in rows)
    table = run_cli(ops_server, "audit", "--target", made["id"])
    assert table.returncode == 0, table.stderr
    assert "token.create" in table.stdout and made["id"] in table.stdout
    refused = run_cli(ops_server, "audit", token=made["secret"])
    assert refused.returncode != 0 and "audit" in refused.stderr


def test_a_clean_shutdown_loses_no_entry() -> None:
    from tests.security.helpers import dedicated_server

    with dedicated_server("corral-ops-stop-", env={"CORRAL_RUNTIME": "fake"}) as srv:
        with srv.client() as api:
            made = [new_token(api, ["read"], name=f"stop-{n}")["id"] for n in range(20)]
        srv.stop()  # at once: the entries may still be queued, and must be stored on the way out
        srv.start()
        with srv.client() as api:
            stored = {e["target"] for e in entries(api, action="token.create")}
    assert set(made) <= stored
