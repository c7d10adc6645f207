"""Tokens limited to some sandboxes, on every face: a name covers the live sandbox that bears it
and nothing else (not the history of a deleted sandbox that bore it before), and a sandbox the
token may not use answers exactly as a missing one."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.sandbox

MISSING_SANDBOX = "sb_0000000000missingmissing00"
MISSING_COMMAND = "cmd_0000000000missingmissing0"
WS_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
}


def new_token(api: httpx.Client, **body: object) -> str:
    resp = api.post("/v1/tokens", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["secret"])


def create(api: httpx.Client, **body: object) -> str:
    resp = api.post("/v1/sandboxes", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def run_native(api: httpx.Client, sandbox: str, command: str) -> str:
    resp = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": command})
    assert resp.status_code == 200 and resp.json()["exit_code"] == 0, resp.text
    return str(resp.json()["id"])


def run_cmdop(api: httpx.Client, sandbox: str, command: str) -> str:
    resp = api.post("/v1/commands", json={"machine_id": sandbox, "command": command})
    assert resp.status_code == 200 and resp.json()["data"]["exit_code"] == 0, resp.text
    return str(resp.json()["data"]["id"])


def shape(resp: httpx.Response, ref: str) -> tuple[int, object]:
    """Status and body, with `ref` (the id asked for) taken out and a per-request id dropped,
    so that the answers for two different ids can be compared."""
    text = resp.text.replace(ref, "<ref>")
    try:
        body = json.loads(text)
    except ValueError:
        return resp.status_code, text
    if isinstance(body, dict):
        body.pop("request_id", None)
    return resp.status_code, body


# --- a name reused after its sandbox is deleted -------------------------------------------------


def test_reused_name_does_not_reach_the_deleted_sandbox(server: Server, api: httpx.Client) -> None:
    name = f"reused-{uuid.uuid4().hex[:8]}"
    old = create(api, name=name)
    native_cid = run_native(api, old, "echo old-secret-native")
    cmdop_cid = run_cmdop(api, old, "echo old-secret-cmdop")
    rds = api.post(f"/v1/vms/{old}/exec", json={"cmd": "echo old-secret-rds"})
    assert rds.status_code == 200, rds.text
    by_name = new_token(api, scopes=["read", "exec"], sandbox_ids=[name])
    by_id = new_token(api, scopes=["read"], sandbox_ids=[old])
    with server.client(by_name) as limited:
        # While the sandbox lives, its name covers it (and its history).
        assert limited.get(f"/v1/commands/{cmdop_cid}").status_code == 200
        assert limited.get(f"/v1/sandboxes/{old}/commands/{native_cid}").status_code == 200
    assert api.delete(f"/v1/sandboxes/{old}").status_code == 200
    new = create(api, name=name)
    try:
        with server.client(by_name) as limited:
            old_urls = [
                # native
                f"/v1/sandboxes/{old}",
                f"/v1/sandboxes/{old}/commands",
                f"/v1/sandboxes/{old}/commands/{native_cid}",
                f"/v1/sandboxes/{old}/commands/{native_cid}/logs",
                # CMDOP
                f"/v1/commands/{cmdop_cid}",
                f"/v1/commands/{native_cid}",
                f"/v1/machines/{old}",
                f"/v1/machines/{old}/commands",
                # run-dat-sheesh
                f"/v1/vms/{old}",
                f"/v1/vms/{old}/exec-logs",
                # Runta
                f"/v1/runtimes/{old}",
                # Vercel
                f"/v2/sandboxes/{old}",
                f"/v2/sandboxes/sessions/{old}/cmd/{native_cid}",
                f"/v2/sandboxes/sessions/{old}/cmd/{native_cid}/logs",
            ]
            for url in old_urls:
                resp = limited.get(url)
                assert resp.status_code == 404, (url, resp.status_code, resp.text)
                assert "old-secret" not in resp.text
            # A command of the old sandbox cannot be cancelled either.
            assert limited.delete(f"/v1/commands/{cmdop_cid}").status_code == 404
            # Lists, deleted sandboxes included, hold the new sandbox only.
            listed = limited.get("/v1/sandboxes", params={"include_deleted": "true"})
            assert [s["id"] for s in listed.json()["items"]] == [new]
            deleted = limited.get("/v1/sandboxes", params={"state": "deleted"})
            assert deleted.json()["items"] == []
            assert [m["id"] for m in limited.get("/v1/machines").json()["data"]] == [new]
            assert [v["id"] for v in limited.get("/v1/vms").json()] == [new]
            assert [r["id"] for r in limited.get("/v1/runtimes").json()["data"]] == [new]
            # The name is the new sandbox's, with none of the old history.
            for url in (
                f"/v1/sandboxes/{name}/commands",
                f"/v1/machines/{name}/commands",
                f"/v1/vms/{name}/exec-logs",
            ):
                resp = limited.get(url)
                assert resp.status_code == 200, (url, resp.text)
                assert native_cid not in resp.text and cmdop_cid not in resp.text, url
            assert limited.get(f"/v1/sandboxes/{name}").json()["id"] == new
        # The deleted sandbox's history stays reachable by its id, for tokens that may use it.
        for token in (server.admin_key, by_id):
            with server.client(token) as allowed:
                got = allowed.get(f"/v1/commands/{cmdop_cid}")
                assert got.status_code == 200, got.text
                assert got.json()["data"]["stdout"] == "old-secret-cmdop\n"
                logs = allowed.get(f"/v1/vms/{old}/exec-logs")
                assert logs.status_code == 200, logs.text
                assert {native_cid, cmdop_cid} <= {e["id"] for e in logs.json()}
                assert old in _all_sandbox_ids(allowed, include_deleted="true")
    finally:
        api.delete(f"/v1/sandboxes/{new}")


def _all_sandbox_ids(client: httpx.Client, **params: str) -> set[str]:
    """Every page: a shared server holds the sandboxes of other tests too."""
    found: set[str] = set()
    cursor: str | None = None
    while True:
        page = client.get(
            "/v1/sandboxes",
            params={**params, "limit": "1000", **({"cursor": cursor} if cursor else {})},
        ).json()
        found |= {s["id"] for s in page["items"]}
        cursor = page.get("next_cursor")
        if not cursor:
            return found


# --- another sandbox answers as a missing one ---------------------------------------------------


@pytest.fixture
def two_sandboxes(api: httpx.Client) -> Iterator[tuple[str, str]]:
    mine, other = create(api), create(api)
    yield mine, other
    api.delete(f"/v1/sandboxes/{mine}")
    api.delete(f"/v1/sandboxes/{other}")


Probe = Callable[[httpx.Client, str], httpx.Response]

SANDBOX_PROBES: dict[str, Probe] = {
    "native get": lambda c, s: c.get(f"/v1/sandboxes/{s}"),
    "native exec": lambda c, s: c.post(f"/v1/sandboxes/{s}/exec", json={"command": "true"}),
    "native history": lambda c, s: c.get(f"/v1/sandboxes/{s}/commands"),
    "native stop": lambda c, s: c.post(f"/v1/sandboxes/{s}/stop"),
    "native delete": lambda c, s: c.delete(f"/v1/sandboxes/{s}"),
    "native files": lambda c, s: c.get(f"/v1/sandboxes/{s}/archive", params={"path": "/tmp"}),
    "native exec stream": lambda c, s: c.get(f"/v1/sandboxes/{s}/exec/stream", headers=WS_HEADERS),
    "cmdop exec": lambda c, s: c.post("/v1/commands", json={"machine_id": s, "command": "true"}),
    "cmdop async": lambda c, s: c.post(
        "/v1/commands/async", json={"machine_id": s, "command": "true"}
    ),
    "cmdop machine": lambda c, s: c.get(f"/v1/machines/{s}"),
    "cmdop history": lambda c, s: c.get(f"/v1/machines/{s}/commands"),
    "rds get": lambda c, s: c.get(f"/v1/vms/{s}"),
    "rds exec": lambda c, s: c.post(f"/v1/vms/{s}/exec", json={"cmd": "true"}),
    "rds exec-logs": lambda c, s: c.get(f"/v1/vms/{s}/exec-logs"),
    "rds stop": lambda c, s: c.post(f"/v1/vms/{s}/stop"),
    "rds download": lambda c, s: c.get(f"/v1/vms/{s}/files/download", params={"path": "/tmp"}),
    "runta get": lambda c, s: c.get(f"/v1/runtimes/{s}"),
    "runta exec": lambda c, s: c.post(f"/v1/runtimes/{s}/exec", json={"command": "true"}),
    "runta delete": lambda c, s: c.delete(f"/v1/runtimes/{s}"),
    "runta exec stream": lambda c, s: c.get(f"/v2/runtimes/{s}/exec/stream", headers=WS_HEADERS),
    "vercel get": lambda c, s: c.get(f"/v2/sandboxes/{s}"),
    "vercel stop": lambda c, s: c.post(f"/v2/sandboxes/{s}/stop"),
    "vercel cmd": lambda c, s: c.post(
        f"/v2/sandboxes/sessions/{s}/cmd", json={"command": "true", "wait": False}
    ),
}


CHANGES_STATE = {"native stop", "native delete", "rds stop", "runta delete", "vercel stop"}


def test_another_sandbox_answers_as_a_missing_one(
    server: Server, api: httpx.Client, two_sandboxes: tuple[str, str]
) -> None:
    mine, other = two_sandboxes
    token = new_token(api, scopes=["read", "exec", "files", "sandboxes"], sandbox_ids=[mine])
    with server.client(token) as limited:
        for what, probe in SANDBOX_PROBES.items():
            if what not in CHANGES_STATE and "stream" not in what:
                own = probe(limited, mine)  # the route is real: the token's own sandbox passes
                assert own.status_code < 400, (what, own.status_code, own.text)
            denied = shape(probe(limited, other), other)
            missing = shape(probe(limited, MISSING_SANDBOX), MISSING_SANDBOX)
            assert denied[0] == 404, (what, denied)
            assert denied == missing, what
        assert api.get(f"/v1/sandboxes/{other}").json()["state"] == "running"  # untouched

        # CMDOP batch: each entry as for a missing machine.
        resp = limited.post(
            "/v1/commands/batch",
            json={"machine_ids": [mine, other, MISSING_SANDBOX], "command": "true"},
        )
        assert resp.status_code == 200, resp.text
        entries = resp.json()["data"]
        assert entries[mine]["exit_code"] == 0
        denied_entry = str(entries[other]).replace(other, "<ref>")
        missing_entry = str(entries[MISSING_SANDBOX]).replace(MISSING_SANDBOX, "<ref>")
        assert entries[other]["error"]["code"] == "not_found", entries
        assert denied_entry == missing_entry

        # A command of the other sandbox answers as a missing command.
        cid = run_native(api, other, "echo theirs")
        command_probes: dict[str, Probe] = {
            "cmdop get": lambda c, i: c.get(f"/v1/commands/{i}"),
            "cmdop cancel": lambda c, i: c.delete(f"/v1/commands/{i}"),
            "vercel get": lambda c, i: c.get(f"/v2/sandboxes/sessions/{mine}/cmd/{i}"),
            "vercel logs": lambda c, i: c.get(f"/v2/sandboxes/sessions/{mine}/cmd/{i}/logs"),
            "native get": lambda c, i: c.get(f"/v1/sandboxes/{mine}/commands/{i}"),
        }
        own_cid = run_native(api, mine, "echo mine")
        for what, probe in command_probes.items():
            if what != "cmdop cancel":
                own = probe(limited, own_cid)
                assert own.status_code == 200, (what, own.status_code, own.text)
            denied = shape(probe(limited, cid), cid)
            missing = shape(probe(limited, MISSING_COMMAND), MISSING_COMMAND)
            assert denied[0] == 404, (what, denied)
            assert denied == missing, what
