"""Test hosts for egress by host name and header injection, each in a network namespace of its
own on this machine (nothing leaves it):

- `web` serves HTTP on :80 and HTTPS on :443 (a certificate for *.allowed.test and *.denied.test
  from a test CA) and DNS on :53, which answers A for *.allowed.test with web's address and for
  *.denied.test with `other`'s, TXT for any name under either, and logs every name it was asked;
- `other` serves the same HTTP and HTTPS.

Both answer a request with `host=<Host header> auth=<sha256 of the X-Api-Key header, or ->`:
which host a request reached and whether a header was added, without echoing the header.

`egress_server` is a server whose DNS forwarder asks web's DNS, whose proxy verifies servers
against the test CA, and whose allowed names may resolve to these private test addresses.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Server, make_data_dir

_NET = f"10.{100 + os.getpid() % 100}"
_TAG = f"{os.getpid() % 100000}"
NETS = {"web": f"{_NET}.21", "other": f"{_NET}.22"}

HOST_SERVER = r"""
import hashlib, socket, ssl, sys, threading
import dns.message, dns.rcode, dns.rdatatype, dns.rrset

address, other, cert, log = sys.argv[1:5]
serve_dns = len(sys.argv) > 5

def answer(conn):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        headers = {}
        for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        auth = headers.get(b"x-api-key")
        digest = hashlib.sha256(auth).hexdigest() if auth is not None else "-"
        body = f"host={headers.get(b'host', b'').decode()} auth={digest}".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
    except (OSError, ssl.SSLError):
        pass
    finally:
        conn.close()

def serve(port, context=None):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        if context is not None:
            try:
                conn.settimeout(5)
                conn = context.wrap_socket(conn, server_side=True)
                conn.settimeout(60)
            except (OSError, ssl.SSLError):
                conn.close()
                continue
        threading.Thread(target=answer, args=(conn,), daemon=True).start()

def dns_server():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, 53))
    with open(log, "a") as asked:
        while True:
            wire, peer = s.recvfrom(4096)
            q = dns.message.from_wire(wire)
            name = q.question[0].name.to_text().lower()
            asked.write(name + "\n")
            asked.flush()
            r = dns.message.make_response(q)
            target = (address if name.endswith(".allowed.test.") else
                      other if name.endswith(".denied.test.") else None)
            rdtype = q.question[0].rdtype
            if target is None:
                r.set_rcode(dns.rcode.NXDOMAIN)
            elif rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(name, 5, "IN", "A", target))
            elif rdtype == dns.rdatatype.TXT:
                r.answer.append(dns.rrset.from_text(name, 5, "IN", "TXT", '"tunnelled"'))
            s.sendto(r.to_wire(), peer)

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert)
threading.Thread(target=serve, args=(80,), daemon=True).start()
threading.Thread(target=serve, args=(443, context), daemon=True).start()
if serve_dns:
    threading.Thread(target=dns_server, daemon=True).start()
print("serving", flush=True)
threading.Event().wait()
"""


@dataclass
class EgressHosts:
    web: str
    other: str
    ca_file: Path  # the test CA's certificate
    dns_log: Path  # every name web's DNS was asked, one a line

    def asked(self) -> list[str]:
        return self.dns_log.read_text().split()


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _test_ca(directory: Path) -> Path:
    """A test CA and a certificate for the test domains, as files in `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = ["*.allowed.test", "*.denied.test"]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "ca.pem"


def _start(ns: str, argv: list[str], address: str, log: Path) -> subprocess.Popen[bytes]:
    """A host server in namespace `ns`, answering HTTP when returned."""
    out = log.open("ab")
    python = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", python, "-u", "-c", HOST_SERVER, *argv],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"http://{address}/", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail(f"test host {address} did not start: {log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def egress_hosts() -> Iterator[EgressHosts]:
    work = Path(tempfile.mkdtemp(prefix="corral-egress-hosts-"))
    servers: list[subprocess.Popen[bytes]] = []
    try:
        ca_file = _test_ca(work)
        dns_log = work / "dns.log"
        dns_log.touch()
        for name, net in NETS.items():
            ns, veth = f"corral-eg-{name}{_TAG}", f"crleg{name[0]}{_TAG}"
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            subprocess.run(["ip", "link", "delete", veth], capture_output=True)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "addr", "add", f"{net}.1/24", "dev", veth)
            _sh("ip", "link", "set", veth, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        web, other = f"{NETS['web']}.2", f"{NETS['other']}.2"
        cert = str(work / "server.pem")
        for name, address, extra in (("web", web, ["dns"]), ("other", other, [])):
            servers.append(
                _start(
                    f"corral-eg-{name}{_TAG}",
                    [address, other, cert, str(dns_log), *extra],
                    address,
                    work / f"{name}.log",
                )
            )
        yield EgressHosts(web=web, other=other, ca_file=ca_file, dns_log=dns_log)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        for name in NETS:
            subprocess.run(
                ["ip", "netns", "delete", f"corral-eg-{name}{_TAG}"], capture_output=True
            )
            subprocess.run(["ip", "link", "delete", f"crleg{name[0]}{_TAG}"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


SECRETS_KEY = "egress-tests-secrets-key"


@pytest.fixture(scope="module")
def egress_server(egress_hosts: EgressHosts) -> Iterator[Server]:
    data_dir = make_data_dir("corral-egress-")
    srv = Server(
        data_dir,
        env={
            "CORRAL_DNS_UPSTREAM": egress_hosts.web,
            "CORRAL_EGRESS_CA_FILE": str(egress_hosts.ca_file),
            "CORRAL_EGRESS_PRIVATE_ANSWERS": "true",
            "CORRAL_SECRETS_KEY": SECRETS_KEY,
        },
    )
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def eapi(egress_server: Server) -> Iterator[httpx.Client]:
    with egress_server.client() as client:
        yield client


def run(api: httpx.Client, sid: str, command: str, **extra: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def curl(api: httpx.Client, sid: str, url: str, *options: str) -> tuple[int, str]:
    """curl's exit code and body (2 s at most)."""
    quoted = " ".join(f"'{o}'" for o in options)
    result = run(api, sid, f"curl -s -m 2 {quoted} '{url}'")
    return result["exit_code"], result["stdout"]


def write_file(api: httpx.Client, sid: str, path: str, data: bytes) -> None:
    resp = api.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=data)
    assert resp.status_code in (200, 201, 204), resp.text
