"""Snapshots and forks through the API, the SDK and the CLI.

Most of these run a real server on the fake runtime (its "capture" records which sandbox a
snapshot was taken of): what the API, the store, the reaper and the clients do is the same
whatever the runtime. The tests of real captures run on the namespaces runtime once it can take
snapshots.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from corral import Client, ConflictError, NotFoundError, Snapshot, SnapshotState
from tests.conftest import Server, make_data_dir
from tests.integration.test_sdk_cli import run_cli

FAKE_SNAPSHOT_BYTES = 4096  # what the fake runtime reports for a capture


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(make_data_dir("corral-test-snapshots-"), env={"CORRAL_RUNTIME": "fake"})
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def _sandbox(api: httpx.Client, **spec: object) -> dict[str, object]:
    resp = api.post("/v1/sandboxes", json=spec)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _snapshot(api: httpx.Client, sid: object, **body: object) -> dict[str, object]:
    resp = api.post(f"/v1/sandboxes/{sid}/snapshots", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def json_id(text: str) -> str:
    return str(json.loads(text)["id"])


def _error(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    return dict(resp.json()["error"])


def test_snapshot_start_from_it_and_delete(server: Server) -> None:
    with server.client() as api:
        source = _sandbox(api, labels={"role": "source"})
        before = datetime.now(UTC)
        snap = _snapshot(api, source["id"], name="base", expires_in=3600, labels={"v": "1"})
        assert str(snap["id"]).startswith("snap_") and snap["name"] == "base"
        assert snap["state"] == "ready" and snap["size_bytes"] == FAKE_SNAPSHOT_BYTES
        assert snap["sandbox_id"] == source["id"] and snap["node_id"] == source["node_id"]
        assert snap["template"] == "host" and snap["image"] is None
        assert snap["labels"] == {"v": "1"} and snap["used_by"] == []
        expires = datetime.fromisoformat(str(snap["expires_at"]))
        assert before + timedelta(seconds=3590) < expires < before + timedelta(seconds=3700)
        assert api.get("/v1/snapshots/base").json()["id"] == snap["id"]
        assert api.get(f"/v1/snapshots/{snap['id']}").json()["name"] == "base"
        dup = api.post(f"/v1/sandboxes/{source['id']}/snapshots", json={"name": "base"})
        assert "base" in str(_error(dup, 409)["message"])

        # Started by name or id: on the snapshot's node, with its template, naming its id.
        child = _sandbox(api, snapshot="base", labels={"role": "child"})
        assert child["snapshot"] == snap["id"] and child["node_id"] == snap["node_id"]
        assert child["template"] == "host" and child["state"] == "running"
        second = _sandbox(api, snapshot=snap["id"], template="host")
        assert api.get(f"/v1/sandboxes/{second['id']}").json()["snapshot"] == snap["id"]
        assert api.get("/v1/snapshots/base").json()["used_by"] == sorted(
            [child["id"], second["id"]]
        )
        # Its sandboxes keep it: refused while one is not deleted (a stopped one counts).
        api.post(f"/v1/sandboxes/{second['id']}/stop")
        api.delete(f"/v1/sandboxes/{child['id']}")
        busy = _error(api.delete("/v1/snapshots/base"), 409)
        assert second["id"] in str(busy["message"]) and child["id"] not in str(busy["message"])
        api.delete(f"/v1/sandboxes/{second['id']}")
        # It outlives the sandbox it was taken of.
        api.delete(f"/v1/sandboxes/{source['id']}")
        assert api.get("/v1/snapshots/base").status_code == 200
        assert api.delete("/v1/snapshots/base").status_code == 204
        _error(api.get(f"/v1/snapshots/{snap['id']}"), 404)
        _error(api.post("/v1/sandboxes", json={"snapshot": snap["id"]}), 404)
        assert snap["id"] not in [s["id"] for s in api.get("/v1/snapshots").json()["items"]]


def test_snapshot_listing_pages_and_filters_by_sandbox(server: Server) -> None:
    with server.client() as api:
        one, two = _sandbox(api), _sandbox(api)
        made = [_snapshot(api, one["id"])["id"] for _ in range(3)]
        other = _snapshot(api, two["id"])["id"]
        page = api.get("/v1/snapshots", params={"sandbox": one["id"], "limit": 2}).json()
        assert [s["id"] for s in page["items"]] == made[:2] and page["next_cursor"]
        rest = api.get(
            "/v1/snapshots",
            params={"sandbox": one["id"], "limit": 2, "cursor": page["next_cursor"]},
        ).json()
        assert [s["id"] for s in rest["items"]] == made[2:] and rest["next_cursor"] is None
        of_two = api.get("/v1/snapshots", params={"sandbox": two["id"]}).json()["items"]
        assert [s["id"] for s in of_two] == [other]
        assert api.get("/v1/snapshots", params={"sandbox": "sb_none"}).json()["items"] == []
        _error(api.get("/v1/snapshots", params={"cursor": "garbage"}), 400)
        for sid in (*made, other):
            assert api.delete(f"/v1/snapshots/{sid}").status_code == 204
        for box in (one, two):
            api.delete(f"/v1/sandboxes/{box['id']}")


def test_fork_is_a_snapshot_and_a_sandbox_in_one_call(server: Server) -> None:
    with server.client() as api:
        source = _sandbox(api, env={"A": "1"}, disk_mb=64, pids=100, labels={"s": "1"})
        resp = api.post(
            f"/v1/sandboxes/{source['id']}/fork", json={"name": "forked", "labels": {"f": "1"}}
        )
        assert resp.status_code == 201, resp.text
        fork = resp.json()
        assert fork["name"] == "forked" and fork["labels"] == {"f": "1"}
        assert fork["node_id"] == source["node_id"] and fork["state"] == "running"
        # A copy, run alike: the source's env and limits unless the fork gives its own.
        assert fork["env_keys"] == ["A"] and fork["disk_mb"] == 64 and fork["pids"] == 100
        own = api.post(f"/v1/sandboxes/{source['id']}/fork", json={"env": {"B": "2"}}).json()
        assert own["env_keys"] == ["B"] and own["disk_mb"] == 64 and own["labels"] == {}
        api.delete(f"/v1/sandboxes/{own['id']}")
        api.delete(f"/v1/snapshots/{own['snapshot']}")
        snap = api.get(f"/v1/snapshots/{fork['snapshot']}").json()
        assert snap["sandbox_id"] == source["id"] and snap["used_by"] == [fork["id"]]
        # A fork of a fork.
        again = api.post("/v1/sandboxes/forked/fork", json={})
        assert again.status_code == 201 and again.json()["snapshot"] != fork["snapshot"]
        for sid in (again.json()["id"], fork["id"], source["id"]):
            api.delete(f"/v1/sandboxes/{sid}")
        for sid in (fork["snapshot"], again.json()["snapshot"]):
            assert api.delete(f"/v1/snapshots/{sid}").status_code == 204


def test_bad_snapshot_requests_get_clear_errors_and_leave_nothing(server: Server) -> None:
    with server.client() as api:
        count = len(api.get("/v1/snapshots").json()["items"])
        box = _sandbox(api)
        sid = box["id"]
        for body in (
            {"expires_in": 0},
            {"expires_in": -5},
            {"expires_in": "soon"},
            {"expires_in": 10**12},
            {"expires_in": 60, "expires_at": "2999-01-01T00:00:00Z"},
            {"expires_at": "not a time"},
            {"name": "../x"},
            {"colour": "red"},
        ):
            _error(api.post(f"/v1/sandboxes/{sid}/snapshots", json=body), 422)
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        gone = _error(api.post(f"/v1/sandboxes/{sid}/snapshots", json={"expires_at": past}), 422)
        assert "past" in str(gone["message"])
        _error(api.post("/v1/sandboxes/sb_nope/snapshots", json={}), 404)
        _error(api.post("/v1/sandboxes/sb_nope/fork", json={}), 404)
        _error(api.get("/v1/snapshots/snap_nope"), 404)
        _error(api.delete("/v1/snapshots/snap_nope"), 404)
        unknown = _error(api.post("/v1/sandboxes", json={"snapshot": "snap_nope"}), 404)
        assert "snap_nope" in str(unknown["message"])
        _error(api.post("/v1/sandboxes", json={"snapshot": "a/b"}), 422)
        # A start from a snapshot keeps its source's template and node.
        snap = _snapshot(api, sid)
        conflict = api.post("/v1/sandboxes", json={"snapshot": snap["id"], "template": "other"})
        assert "template" in str(_error(conflict, 422)["message"])
        elsewhere = api.post("/v1/sandboxes", json={"snapshot": snap["id"], "node": "n9"})
        assert "node" in str(_error(elsewhere, 422)["message"])
        _error(api.post(f"/v1/sandboxes/{sid}/fork", json={"snapshot": snap["id"]}), 422)
        _error(api.post(f"/v1/sandboxes/{sid}/fork", json={"template": "other"}), 422)
        assert api.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
        # Only a running sandbox: paused, stopped and deleted ones are refused (409).
        api.post(f"/v1/sandboxes/{sid}/pause")
        paused = _error(api.post(f"/v1/sandboxes/{sid}/snapshots", json={}), 409)
        assert paused["code"] == "sandbox_not_running" and "resume" in str(paused["message"])
        api.post(f"/v1/sandboxes/{sid}/resume")
        api.post(f"/v1/sandboxes/{sid}/stop")
        stopped = _error(api.post(f"/v1/sandboxes/{sid}/snapshots", json={}), 409)
        assert stopped["code"] == "sandbox_not_running" and "stopped" in str(stopped["message"])
        _error(api.post(f"/v1/sandboxes/{sid}/fork", json={}), 409)
        api.delete(f"/v1/sandboxes/{sid}")
        deleted = _error(api.post(f"/v1/sandboxes/{sid}/snapshots", json={}), 409)
        assert "deleted" in str(deleted["message"])
        # Nothing was left by any of them.
        assert len(api.get("/v1/snapshots").json()["items"]) == count


def test_expired_snapshots_are_removed_unless_in_use(server: Server) -> None:
    with server.client() as api:
        box = _sandbox(api)
        lone = _snapshot(api, box["id"], expires_in=1)
        used = _snapshot(api, box["id"], expires_in=1)
        child = _sandbox(api, snapshot=used["id"])
        deadline = time.monotonic() + 10
        while api.get(f"/v1/snapshots/{lone['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the expired snapshot was not removed"
            time.sleep(0.2)
        # In use: kept (its sandbox runs on it) but no longer started from.
        kept = api.get(f"/v1/snapshots/{used['id']}")
        assert kept.status_code == 200 and kept.json()["used_by"] == [child["id"]]
        late = _error(api.post("/v1/sandboxes", json={"snapshot": used["id"]}), 409)
        assert "expired" in str(late["message"])
        api.delete(f"/v1/sandboxes/{child['id']}")
        deadline = time.monotonic() + 10
        while api.get(f"/v1/snapshots/{used['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the snapshot outlived its last sandbox"
            time.sleep(0.2)
        api.delete(f"/v1/sandboxes/{box['id']}")


def test_snapshot_scopes(server: Server) -> None:
    with server.client() as api:
        box = _sandbox(api)
        snap = _snapshot(api, box["id"])

        def token(**body: object) -> str:
            resp = api.post("/v1/tokens", json={"name": "t", **body})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["secret"])

        with server.client(token(scopes=["read"])) as reader:
            assert reader.get(f"/v1/snapshots/{snap['id']}").status_code == 200
            assert reader.get("/v1/snapshots").status_code == 200
            _error(reader.post(f"/v1/sandboxes/{box['id']}/snapshots", json={}), 403)
            _error(reader.post(f"/v1/sandboxes/{box['id']}/fork", json={}), 403)
            _error(reader.delete(f"/v1/snapshots/{snap['id']}"), 403)
        limited = token(scopes=["read", "sandboxes"], sandbox_ids=[box["id"]])
        with server.client(limited) as one:
            _error(one.get("/v1/snapshots"), 403)
            _error(one.post(f"/v1/sandboxes/{box['id']}/snapshots", json={}), 403)
            _error(one.post(f"/v1/sandboxes/{box['id']}/fork", json={}), 403)
        api.delete(f"/v1/snapshots/{snap['id']}")
        api.delete(f"/v1/sandboxes/{box['id']}")


def test_snapshots_through_the_sdk_and_the_cli(server: Server) -> None:
    with Client(server.url, token=server.admin_key) as client:
        box = client.create_sandbox(name="sdk-source")
        at = datetime.now(UTC) + timedelta(hours=1)
        made = client.create_snapshot(box, name="sdk-snap", expires_at=at, labels={"k": "v"})
        assert isinstance(made, Snapshot) and made.state == SnapshotState.ready
        assert made.expires_at is not None and abs(made.expires_at - at) < timedelta(seconds=1)
        child = client.create_sandbox(snapshot=made)
        assert child.snapshot == made.id
        assert client.get_snapshot("sdk-snap").used_by == [child.id]
        assert [s.id for s in client.list_snapshots(sandbox=box)] == [made.id]
        with pytest.raises(ConflictError):
            client.delete_snapshot(made)
        fork = client.fork(box, name="sdk-fork", labels={"x": "y"})
        assert fork.snapshot and fork.labels == {"x": "y"}
        assert client.get_snapshot(fork.snapshot).sandbox_id == box.id
        for sandbox in (child, fork):
            client.delete_sandbox(sandbox)
        client.delete_snapshot(fork.snapshot)
    listed = run_cli(server, "snapshot", "ls", "--sandbox", "sdk-source")
    assert listed.returncode == 0 and "sdk-snap" in listed.stdout and "4.0 KiB" in listed.stdout
    shown = run_cli(server, "snapshot", "inspect", "sdk-snap")
    assert shown.returncode == 0 and made.id in shown.stdout
    cli_snap = run_cli(server, "snapshot", "create", "sdk-source", "--name", "cli-snap")
    assert cli_snap.returncode == 0 and cli_snap.stdout.startswith("snap_"), cli_snap.stderr
    started = run_cli(server, "sandbox", "create", "--snapshot", "cli-snap", "--json")
    assert started.returncode == 0 and cli_snap.stdout.strip() in started.stdout, started.stderr
    shown_box = run_cli(server, "sandbox", "show", json_id(started.stdout))
    assert f"snapshot  {cli_snap.stdout.strip()}" in shown_box.stdout, shown_box.stdout
    forked = run_cli(server, "sandbox", "fork", "sdk-source", "--name", "cli-fork")
    assert forked.returncode == 0 and forked.stdout.startswith("sb_"), forked.stderr
    busy = run_cli(server, "snapshot", "rm", "cli-snap")
    assert busy.returncode != 0 and "in use" in busy.stderr
    missing = run_cli(server, "snapshot", "inspect", "nope")
    assert missing.returncode != 0 and "nope" in missing.stderr
    with Client(server.url, token=server.admin_key) as client:
        for sandbox in client.list_sandboxes():
            client.delete_sandbox(sandbox)
        left = [s.id for s in client.list_snapshots()]
    gone = run_cli(server, "snapshot", "rm", *left)
    assert gone.returncode == 0, gone.stderr
    with Client(server.url, token=server.admin_key) as client:
        assert client.list_snapshots() == []
        with pytest.raises(NotFoundError):
            client.get_snapshot("cli-snap")


# --- real captures (the namespaces runtime) ----------------------------------------------------


@pytest.fixture(scope="module")
def real_server() -> Iterator[Server]:
    srv = Server(make_data_dir("corral-test-snapshots-real-"))
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def _run(api: httpx.Client, sid: object, command: str) -> dict[str, object]:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.mark.sandbox
def test_sandboxes_from_a_snapshot_see_its_files_and_diverge(real_server: Server) -> None:
    with real_server.client() as api:
        source = _sandbox(api)
        wrote = _run(api, source["id"], "mkdir -p d && echo one > d/f && echo src > mine")
        assert wrote["exit_code"] == 0, wrote
        snap = _snapshot(api, source["id"])
        assert int(str(snap["size_bytes"])) > 0
        # The source goes on, unseen by what starts from the snapshot.
        _run(api, source["id"], "echo later >> d/f")
        a, b = _sandbox(api, snapshot=snap["id"]), _sandbox(api, snapshot=snap["id"])
        for box in (a, b):
            assert _run(api, box["id"], "cat d/f mine")["stdout"] == "one\nsrc\n"
        _run(api, a["id"], "echo a > d/f")
        _run(api, b["id"], "rm mine")
        assert _run(api, a["id"], "cat d/f; ls")["stdout"] == "a\nd\nmine\n"
        assert _run(api, b["id"], "cat d/f; ls")["stdout"] == "one\nd\n"
        fork = api.post(f"/v1/sandboxes/{a['id']}/fork", json={}).json()
        assert _run(api, fork["id"], "cat d/f")["stdout"] == "a\n"
        for box in (fork, a, b, source):
            api.delete(f"/v1/sandboxes/{box['id']}")
        for sid in (snap["id"], fork["snapshot"]):
            assert api.delete(f"/v1/snapshots/{sid}").status_code == 204
        assert not list((real_server.data_dir).glob(f"**/{snap['id']}"))
