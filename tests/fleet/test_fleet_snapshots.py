"""Snapshots in a fleet, over the node protocol: a snapshot lives on its node, and sandboxes
from it go there whichever replica is asked. The agents run the fake runtime: the protocol,
the placement and the store are what is tested here (real captures: test_fleet.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet

FAKE = ("--runtime", "fake")


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, agent_args={n: FAKE for n in ("n1", "n2", "n3")}).start()
    yield running
    running.stop()


def test_sandboxes_from_a_snapshot_land_on_its_node_from_either_replica(fleet: Fleet) -> None:
    with fleet.client(0) as a, fleet.client(1) as b:
        made = a.post("/v1/sandboxes", json={"node": "n2"})
        assert made.status_code == 201, made.text
        source = made.json()["id"]
        snap = b.post(f"/v1/sandboxes/{source}/snapshots", json={"name": "on-n2"})
        assert snap.status_code == 201, snap.text
        assert snap.json()["node_id"] == "n2" and snap.json()["size_bytes"] > 0
        started = []
        for api in (a, b, a, b):
            child = api.post("/v1/sandboxes", json={"snapshot": "on-n2"})
            assert child.status_code == 201 and child.json()["node_id"] == "n2", child.text
            started.append(child.json()["id"])
        elsewhere = a.post("/v1/sandboxes", json={"snapshot": "on-n2", "node": "n1"})
        assert elsewhere.status_code == 422 and "n2" in elsewhere.text
        fork = b.post(f"/v1/sandboxes/{source}/fork", json={"labels": {"f": "1"}})
        assert fork.status_code == 201 and fork.json()["node_id"] == "n2", fork.text
        assert sorted(a.get("/v1/snapshots/on-n2").json()["used_by"]) == sorted(started)
        busy = b.delete("/v1/snapshots/on-n2")
        assert busy.status_code == 409, busy.text
        for sid in (*started, fork.json()["id"], source):
            assert a.delete(f"/v1/sandboxes/{sid}").status_code == 200
        assert b.delete("/v1/snapshots/on-n2").status_code == 204
        assert a.get("/v1/snapshots/on-n2").status_code == 404
        # The fork's snapshot expires through the leader's reaper, whichever replica leads.
        taken = a.post(f"/v1/sandboxes/{fork.json()['id']}/snapshots", json={})
        assert taken.status_code == 409  # the fork is deleted
        box = b.post("/v1/sandboxes", json={"node": "n3"}).json()["id"]
        short = a.post(f"/v1/sandboxes/{box}/snapshots", json={"expires_in": 1}).json()
        assert short["node_id"] == "n3"
        deadline = time.monotonic() + 15
        while b.get(f"/v1/snapshots/{short['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the expired snapshot was not removed"
            time.sleep(0.2)
        assert a.delete(f"/v1/snapshots/{fork.json()['snapshot']}").status_code == 204
        a.delete(f"/v1/sandboxes/{box}")
