"""Egress by host name: the node's DNS forwarder and transparent TCP proxy for sandboxes whose
allow-list names hosts (hostnames.py). netpolicy.py sends them their traffic.

- DNS: a sandbox's /etc/resolv.conf names its link's gateway; nftables redirects port 53 there
  to the forwarder, which answers only names the sandbox's list allows (any name in `outbound`
  mode) and says NXDOMAIN to the rest, so nothing is tunnelled through queries for a denied
  name. Allowed answers are forwarded from the upstream resolver; the IPv4 addresses of a name
  the list allows are recorded for the sandbox, with their TTL (at least MIN_TTL, plus GRACE),
  and added to its `resolved` nft set. AAAA questions get an empty answer (no IPv6 path).
- TCP to a recorded address (and not in a listed CIDR) is redirected to the proxy, which reads
  the TLS ClientHello's SNI or the HTTP Host header without consuming it, checks the name against
  the list and that an allowed name resolved to the address, then splices the connection to the
  original destination. A connection it cannot name (no SNI, not HTTP, nothing sent within
  FIRST_BYTES_TIMEOUT) is refused. Anything else to such an address (UDP, ICMP) is rejected by
  the sandbox's forward chain.
- HTTPS to a host with an injection rule is intercepted: the sandbox is shown a certificate of
  its own CA (egress_ca.py), the proxy verifies the real server, adds the rule's header to the
  request (and `Connection: close`, so each connection carries one request) and relays the
  rest. Other hosts are never decrypted. Plain HTTP gets no header: a secret never travels in
  clear.
- A changed list applies at once: recorded addresses no allowed name resolved to are dropped,
  and proxied connections to a host the list no longer allows are closed.

Every decision is counted per sandbox (`status`). Queries and connections come in from the
sandbox's link address only (its namespace belongs to the host: it cannot take another).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from corral import hostnames
from corral.runtime.base import Injection
from corral.runtime.egress_ca import SandboxCA

log = logging.getLogger(__name__)

MIN_TTL = 30.0
GRACE = 60.0  # clients cache answers a little past their TTL
MAX_TTL = 86400.0
FIRST_BYTES_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
MAX_PEEK = 16384
MAX_REQUEST_HEAD = 65536
RECENT_REFUSALS = 50
MAX_DNS_IN_FLIGHT = 256  # questions being answered, all sandboxes together; more are dropped
MAX_FLOWS = 512  # proxied connections of one sandbox at once; more are refused
SO_ORIGINAL_DST = 80


@dataclass
class SlotState:
    slot: int
    address: str  # the sandbox's end of its link
    mode: str = "allow"
    names: tuple[str, ...] = ()
    injections: tuple[Injection, ...] = ()
    # address -> name -> when its answer expires (time.monotonic)
    resolved: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    injected: collections.Counter[int] = field(default_factory=collections.Counter)
    refusals: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_REFUSALS)
    )
    flows: dict[asyncio.Task[None], str] = field(default_factory=dict)  # proxied, by host
    ca: SandboxCA | None = None

    def name_allowed(self, name: str) -> bool:
        return self.mode == "outbound" or hostnames.allowed(self.names, name)

    def listed(self, name: str) -> bool:
        return hostnames.allowed(self.names, name)

    def refuse(self, kind: str, host: str, reason: str) -> None:
        self.counters[kind] += 1
        self.refusals.append(
            {"at": time.time(), "kind": kind.removesuffix("_refused"), "host": host,
             "reason": reason}
        )  # fmt: skip

    def address_allowed(self, address: str) -> bool:
        """Whether a name the list allows resolved to `address`, and has not expired."""
        now = time.monotonic()
        names = self.resolved.get(address, {})
        return any(until > now and self.listed(n) for n, until in names.items())


class Egress:
    """The DNS forwarder and the proxy of one node, for all its sandboxes."""

    def __init__(
        self,
        *,
        upstream: str,
        scratch: Path,
        upstream_ca_file: str | None = None,
        private_answers: bool = False,
        denied: tuple[str, ...] = (),
    ) -> None:
        self.upstream = upstream
        self.scratch = scratch
        self.private_answers = private_answers
        self.denied = [ipaddress.ip_network(d) for d in denied]
        self.upstream_ca_file = upstream_ca_file
        self.slots: dict[int, SlotState] = {}
        self.by_address: dict[str, SlotState] = {}
        self.dns_port = 0
        self.proxy_port = 0
        # Set by the network manager: adds and removes addresses of a slot's `resolved` set.
        self.open_addresses: Callable[[int, list[str]], Awaitable[None]] | None = None
        self.close_addresses: Callable[[int, list[str]], Awaitable[None]] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dns_in_flight = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._client_context: ssl.SSLContext | None = None
        self._pending_cas: dict[int, SandboxCA] = {}  # made for a start, before attach

    # --- lifetime ---

    async def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.scratch.chmod(0o700)
        self._client_context = ssl.create_default_context(cafile=self.upstream_ca_file or None)
        self._client_context.set_alpn_protocols(["http/1.1"])
        loop = asyncio.get_running_loop()
        # One port for DNS over UDP and TCP, another for the proxy; on every address, but
        # nftables takes nothing on them that does not come from a sandbox link.
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("0.0.0.0", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise OSError("no free port for the DNS forwarder")
        self.dns_port = port
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _DnsProtocol(self), sock=udp)
        tcp.listen(128)
        self._servers.append(await asyncio.start_server(self._dns_tcp, sock=tcp))
        proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.bind(("0.0.0.0", 0))
        proxy.listen(512)
        proxy.setblocking(False)
        self.proxy_port = proxy.getsockname()[1]
        self._proxy_socket = proxy
        self._spawn(self._accept_loop(proxy))
        self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._udp is not None:
            self._udp.close()
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(OSError, AttributeError):
            self._proxy_socket.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- sandboxes ---

    def ca(self, slot: int, label: str) -> SandboxCA:
        """A new CA for the slot's next sandbox, which add_slot gives it (at most one waits
        per slot)."""
        ca = SandboxCA(label, self.scratch)
        self._pending_cas[slot] = ca
        return ca

    def add_slot(self, slot: int, address: str) -> None:
        self.remove_slot(slot)
        state = SlotState(slot, address, ca=self._pending_cas.pop(slot, None))
        self.slots[slot] = state
        self.by_address[address] = state

    def remove_slot(self, slot: int) -> None:
        state = self.slots.pop(slot, None)
        if state is None:
            return
        self.by_address.pop(state.address, None)
        for task in list(state.flows):
            task.cancel()

    async def set_policy(
        self, slot: int, mode: str, names: tuple[str, ...], injections: tuple[Injection, ...]
    ) -> None:
        state = self.slots.get(slot)
        if state is None:
            return
        state.mode, state.names, state.injections = mode, names, injections
        gone = [a for a in state.resolved if not state.address_allowed(a)]
        for address in gone:
            del state.resolved[address]
        if gone and self.close_addresses is not None:
            await self.close_addresses(slot, gone)
        for task, host in list(state.flows.items()):
            if host and not state.name_allowed(host):
                task.cancel()  # a host no longer allowed: its open connections end too

    def status(self, slot: int) -> dict[str, Any]:
        state = self.slots.get(slot)
        if state is None:
            return {}
        now = time.monotonic()
        resolved = {
            address: sorted(n for n, until in names.items() if until > now)
            for address, names in state.resolved.items()
        }
        return {
            "counters": {
                "connections_allowed": state.counters["connections_allowed"],
                "connections_refused": state.counters["connections_refused"],
                "dns_answered": state.counters["dns_answered"],
                "dns_refused": state.counters["dns_refused"],
            },
            "injections": [
                {"host": r.host, "header": r.header, "count": state.injected[i]}
                for i, r in enumerate(state.injections)
            ],
            "resolved": {a: n for a, n in sorted(resolved.items()) if n},
            "recent_refusals": list(state.refusals),
            "open_connections": len(state.flows),
        }

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(10)
            now = time.monotonic()
            for state in list(self.slots.values()):
                gone = []
                for address, names in list(state.resolved.items()):
                    for name, until in list(names.items()):
                        if until <= now:
                            del names[name]
                    if not names:
                        del state.resolved[address]
                        gone.append(address)
                if gone and self.close_addresses is not None:
                    with contextlib.suppress(Exception):
                        await self.close_addresses(state.slot, gone)

    # --- DNS ---

    async def answer(self, wire: bytes, peer: str) -> bytes | None:
        state = self.by_address.get(peer)
        if state is None:
            return None
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            state.refuse("dns_refused", "", "malformed query")
            return None
        if len(query.question) != 1 or query.opcode() != 0:
            state.refuse("dns_refused", "", "not one standard question")
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        question = query.question[0]
        name = hostnames.normalize(question.name.to_text())
        if not state.name_allowed(name):
            state.refuse("dns_refused", name, "name not in the allow-list")
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        if question.rdtype == dns.rdatatype.AAAA:
            state.counters["dns_answered"] += 1
            return dns.message.make_response(query).to_wire()  # no IPv6 path: no addresses
        response = await self._forward(query)
        if response is None:
            failed = dns.message.make_response(query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            return failed.to_wire()
        if state.listed(name):
            await self._record(state, name, response)
        state.counters["dns_answered"] += 1
        return response.to_wire()

    async def _forward(self, query: dns.message.Message) -> dns.message.Message | None:
        try:
            response = await dns.asyncquery.udp(query, self.upstream, timeout=3.0)
            if response.flags & dns.flags.TC:
                response = await dns.asyncquery.tcp(query, self.upstream, timeout=3.0)
        except (dns.exception.DNSException, OSError) as exc:
            log.info("DNS upstream %s failed: %r", self.upstream, exc)
            return None
        return response

    async def _record(self, state: SlotState, name: str, response: dns.message.Message) -> None:
        new, until = [], None
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.A:
                continue
            ttl = min(max(float(rrset.ttl), MIN_TTL), MAX_TTL) + GRACE
            until = time.monotonic() + ttl
            for rdata in rrset:
                address = rdata.address
                ip = ipaddress.ip_address(address)
                if not self.private_answers and any(ip in net for net in self.denied):
                    state.refuse("dns_refused", name, f"resolved to a private address {address}")
                    continue
                names = state.resolved.setdefault(address, {})
                if not names:
                    new.append(address)
                names[name] = max(names.get(name, 0.0), until)
        if new and self.open_addresses is not None:
            await self.open_addresses(state.slot, new)

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
                wire = await asyncio.wait_for(reader.readexactly(size), 10)
                answer = await self.answer(wire, peer)
                if answer is None:
                    break
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    # --- the proxy ---

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("egress proxy: accept failed: %r", exc)
                await asyncio.sleep(0.1)
                continue
            state = self.by_address.get(peer[0])
            if state is None or len(state.flows) >= MAX_FLOWS:
                if state is not None:
                    state.refuse("connections_refused", "", "too many open connections")
                sock.close()
                continue
            task = self._spawn(self._proxy(state, sock))
            state.flows[task] = ""
            task.add_done_callback(lambda t, s=state: s.flows.pop(t, None))

    async def _proxy(self, state: SlotState, sock: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack("!2xH4s8x", raw)
            address = socket.inet_ntoa(packed)
            kind, host = await _peek_name(sock)
            if host is None:
                state.refuse("connections_refused", address, f"{kind}: no host name")
                return
            if not state.name_allowed(host):
                state.refuse("connections_refused", host, f"{kind}: host not in the allow-list")
                return
            if not state.address_allowed(address):
                state.refuse(
                    "connections_refused", host, f"{kind}: {address} is not an address of it"
                )
                return
            state.flows[task] = host
            rules = [
                (i, r) for i, r in enumerate(state.injections) if r.host == host
            ] if kind == "tls" else []  # fmt: skip
            state.counters["connections_allowed"] += 1
            if rules and state.ca is not None:
                await self._intercept(state, sock, host, address, port, rules)
            else:
                await self._splice(sock, address, port)
        except asyncio.CancelledError:
            pass
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:  # fmt: skip
            log.debug("egress proxy: slot %s: %r", state.slot, exc)
        finally:
            sock.close()

    async def _splice(self, sock: socket.socket, address: str, port: int) -> None:
        reader, writer = await _streams(sock)
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(address, port), CONNECT_TIMEOUT
        )
        await _relay(reader, writer, up_reader, up_writer)

    async def _intercept(
        self,
        state: SlotState,
        sock: socket.socket,
        host: str,
        address: str,
        port: int,
        rules: list[tuple[int, Injection]],
    ) -> None:
        assert state.ca is not None
        context = await asyncio.to_thread(state.ca.server_context, host)
        reader, writer = await _streams(sock, context)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FIRST_BYTES_TIMEOUT)
        if len(head) > MAX_REQUEST_HEAD:
            raise ValueError("request head too long")
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=self._client_context, server_hostname=host),
            CONNECT_TIMEOUT,
        )
        up_writer.write(_with_headers(head, [(r.header, r.value) for _, r in rules]))
        for i, _ in rules:
            state.injected[i] += 1
        await _relay(reader, writer, up_reader, up_writer)


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] in self.egress.by_address and self.egress.dns_in_flight < MAX_DNS_IN_FLIGHT:
            self.egress.dns_in_flight += 1
            self.egress._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            answer = await self.egress.answer(data, addr[0])
        finally:
            self.egress.dns_in_flight -= 1
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


async def _peek_name(sock: socket.socket) -> tuple[str, str | None]:
    """What the client's first bytes name, read without consuming them: ("tls", SNI) or
    ("http", Host), or a kind and None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_BYTES_TIMEOUT
    seen = -1
    while True:
        if loop.time() > deadline:
            return "timeout", None
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _settle, readable)
        try:
            await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
        except TimeoutError:
            return "timeout", None
        finally:
            loop.remove_reader(sock.fileno())
        data = sock.recv(MAX_PEEK, socket.MSG_PEEK)
        if not data:
            return "closed", None
        if data[0] == 0x16:
            found = _client_hello_sni(data)
            kind = "tls"
        else:
            found = _http_host(data)
            kind = "http"
        if found is not _MORE:
            return kind, found  # type: ignore[return-value]
        if len(data) >= MAX_PEEK:
            return kind, None
        if len(data) == seen:
            await asyncio.sleep(0.02)  # still readable: nothing new yet
        seen = len(data)


