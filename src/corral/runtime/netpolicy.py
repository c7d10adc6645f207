"""Network policy for sandboxes that may reach the network: a network namespace per sandbox with
a veth pair to the host, and one nftables table for the node that decides what may pass.

Modes: `none` needs none of this (bubblewrap gives the sandbox an empty network namespace).
`allow` lets the sandbox reach only the listed CIDRs. `outbound` lets it reach public addresses:
private ranges (RFC 1918, 100.64.0.0/10), multicast and SMTP stay denied unless listed. Nothing
may connect into a sandbox. The lists are nft sets, so changing them takes effect at once in a
running sandbox.

Whatever a sandbox's list says, it never reaches the host (every address of every host interface,
looked up per packet so that addresses added later are covered too, the host ends of all sandbox
links), another sandbox, or 169.254.0.0/16 (cloud metadata): the `protect` chain drops those before
any allow rule is looked at, in prerouting (ahead of DNAT, so a port a host rule redirects stays
the host's), in forward (after DNAT) and in input, which takes nothing at all from a sandbox link.
The only exceptions are the destinations the operator opens (`OpenDestination`), and a sandbox
reaches one of them only when its own list includes it too. IPv6 has no path: the veth ends get no
addresses, and the table drops every IPv6 packet from a sandbox link.

Host names in a list (egress.py) are enforced by the node's DNS forwarder, which a sandbox reaches
at its gateway's port 53 (redirected to the forwarder's own port; its resolv.conf names the
gateway), and by the egress proxy: TCP to an address an allowed name resolved to (the slot's
`resolved` set), when no listed CIDR covers it, is redirected to the proxy. A packet from a
sandbox link with another source address than the sandbox's is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral import hostnames
from corral.runtime.base import Injection
from corral.runtime.egress import Egress

log = logging.getLogger(__name__)

ALWAYS_DENIED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
)
# Every node's sandbox links: each live node of a host gets a block of it (runtime/hostlock.py),
# a /30 per sandbox slot.
SUBNET = ipaddress.ip_network("10.200.0.0/13")
METADATA = ipaddress.ip_network("169.254.0.0/16")
# Never reachable from a sandbox unless opened: every node's sandbox links and link-local, where
# clouds serve instance metadata and credentials.
PROTECTED = (str(SUBNET), str(METADATA))
NETNS_DIR = Path("/run/netns")
IPV6_CONF = Path("/proc/sys/net/ipv6")
# Ahead of DNAT (-100) in prerouting, and of the usual filter chains (0) of any other table.
GUARD_PRIORITY = -150
OPEN_PORT = "ip daddr . th dport @open_ports"


class NetworkError(RuntimeError):
    pass


@dataclass(frozen=True)
class EgressOptions:
    """How the node resolves and proxies for sandboxes allowed host names."""

    dns_upstream: str = ""  # ADDRESS of the resolver to forward to; default: resolv.conf's
    upstream_ca_file: str = ""  # roots the proxy verifies intercepted servers against
    private_answers: bool = False  # names may resolve to private addresses (ALWAYS_DENIED)


def host_resolver(path: Path = Path("/etc/resolv.conf")) -> str:
    """The host's first IPv4 name server (127.0.0.1 if it names none)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                return str(ipaddress.IPv4Address(parts[1]))
    return "127.0.0.1"


def split_allow(allow: list[str] | tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """An allow-list's CIDRs and its host name patterns."""
    cidrs = [a for a in allow if hostnames.is_cidr(a)]
    return cidrs, tuple(a for a in allow if not hostnames.is_cidr(a))


@dataclass(frozen=True)
class OpenDestination:
    """A protected destination the operator lets sandboxes reach: one IPv4 address, and one
    port of it (TCP and UDP) or, without a port, all of it."""

    address: ipaddress.IPv4Address
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.address}:{self.port}" if self.port is not None else str(self.address)


