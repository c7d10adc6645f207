"""Separate hosts for fleet tests: each simulated host is a network namespace with one veth link
to this (the root) namespace, where the test's PostgreSQL, NATS and server replicas run.

    with NetnsHost() as host:
        agent = host.popen([sys.executable, "-m", "corral.cli.main", "agent", ...])  # inside
        nats.url(user, address=host.gateway)  # how the host reaches a server here
        host.partition()  # its link drops every packet, both ways
        host.heal()

What a host gets: a namespace `corral-t<pid>-<n>`, its end of the link named `eth0` with the
second address of a /30 (the root end, `gateway`, has the first), loopback up, and a default route
via the gateway. Through it the host reaches the root namespace's addresses (not its loopback:
servers it should reach listen on all addresses, as `NatsServer(listen_address="0.0.0.0")`), and
nothing beyond: a table `inet corral_test_hosts` here rejects whatever the root namespace would
forward for a host, so that nothing leaves the machine and a DNS lookup fails at once instead of
stalling (the table goes with the last host). The /30s come from 172.31.0.0/16 (clear of
127/8 and of 10.200.0.0/13, Corral's sandbox links), starting at an offset keyed by the pid,
skipping any that overlap an address of, or a route in, this namespace; the choice is made under
a lock file, so test processes side by side never take the same one.

Processes enter the host with `nsenter --net` only, not `ip netns exec`: they keep this mount
namespace and cgroup, so an agent in a host sees /sys/fs/cgroup (`ip netns exec` remounts /sys
in a mount namespace of its own, which loses the cgroup mounts under it), and the namespaces it
makes for its sandboxes in /run/netns are visible, and sweepable, from here. Inside, the agent
is root of its own network stack: its nftables tables, sysctls and sandbox veths stay in it.

A partition is an nftables `netdev` table in the host's namespace whose ingress and egress hooks
on `eth0` drop everything: packets vanish as on a cut cable (no RST, no ICMP, and no local send
error, which an `inet` output rule would give UDP senders). It covers what the host's sandboxes
send through it too.

`stop()` kills every process whose network namespace is the host's, then deletes the link and the
namespace; it is idempotent, and also runs at exit for hosts a test left running. Hosts of test
processes that are gone (a crash, a kill -9) are swept by `sweep_stale_hosts()`, which the first
`start()` of each process runs.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NETNS_DIR = Path("/run/netns")
POOL = ipaddress.ip_network("172.31.0.0/16")
LINK_PREFIX = 30
PREFIX = "corral-t"  # namespaces: corral-t<pid>-<n>
VETH_PREFIX = "cth"  # root ends of the links: cth<pid>-<n>, at most 15 characters (IFNAMSIZ)
LOCK_FILE = Path("/run/corral/test-hosts.lock")
PARTITION_TABLE = "corral_partition"
GUARD_TABLE = "corral_test_hosts"
KILL_WAIT = 10.0  # seconds for the processes of a stopped host to go

_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)$")
_VETH = re.compile(rf"^{VETH_PREFIX}(\d+)-(\d+)$")
_counter = itertools.count()
_live: dict[str, NetnsHost] = {}  # this process's started hosts, by namespace name
_swept = False


class HostError(RuntimeError):
    """A host's namespace or link could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(
    argv: Sequence[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=30
    )  # fmt: skip
    if check and result.returncode != 0:
        raise HostError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(netns: Path) -> list[int]:
    """Every process whose network namespace is the one bound at `netns`."""
    wanted = _netns_id(netns)
    if wanted is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _netns_id(entry / "ns" / "net") == wanted:
            found.append(int(entry.name))
    return found


