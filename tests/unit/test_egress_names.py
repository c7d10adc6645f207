"""Host name patterns, and what the egress proxy reads from a connection's first bytes: a TLS
ClientHello's SNI (made by Python's own ssl), an HTTP request's Host."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import dns.message
import dns.rrset
import pytest

from corral import hostnames
from corral.node import protocol
from corral.runtime.base import Injection
from corral.runtime.egress import _MORE, Egress, _client_hello_sni, _http_host, _with_headers
from corral.runtime.netpolicy import ALWAYS_DENIED


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),  # the apex is not covered
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "A.Example.COM.", True),
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "x.api.example.com", False),
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    assert hostnames.matches(hostnames.check_pattern(pattern), name) is expected


def client_hello(server_name: str | None) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni() -> None:
    hello = client_hello("api.example.com")
    assert _client_hello_sni(hello) == "api.example.com"
    assert _client_hello_sni(hello[:40]) is _MORE  # wait for the whole record
    assert _client_hello_sni(client_hello(None)) is None  # no name: refused
    assert _client_hello_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None


def test_http_host() -> None:
    assert _http_host(b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\n\r\n") == "api.example.com"
    assert _http_host(b"GET / HTTP/1.1\r\nHo") is _MORE
    assert _http_host(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n") is None
    assert _http_host(b"GET / HTTP/1.1\r\n\r\n") is None
    assert _http_host(b"\x00\x01binary") is None


def test_headers_replaced() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nx-api-key: mine\r\nConnection: keep-alive\r\n\r\n"
    out = _with_headers(head, [("X-Api-Key", "theirs")])
    assert (
        out == b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: theirs\r\nConnection: close\r\n\r\n"
    )


def test_injections_cross_the_wire_and_stay_out_of_reprs() -> None:
    rules = (Injection("a.test", "X-Api-Key", "s3cr3t"),)
    assert protocol.injections_from_wire(protocol.injections_to_wire(rules)) == rules
    assert "s3cr3t" not in repr(rules)


def test_private_answers_are_not_made_reachable(tmp_path: Path) -> None:
    asyncio.run(private_answers(tmp_path))


async def private_answers(tmp_path: Path) -> None:
    opened: list[str] = []

    async def open_addresses(slot: int, addresses: list[str]) -> None:
        opened.extend(addresses)

    egress = Egress(upstream="127.0.0.1", scratch=tmp_path, denied=ALWAYS_DENIED)
    egress.open_addresses = open_addresses
    egress.add_slot(3, "10.200.0.14")
    await egress.set_policy(3, "allow", ("*.example.com",), ())
    state = egress.slots[3]
    query = dns.message.make_query("a.example.com", "A")
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("a.example.com.", 300, "IN", "A", "10.1.2.3", "203.0.113.9")
    )
    await egress._record(state, "a.example.com", response)
    assert opened == ["203.0.113.9"]
    assert state.address_allowed("203.0.113.9") and not state.address_allowed("10.1.2.3")
    assert state.refusals[-1]["reason"] == "resolved to a private address 10.1.2.3"
    # A list without the name no longer reaches its addresses.
    await egress.set_policy(3, "allow", ("other.example.com",), ())
    assert not state.address_allowed("203.0.113.9") and state.resolved == {}
