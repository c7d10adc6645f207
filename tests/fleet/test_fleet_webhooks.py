"""Webhooks and idempotency keys in a fleet: two replicas on PostgreSQL, a sandbox on a remote
agent. Each event reaches the receiver once (one replica delivers, each delivery claimed), a
failed one is retried, and a key used on one replica is answered alike by the other."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet
from tests.integration.helpers import wait_for
from tests.ops.test_webhooks import WEBHOOK_ENV, Receiver, verify_signature

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, nodes=("n1",), replicas=2, env=lambda i: dict(WEBHOOK_ENV)).start()
    yield running
    running.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_each_event_is_delivered_once(fleet: Fleet, receiver: Receiver) -> None:
    with fleet.client(0) as first, fleet.client(1) as second:
        made = first.post("/v1/webhooks", json={"url": receiver.url,
                                                "events": ["command.finished"]})  # fmt: skip
        assert made.status_code == 201, made.text
        hook = made.json()
        time.sleep(2.5)  # the other replica rereads the webhooks every 2 s
        sid = second.post("/v1/sandboxes", json={"node": "n1"}).json()["id"]
        receiver.answers = [500]  # the first delivery fails once
        ids = []
        for i in range(4):
            api = (first, second)[i % 2]
            ran = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": f"echo {i}"})
            assert ran.status_code == 200, ran.text
            ids.append(ran.json()["id"])

        def delivered() -> dict[str, int]:
            counts: dict[str, int] = {}
            for _, _, event in receiver.events():
                cid = event["data"]["command"]["id"]
                counts[cid] = counts.get(cid, 0) + 1
            return counts

        # Four events; one of them twice (its first attempt answered 500).
        assert wait_for(lambda: sum(delivered().values()) >= 5, 30), delivered()
        time.sleep(2)  # nothing more
        counts = delivered()
        assert set(counts) == set(ids), counts
        assert sorted(counts.values()) == [1, 1, 1, 2]
        events: dict[str, set[str]] = {}
        for headers, body, event in receiver.events():
            assert verify_signature(hook["secret"], headers["corral-signature"], body)
            events.setdefault(event["id"], set()).add(headers["corral-delivery-attempt"])
        assert len(events) == 4
        assert sorted(sorted(a) for a in events.values()) == [["1"], ["1"], ["1"], ["1", "2"]]
        attempts: list[dict[str, Any]] = second.get(f"/v1/webhooks/{hook['id']}/deliveries").json()[
            "items"
        ]
        assert sorted(a["status_code"] for a in attempts) == [200, 200, 200, 200, 500]
        first.delete(f"/v1/webhooks/{hook['id']}")
        first.delete(f"/v1/sandboxes/{sid}")


def test_a_key_is_answered_alike_by_every_replica(fleet: Fleet) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with fleet.client(0) as first, fleet.client(1) as second:
        one = first.post("/v1/sandboxes", json={"node": "n1"}, headers=key)
        assert one.status_code == 201, one.text
        two = second.post("/v1/sandboxes", json={"node": "n1"}, headers=key)
        assert two.status_code == 201, two.text
        assert two.json()["id"] == one.json()["id"]
        assert two.headers["idempotent-replayed"] == "true"
        other = second.post("/v1/sandboxes", json={"node": "n1", "name": "x"}, headers=key)
        assert other.status_code == 422
        first.delete(f"/v1/sandboxes/{one.json()['id']}")