_MORE = object()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _client_hello_sni(data: bytes) -> object:
    if len(data) < 5:
        return _MORE
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length:
        return _MORE
    body = data[5 : 5 + length]
    try:
        if body[0] != 1:
            return None
        i = 4 + 2 + 32
        i += 1 + body[i]  # session id
        i += 2 + int.from_bytes(body[i : i + 2], "big")  # cipher suites
        i += 1 + body[i]  # compression methods
        end = i + 2 + int.from_bytes(body[i : i + 2], "big")
        i += 2
        while i + 4 <= end:
            kind = int.from_bytes(body[i : i + 2], "big")
            size = int.from_bytes(body[i + 2 : i + 4], "big")
            if kind == 0:  # server_name: list length, type 0, name length, name
                name_len = int.from_bytes(body[i + 7 : i + 9], "big")
                name = body[i + 9 : i + 9 + name_len].decode("ascii")
                return hostnames.check_name(name)
            i += 4 + size
    except (IndexError, UnicodeDecodeError, ValueError):
        return None
    return None


def _http_host(data: bytes) -> object:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        first = data.split(b" ", 1)[0]
        return _MORE if first.isalpha() and first.isupper() else None
    lines = data[:end].split(b"\r\n")
    if len(lines[0].split(b" ")) != 3:
        return None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace")
            if host.startswith("["):
                return None
            try:
                return hostnames.check_name(host.rsplit(":", 1)[0])
            except ValueError:
                return None
    return None


def _with_headers(head: bytes, headers: list[tuple[str, str]]) -> bytes:
    """The request head with `headers` set (replacing any the client sent of those names)
    and `Connection: close`."""
    lines = head[:-4].split(b"\r\n")
    names = {h.lower().encode() for h, _ in headers} | {b"connection", b"proxy-connection"}
    kept = [lines[0]] + [
        line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in names
    ]
    kept += [f"{h}: {v}".encode() for h, v in headers]
    kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"


async def _streams(
    sock: socket.socket, tls: Any = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket, nothing of it read yet; TLS as the server if given."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol,
        sock.dup(),
        ssl=tls,
        ssl_handshake_timeout=FIRST_BYTES_TIMEOUT if tls is not None else None,
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, RuntimeError):
            pass

    try:
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
    finally:
        for w in (writer, up_writer):
            w.close()
