"""A fleet losing its parts: an agent killed mid-command, a replica killed mid-stream, NATS
restarted. Nothing acknowledged is lost, nothing hangs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet

LOST_AFTER = 3.0


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, lost_after=LOST_AFTER).start()
    yield running
    running.stop()


def _sandbox(fleet: Fleet, node: str) -> str:
    with fleet.client(0) as api:
        resp = api.post("/v1/sandboxes", json={"node": node})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])


def _wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def test_a_killed_agent_loses_its_commands_in_the_grace_and_comes_back(fleet: Fleet) -> None:
    sid = _sandbox(fleet, "n3")
    with fleet.client(0) as a, fleet.client(1) as b:
        cid = a.post(f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 60"}).json()["id"]
        killed_at = time.monotonic()
        fleet.agents["n3"].kill9()

        def lost() -> bool:
            resp = b.get(f"/v1/sandboxes/{sid}/commands/{cid}")
            assert resp.status_code == 200, resp.text
            return bool(resp.json()["status"] == "lost")

        _wait(lost, LOST_AFTER * 3, "the command is lost")
        assert time.monotonic() - killed_at < LOST_AFTER * 3
        assert b.get("/v1/nodes/n3").json()["state"] == "offline"
        # Its sandboxes answer 503 with the reason at once, never a hang.
        began = time.monotonic()
        refused = a.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert refused.status_code == 503 and "n3" in refused.json()["error"]["message"]
        assert time.monotonic() - began < 2
        # New sandboxes go to the nodes that answer.
        placed = {}
        for i in range(6):
            resp = (a if i % 2 else b).post("/v1/sandboxes", json={})
            assert resp.status_code == 201, resp.text
            placed[resp.json()["id"]] = resp.json()["node_id"]
        assert sorted(placed.values()) == ["n1", "n1", "n1", "n2", "n2", "n2"]
        for other in placed:
            a.delete(f"/v1/sandboxes/{other}")
        # Restarted, the agent registers again and its sandbox comes back.
        fleet.agents["n3"].start()
        fleet.wait_online("n3")

        def back() -> bool:
            resp = a.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo back"})
            return resp.status_code == 200 and resp.json()["stdout"] == "back\n"

        _wait(back, 30, "the sandbox runs again")
        assert b.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
        assert a.get(f"/v1/sandboxes/{sid}/commands/{cid}").json()["status"] == "lost"
        a.delete(f"/v1/sandboxes/{sid}")


def test_a_stream_continues_byte_exact_through_the_other_replica_after_kill9(
    fleet: Fleet,
) -> None:
    sid = _sandbox(fleet, "n1")
    script = "for i in $(seq 1 400); do echo line-$i; sleep 0.01; done"
    with fleet.client(1) as b:
        cid = b.post(f"/v1/sandboxes/{sid}/commands", json={"command": script}).json()["id"]
    received = ""
    offset = 0
    a = fleet.replicas[0].client()
    with a.stream("GET", f"/v1/sandboxes/{sid}/commands/{cid}/logs") as logs:
        for line in logs.iter_lines():
            event = json.loads(line)
            if event["type"] == "stdout":
                received += event["data"]
                offset = event["next_offset"]
            if received.count("\n") >= 50:
                break
    fleet.replicas[0].kill9()
    a.close()
    try:
        with fleet.client(1) as b:
            events = []
            with b.stream(
                "GET", f"/v1/sandboxes/{sid}/commands/{cid}/logs", params={"offset": offset}
            ) as logs:
                events = [json.loads(line) for line in logs.iter_lines() if line.strip()]
            received += "".join(e["data"] for e in events if e["type"] == "stdout")
            assert events[-1]["type"] == "exit" and events[-1]["status"] == "completed"
            assert received == "".join(f"line-{i}\n" for i in range(1, 401))
            b.delete(f"/v1/sandboxes/{sid}")
    finally:
        fleet.replicas[0].start()


def test_a_nats_restart_loses_nothing_acknowledged(fleet: Fleet) -> None:
    sid = _sandbox(fleet, "n2")
    with fleet.client(0) as a:
        epochs = {n["id"]: n["epoch"] for n in a.get("/v1/nodes").json()["items"]}
        cid = a.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 0.5; echo done"}
        ).json()["id"]
        long = a.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 6; echo survived"}
        ).json()["id"]
    fleet.nats.kill()
    time.sleep(1.0)  # the command ends while NATS is away: its result waits in the outbox
    fleet.nats.start()
    with fleet.client(1) as b:
        done = b.get(
            f"/v1/sandboxes/{sid}/commands/{cid}", params={"wait": "true", "timeout_ms": 20000}
        ).json()
        assert done["status"] == "completed" and done["stdout"] == "done\n"

        def works() -> bool:
            resp = b.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo again"})
            return resp.status_code == 200 and resp.json()["stdout"] == "again\n"

        _wait(works, 20, "execs work again")
        # A command that ran through the outage ends as it would have: no node was declared
        # lost (none registered again).
        survived = b.get(
            f"/v1/sandboxes/{sid}/commands/{long}", params={"wait": "true", "timeout_ms": 20000}
        ).json()
        assert survived["status"] == "completed" and survived["stdout"] == "survived\n"
        assert fleet.node_states() == {"n1": "online", "n2": "online", "n3": "online"}
        assert {n["id"]: n["epoch"] for n in b.get("/v1/nodes").json()["items"]} == epochs
        b.delete(f"/v1/sandboxes/{sid}")


def test_a_partitioned_agent_loses_its_commands_and_late_results_are_not_applied(
    fleet: Fleet,
) -> None:
    sid = _sandbox(fleet, "n2")
    host = fleet.hosts["n2"]
    with fleet.client(0) as a, fleet.client(1) as b:
        cid = a.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 5; echo late"}
        ).json()["id"]
        host.partition()
        try:

            def lost() -> bool:
                return bool(b.get(f"/v1/sandboxes/{sid}/commands/{cid}").json()["status"] == "lost")

            _wait(lost, LOST_AFTER * 3, "the command is lost")
            assert a.get("/v1/nodes/n2").json()["state"] == "offline"
        finally:
            host.heal()
        fleet.wait_online("n2", timeout=30)
        # The command ended on the agent after the heal; its result came too late.
        time.sleep(5)
        final = a.get(f"/v1/sandboxes/{sid}/commands/{cid}").json()
        assert final["status"] == "lost" and final["exit_code"] is None

        # The sandbox itself was never gone: it serves commands again.
        def works() -> bool:
            resp = b.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo healed"})
            return resp.status_code == 200 and resp.json()["stdout"] == "healed\n"

        _wait(works, 20, "execs work again")
        b.delete(f"/v1/sandboxes/{sid}")
