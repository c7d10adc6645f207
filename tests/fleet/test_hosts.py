"""The simulated hosts of the fleet tests (tests/fleet/hosts.py): each reaches the root namespace
through its gateway and nothing else, a partition drops its packets silently until healed, stop()
and the sweep leave nothing behind, and inside one, what an agent does for its sandboxes (network
namespaces with veths, nftables, cgroups, bubblewrap) works."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from corral.runtime.cgroups import find_cgroup2
from corral.runtime.netpolicy import NETNS_DIR, SUBNET, NetworkManager
from tests.engines import NatsServer
from tests.fleet.hosts import (
    PREFIX,
    HostError,
    NetnsHost,
    _free_link,
    pids_in_netns,
    sweep_stale_hosts,
)

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

CONNECT = textwrap.dedent("""
    import socket, sys, time
    start = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)
    print(round(time.monotonic() - start, 2))
""")


def links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def connect_from(
    host: NetnsHost, port: int, timeout: float = 1.0, address: str | None = None
) -> tuple[str, float]:
    """What a TCP connect from inside `host` to its gateway (or `address`) ends in, and after
    how long."""
    out = host.run(
        [sys.executable, "-c", CONNECT, address or host.gateway, str(port), str(timeout)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    return out[0], float(out[1])


@contextlib.contextmanager
def listener(address: str = "0.0.0.0") -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.listen(16)
        sock.settimeout(10)
        yield sock


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (bound, never listening: nobody else gets it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        yield int(sock.getsockname()[1])


class Lines:
    """A subprocess's stdout, line by line, read on a thread so that waits can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.queue.put(line.strip())

    def drain(self) -> list[str]:
        got = []
        with contextlib.suppress(queue.Empty):
            while True:
                got.append(self.queue.get_nowait())
        self.seen += got
        return got

    def wait_for(self, wanted: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if wanted(line):
                return line
        raise AssertionError(f"no such line within {timeout} s; last lines: {self.seen[-15:]}")


def dead(pid: int) -> bool:
    """Gone, or a zombie its new parent has yet to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


# --- addresses and reachability ---


def test_host_reaches_a_listener_on_its_gateway() -> None:
    with NetnsHost() as host, listener() as server:
        port = server.getsockname()[1]
        assert connect_from(host, port)[0] == "connected"
        conn, peer = server.accept()
        conn.close()
        # The connection came over the host's link, from the host's own address.
        assert peer[0] == host.address
        # Inside, the host has loopback and its one link, nothing of the root namespace.
        inside = host.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
        addresses = {
            (link["ifname"], a["local"])
            for link in json.loads(inside.stdout)
            for a in link["addr_info"]
        }  # fmt: skip
        assert addresses == {("lo", "127.0.0.1"), ("eth0", host.address)}


def test_nothing_beyond_the_root_namespace_and_no_dns_stall() -> None:
    beyond = json.loads(
        subprocess.run(["ip", "-j", "-4", "route", "show", "default"], capture_output=True,
                       text=True, check=True).stdout or "[]"
    )  # fmt: skip
    address = beyond[0]["gateway"] if beyond else "192.0.2.1"
    with NetnsHost() as host:
        outcome, took = connect_from(host, 53, timeout=5, address=address)
        assert outcome == "ConnectionRefusedError" and took < 2
        lookup = host.run(
            [sys.executable, "-c", "import socket, time; t = time.monotonic()\n"
             "try:\n socket.getaddrinfo('pypi.org', 443)\nexcept OSError: pass\n"
             "print(time.monotonic() - t)"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert float(lookup.stdout) < 2
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if not any(link.startswith("cth") for link in links()):  # the last host takes it along
        assert "corral_test_hosts" not in tables


def test_hosts_get_distinct_addresses_clear_of_sandbox_links() -> None:
    with NetnsHost() as a, NetnsHost() as b:
        assert a.name != b.name and a.name.startswith(f"{PREFIX}{os.getpid()}-")
        assert a.link is not None and b.link is not None
        assert not a.link.overlaps(b.link)
        for host in (a, b):
            assert host.link is not None
            assert not host.link.overlaps(SUBNET)
            assert not host.link.overlaps(ipaddress.ip_network("127.0.0.0/8"))
            assert ipaddress.ip_address(host.gateway) in host.link
            assert ipaddress.ip_address(host.address) in host.link
        # Each /30 is taken only once on this machine, even by a third host started now.
        with NetnsHost() as c:
            assert c.link is not None
            assert not c.link.overlaps(a.link) and not c.link.overlaps(b.link)


def test_a_link_skips_addresses_already_in_use() -> None:
    taken = _free_link(os.getpid())  # the /30 the next host would get
    dummy = f"ctd{os.getpid()}"
    subprocess.run(  # no dummy driver everywhere; a veth pair holds an address as well
        ["ip", "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p"], check=True
    )
    try:
        subprocess.run(["ip", "addr", "add", f"{taken[2]}/30", "dev", dummy], check=True)
        with NetnsHost() as host:
            assert host.link is not None and not host.link.overlaps(taken)
    finally:
        subprocess.run(["ip", "link", "delete", dummy], check=True)


# --- partitions ---


def test_partition_makes_connects_time_out_and_heal_restores_them(closed_port: int) -> None:
    closed = closed_port
    with NetnsHost() as host, listener() as server:
        port = server.getsockname()[1]
        assert connect_from(host, closed)[0] == "ConnectionRefusedError"

        host.partition()
        assert host.partitioned
        # A stall, not a refusal: not even a closed port answers with a reset.
        outcome, took = connect_from(host, port, timeout=1.0)
        assert (outcome, took >= 0.9) == ("TimeoutError", True)
        assert connect_from(host, closed, timeout=1.0)[0] == "TimeoutError"
        # Nor does a datagram sender see an error: packets vanish as on a cut link.
        udp = host.run(
            [sys.executable, "-c", "import socket, sys; socket.socket(2, 2).sendto(b'x', "
             f"({host.gateway!r}, {closed})); print('sent')"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert udp.stdout.strip() == "sent", udp.stderr

        host.heal()
        assert not host.partitioned
        assert connect_from(host, port)[0] == "connected"
        assert connect_from(host, closed)[0] == "ConnectionRefusedError"


RESPONDER = textwrap.dedent("""
    import asyncio, sys, nats
    async def main():
        nc = await nats.connect(sys.argv[1])
        async def answer(msg):
            print("got", msg.data.decode(), flush=True)
            await msg.respond(msg.data)
        await nc.subscribe("hosts.echo", cb=answer)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")

REQUESTER = textwrap.dedent("""
    import asyncio, sys, nats
    def say(*words):
        print(*words, flush=True)
    async def main():
        async def on_error(exc):
            say("error", type(exc).__name__)
        async def on_disconnect():
            say("disconnected")
        async def on_reconnect():
            say("reconnected")
        nc = await nats.connect(
            sys.argv[1], ping_interval=1, max_outstanding_pings=2, reconnect_time_wait=0.2,
            max_reconnect_attempts=-1, connect_timeout=1, error_cb=on_error,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
        )
        seq = 0
        while True:
            seq += 1
            try:
                reply = await nc.request("hosts.echo", str(seq).encode(), timeout=0.5)
                say("ok", reply.data.decode())
            except Exception as exc:
                say("failed", seq, type(exc).__name__)
                await asyncio.sleep(0.1)
    asyncio.run(main())
""")


def test_nats_client_inside_recovers_after_partition(nats: NatsServer) -> None:
    user = nats.users[0]
    responder = subprocess.Popen(
        [sys.executable, "-c", RESPONDER, nats.url(user)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        answered = Lines(responder.stdout)  # type: ignore[arg-type]
        answered.wait_for(lambda line: line == "ready", 20)
        with NetnsHost() as host:
            url = nats.url(user, address=host.gateway)
            client = host.popen(
                [sys.executable, "-c", REQUESTER, url], stdout=subprocess.PIPE, text=True
            )  # fmt: skip
            inside = Lines(client.stdout)  # type: ignore[arg-type]
            inside.wait_for(lambda line: line.startswith("ok "), 20)

            host.partition()
            time.sleep(0.6)  # a request's timeout: whatever was in flight has ended
            answered.drain(), inside.drain()
            time.sleep(3)
            # Nothing of the client reached the server, and nothing came back.
            assert answered.drain() == []
            during = inside.drain()
            assert during and not [line for line in during if line.startswith("ok ")], during

            host.heal()
            healed = time.monotonic()
            inside.wait_for(lambda line: line.startswith("ok "), 15)
            assert time.monotonic() - healed < 15
            assert answered.drain(), "the server saw no request after the heal"
    finally:
        responder.kill()
        responder.wait()


# --- clean-up ---


def test_stop_kills_everything_inside_and_leaves_nothing() -> None:
    host = NetnsHost().start()
    netns, veth = host.netns_path, host.veth
    # popen's pid is the program's own (nsenter execs it): kill -9 of it is an agent's crash.
    proc = host.popen(["sleep", "600"])
    comm = Path(f"/proc/{proc.pid}/comm")
    deadline = time.monotonic() + 5
    while comm.read_text() != "sleep\n" and time.monotonic() < deadline:
        time.sleep(0.01)  # nsenter has not exec'd the program yet
    assert proc.pid in host.pids() and comm.read_text() == "sleep\n"
    proc.kill()
    proc.wait()
    # A process that detaches itself (setsid, its own child) is found through its namespace.
    host.popen(["sh", "-c", "setsid sleep 600 & exec sleep 600"])
    deadline = time.monotonic() + 5
    while len(host.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = host.pids()
    assert len(pids) == 2
    assert veth in links() and netns.exists()

    host.stop()
    assert not netns.exists() and veth not in links()
    for pid in pids:
        assert dead(pid)
    host.stop()  # idempotent
    assert not host.running


def test_context_manager_cleans_up_when_the_test_fails() -> None:
    with pytest.raises(ZeroDivisionError), NetnsHost() as host:
        netns, veth = host.netns_path, host.veth
        host.popen(["sleep", "600"])
        _ = 1 / 0
    assert not netns.exists() and veth not in links()
    assert pids_in_netns(netns) == []


CRASH = textwrap.dedent("""
    import os, subprocess
    from tests.fleet.hosts import NetnsHost
    host = NetnsHost().start()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # not our pipes
    host.popen(["sleep", "600"], start_new_session=True, **quiet)
    print(host.name, host.veth, flush=True)
    os._exit(9)  # no atexit: what a kill -9 of a test run leaves
""")


def test_sweep_removes_hosts_of_dead_test_processes() -> None:
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", CRASH], cwd=repo, capture_output=True, text=True, timeout=20
    )  # fmt: skip
    assert out.returncode == 9, out.stderr
    name, veth = out.stdout.split()
    assert (NETNS_DIR / name).exists() and veth in links()
    left = pids_in_netns(NETNS_DIR / name)
    assert len(left) == 1  # its sleep outlived it

    with NetnsHost() as mine:
        sweep_stale_hosts()  # (a test run beside this one may have swept it first: as good)
        assert mine.netns_path.exists()  # a live process's host is not stale
    assert not (NETNS_DIR / name).exists() and veth not in links()
    assert dead(left[0])


def test_a_host_has_addresses_only_while_it_runs() -> None:
    host = NetnsHost()
    with pytest.raises(HostError):
        _ = host.gateway
    with host:
        assert host.running and host.gateway
    for call in (lambda: host.gateway, lambda: host.popen(["true"])):
        with pytest.raises(HostError):
            call()


# --- what an agent does inside ---


CGROUP_PROBE = textwrap.dedent("""
    import pathlib, subprocess, sys, time
    group = pathlib.Path(sys.argv[1])
    group.mkdir()
    child = subprocess.Popen(["sleep", "600"])
    (group / "cgroup.procs").write_text(str(child.pid))
    if f"0::/{group.name}\\n" in pathlib.Path(f"/proc/{child.pid}/cgroup").read_text():
        print("joined")
    (group / "cgroup.kill").write_text("1")
    child.wait(5)
    print("killed" if child.returncode == -9 else child.returncode)
    group.rmdir()
""")


def test_sandbox_namespaces_cgroups_and_bubblewrap_work_inside() -> None:
    with NetnsHost() as host:
        # A fresh network namespace, as bubblewrap --unshare-net makes.
        fresh = host.run(
            ["unshare", "--net", "ip", "-j", "link"], capture_output=True, text=True, check=True
        )  # fmt: skip
        assert [link["ifname"] for link in json.loads(fresh.stdout)] == ["lo"]
        sandbox = host.run(
            ["bwrap", "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "--proc", "/proc",
             "--dev", "/dev", "--", "cat", "/proc/self/uid_map"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert sandbox.returncode == 0, sandbox.stderr

        # cgroup v2: a cgroup made from inside takes a process and kills it whole.
        mount = find_cgroup2()
        assert mount is not None
        group = mount / f"corral-thost-{os.getpid()}"
        try:
            probe = host.run(
                [sys.executable, "-c", CGROUP_PROBE, str(group)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert probe.stdout.split() == ["joined", "killed"], probe.stderr
        finally:
            with contextlib.suppress(FileNotFoundError):
                group.rmdir()


SANDBOX_LINK = textwrap.dedent("""
    import asyncio, subprocess, sys
    from corral.runtime.netpolicy import NetworkManager
    node, gateway, port = sys.argv[1], sys.argv[2], sys.argv[3]
    CONNECT = (
        "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5);"
        "print('connected')"
    )
    async def main():
        manager = NetworkManager(node)
        why = await manager.setup()
        if why:
            sys.exit(why)
        try:
            netns = await manager.attach(0, "allow", [gateway + "/32"])
            subprocess.run(
                ["nsenter", f"--net={netns}", sys.executable, "-c", CONNECT, gateway, port],
                check=True, timeout=20,
            )
        finally:
            await manager.close()
    asyncio.run(main())
""")


def test_a_sandbox_link_made_inside_reaches_the_root_namespace() -> None:
    """Corral's own sandbox networking, run in a host: the sandbox's veth ends in the host's
    namespace, and its traffic leaves through the host's link, masqueraded to its address."""
    node = f"corral-thost-{os.getpid()}"
    manager = NetworkManager(node)
    with NetnsHost() as host, listener() as server:
        try:
            out = host.run(
                [sys.executable, "-c", SANDBOX_LINK, node, host.gateway,
                 str(server.getsockname()[1])],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.stdout.strip() == "connected", out.stderr
            conn, peer = server.accept()
            conn.close()
            assert peer[0] == host.address
            # The sandbox's namespace lives in /run/netns like the host's; its veth and the
            # node's nftables table stayed inside the host.
            assert not any(name.startswith(manager.prefix) for name in links())
            tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
            assert manager.table not in tables.stdout
            assert not list(NETNS_DIR.glob(f"{manager.prefix}-*"))  # its close() removed it
        finally:
            for path in NETNS_DIR.glob(f"{manager.prefix}-*"):
                subprocess.run(["ip", "netns", "delete", path.name], capture_output=True)
