"""CMDOP's machines are the fleet's nodes: commands on their hosts, a batch over several of
them in parallel, and a node that dies midway."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet

HOST_USER = "nobody"
LOST_AFTER = 3.0


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    host_exec = ("--host-exec", HOST_USER)
    running = Fleet(
        postgres,
        nodes=("n1", "n2", "n3", "n4"),
        lost_after=LOST_AFTER,
        agent_args={"n1": host_exec, "n2": host_exec, "n3": host_exec},
    ).start()
    yield running
    running.stop()


def test_machines_are_the_nodes_and_their_hosts_run_commands(fleet: Fleet) -> None:
    with fleet.client(0) as a, fleet.client(1) as b:
        machines = a.get("/v1/machines", params={"limit": 100}).json()
        by_id = {m["id"]: m for m in machines["data"]}
        assert {"n1", "n2", "n3", "n4"} <= set(by_id)
        assert all(by_id[n]["status"] == "online" for n in ("n1", "n2", "n3", "n4"))
        assert "host_exec=true" in by_id["n1"]["tags"] and "host_exec=false" in by_id["n4"]["tags"]
        one = b.get("/v1/machines/n2").json()["data"]
        assert one["id"] == "n2" and one["status"] == "online"
        ran = b.post(
            "/v1/commands", json={"machine_id": "n1", "command": "id -un; echo err >&2; exit 4"}
        )
        assert ran.status_code == 200, ran.text
        data = ran.json()["data"]
        assert data["machine_id"] == "n1" and data["status"] == "completed"
        assert data["stdout"] == f"{HOST_USER}\n" and data["stderr"] == "err\n"
        assert data["exit_code"] == 4
        # Never root, and a timeout ends the command.
        slow = a.post(
            "/v1/commands", json={"machine_id": "n3", "command": "sleep 30", "timeout": 500}
        ).json()["data"]
        assert slow["status"] == "timed_out" and slow["exit_code"] == 137
        # A node whose agent was not opened for host commands refuses them.
        refused = a.post("/v1/commands", json={"machine_id": "n4", "command": "id"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden"
        assert "--host-exec" in refused.json()["error"]["message"]


def test_a_batch_over_three_machines_with_one_killed_midway(fleet: Fleet) -> None:
    killer = threading.Timer(1.0, fleet.agents["n2"].kill9)
    with fleet.client(1) as b:
        began = time.monotonic()
        killer.start()
        resp = b.post(
            "/v1/commands/batch",
            json={"machine_ids": ["n1", "n2", "n3"], "command": "sleep 2; echo done"},
            timeout=60,
        )
        took = time.monotonic() - began
    killer.join()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["meta"] == {"total": 3, "succeeded": 2, "failed": 1}
    for node in ("n1", "n3"):
        assert body["data"][node]["status"] == "completed"
        assert body["data"][node]["stdout"] == "done\n"
    assert body["data"]["n2"]["error"]["code"] == "service_unavailable"
    assert "n2" in body["data"]["n2"]["error"]["message"]
    assert took < 2 + LOST_AFTER * 3  # the dead one is given up within the grace, in parallel
    fleet.agents["n2"].start()
    fleet.wait_online("n2")
