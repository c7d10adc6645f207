"""Network policy for sandboxes that may reach the network: a network namespace per sandbox with
a veth pair to the host, and one nftables table for the node that decides what may pass.

Modes: `none` needs none of this (bubblewrap gives the sandbox an empty network namespace).
`allow` lets the sandbox reach only the listed CIDRs. `outbound` lets it reach public addresses:
private ranges (RFC 1918, 100.64.0.0/10), link-local and cloud metadata (169.254.0.0/16), the host
itself and SMTP stay denied unless listed. Nothing may connect into a sandbox. The lists are nft
sets, so changing them takes effect at once in a running sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import shutil
from pathlib import Path

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
# Every node's sandbox links: each live node gets a block of it (runtime/hostlock.py), a /30
# per sandbox slot.
SUBNET = ipaddress.ip_network("10.200.0.0/13")
NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    pass


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
    def __init__(self, node_name: str, subnet: ipaddress.IPv4Network | None = None) -> None:
        self.subnet = subnet or next(SUBNET.subnets(new_prefix=14))  # this node's links
        tag = hashlib.sha256(node_name.encode()).hexdigest()[:4]
        self.table = f"corral_{tag}"
        self.prefix = f"crl{tag}"  # netns names and host-side veth names
        self.available = False

    # --- naming ---

    def netns(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def netns_path(self, slot: int) -> Path:
        return NETNS_DIR / self.netns(slot)

    def veth(self, slot: int) -> str:
        return f"{self.prefix}h{slot}"  # at most 15 characters (IFNAMSIZ)

    def addresses(self, slot: int) -> tuple[str, str]:
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
            denied = ", ".join(ALWAYS_DENIED)
            await _run(
                "nft",
                "-f",
                "-",
                stdin=f"""
table inet {self.table} {{
    set denied {{ type ipv4_addr; flags interval; elements = {{ {denied} }} }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        oifname "{self.prefix}h*" ct state established,related accept
        oifname "{self.prefix}h*" drop
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        iifname "{self.prefix}h*" oifname != "{self.prefix}h*" masquerade
    }}
}}
""".encode(),
            )
        except (NetworkError, OSError) as exc:
            return f"network policy unavailable: {exc}"
        self.available = True
        return None

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

    # --- sandboxes ---

    async def attach(self, slot: int, mode: str, allow: list[str]) -> Path:
        """Give a sandbox slot its namespace, veth and rules; returns the namespace's path."""
        if not self.available:
            raise NetworkError("network policy is not available on this host")
        await self.detach(slot)
        ns, veth = self.netns(slot), self.veth(slot)
        host_ip, sandbox_ip = self.addresses(slot)
        await _run("ip", "netns", "add", ns)
        await _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        await _run("ip", "addr", "add", f"{host_ip}/30", "dev", veth)
        await _run("ip", "link", "set", veth, "up")
        for args in (
            ("addr", "add", f"{sandbox_ip}/30", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", host_ip),
        ):
            await _run("ip", "-n", ns, *args)
        chain = f"sb{slot}"
        await _run(
            "nft",
            "-f",
            "-",
            stdin=f"""
add set inet {self.table} allow{slot} {{ type ipv4_addr; flags interval; }}
add chain inet {self.table} {chain}
add rule inet {self.table} forward iifname "{veth}" jump {chain}
add rule inet {self.table} input iifname "{veth}" ip daddr @allow{slot} accept
add rule inet {self.table} input iifname "{veth}" drop
""".encode(),
        )
        await self.update(slot, mode, allow)
        return self.netns_path(slot)

    async def update(self, slot: int, mode: str, allow: list[str]) -> None:
        """Replace a sandbox's rules and allow-list in one transaction."""
        chain, rules = f"sb{slot}", [f"ip daddr @allow{slot} accept"]
        if mode == "outbound":
            rules += ["ip daddr @denied reject", "tcp dport 25 reject", "meta nfproto ipv4 accept"]
        rules.append("reject")
        elements = f"add element inet {self.table} allow{slot} {{ {', '.join(allow)} }}\n"
        script = (
            f"flush chain inet {self.table} {chain}\n"
            f"flush set inet {self.table} allow{slot}\n"
            + (elements if allow else "")
            + "".join(f"add rule inet {self.table} {chain} {r}\n" for r in rules)
        )
        await _run("nft", "-f", "-", stdin=script.encode())

    async def detach(self, slot: int) -> None:
        veth, chain = self.veth(slot), f"sb{slot}"
        with contextlib.suppress(NetworkError):
            handles = await _run("nft", "-a", "list", "table", "inet", self.table)
            script = ""
            for line in handles.splitlines():
                if f'"{veth}"' in line and "# handle" in line:
                    hook = "forward" if "jump" in line else "input"
                    handle = line.rsplit("# handle", 1)[1].strip()
                    script += f"delete rule inet {self.table} {hook} handle {handle}\n"
            if f"chain {chain} " in handles:
                script += f"delete chain inet {self.table} {chain}\n"
            if f"set allow{slot} " in handles:
                script += f"delete set inet {self.table} allow{slot}\n"
            if script:
                await _run("nft", "-f", "-", stdin=script.encode())
        with contextlib.suppress(NetworkError):
            await _run("ip", "link", "delete", veth)
        if self.netns_path(slot).exists():
            with contextlib.suppress(NetworkError):
                await _run("ip", "netns", "delete", self.netns(slot))
