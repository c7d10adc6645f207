"""Acceptance 2: one sandbox, created through one face, runs commands through all five faces
and shows one history in each face that lists history (and in the native API)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.faces.conftest import FacesServer

pytestmark = pytest.mark.sandbox


def test_one_sandbox_five_faces_one_history(faces_server: FacesServer, fapi: httpx.Client) -> None:
    name = "shared-" + uuid.uuid4().hex[:6]
    created = fapi.post("/v1/runtimes", json={"name": name})  # Runta creates it
    assert created.status_code == 201, created.text
    sid = created.json()["data"]["id"]
    owner = "hist-" + uuid.uuid4().hex[:6]
    try:
        ran: list[str] = []
        # Runta, by name.
        runta = fapi.post(f"/v1/runtimes/{name}/exec", json={"command": "echo runta >> trail"})
        assert runta.json()["data"]["exit_code"] == 0
        # Vercel: the sandbox id is the session id.
        vercel = fapi.post(
            f"/v2/sandboxes/sessions/{sid}/cmd",
            json={"command": "sh", "args": ["-c", "echo vercel >> trail"], "wait": True},
        )
        last = json.loads(vercel.text.strip().splitlines()[-1])["command"]
        assert last["exitCode"] == 0
        ran.append(last["id"])
        # CMDOP: the sandbox id is the machine id.
        body = {"machine_id": sid, "command": "echo cmdop >> trail"}
        cmdop = fapi.post("/v1/commands", json=body)
        assert cmdop.json()["data"]["exit_code"] == 0
        ran.append(cmdop.json()["data"]["id"])
        # run-dat-sheesh: the sandbox id is the VM id.
        rds = fapi.post(f"/v1/vms/{sid}/exec", json={"cmd": "echo rundatsheesh >> trail"})
        assert rds.json()["exitCode"] == 0
        # cmd.io: a named command bound to this sandbox.
        assert fapi.post("/v1/users", json={"name": owner}).status_code == 201
        made = fapi.post(
            f"/v1/users/{owner}/commands",
            json={"name": "trail", "command": "echo cmdio >> trail; cat trail", "sandbox": name},
        )
        assert made.status_code == 201, made.text
        cmdio = httpx.get(
            f"{faces_server.url}/run/{owner}/trail", auth=(faces_server.admin_key, "")
        )
        assert cmdio.text == "runta\nvercel\ncmdop\nrundatsheesh\ncmdio\n"
        ran.append(cmdio.headers["x-command-id"])

        native = [c["id"] for c in fapi.get(f"/v1/sandboxes/{sid}/commands").json()["items"]]
        assert len(native) == 5 and set(ran) <= set(native)
        machine = fapi.get(f"/v1/machines/{sid}/commands").json()
        assert [c["id"] for c in machine["data"]] == native and machine["meta"]["total"] == 5
        assert [c["id"] for c in fapi.get(f"/v1/vms/{sid}/exec-logs").json()] == native
        assert native[0] == cmdio.headers["x-command-id"]  # newest first
        # The other faces see the same sandbox too.
        assert fapi.get(f"/v2/sandboxes/{sid}").json()["sandbox"]["id"] == sid
        assert fapi.get(f"/v1/machines/{name}").json()["data"]["id"] == sid
        assert fapi.get(f"/v1/vms/{sid}").json()["state"] == "RUNNING"
    finally:
        fapi.delete(f"/v1/users/{owner}")
        fapi.delete(f"/v1/runtimes/{sid}")
