"""Sandbox ports in a fleet: a sandbox on a remote agent (`"network": "none"`) is reached through
a replica over the node protocol's port tunnel: HTTP both ways, WebSocket, the raw TCP tunnel
of port-forward, and a 502 for a port nothing listens on."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.engines import PostgresCluster
from tests.fleet.fleet import Fleet
from tests.integration.test_ports import SERVICE, TCP_SERVICE

pytestmark = pytest.mark.sandbox

MIB = 1 << 20


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, nodes=("n1",), replicas=1).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sandbox(fleet: Fleet) -> Iterator[str]:
    with fleet.client(0) as api:
        created = api.post("/v1/sandboxes", json={"node": "n1"})
        if created.status_code == 409:
            # Its disk's loop mount lost a race for a loop device with another job on this
            # host (the agent's log says so): once more. Ports play no part in a create.
            created = api.post("/v1/sandboxes", json={"node": "n1"})
        assert created.status_code == 201, created.text
        assert created.json()["network"] == "none"
        sid = created.json()["id"]
        for path, text in (("/workspace/s.py", SERVICE), ("/workspace/tcp.py", TCP_SERVICE)):
            api.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=text)
        for command in ("exec python3 /workspace/s.py 8001", "exec python3 /workspace/tcp.py 9000"):
            assert api.post(f"/v1/sandboxes/{sid}/commands", json={"command": command}).is_success
        assert api.post(f"/v1/sandboxes/{sid}/ports", json={"port": 8001}).status_code == 201
        deadline = time.monotonic() + 20
        while api.get(f"/v1/sandboxes/{sid}/ports/8001/headers").status_code != 200:
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        yield sid
        api.delete(f"/v1/sandboxes/{sid}")


def test_http_both_ways_through_the_tunnel(fleet: Fleet, sandbox: str) -> None:
    with fleet.client(0) as api:
        seen = api.get(f"/v1/sandboxes/{sandbox}/ports/8001/headers?q=1")
        assert seen.status_code == 200 and seen.json()["path"] == "/headers?q=1"
        size = 20 * MIB
        got = 0
        with api.stream("GET", f"/v1/sandboxes/{sandbox}/ports/8001/bytes?n={size}") as r:
            assert r.status_code == 200
            for piece in r.iter_bytes():
                got += len(piece)
        assert got == size
        sent = api.post(f"/v1/sandboxes/{sandbox}/ports/8001/count", content=b"u" * (5 * MIB))
        assert sent.json() == {"received": 5 * MIB}
        api.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": 8002})
        began = time.monotonic()
        closed = api.get(f"/v1/sandboxes/{sandbox}/ports/8002/")
        assert closed.status_code == 502 and closed.json()["error"]["code"] == "port_unreachable"
        assert time.monotonic() - began < 2.0


def test_websocket_and_tcp_tunnel(fleet: Fleet, sandbox: str) -> None:
    replica = fleet.replicas[0]
    auth = {"Authorization": f"Bearer {replica.admin_key}"}
    base = f"ws://127.0.0.1:{replica.port}/v1/sandboxes/{sandbox}"
    with ws_connect(f"{base}/ports/8001/ws", additional_headers=auth) as ws:
        ws.send("over the fleet")
        assert ws.recv(10) == "over the fleet"
    payload = os.urandom(2 * MIB)
    with ws_connect(f"{base}/tcp/9000", additional_headers=auth, max_size=None) as tunnel:
        for start in range(0, len(payload), 1 << 16):
            tunnel.send(payload[start : start + (1 << 16)])
        tunnel.send(b"")  # end of input: the service answers after it
        answer = b""
        with pytest.raises(ConnectionClosedOK):  # closed 1000 once the service has answered
            while True:
                answer += tunnel.recv(10)  # type: ignore[operator]
    assert answer == payload.upper()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{base}/tcp/8002", additional_headers=auth).close()
    assert refused.value.response.status_code == 502
    assert json.loads(refused.value.response.body)["error"]["code"] == "port_unreachable"
