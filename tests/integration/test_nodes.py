"""The built-in node in `/v1/nodes`: online with its capacity and load, drain and undrain
through the API, the SDK and the CLI, and placement that honours them."""

from __future__ import annotations

import json

import httpx
import pytest

from corral import Client, NodeState, NotFoundError, UnavailableError
from tests.conftest import Server
from tests.integration.test_sdk_cli import run_cli

pytestmark = pytest.mark.sandbox


def test_the_local_node_is_listed_online_with_its_load(server: Server, api: httpx.Client) -> None:
    before = api.get("/v1/nodes/local").json()
    created = api.post("/v1/sandboxes", json={})
    assert created.status_code == 201, created.text
    assert created.json()["node_id"] == "local"
    try:
        listed = api.get("/v1/nodes")
        assert listed.status_code == 200, listed.text
        (node,) = listed.json()["items"]
        assert node["id"] == "local"
        assert node["state"] == "online"
        assert node["sandboxes"] == before["sandboxes"] + 1
        assert node["capacity"]["sandboxes"] >= 1 and node["capacity"]["cpus"] >= 1
        assert node["runtime"] == "namespaces" and "host" in node["templates"]
        assert node["epoch"] >= 1
    finally:
        api.delete(f"/v1/sandboxes/{created.json()['id']}")
    missing = api.get("/v1/nodes/elsewhere")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_a_draining_node_takes_no_new_sandbox(server: Server, api: httpx.Client) -> None:
    running = api.post("/v1/sandboxes", json={}).json()
    with Client(server.url, token=server.admin_key) as client:
        try:
            drained = client.drain_node("local")
            assert drained.state == NodeState.draining
            refused = api.post("/v1/sandboxes", json={})
            assert refused.status_code == 503, refused.text
            assert "draining" in refused.json()["error"]["message"]
            with pytest.raises(UnavailableError):
                client.create_sandbox()
            # What it holds keeps working.
            done = api.post(f"/v1/sandboxes/{running['id']}/exec", json={"command": "echo ok"})
            assert done.json()["stdout"] == "ok\n"
            assert client.get_node("local").state == NodeState.draining
        finally:
            assert client.undrain_node("local").state == NodeState.online
        again = client.create_sandbox(node="local")
        assert again.node_id == "local"
        client.delete_sandbox(again.id)
        with pytest.raises(NotFoundError):
            client.drain_node("elsewhere")
    api.delete(f"/v1/sandboxes/{running['id']}")


def test_create_on_an_unknown_node_is_refused(api: httpx.Client) -> None:
    resp = api.post("/v1/sandboxes", json={"node": "elsewhere"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["loc"] == ["body", "node"]
    bad = api.post("/v1/sandboxes", json={"node": "a.b"})  # not one subject token
    assert bad.status_code == 422


def test_reading_nodes_needs_read_and_draining_needs_admin(
    api: httpx.Client, server: Server
) -> None:
    token = api.post("/v1/tokens", json={"scopes": ["exec"]}).json()["secret"]
    with server.client(token) as limited:
        assert limited.get("/v1/nodes").status_code == 403
    reader = api.post("/v1/tokens", json={"scopes": ["read"]}).json()["secret"]
    with server.client(reader) as limited:
        assert limited.get("/v1/nodes").status_code == 200
        assert limited.post("/v1/nodes/local/drain").status_code == 403


def test_cli_node_ls_and_drain(server: Server) -> None:
    listed = run_cli(server, "node", "ls")
    assert listed.returncode == 0, listed.stderr
    assert "local" in listed.stdout and "online" in listed.stdout
    try:
        drained = run_cli(server, "node", "drain", "local")
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.strip() == "local draining"
    finally:
        undone = run_cli(server, "node", "drain", "local", "--undo", "--json")
        assert undone.returncode == 0, undone.stderr
    assert json.loads(undone.stdout)["state"] == "online"
