"""Replicas that run a built-in node each: its sandboxes are served to the other replicas over
NATS, as an agent's are."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, nodes=(), local_nodes=True).start()
    yield running
    running.stop()


def test_a_replicas_own_node_serves_every_replica(fleet: Fleet) -> None:
    fleet.wait_online("r1", "r2")
    with fleet.client(0) as a, fleet.client(1) as b:
        for node, creator, user in (("r1", b, a), ("r2", a, b)):
            created = creator.post("/v1/sandboxes", json={"node": node})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            for api in (creator, user):
                ran = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo $((6*7))"})
                assert ran.status_code == 200, ran.text
                assert ran.json()["stdout"] == "42\n"
            started = creator.post(f"/v1/sandboxes/{sid}/commands", json={"command": "echo x"})
            cid = started.json()["id"]
            done = user.get(f"/v1/sandboxes/{sid}/commands/{cid}", params={"wait": "true"})
            assert done.json()["status"] == "completed" and done.json()["stdout"] == "x\n"
            put = user.put(
                f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f"}, content=b"hi"
            )
            assert put.status_code == 200, put.text
            got = creator.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f"})
            assert got.content == b"hi"
            assert user.delete(f"/v1/sandboxes/{sid}").status_code == 200
