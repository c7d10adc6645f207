"""Egress by host name, against test hosts in network namespaces (egress_hosts.py): a sandbox
allowed `*.allowed.test` reaches a.allowed.test over HTTP and HTTPS, and not b.denied.test: not by
name, not by raw address, not by naming an allowed address for it, not through DNS queries for
denied names (which never reach the upstream resolver); refusals are counted; a PATCH applies
at once; an empty list denies DNS too."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.egress_hosts import EgressHosts, curl, run, write_file

pytestmark = pytest.mark.sandbox

# A DNS query by hand (the sandbox has no DNS library): prints the answer's rcode and how many
# answers it has, or the error that ended it.
DNS_QUERY = r"""
import random, socket, struct, sys
name, qtype, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if server == "-":
    server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
qid = random.randrange(65536)
packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
packet += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
packet += struct.pack("!HH", qtype, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(packet, (server, 53))
    reply = s.recv(4096)
    flags, _, answers = struct.unpack("!HHH", reply[2:8])
    print(f"rcode={flags & 0xF} answers={answers}")
except OSError as exc:
    print(f"error={type(exc).__name__}")
"""
A, TXT = 1, 16

# Holds an HTTPS connection to a.allowed.test open, sending nothing, until the far end ends it.
HOLD = r"""
import socket, ssl
ctx = ssl.create_default_context(cafile="/tmp/ca.pem")
raw = socket.create_connection(("a.allowed.test", 443))
s = ctx.wrap_socket(raw, server_hostname="a.allowed.test")
print("open", flush=True)
try:
    print("closed", repr(s.recv(10)), flush=True)
except (OSError, ssl.SSLError) as exc:
    print("closed", type(exc).__name__, flush=True)
"""


def dns_query(api: httpx.Client, sid: str, name: str, qtype: int, server: str = "-") -> str:
    result = run(api, sid, f"python3 /tmp/q.py {name} {qtype} {server}")
    return result["stdout"].strip()


def sandbox(api: httpx.Client, allow: list[str], network: str = "allow") -> str:
    created = api.post("/v1/sandboxes", json={"network": network, "allow": allow})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    write_file(api, sid, "/tmp/q.py", DNS_QUERY.encode())
    return sid


def network(api: httpx.Client, sid: str) -> dict:
    resp = api.get(f"/v1/sandboxes/{sid}/network")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_allowed_names_only(eapi: httpx.Client, egress_hosts: EgressHosts) -> None:
    sid = sandbox(eapi, ["*.allowed.test"])
    try:
        write_file(eapi, sid, "/tmp/ca.pem", egress_hosts.ca_file.read_bytes())
        # The sandbox's resolver is the node's forwarder, at its gateway.
        conf = run(eapi, sid, "cat /etc/resolv.conf")["stdout"]
        gateway = run(eapi, sid, "ip route | awk '/default/ {print $3}'")["stdout"].strip()
        assert conf.startswith(f"nameserver {gateway}\n")
        # Allowed: HTTP (by Host) and HTTPS (by SNI, spliced: the test CA's certificate).
        assert curl(eapi, sid, "http://a.allowed.test/") == (0, "host=a.allowed.test auth=-")
        assert curl(eapi, sid, "https://a.allowed.test/", "--cacert", "/tmp/ca.pem") == (
            0,
            "host=a.allowed.test auth=-",
        )
        assert curl(eapi, sid, "http://deep.sub.allowed.test/")[1].startswith(
            "host=deep.sub.allowed.test"
        )
        # The wildcard does not cover the domain itself.
        assert dns_query(eapi, sid, "allowed.test", A) == "rcode=3 answers=0"
        # Denied by name: NXDOMAIN, and the upstream never heard of it.
        assert curl(eapi, sid, "http://b.denied.test/")[0] == 6  # could not resolve
        assert dns_query(eapi, sid, "b.denied.test", A) == "rcode=3 answers=0"
        # DNS tunnelling through denied names: TXT lookups get NXDOMAIN too.
        assert dns_query(eapi, sid, "c2hlbGw.exfil.denied.test", TXT) == "rcode=3 answers=0"
        assert dns_query(eapi, sid, "x.allowed.test", TXT) == "rcode=0 answers=1"
        assert not [n for n in egress_hosts.asked() if "denied" in n or n == "allowed.test."]
        # Straight to a resolver elsewhere: no path.
        assert dns_query(eapi, sid, "b.denied.test", A, egress_hosts.web).startswith("error=")
        # Raw addresses: other's was never an answer (nftables rejects it); web's was, but a
        # connection by address names no allowed host (the proxy refuses it).
        assert curl(eapi, sid, f"http://{egress_hosts.other}/")[0] != 0
        assert curl(eapi, sid, f"http://{egress_hosts.web}/")[0] != 0
        assert curl(eapi, sid, f"https://{egress_hosts.web}/", "-k")[0] != 0
        # A denied name pointed at an allowed address: refused by Host and by SNI.
        fronted = f"b.denied.test:80:{egress_hosts.web}"
        assert curl(eapi, sid, "http://b.denied.test/", "--resolve", fronted)[0] != 0
        fronted = f"b.denied.test:443:{egress_hosts.web}"
        assert curl(eapi, sid, "https://b.denied.test/", "-k", "--resolve", fronted)[0] != 0
        # An allowed name pointed at an address it never resolved to.
        moved = f"a.allowed.test:80:{egress_hosts.other}"
        assert curl(eapi, sid, "http://a.allowed.test/", "--resolve", moved)[0] != 0

        seen = network(eapi, sid)
        counters = seen["counters"]
        assert seen["allow"] == ["*.allowed.test"]
        assert counters["connections_allowed"] >= 3
        assert counters["connections_refused"] >= 4
        assert counters["dns_refused"] >= 4
        assert counters["dns_answered"] >= 3
        assert counters["packets_rejected"] >= 1
        assert seen["resolved"][egress_hosts.web]
        refused = {(r["kind"], r["host"]) for r in seen["recent_refusals"]}
        assert ("dns", "b.denied.test") in refused
        assert ("dns", "c2hlbgw.exfil.denied.test") in refused
        assert ("connections", "b.denied.test") in refused
        assert any(r["host"] == egress_hosts.web for r in seen["recent_refusals"])
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")


def test_live_change(eapi: httpx.Client, egress_hosts: EgressHosts) -> None:
    sid = sandbox(eapi, ["*.allowed.test"])
    try:
        assert curl(eapi, sid, "http://a.allowed.test/")[0] == 0
        # A connection held open across the change: cut when its host is no longer allowed.
        write_file(eapi, sid, "/tmp/ca.pem", egress_hosts.ca_file.read_bytes())
        write_file(eapi, sid, "/tmp/hold.py", HOLD.encode())
        holder = eapi.post(
            f"/v1/sandboxes/{sid}/commands", json={"command": "python3 /tmp/hold.py"}
        ).json()
        url = f"/v1/sandboxes/{sid}/commands/{holder['id']}"
        deadline = time.monotonic() + 10
        while "open" not in eapi.get(url).json()["stdout"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert network(eapi, sid)["open_connections"] == 1
        changed = eapi.patch(f"/v1/sandboxes/{sid}", json={"allow": ["*.denied.test"]})
        assert changed.status_code == 200, changed.text
        assert changed.json()["allow"] == ["*.denied.test"]
        # In effect once the PATCH returns; polled for a second at most.
        deadline = time.monotonic() + 1
        while True:
            old = curl(eapi, sid, "http://a.allowed.test/")[0]
            new = curl(eapi, sid, "http://b.denied.test/")
            if (old != 0 and new[0] == 0) or time.monotonic() > deadline:
                break
        assert old != 0 and new == (0, "host=b.denied.test auth=-")
        held = eapi.get(url, params={"wait": True, "timeout_ms": 5000}).json()
        assert held["status"] == "completed" and held["stdout"].startswith("open\nclosed"), held
        # outbound keeps the names' path through the proxy, and reaches the rest directly.
        eapi.patch(f"/v1/sandboxes/{sid}", json={"network": "outbound", "allow": []})
        assert curl(eapi, sid, "http://b.denied.test/")[0] != 0  # private, not listed
        assert dns_query(eapi, sid, "b.denied.test", A) == "rcode=0 answers=1"
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")


def test_empty_list_denies_dns(eapi: httpx.Client, egress_hosts: EgressHosts) -> None:
    sid = sandbox(eapi, [])
    try:
        assert dns_query(eapi, sid, "a.allowed.test", A) == "rcode=3 answers=0"
        assert curl(eapi, sid, f"http://{egress_hosts.web}/")[0] != 0
        seen = network(eapi, sid)
        assert seen["counters"]["dns_refused"] == 1 and seen["counters"]["dns_answered"] == 0
        # CIDRs beside names: the address directly, no name needed.
        eapi.patch(f"/v1/sandboxes/{sid}", json={"allow": [f"{egress_hosts.web}/32"]})
        assert curl(eapi, sid, f"http://{egress_hosts.web}/")[0] == 0
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")


@pytest.mark.parametrize(
    "entry", ["*.com", "a*.example.com", "*.*.example.com", "exa mple.com", "-a.example.com",
              "localhost", "a..example.com", "x" * 64 + ".com"],
)  # fmt: skip
def test_bad_patterns(eapi: httpx.Client, entry: str) -> None:
    resp = eapi.post("/v1/sandboxes", json={"network": "allow", "allow": [entry]})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_argument"
    assert any("allow" in d["loc"] for d in error["details"]), error


def test_bad_patterns_on_patch(eapi: httpx.Client) -> None:
    sid = eapi.post("/v1/sandboxes", json={"network": "allow", "allow": []}).json()["id"]
    try:
        resp = eapi.patch(f"/v1/sandboxes/{sid}", json={"allow": ["*.example.com", "bad_name!"]})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_argument"
        assert eapi.get(f"/v1/sandboxes/{sid}").json()["allow"] == []
    finally:
        eapi.delete(f"/v1/sandboxes/{sid}")
