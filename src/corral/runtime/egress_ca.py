"""A certificate authority per sandbox, for the egress proxy's interception of HTTPS to hosts
with an injection rule. The sandbox trusts the CA's certificate (installed in its trust store);
the key never leaves the node's memory. Leaf certificates are made per host on first use and
kept for the sandbox's life."""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LEAF_DAYS = 30
CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


class SandboxCA:
    def __init__(self, label: str, scratch: Path) -> None:
        self.scratch = scratch  # a directory only root reads, for loading leaf keys into ssl
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(f"Corral egress CA ({label})")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())  # one for all its leaves
        self._contexts: dict[str, ssl.SSLContext] = {}

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def bundle(self) -> bytes:
        """The host's trusted roots and this CA: the sandbox's trust store."""
        try:
            host = HOST_BUNDLE.read_bytes()
        except OSError:
            host = b""
        if host and not host.endswith(b"\n"):
            host += b"\n"
        return host + self.cert_pem()

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for `host` signed by this CA."""
        found = self._contexts.get(host)
        if found is not None:
            return found
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.name)
            .public_key(self.leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM) + self.leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the proxy rewrites HTTP/1.1 requests only
        # ssl loads keys only from files: one that lives for the call, in a root-only directory.
        fd, path = tempfile.mkstemp(dir=self.scratch, suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        self._contexts[host] = context
        return context
