"""The host is out of a sandbox's reach whatever its allow list says: the host end of its own link
and of every other, the host's main interface and an address added after the server started,
the host's loopback, IPv6, other sandboxes and cloud metadata (169.254.0.0/16), in every network
mode and through the run-dat-sheesh face too. Only what the operator opens with
CORRAL_NETWORK_OPEN is reachable, and only by a sandbox whose own list includes it.

The host's listeners run in this process; the "remote host" and the metadata server live in a
network namespace on this machine. No traffic leaves the machine."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from corral.runtime.netpolicy import SUBNET
from corral.settings import Settings
from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox

BANNER = "corral-test-listener"
_NET = f"10.{100 + os.getpid() % 100}"  # the same per-process scheme as the integration tests
_TAG = f"{os.getpid() % 100000}"
REMOTE = f"{_NET}.3.2"  # the remote host; its link's host end is .3.1
ADDED = f"{_NET}.4.1"  # a host address added after the server started
METADATA = "169.254.169.254"
REMOTE_PORT, METADATA_PORT, METADATA_OTHER_PORT, SANDBOX_PORT = 8080, 80, 81, 9000

# Runs in the sandbox: connects to every target at once and prints, for each, what it read
# ("" when it could not connect). GATEWAY stands for the host end of the sandbox's own link.
PROBE = r"""
import concurrent.futures, json, socket, struct, sys
gateway = ""
for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    if f[1] == "00000000":
        gateway = socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
def probe(target):
    label, host, port = target
    host = gateway if host == "GATEWAY" else host
    if not host:
        return label, ""
    try:
        with socket.create_connection((host, port), timeout=1.5) as s:
            s.settimeout(1.5)
            return label, s.recv(64).decode(errors="replace")
    except OSError:
        return label, ""
targets = json.loads(sys.argv[1])
with concurrent.futures.ThreadPoolExecutor(max(1, len(targets))) as pool:
    results = dict(pool.map(probe, targets))
address = ""
if gateway:  # the sandbox's own address: the source a datagram to the gateway would get
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.connect((gateway, 9))
        address = u.getsockname()[0]