def parse_open(text: str) -> tuple[OpenDestination, ...]:
    """`ADDRESS` or `ADDRESS:PORT` entries, comma-separated (e.g.
    "169.254.169.254:80,10.0.0.5:5432"); raises ValueError naming the entry it cannot take."""
    found: dict[str, OpenDestination] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, sep, port_text = entry.partition(":")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{entry!r} is not ADDRESS or ADDRESS:PORT with one IPv4 address"
            ) from None
        port = None
        if sep:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
            port = int(port_text)
        if address in SUBNET:
            raise ValueError(f"{entry!r}: sandbox link addresses ({SUBNET}) cannot be opened")
        destination = OpenDestination(address, port)
        found[str(destination)] = destination
    return tuple(found.values())


async def _run(*argv: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:4])}: {err.decode(errors='replace').strip()}")
    return out.decode()


class NetworkManager:
    def __init__(
        self,
        node_name: str,
        *,
        subnet: ipaddress.IPv4Network | None = None,
        open_to_sandboxes: tuple[OpenDestination, ...] = (),
        egress: EgressOptions | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.subnet = subnet or next(SUBNET.subnets(new_prefix=14))  # this node's links
        tag = hashlib.sha256(node_name.encode()).hexdigest()[:4]
        self.table = f"corral_{tag}"
        self.prefix = f"crl{tag}"  # netns names and host-side veth names
        self.open = open_to_sandboxes
        self.available = False
        options = egress or EgressOptions()
        self.egress = Egress(
            upstream=options.dns_upstream or host_resolver(),
            scratch=scratch or Path("/run") / f"corral-egress-{tag}",
            upstream_ca_file=options.upstream_ca_file or None,
            private_answers=options.private_answers,
            denied=ALWAYS_DENIED,
        )
        self.egress.open_addresses = self._open_addresses
        self.egress.close_addresses = self._close_addresses
        self._egress_started = False

    # --- naming ---

    def netns(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def netns_path(self, slot: int) -> Path:
        return NETNS_DIR / self.netns(slot)

    def veth(self, slot: int) -> str:
        return f"{self.prefix}h{slot}"  # at most 15 characters (IFNAMSIZ)

    def addresses(self, slot: int) -> tuple[str, str]:
        """The host end's and the sandbox's address of a slot's link."""
        links = self.subnet.num_addresses // 4
        if slot >= links:
            raise NetworkError(f"a node can give at most {links} sandboxes a network")
        base = self.subnet.network_address + slot * 4
        return str(base + 1), str(base + 2)

    # --- node lifetime ---

    async def setup(self) -> str | None:
        """Create the node's table; returns why network policy is unavailable, if it is."""
        for tool in ("ip", "nft", "nsenter"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed: sandboxes can only have network 'none'"
        try:
            await self.sweep()
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")  # noqa: ASYNC240 - procfs
            if not self._egress_started:
                await self.egress.start()
                self._egress_started = True
            await _run("nft", "-f", "-", stdin=self._table_script().encode())
        except (NetworkError, OSError) as exc:
            return f"network policy unavailable: {exc}"
        self.available = True
        return None

    def _table_script(self) -> str:
        links = f'"{self.prefix}h*"'
        hosts = ", ".join(str(o.address) for o in self.open if o.port is None)
        ports = ", ".join(f"{o.address} . {o.port}" for o in self.open if o.port is not None)
        hosts = f"elements = {{ {hosts} }}" if hosts else ""
        ports = f"elements = {{ {ports} }}" if ports else ""
        dns, proxy = self.egress.dns_port, self.egress.proxy_port
        return f"""
table inet {self.table} {{
    set denied {{ type ipv4_addr; flags interval; elements = {{ {", ".join(ALWAYS_DENIED)} }} }}
    set protected {{ type ipv4_addr; flags interval; elements = {{ {", ".join(PROTECTED)} }} }}
    set open_hosts {{ type ipv4_addr; {hosts} }}
    set open_ports {{ type ipv4_addr . inet_service; {ports} }}
    chain protect {{
        ip daddr @open_hosts return
        meta l4proto {{ tcp, udp }} {OPEN_PORT} return
        fib daddr type {{ local, broadcast, multicast }} drop
        ip daddr @protected drop
    }}
    chain guard {{
        type filter hook prerouting priority {GUARD_PRIORITY}; policy accept;
        iifname {links} meta nfproto != ipv4 drop
        iifname {links} jump protect
    }}
    chain forward {{
        type filter hook forward priority {GUARD_PRIORITY}; policy accept;
        oifname {links} ct state established,related accept
        oifname {links} drop
        iifname {links} meta nfproto != ipv4 drop
        iifname {links} jump protect
    }}
    chain input {{
        type filter hook input priority {GUARD_PRIORITY}; policy accept;
        iifname != {links} meta l4proto {{ tcp, udp }} th dport {dns} drop
        iifname != {links} tcp dport {proxy} drop
        iifname {links} meta l4proto {{ tcp, udp }} th dport {dns} accept
        iifname {links} tcp dport {proxy} accept
        iifname {links} drop
    }}
    chain egress {{
        type nat hook prerouting priority -100; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        iifname {links} oifname != {links} masquerade
    }}
}}
"""

    async def sweep(self) -> None:
        """Remove the node's table, namespaces and veths left by an earlier run."""
        with contextlib.suppress(NetworkError):
            await _run("nft", "delete", "table", "inet", self.table)
        if NETNS_DIR.is_dir():  # noqa: ASYNC240 - a tmpfs listing
            for path in NETNS_DIR.iterdir():  # noqa: ASYNC240
                if path.name.startswith(self.prefix + "-"):
                    with contextlib.suppress(NetworkError):
                        await _run("ip", "netns", "delete", path.name)
        links = await _run("ip", "-o", "link", "show")
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(self.prefix + "h"):
                with contextlib.suppress(NetworkError):
                    await _run("ip", "link", "delete", name)

    async def close(self) -> None:
        await self.sweep()
        await self.egress.close()

    # --- sandboxes ---

    def resolv_conf(self, slot: int) -> bytes:
        """The sandbox's /etc/resolv.conf: its gateway, where the node's forwarder answers."""
        return f"nameserver {self.addresses(slot)[0]}\noptions timeout:2 attempts:2\n".encode()

    def trust_bundle(self, slot: int, label: str) -> bytes:
        """The trust store of the slot's next sandbox: the host's roots and its own CA."""
        return self.egress.ca(slot, label).bundle()

    async def attach(
        self, slot: int, mode: str, allow: list[str], inject: tuple[Injection, ...] = ()
    ) -> Path:
        """Give a sandbox slot its namespace, veth and rules; returns the namespace's path."""
        if not self.available:
            raise NetworkError("network policy is not available on this host")
        await self.detach(slot)
        ns, veth = self.netns(slot), self.veth(slot)
        host_ip, sandbox_ip = self.addresses(slot)
        await _run("ip", "netns", "add", ns)
        await _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        if IPV6_CONF.is_dir():  # noqa: ASYNC240 - procfs
            # No link-local address on either end: no IPv6 path to the host at all.
            await _run("ip", "link", "set", veth, "addrgenmode", "none")
            await _run("ip", "-n", ns, "link", "set", "eth0", "addrgenmode", "none")
        await _run("ip", "addr", "add", f"{host_ip}/30", "dev", veth)
        await _run("ip", "link", "set", veth, "up")
        for args in (
            ("addr", "add", f"{sandbox_ip}/30", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", host_ip),
        ):
            await _run("ip", "-n", ns, *args)
        chain, allowed = f"sb{slot}", f'iifname "{veth}" ip daddr @allow{slot}'
        link, t = f'iifname "{veth}"', self.table
        dns, proxy = self.egress.dns_port, self.egress.proxy_port
        # Input takes only what the operator opened on the host, and only when the sandbox's
        # own list includes it; the general drop after these takes the rest. DNS to the
        # gateway goes to the forwarder; TCP to what allowed names resolved to, to the proxy.
        await _run(
            "nft",
            "-f",
            "-",
            stdin=f"""
add set inet {t} allow{slot} {{ type ipv4_addr; flags interval; }}
add set inet {t} resolved{slot} {{ type ipv4_addr; }}
add chain inet {t} {chain}
add rule inet {t} forward {link} jump {chain}
insert rule inet {t} input {allowed} ip daddr @open_hosts accept
insert rule inet {t} input {allowed} meta l4proto {{ tcp, udp }} {OPEN_PORT} accept
insert rule inet {t} guard {link} ip daddr {host_ip} meta l4proto {{ tcp, udp }} th dport 53 accept
insert rule inet {t} guard {link} ip saddr != {sandbox_ip} drop
add rule inet {t} egress {link} ip daddr {host_ip} meta l4proto {{ tcp, udp }} th dport 53 \
    redirect to :{dns}
add rule inet {t} egress {link} ip daddr @resolved{slot} ip daddr != @allow{slot} \
    meta l4proto tcp redirect to :{proxy}
""".encode(),
        )
        self.egress.add_slot(slot, sandbox_ip)
        await self.update(slot, mode, allow, inject)
        return self.netns_path(slot)

    async def update(
        self, slot: int, mode: str, allow: list[str], inject: tuple[Injection, ...] = ()
    ) -> None:
        """Replace a sandbox's rules and allow-list in one transaction."""
        allow, names = split_allow(allow)
        chain, rules = f"sb{slot}", [f"ip daddr @allow{slot} accept"]
        if mode == "outbound":
            rules += [
                "ip daddr @denied counter reject",
                "tcp dport 25 counter reject",
                "meta nfproto ipv4 accept",
            ]
        rules.append("counter reject")
        elements = f"add element inet {self.table} allow{slot} {{ {', '.join(allow)} }}\n"
        script = (
            f"flush chain inet {self.table} {chain}\n"
            f"flush set inet {self.table} allow{slot}\n"
            + (elements if allow else "")
            + "".join(f"add rule inet {self.table} {chain} {r}\n" for r in rules)
        )
        await _run("nft", "-f", "-", stdin=script.encode())
        await self.egress.set_policy(slot, mode, names, inject)

    async def _open_addresses(self, slot: int, addresses: list[str]) -> None:
        elements = ", ".join(addresses)
        await _run(
            "nft", "add", "element", "inet", self.table, f"resolved{slot}", f"{{ {elements} }}"
        )

    async def _close_addresses(self, slot: int, addresses: list[str]) -> None:
        for address in addresses:
            with contextlib.suppress(NetworkError):
                await _run(
                    "nft", "delete", "element", "inet", self.table, f"resolved{slot}",
                    f"{{ {address} }}",
                )  # fmt: skip

    async def status(self, slot: int) -> dict[str, Any]:
        """What the slot's sandbox reached and was refused (egress.py), and the packets its
        forward chain rejected."""
        found = self.egress.status(slot)
        if not found:
            return {}
        rejected = 0
        with contextlib.suppress(NetworkError):
            listing = await _run("nft", "list", "chain", "inet", self.table, f"sb{slot}")
            for line in listing.splitlines():
                words = line.split()
                if "counter" in words and "packets" in words:
                    rejected += int(words[words.index("packets") + 1])
        found["counters"]["packets_rejected"] = rejected
        return found

    async def detach(self, slot: int) -> None:
        veth, chain = self.veth(slot), f"sb{slot}"
        self.egress.remove_slot(slot)
        with contextlib.suppress(NetworkError):
            handles = await _run("nft", "-a", "list", "table", "inet", self.table)
            script, current = "", ""
            for line in handles.splitlines():
                words = line.split()
                if words[:1] == ["chain"] and len(words) >= 2:
                    current = words[1]
                if f'"{veth}"' in line and "# handle" in line:
                    handle = line.rsplit("# handle", 1)[1].strip()
                    script += f"delete rule inet {self.table} {current} handle {handle}\n"
            if f"chain {chain} " in handles:
                script += f"delete chain inet {self.table} {chain}\n"
            for name in (f"allow{slot}", f"resolved{slot}"):
                if f"set {name} " in handles:
                    script += f"delete set inet {self.table} {name}\n"
            if script:
                await _run("nft", "-f", "-", stdin=script.encode())
        with contextlib.suppress(NetworkError):
            await _run("ip", "link", "delete", veth)
        if self.netns_path(slot).exists():
            with contextlib.suppress(NetworkError):
                await _run("ip", "netns", "delete", self.netns(slot))
