"""Two API replicas on one PostgreSQL and one NATS, three agents: any replica serves any
sandbox on any node."""

from __future__ import annotations

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
