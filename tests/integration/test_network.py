"""Network policy: none reaches nothing; allow reaches only the listed CIDRs (tested against test
hosts that live in network namespaces on this machine); the list changes live; nothing is left
behind. No traffic leaves the machine."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO

import httpx
import pytest

from corral.runtime.netpolicy import NetworkManager
from tests.conftest import Server

pytestmark = pytest.mark.sandbox

# A test host per /24 (<net>.2 serves, <net>.1 is our side); per process, so that runs in
# parallel on one machine do not collide.
_NET = f"10.{100 + os.getpid() % 100}"
HOSTS = {"a": f"{_NET}.1", "b": f"{_NET}.2"}
_TAG = f"{os.getpid() % 100000}"


# A minimal HTTP responder. Not http.server: its bind looks the address up in DNS, which in a
# namespace without a resolver stalls for seconds.
HOST_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080))
s.listen(16)
print("serving", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    c.close()
"""


def start_host_server(ns: str, address: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """An HTTP server on address:8080 inside the test host's namespace, answering when returned.

    A start that does not answer within a few seconds is killed and tried again.
    """
    for _ in range(4):
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "/usr/bin/python3", "-u", "-c", HOST_SERVER,
             address],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://{address}:8080/", timeout=0.5)
                return proc
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
    log.seek(0)
    pytest.fail(f"test host {address} did not start: {log.read().decode(errors='replace')}")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_hosts() -> Iterator[dict[str, str]]:
    servers = []
    log = tempfile.TemporaryFile()
    try:
        for name, net in HOSTS.items():
            ns, veth = f"corral-th-{name}{_TAG}", f"crlth{name}{_TAG}"
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            subprocess.run(["ip", "link", "delete", veth], capture_output=True)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", f"{net}.1/24", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # No default route: a test host talks only on its own /24 (the sandbox's traffic
            # reaches it masqueraded as <net>.1), so nothing it does can leave the machine.
            servers.append(start_host_server(ns, f"{net}.2", log))
        yield {name: f"{net}.2" for name, net in HOSTS.items()}
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        log.close()
        for name in HOSTS:
            subprocess.run(
                ["ip", "netns", "delete", f"corral-th-{name}{_TAG}"], capture_output=True
            )
            subprocess.run(["ip", "link", "delete", f"crlth{name}{_TAG}"], capture_output=True)


def reach(api: httpx.Client, sid: str, address: str) -> bool:
    probe = f"curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{address}:8080/"
    result = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": probe}).json()
    return result["stdout"] == "200"


def test_none_reaches_nothing(api: httpx.Client, server: Server, test_hosts: dict) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        assert not reach(api, sid, test_hosts["a"])
        devices = "tail -n +3 /proc/net/dev | cut -d: -f1"
        links = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": devices})
        assert links.json()["stdout"].split() == ["lo"]
        port = server.url.rsplit(":", 1)[1]
        own = api.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": f"curl -s -m 2 http://127.0.0.1:{port}/healthz"},
        ).json()
        assert own["exit_code"] != 0 and own["stdout"] == ""
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_allow_list_and_live_change(api: httpx.Client, server: Server, test_hosts: dict) -> None:
    created = api.post("/v1/sandboxes", json={"network": "allow", "allow": [f"{HOSTS['a']}.0/24"]})
    assert created.status_code == 201, created.text
    sandbox = created.json()
    sid = sandbox["id"]
    assert sandbox["allow"] == [f"{HOSTS['a']}.0/24"] and sandbox["limits_enforced"]["network"]
    try:
        assert reach(api, sid, test_hosts["a"])
        assert not reach(api, sid, test_hosts["b"])
        # The host itself (the sandbox's gateway) is not reachable unless listed.
        gateway = (
            api.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"command": "ip route | awk '/default/ {print $3}'"},
            )
            .json()["stdout"]
            .strip()
        )
        assert not reach(api, sid, gateway)
        # A live change: no restart (a file in /tmp survives), the new list applies at once.
        api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo mark > /tmp/mark"})
        changed = api.patch(f"/v1/sandboxes/{sid}", json={"allow": [f"{HOSTS['b']}.0/24"]})
        assert changed.status_code == 200 and changed.json()["allow"] == [f"{HOSTS['b']}.0/24"]
        assert not reach(api, sid, test_hosts["a"])
        assert reach(api, sid, test_hosts["b"])
        kept = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "cat /tmp/mark"}).json()
        assert kept["stdout"] == "mark\n"
        # outbound: public addresses only; private ranges stay denied unless listed.
        api.patch(f"/v1/sandboxes/{sid}", json={"network": "outbound", "allow": []})
        assert not reach(api, sid, test_hosts["a"])
        api.patch(f"/v1/sandboxes/{sid}", json={"allow": [f"{HOSTS['a']}.2/32"]})
        assert reach(api, sid, test_hosts["a"]) and not reach(api, sid, test_hosts["b"])
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
    # Nothing is left: no namespace, veth or rule for it (of this server: others may be running).
    net = NetworkManager(server.cgroup_name)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in namespaces.split() if n.startswith(net.prefix + "-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f" {net.prefix}h" not in links
    table = subprocess.run(
        ["nft", "list", "table", "inet", net.table], capture_output=True, text=True, check=True
    ).stdout
    assert "chain sb" not in table and "set allow" not in table and f"{net.prefix}h" in table


def test_switching_to_none_restarts_and_removes_the_network(
    api: httpx.Client, test_hosts: dict
) -> None:
    sid = api.post(
        "/v1/sandboxes", json={"network": "allow", "allow": [f"{HOSTS['a']}.0/24"]}
    ).json()["id"]
    try:
        job = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 30"}).json()
        busy = api.patch(f"/v1/sandboxes/{sid}", json={"network": "none"})
        assert busy.status_code == 409
        api.post(f"/v1/sandboxes/{sid}/commands/{job['id']}/cancel")
        done = api.patch(f"/v1/sandboxes/{sid}", json={"network": "none"})
        assert done.status_code == 200 and done.json()["network"] == "none"
        assert not reach(api, sid, test_hosts["a"])
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_bad_network_specs(api: httpx.Client) -> None:
    for spec in ({"network": "everything"}, {"allow": ["not-a-cidr"]}, {"allow": ["::1/128"]}):
        resp = api.post("/v1/sandboxes", json=spec)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_argument"