v6 = [f"{l.split()[-1]} {l.split()[0]}" for l in open("/proc/net/if_inet6")]
v6 = [entry for entry in v6 if not entry.startswith("lo ")]
print(json.dumps({"gateway": gateway, "address": address, "results": results, "ipv6": v6}))
"""

# Runs in the remote host's namespace: a banner on each ADDRESS:PORT given.
NAMESPACE_LISTENER = r"""
import socket, sys, threading
def serve(s):
    while True:
        c, _ = s.accept()
        c.sendall(b"BANNER")
        c.close()
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("serving", flush=True)
threading.Event().wait()
""".replace("BANNER", BANNER)

# Runs in another sandbox, in the background: a banner on every address of it.
SANDBOX_LISTENER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {SANDBOX_PORT})); s.listen(16)\n"
    f"while True:\n    c, _ = s.accept(); c.sendall(b'{BANNER}'); c.close()\n"
)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class HostListener:
    """A banner on one port of every host address, IPv4 and IPv6 (a dual-stack socket on ::)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(BANNER.encode())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def reaches_from_host(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        return s.recv(64).decode() == BANNER
    return False


@dataclass
class Lab:
    listener: HostListener  # the port that is opened in the CORRAL_NETWORK_OPEN case
    other: HostListener  # a second port that never is
    main_address: str  # the address of the host's default-route interface

    @property
    def port(self) -> int:
        return self.listener.port


def main_address() -> str:
    route = sh("ip", "-4", "route", "show", "default").split()
    dev = route[route.index("dev") + 1]
    return sh("ip", "-4", "-o", "addr", "show", "dev", dev).split()[3].split("/")[0]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Host listeners, and a remote host namespace serving REMOTE and METADATA."""
    ns, veth = f"corral-nh-{_TAG}", f"crlnh{_TAG}"
    listeners = [HostListener(), HostListener()]
    log = tempfile.TemporaryFile()
    proc = None
    try:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{_NET}.3.1/24", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", ns, "addr", "add", f"{REMOTE}/24", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{METADATA}/32", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Metadata is reached through this namespace, as a cloud's would be through the gateway;
        # the namespace has no default route, so nothing it does leaves the machine.
        sh("ip", "route", "add", f"{METADATA}/32", "via", REMOTE, "dev", veth)
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "/usr/bin/python3", "-u", "-c",
             NAMESPACE_LISTENER, f"{REMOTE}:{REMOTE_PORT}", f"{METADATA}:{METADATA_PORT}",
             f"{METADATA}:{METADATA_OTHER_PORT}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not reaches_from_host(REMOTE, REMOTE_PORT):
            if time.monotonic() > deadline or proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the remote host did not start: {log.read().decode()}")
            time.sleep(0.1)
        yield Lab(listeners[0], listeners[1], main_address())
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        log.close()
        for listener in listeners:
            listener.close()
        subprocess.run(["ip", "route", "delete", f"{METADATA}/32"], capture_output=True)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)


@pytest.fixture(scope="module")
def added_address(server: Server, lab: Lab) -> Iterator[str]:
    """A host address that did not exist when the server started (on an empty bridge)."""
    dev = f"crlnd{_TAG}"
    subprocess.run(["ip", "link", "delete", dev], capture_output=True)
    sh("ip", "link", "add", dev, "type", "bridge")
    try:
        sh("ip", "addr", "add", f"{ADDED}/32", "dev", dev)
        sh("ip", "link", "set", dev, "up")
        yield ADDED
    finally:
        subprocess.run(["ip", "link", "delete", dev], capture_output=True)


def native_exec(api: httpx.Client, sid: str, command: str) -> str:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, "timeout_ms": 30_000})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["stdout"])


@dataclass
class Probed:
    gateway: str  # the host end of the sandbox's link ("" without a network)
    address: str  # the sandbox's end
    reached: set[str]  # the labels of the targets whose listener answered
    ipv6: list[str]  # the sandbox's IPv6 addresses, loopback aside


def probe(run: Callable[[str], str], targets: list[tuple[str, str, int]]) -> Probed:
    """Tries (label, address, port) targets from the sandbox; run(command) runs a shell command
    there and returns its output."""
    command = f"python3 -c {shlex.quote(PROBE)} {shlex.quote(json.dumps(targets))}"
    out = json.loads(run(command))
    reached = {label for label, got in out["results"].items() if got == BANNER}
    return Probed(out["gateway"], out["address"], reached, out["ipv6"])


def host_link(address: str) -> str:
    """The host interface that holds address."""
    for line in sh("ip", "-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        if fields[3].split("/")[0] == address:
            return fields[1]
    raise AssertionError(f"no host interface has {address}")


def host_targets(lab: Lab, others: list[str]) -> list[tuple[str, str, int]]:
    """Every way to the host and beyond it that must stay closed, plus the remote host."""
    targets = [
        ("own link host end", "GATEWAY", lab.port),
        ("main interface", lab.main_address, lab.port),
        ("added address", ADDED, lab.port),
        ("loopback", "127.0.0.1", lab.port),
        ("ipv6 loopback", "::1", lab.port),
        ("metadata", METADATA, METADATA_PORT),
        ("remote host", REMOTE, REMOTE_PORT),
    ]
    for line in sh("ip", "-6", "-o", "addr", "show", "scope", "global").splitlines():
        targets.append((f"ipv6 {line.split()[1]}", line.split()[3].split("/")[0], lab.port))
    for n, address in enumerate(others):
        targets.append((f"other sandbox {n}", address, SANDBOX_PORT))
        targets.append((f"other link host end {n}", gateway_of(address), lab.port))
    return targets


def gateway_of(sandbox_address: str) -> str:
    """The host end of a sandbox's /30 link."""
    parts = [int(p) for p in sandbox_address.split(".")]
    return ".".join(map(str, [*parts[:3], parts[3] - 1]))


@pytest.fixture(scope="module")
def other_sandbox(server: Server) -> Iterator[str]:
    """Another sandbox with a network and a listener; yields its address."""
    with server.client() as api:
        sid = api.post("/v1/sandboxes", json={"network": "allow", "allow": []}).json()["id"]
        try:

            def run(command: str) -> str:
                return native_exec(api, sid, command)

            run(f"nohup python3 -c {shlex.quote(SANDBOX_LISTENER)} >/dev/null 2>&1 & sleep 0.5")
            # Its listener answers inside it: a probe from elsewhere that fails means something.
            found = probe(run, [("itself", "127.0.0.1", SANDBOX_PORT)])
            assert found.reached == {"itself"}, found
            assert ipaddress.ip_address(found.address) in SUBNET, found
            yield found.address
        finally:
            api.delete(f"/v1/sandboxes/{sid}")


def check_closed(found: Probed, *, reachable: set[str]) -> None:
    """Exactly `reachable` connected, the sandbox's link has no IPv6 address, neither has the
    host end of it."""
    assert found.reached == reachable
    assert found.ipv6 == [], found.ipv6
    host_end = host_link(found.gateway)
    assert sh("ip", "-6", "-o", "addr", "show", "dev", host_end) == ""


@pytest.mark.parametrize(
    ("network", "allow", "reachable"),
    [
        ("allow", ["0.0.0.0/0"], {"remote host"}),
        ("allow", ["10.0.0.0/8"], {"remote host"}),
        ("allow", ["GATEWAY"], set()),
        ("outbound", [], set()),
        ("outbound", ["HOST"], {"remote host"}),
    ],
    ids=["everything", "ten-slash-eight", "own-host-end", "outbound", "outbound-listing-host"],
)
def test_no_allow_list_opens_the_host(
    server: Server, lab: Lab, added_address: str, other_sandbox: str,
    network: str, allow: list[str], reachable: set[str],
) -> None:  # fmt: skip
    # The listeners answer on every address the sandbox tries, seen from the host itself.
    for address in (lab.main_address, added_address, "127.0.0.1", "::1", gateway_of(other_sandbox)):
        assert reaches_from_host(address, lab.port), address
    with server.client() as api:
        created = api.post("/v1/sandboxes", json={"network": network, "allow": []})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        try:

            def run(command: str) -> str:
                return native_exec(api, sid, command)

            gateway = probe(run, [("", "127.0.0.1", 1)]).gateway
            listed = {
                "GATEWAY": [f"{gateway}/32"],
                "HOST": [f"{gateway}/32", f"{lab.main_address}/32", f"{added_address}/32",
                         f"{METADATA}/32", f"{other_sandbox}/32", f"{REMOTE}/32"],
            }  # fmt: skip
            wanted = [c for entry in allow for c in listed.get(entry, [entry])]
            changed = api.patch(f"/v1/sandboxes/{sid}", json={"allow": wanted})
            assert changed.status_code == 200, changed.text
            check_closed(probe(run, host_targets(lab, [other_sandbox])), reachable=reachable)
        finally:
            api.delete(f"/v1/sandboxes/{sid}")


def test_no_network_reaches_the_host(
    server: Server, lab: Lab, added_address: str, other_sandbox: str
) -> None:
    with server.client() as api:
        sid = api.post("/v1/sandboxes", json={}).json()["id"]
        try:
            found = probe(
                lambda command: native_exec(api, sid, command),
                host_targets(lab, [other_sandbox]),
            )
            assert found.reached == set() and found.gateway == "" and found.ipv6 == []
        finally:
            api.delete(f"/v1/sandboxes/{sid}")


def test_run_dat_sheesh_allow_ips_do_not_open_the_host(
    server: Server, lab: Lab, added_address: str, other_sandbox: str
) -> None:
    headers = {"X-API-Key": server.admin_key}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as face:
        created = face.post("/v1/vms", json={"allowIps": ["0.0.0.0/0"]})
        assert created.status_code == 201, created.text
        vm = created.json()["id"]
        try:

            def run(command: str) -> str:
                resp = face.post(f"/v1/vms/{vm}/exec", json={"cmd": command})
                assert resp.status_code == 200 and resp.json()["exitCode"] == 0, resp.text
                return str(resp.json()["stdout"])

            check_closed(probe(run, host_targets(lab, [other_sandbox])), reachable={"remote host"})
        finally:
            face.delete(f"/v1/vms/{vm}")


def test_host_nat_rules_do_not_open_the_host(server: Server, lab: Lab) -> None:
    """A port the host publishes by DNAT (as container engines do) and a transparent redirect
    to a host port: neither takes a sandbox to the host."""
    table = f"crltestnat{_TAG}"
    with server.client() as api:
        created = api.post("/v1/sandboxes", json={"network": "allow", "allow": ["0.0.0.0/0"]})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        try:

            def run(command: str) -> str:
                return native_exec(api, sid, command)

            veth = host_link(probe(run, []).gateway)
            subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
            subprocess.run(
                ["nft", "-f", "-"],
                check=True,
                input=f"""
table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        iifname "{veth}" ip daddr {lab.main_address} tcp dport 7001 dnat to {REMOTE}:{REMOTE_PORT}
        iifname "{veth}" ip daddr {REMOTE} tcp dport 7000 redirect to :{lab.port}
    }}
}}
""".encode(),
            )
            found = probe(
                run,
                [
                    ("published host port", lab.main_address, 7001),
                    ("redirected to the host", REMOTE, 7000),
                    ("remote host", REMOTE, REMOTE_PORT),
                ],
            )
            check_closed(found, reachable={"remote host"})
        finally:
            subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
            api.delete(f"/v1/sandboxes/{sid}")


def test_operator_opens_exactly_what_the_setting_names(lab: Lab) -> None:
    data_dir = make_data_dir("corral-test-netopen-")
    opened = f"{lab.main_address}:{lab.port}, {METADATA}:{METADATA_PORT}"
    srv = Server(data_dir, env={"CORRAL_NETWORK_OPEN": opened})
    srv.start()
    try:
        with srv.client() as api:
            sids = []
            for allow in (["0.0.0.0/0"], [f"{REMOTE}/32"]):
                created = api.post("/v1/sandboxes", json={"network": "allow", "allow": allow})
                assert created.status_code == 201, created.text
                sids.append(created.json()["id"])
            targets = [
                ("opened", lab.main_address, lab.port),
                ("opened metadata", METADATA, METADATA_PORT),
                ("other port", lab.main_address, lab.other.port),
                ("other metadata port", METADATA, METADATA_OTHER_PORT),
                ("own link host end", "GATEWAY", lab.port),
                ("loopback", "127.0.0.1", lab.port),
                ("remote host", REMOTE, REMOTE_PORT),
            ]
            assert reaches_from_host(lab.main_address, lab.other.port)
            # A sandbox whose list includes them reaches the opened ones and nothing else there;
            # one whose list does not, reaches none of them.
            for sid, reachable in zip(
                sids, ({"opened", "opened metadata", "remote host"}, {"remote host"}), strict=True
            ):
                found = probe(lambda command, sid=sid: native_exec(api, sid, command), targets)
                check_closed(found, reachable=reachable)
            for sid in sids:
                api.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "entry", ["10.0.0.0/8", "::1", "host.example:80", "10.0.0.5:0", "10.0.0.5:http", "10.200.0.1"]
)
def test_open_setting_refuses_what_is_not_one_address(entry: str) -> None:
    with pytest.raises(ValueError, match="network_open"):
        Settings(network_open=f"10.0.0.5:5432,{entry}")


def test_open_setting_is_normalized() -> None:
    settings = Settings(network_open=" 169.254.169.254:80 ,10.0.0.5,, 10.0.0.5 ")
    assert settings.network_open == "169.254.169.254:80,10.0.0.5"