def _kill_netns_processes(netns: Path) -> None:
    """SIGKILL until nothing is left in the namespace (a dying parent may still fork)."""
    deadline = time.monotonic() + KILL_WAIT
    while pids := pids_in_netns(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HostError(f"processes {pids} in {netns.name} survive SIGKILL")
        time.sleep(0.02)


def _links() -> list[str]:
    out = _ip("-j", "link", "show").stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this namespace has an address in or a route to."""
    used = []
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        with contextlib.suppress(ValueError):  # "default", or a broadcast/local entry's name
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    return [net for net in used if net.prefixlen > 0]


def _free_link(pid: int) -> ipaddress.IPv4Network:
    """The first /30 of POOL, from an offset keyed by `pid`, that overlaps nothing here."""
    links = list(POOL.subnets(new_prefix=LINK_PREFIX))
    used = _used_networks()
    start = (pid * 64) % len(links)  # each process starts on its own stretch of 64 links
    for i in range(len(links)):
        candidate = links[(start + i) % len(links)]
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise HostError(f"no free /{LINK_PREFIX} left in {POOL}")


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _guard() -> None:
    """Reject what hosts send beyond the root namespace (call under the allocation lock)."""
    if _run(["nft", "list", "table", "inet", GUARD_TABLE], check=False).returncode == 0:
        return
    script = f"""
table inet {GUARD_TABLE} {{
    chain forward {{
        type filter hook forward priority -200; policy accept;
        iifname "{VETH_PREFIX}*" reject
    }}
}}
"""
    _run(["nft", "-f", "-"], stdin=script)


def _unguard_if_unused() -> None:
    with _allocation_lock():
        if not any(_VETH.match(link) for link in _links()):
            _run(["nft", "delete", "table", "inet", GUARD_TABLE], check=False)


def _remove(name: str, veth: str) -> None:
    path = NETNS_DIR / name
    _kill_netns_processes(path)
    if veth in _links():
        _ip("link", "delete", veth, check=False)  # takes the peer in the namespace with it
    if path.exists():
        _ip("netns", "delete", name)


def sweep_stale_hosts() -> list[str]:
    """Remove the namespaces and links of hosts whose test process is gone, and this process's
    own leftovers (an earlier process with the same pid); returns the namespaces removed."""
    removed = []
    me = os.getpid()

    def stale(match: re.Match[str]) -> bool:
        pid, n = int(match.group(1)), match.group(2)
        return f"{PREFIX}{pid}-{n}" not in _live if pid == me else not _pid_alive(pid)

    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        match = _NAME.match(name)
        if match is not None and stale(match):
            _remove(name, f"{VETH_PREFIX}{match.group(1)}-{match.group(2)}")
            removed.append(name)
    for veth in _links():  # a link whose namespace is already gone
        match = _VETH.match(veth)
        if match is not None and stale(match):
            _ip("link", "delete", veth, check=False)
    _unguard_if_unused()
    return removed


def _stop_all_at_exit() -> None:
    for host in list(_live.values()):
        with contextlib.suppress(Exception):
            host.stop()


atexit.register(_stop_all_at_exit)


class NetnsHost:
    """One simulated host; see the module docstring. Needs root, `ip`, `nft` and `nsenter`."""

    def __init__(self) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}-{n}"
        self.veth = f"{VETH_PREFIX}{pid}-{n}"  # the root end; the host's end is `eth0`
        self.netns_path = NETNS_DIR / self.name
        self.link: ipaddress.IPv4Network | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._partitioned = False

    # --- addresses ---

    @property
    def gateway(self) -> str:
        """The root end's address: where the host reaches what runs in the root namespace."""
        return str(self._link().network_address + 1)

    @property
    def address(self) -> str:
        """The host's own address, on its `eth0`."""
        return str(self._link().network_address + 2)

    def _link(self) -> ipaddress.IPv4Network:
        if self.link is None:
            raise HostError(f"{self.name} is not started")
        return self.link

    # --- lifetime ---

    @property
    def running(self) -> bool:
        return self.name in _live

    def start(self) -> NetnsHost:
        global _swept
        if self.running:
            return self
        if not _swept:
            sweep_stale_hosts()
            _swept = True
        _live[self.name] = self
        try:
            with _allocation_lock():
                _guard()
                self.link = _free_link(os.getpid())
                self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        prefix = f"/{LINK_PREFIX}"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        if Path("/proc/sys/net/ipv6").is_dir():
            # No link-local addresses: the link is IPv4 only, as Corral's own sandbox links.
            _ip("link", "set", self.veth, "addrgenmode", "none")
            _ip("-n", self.name, "link", "set", "eth0", "addrgenmode", "none")
        _ip("addr", "add", self.gateway + prefix, "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.name, "addr", "add", self.address + prefix, "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "route", "add", "default", "via", self.gateway)

    def stop(self) -> None:
        """Kill everything in the host, delete its link and namespace. Idempotent."""
        try:
            for proc in self._procs:  # also any still on their way in
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            _remove(self.name, self.veth)
            _unguard_if_unused()
        finally:
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(KILL_WAIT)  # reap them
            self._procs.clear()
            self._partitioned = False
            self.link = None
            _live.pop(self.name, None)

    def __enter__(self) -> NetnsHost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- processes ---

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run in the host's network namespace (and nothing else's)."""
        self._link()
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen of `argv` in the host; nsenter execs it, so the Popen's pid is the
        program's own. Returns once the process is in the host (or has exited already), so that
        pids() includes it. stop() kills it if it is still running."""
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self._procs.append(proc)
        wanted, deadline = _netns_id(self.netns_path), time.monotonic() + KILL_WAIT
        while _netns_id(Path(f"/proc/{proc.pid}/ns/net")) != wanted and proc.poll() is None:
            if time.monotonic() > deadline:
                raise HostError(f"{argv[0]} did not enter {self.name}")
            time.sleep(0.002)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run of `argv` in the host."""
        return subprocess.run(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process in the host's network namespace."""
        return pids_in_netns(self.netns_path)

    # --- faults ---

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def partition(self) -> None:
        """Cut the host off: every packet on its link is dropped, both ways, until heal()."""
        if self._partitioned:
            return
        script = f"""
table netdev {PARTITION_TABLE} {{
    chain ingress {{ type filter hook ingress device "eth0" priority -500; policy drop; }}
    chain egress {{ type filter hook egress device "eth0" priority -500; policy drop; }}
}}
"""
        result = self.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if result.returncode != 0:
            raise HostError(f"partition of {self.name}: {result.stderr.strip()}")
        self._partitioned = True

    def heal(self) -> None:
        """Undo partition()."""
        if not self._partitioned:
            return
        result = self.run(
            ["nft", "delete", "table", "netdev", PARTITION_TABLE], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise HostError(f"heal of {self.name}: {result.stderr.strip()}")
        self._partitioned = False

    def __repr__(self) -> str:
        where = f" {self.address} via {self.gateway}" if self.link else ""
        return f"<NetnsHost {self.name}{where}{' partitioned' if self._partitioned else ''}>"
