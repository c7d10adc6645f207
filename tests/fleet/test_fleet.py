"""Two API replicas on one PostgreSQL and one NATS, three agents: any replica serves any
sandbox on any node."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres).start()
    yield running
    running.stop()


def test_creates_through_alternating_replicas_spread_over_every_node(fleet: Fleet) -> None:
    placed: dict[str, str] = {}
    for i in range(30):
        with fleet.client(i) as api:
            resp = api.post("/v1/sandboxes", json={"labels": {"i": str(i)}})
            assert resp.status_code == 201, resp.text
            placed[resp.json()["id"]] = resp.json()["node_id"]
    assert sorted(set(placed.values())) == ["n1", "n2", "n3"]
    counts = {n: list(placed.values()).count(n) for n in ("n1", "n2", "n3")}
    assert all(c == 10 for c in counts.values()), counts  # least loaded first: even
    # Every replica answers for every sandbox, and execs run on its node.
    for i, (sid, node) in enumerate(placed.items()):
        with fleet.client(i + 1) as api:
            got = api.get(f"/v1/sandboxes/{sid}")
            assert got.status_code == 200 and got.json()["node_id"] == node
            run = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": f"echo {i}; echo e >&2"})
            assert run.status_code == 200, run.text
            assert run.json()["stdout"] == f"{i}\n" and run.json()["stderr"] == "e\n"
            assert run.json()["status"] == "completed" and run.json()["exit_code"] == 0
    with fleet.client(0) as api:
        for sid in placed:
            assert api.delete(f"/v1/sandboxes/{sid}").status_code == 200


def _sandbox(fleet: Fleet, node: str, **spec: object) -> str:
    with fleet.client(0) as api:
        resp = api.post("/v1/sandboxes", json={"node": node, **spec})
        assert resp.status_code == 201, resp.text
        assert resp.json()["node_id"] == node
        return str(resp.json()["id"])


def _events(lines: Iterator[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("node", ["n1", "n2", "n3"])
def test_start_wait_stream_cancel_and_input_through_either_replica(fleet: Fleet, node: str) -> None:
    sid = _sandbox(fleet, node)
    a, b = fleet.client(0), fleet.client(1)
    with a, b:
        script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done; echo bye >&2; exit 3"
        started = a.post(f"/v1/sandboxes/{sid}/commands", json={"command": script})
        assert started.status_code == 202, started.text
        cid = started.json()["id"]
        # Followed live through the other replica, to its one terminal event.
        with b.stream("GET", f"/v1/sandboxes/{sid}/commands/{cid}/logs") as logs:
            events = _events(logs.iter_lines())
        out = "".join(str(e["data"]) for e in events if e["type"] == "stdout")
        assert out == "".join(f"line{i}\n" for i in range(1, 6))
        assert [e["type"] for e in events][-1] == "exit"
        assert events[-1]["status"] == "completed" and events[-1]["exit_code"] == 3
        for api in (a, b):
            done = api.get(f"/v1/sandboxes/{sid}/commands/{cid}", params={"wait": "true"})
            assert done.json()["status"] == "completed" and done.json()["stderr"] == "bye\n"
        # A wait through one replica ends when a cancel through the other ends the command.
        slow = a.post(f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 60"}).json()["id"]
        cancelled = b.post(f"/v1/sandboxes/{sid}/commands/{slow}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        waited = a.get(
            f"/v1/sandboxes/{sid}/commands/{slow}", params={"wait": "true", "timeout_ms": 10000}
        )
        assert waited.json()["status"] == "cancelled"
        # Input written through one replica to a command started through the other.
        cat = a.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": "cat", "interactive": True}
        ).json()["id"]
        wrote = b.post(
            f"/v1/sandboxes/{sid}/commands/{cat}/stdin",
            content=b"hello from b\n",
            params={"close": "true"},
        )
        assert wrote.status_code == 200, wrote.text
        echoed = a.get(f"/v1/sandboxes/{sid}/commands/{cat}", params={"wait": "true"}).json()
        assert echoed["status"] == "completed" and echoed["stdout"] == "hello from b\n"
        assert a.delete(f"/v1/sandboxes/{sid}").status_code == 200


def test_a_volume_lives_on_its_node_and_its_sandboxes_go_there(fleet: Fleet) -> None:
    with fleet.client(0) as a, fleet.client(1) as b:
        made = a.post("/v1/volumes", json={"name": "shared", "node": "n2", "size_mb": 32})
        assert made.status_code == 201, made.text
        assert made.json()["node_id"] == "n2"
        first = b.post("/v1/sandboxes", json={"volumes": [{"name": "shared", "path": "/data"}]})
        assert first.status_code == 201 and first.json()["node_id"] == "n2", first.text
        sid = first.json()["id"]
        wrote = a.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo n2 > /data/f"})
        assert wrote.json()["exit_code"] == 0, wrote.text
        assert b.get("/v1/volumes/shared").json()["used_by"] == [sid]
        elsewhere = a.post(
            "/v1/sandboxes",
            json={"node": "n1", "volumes": [{"name": "shared", "path": "/data"}]},
        )
        assert elsewhere.status_code == 422 and "n2" in elsewhere.text
        b.delete(f"/v1/sandboxes/{sid}")
        second = a.post("/v1/sandboxes", json={"volumes": [{"name": "shared", "path": "/v"}]})
        read = b.post(f"/v1/sandboxes/{second.json()['id']}/exec", json={"command": "cat /v/f"})
        assert read.json()["stdout"] == "n2\n"
        a.delete(f"/v1/sandboxes/{second.json()['id']}")
        assert b.delete("/v1/volumes/shared").status_code == 204


def test_a_snapshot_lives_on_its_node_and_its_sandboxes_go_there(fleet: Fleet) -> None:
    source = _sandbox(fleet, "n2")
    with fleet.client(0) as a, fleet.client(1) as b:
        wrote = a.post(f"/v1/sandboxes/{source}/exec", json={"command": "echo n2 > f"})
        assert wrote.json()["exit_code"] == 0, wrote.text
        snap = b.post(f"/v1/sandboxes/{source}/snapshots", json={"name": "on-n2"})
        assert snap.status_code == 201 and snap.json()["node_id"] == "n2", snap.text
        started = []
        for api in (a, b):  # from either replica, the sandbox lands on the snapshot's node
            made = api.post("/v1/sandboxes", json={"snapshot": "on-n2"})
            assert made.status_code == 201 and made.json()["node_id"] == "n2", made.text
            started.append(made.json()["id"])
            read = b.post(f"/v1/sandboxes/{started[-1]}/exec", json={"command": "cat f"})
            assert read.json()["stdout"] == "n2\n"
        elsewhere = a.post("/v1/sandboxes", json={"snapshot": "on-n2", "node": "n1"})
        assert elsewhere.status_code == 422 and "n2" in elsewhere.text
        fork = b.post(f"/v1/sandboxes/{source}/fork", json={})
        assert fork.status_code == 201 and fork.json()["node_id"] == "n2", fork.text
        assert sorted(a.get("/v1/snapshots/on-n2").json()["used_by"]) == sorted(started)
        assert a.delete("/v1/snapshots/on-n2").status_code == 409
        for sid in (*started, fork.json()["id"], source):
            assert b.delete(f"/v1/sandboxes/{sid}").status_code == 200
        for ref in ("on-n2", fork.json()["snapshot"]):
            assert a.delete(f"/v1/snapshots/{ref}").status_code == 204
        assert b.get("/v1/snapshots/on-n2").status_code == 404
        # An expired snapshot is removed by the leader's reaper, whichever replica leads.
        box = _sandbox(fleet, "n3")
        short = a.post(f"/v1/sandboxes/{box}/snapshots", json={"expires_in": 1}).json()
        assert short["node_id"] == "n3"
        deadline = time.monotonic() + 15
        while b.get(f"/v1/snapshots/{short['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the expired snapshot was not removed"
            time.sleep(0.2)
        a.delete(f"/v1/sandboxes/{box}")
