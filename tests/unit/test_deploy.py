"""The deployment files shipped with the package: the systemd units, and the NATS configuration
writer against a real nats-server (accepted, permissions enforced, TLS required)."""

from __future__ import annotations

import asyncio
import configparser
import datetime
import io
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

import corral.deploy
from corral.deploy import ENV_EXAMPLES, UNITS, install, read
from corral.deploy.nats_config import ConfigError, Tls, main, node_user, write_config
from corral.node.bus import Bus, node_inbox_prefix, node_subject, tls_context
from tests.engines import NatsServer, nats_server_bin

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
FAST_BCRYPT = 4  # the lowest cost: the tests connect often, production keeps the default


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- the systemd units -------------------------------------------------------------------------


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, Path]:
    written = install(
        list(UNITS),
        unit_dir=tmp_path / "units",
        etc_dir=tmp_path / "etc",
        bin_dir=BIN_DIR,
        create_user=False,
    )
    return {path.name: path for path in written}


def test_installed_units_pass_systemd_verification(installed: dict[str, Path]) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the key checks below still run)")
    units = [str(installed[name]) for name in UNITS.values()]
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    # Any warning (an unknown key, a missing program) fails: verify exits 0 on most of them.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_shipped_units_fail_verification_until_installed() -> None:
    # The check above is meaningful: a unit naming a program that is not there is refused.
    analyze = shutil.which("systemd-analyze")
    if analyze is None or Path("/opt/corral/bin/corral").exists():
        pytest.skip("needs systemd-analyze and no /opt/corral")
    shipped = Path(corral.deploy.__file__).with_name("corral-agent.service")
    result = subprocess.run([analyze, "verify", str(shipped)], capture_output=True, text=True)
    assert "/opt/corral/bin/corral" in result.stderr


def test_units_have_what_a_fleet_needs(installed: dict[str, Path]) -> None:
    agent = _unit(installed["corral-agent.service"])["Service"]
    assert agent["EnvironmentFile"] == "/etc/corral/agent.env"
    assert agent["ExecStart"] == f"{BIN_DIR}/corral agent $CORRAL_AGENT_ARGS"
    assert agent["Delegate"] == "yes"
    assert agent["KillMode"] == "mixed"  # SIGTERM to the agent alone: it stops its sandboxes
    assert agent["Restart"] == "always"
    assert int(agent["LimitNOFILE"]) >= 65536
    assert "User" not in agent and "DynamicUser" not in agent  # sandboxes need root

    server = _unit(installed["corral-server.service"])["Service"]
    assert server["EnvironmentFile"] == "/etc/corral/server.env"
    assert server["ExecStart"] == f"{BIN_DIR}/corral serve $CORRAL_SERVE_ARGS"
    assert server["Restart"] == "always"
    assert server["DynamicUser"] == "yes"
    assert int(server["LimitNOFILE"]) >= 65536

    nats_unit = _unit(installed["corral-nats.service"])["Service"]
    assert nats_unit["ExecStart"] == f"{BIN_DIR}/nats-server -c /etc/corral/nats.conf"
    assert nats_unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for parsed in (agent, server, nats_unit):
        assert parsed["Type"] == "exec"
    for name in UNITS.values():
        assert _unit(installed[name])["Install"]["WantedBy"] == "multi-user.target"


def test_install_keeps_the_operators_settings(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "server.env").write_text("CORRAL_ADMIN_KEY=mine\n")
    install(["server"], unit_dir=tmp_path / "u", etc_dir=etc, bin_dir=BIN_DIR)
    assert (etc / "server.env").read_text() == "CORRAL_ADMIN_KEY=mine\n"
    assert (etc / "server.env.example").read_text() == read("server.env.example")
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["corral-server.service"]
    with pytest.raises(corral.deploy.InstallError, match="not an executable program"):
        install(["agent"], unit_dir=tmp_path / "u", etc_dir=etc, bin_dir=tmp_path)


def test_env_examples_name_the_contract_variables() -> None:
    server = read("server.env.example")
    agent = read("agent.env.example")
    for name in (
        "CORRAL_DATABASE_URL=postgresql+asyncpg://",
        "CORRAL_NATS_URL=",
        "CORRAL_ADMIN_KEY=",
    ):
        assert name in server
    assert "CORRAL_SERVE_ARGS=--no-local-node" in server
    for name in ("CORRAL_NODE_ID=", "CORRAL_NATS_URL=", "CORRAL_DATA_DIR="):
        assert name in agent


def test_every_shipped_file_is_package_data() -> None:
    # The wheel carries only the data files pyproject.toml names.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["corral"]
    package = Path(corral.deploy.__file__).parent
    shipped = [p for p in package.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert {p.name for p in shipped} == {*UNITS.values(), *ENV_EXAMPLES}
    for path in shipped:
        relative = path.relative_to(package.parent).as_posix()
        assert any(Path(relative).match(g) for g in globs), relative


# --- the NATS configuration --------------------------------------------------------------------


class ConfiguredNats(NatsServer):
    """nats-server started on a configuration file given to it (the engines' own port)."""

    config_path: Path

    def _write_config(self) -> Path:
        return self.config_path


class GeneratedNats(ConfiguredNats):
    """nats-server started with a configuration from corral.deploy.nats_config."""

    def __init__(self, node_ids: list[str], replicas: list[str], **options: Any) -> None:
        super().__init__()
        out = io.StringIO()
        self.passwords = write_config(
            out, node_ids, replicas, listen=f"127.0.0.1:{self.port}",
            bcrypt_cost=FAST_BCRYPT, **options,
        )  # fmt: skip
        self.config_path = self.root / "nats.conf"
        self.config_path.write_text(out.getvalue())

    def creds(self, user: str) -> str:
        return f"{user}:{self.passwords[user]}@127.0.0.1:{self.port}"


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    binary = nats_server_bin()
    assert binary is not None, "nats-server is installed with the test extra"
    return subprocess.run(
        [str(binary), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
    )


def test_config_is_accepted_by_nats_server(tmp_path: Path, pki: dict[str, Path]) -> None:
    out = tmp_path / "nats.conf"
    code = main(
        ["--node", "b", "--node", "c", "--replica-user", "api", "--replica-user", "api2",
         "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
         "--tls-ca", str(pki["ca"]), "--tls-verify", "--monitor", "127.0.0.1:8222",
         "--bcrypt-cost", str(FAST_BCRYPT), "--secrets", str(tmp_path / "users"),
         "--url", "tls://nats.example:4222", "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    checked = _check_config(out)
    assert checked.returncode == 0, checked.stderr
    assert "is valid" in checked.stderr + checked.stdout
    config = json.loads(out.read_text())
    users = {u["user"]: u for u in config["authorization"]["users"]}
    assert sorted(users) == ["api", "api2", "node-b", "node-c"]
    secrets = (tmp_path / "users").read_text()
    assert (tmp_path / "users").stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o077 == 0o040  # the NATS server's group may read it
    for user, entry in users.items():
        assert entry["password"].startswith("$2b$")  # bcrypt: the file gives nothing away
        assert entry["password"] not in secrets
        assert f"\n{user} " in secrets
    assert "CORRAL_NATS_URL=tls://node-b:" in secrets
    assert config["tls"]["verify"] is True

    # Plain passwords are a valid configuration too.
    plain = tmp_path / "plain.conf"
    assert main(["--node", "b", "--plain-passwords", "-o", str(plain)]) == 0
    assert _check_config(plain).returncode == 0
    assert not json.loads(plain.read_text())["authorization"]["users"][0]["password"].startswith(
        "$"
    )


def test_module_entry_point_prints_config_and_passwords(tmp_path: Path) -> None:
    # As an operator runs it: the configuration on stdout, the passwords on stderr.
    server = ConfiguredNats()
    try:
        _entry_point_against(server, tmp_path)
    finally:
        server.remove()


def _entry_point_against(server: ConfiguredNats, tmp_path: Path) -> None:
    here = f"127.0.0.1:{server.port}"
    result = subprocess.run(
        [sys.executable, "-m", "corral.deploy.nats_config", "--node", "n1", "--node", "n2",
         "--replica-user", "api", "--listen", here, "--bcrypt-cost", str(FAST_BCRYPT),
         "--url", f"nats://{here}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    server.config_path = tmp_path / "nats.conf"
    server.config_path.write_text(result.stdout)
    assert _check_config(server.config_path).returncode == 0
    lines = result.stderr.splitlines()
    passwords = dict(line.split(" ", 1) for line in lines if not line.startswith("#"))
    assert sorted(passwords) == ["api", "node-n1", "node-n2"]
    for password in passwords.values():
        assert password not in result.stdout
    url = f"nats://node-n1:{passwords['node-n1']}@{here}"
    assert f"# node n1 (agent.env): CORRAL_NATS_URL={url}" in lines

    async def connect() -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        assert nc.is_connected
        await nc.close()

    server.start()
    run(connect())


def test_a_second_run_keeps_known_passwords(tmp_path: Path) -> None:
    secrets = tmp_path / "users"
    conf = tmp_path / "nats.conf"
    assert main(["--node", "b", "--secrets", str(secrets), "-o", str(conf),
                 "--bcrypt-cost", str(FAST_BCRYPT)]) == 0  # fmt: skip
    first = secrets.read_text().splitlines()
    assert main(["--node", "b", "--node", "c", "--secrets", str(secrets), "-o", str(conf),
                 "--bcrypt-cost", str(FAST_BCRYPT)]) == 0  # fmt: skip
    second = secrets.read_text().splitlines()
    assert [line for line in first if line.startswith(("api ", "node-b "))] == [
        line for line in second if line.startswith(("api ", "node-b "))
    ]
    assert any(line.startswith("node-c ") for line in second)


def test_bad_input_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--node", "a.b"]) == 2
    assert "one NATS subject token" in capsys.readouterr().err
    assert main(["--node", "b", "--node", "b"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["--node", "b", "--replica-user", "node-b"]) == 2
    assert main(["--tls-cert", "/x.pem"]) == 2
    assert "--tls-key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="CA file"):
        Tls(Path("c"), Path("k"), verify=True)
    with pytest.raises(ConfigError):
        node_user("")


async def _request_once_served(nc: Any, subject: str, data: bytes) -> Any:
    """A request that waits for a subscription just made elsewhere: the server may answer "no
    responders" for a moment after the subscriber's flush, as the bus itself allows for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        try:
            return await nc.request(subject, data, timeout=5)
        except NoRespondersError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_node_users_are_confined_to_their_own_subjects() -> None:
    server = GeneratedNats(["b", "c"], ["api"]).start()

    async def main_() -> None:
        errors: list[str] = []

        async def collect(exc: Exception) -> None:
            errors.append(str(exc))

        node_b = await nats.connect(
            f"nats://{server.creds('node-b')}", error_cb=collect,
            inbox_prefix=node_inbox_prefix("b").encode(), allow_reconnect=False,
        )  # fmt: skip
        node_c = await nats.connect(
            f"nats://{server.creds('node-c')}",
            inbox_prefix=node_inbox_prefix("c").encode(), allow_reconnect=False,
        )  # fmt: skip
        api = await Bus.connect(f"nats://{server.creds('api')}", name="api")
        api2 = await Bus.connect(f"nats://{server.creds('api')}", name="api2")

        # b serves its own requests; the replica's request reaches it and b's answer comes back.
        async def answer(msg: Any) -> None:
            await msg.respond(b'{"v":1,"result":"b"}')

        await node_b.subscribe(node_subject("b", "in", "rpc"), cb=answer)
        await node_b.flush()
        assert await api.request(node_subject("b", "in", "rpc"), "ping") == "b"

        # b's events are acknowledged by a replica on b's own inbox.
        async def ack(msg: Any) -> None:
            await msg.respond(b"ack")

        await api.nc.subscribe(node_subject("b", "out", "event"), queue="replicas", cb=ack)
        await api.nc.flush()
        reply = await _request_once_served(node_b, node_subject("b", "out", "event"), b"result")
        assert reply.data == b"ack"

        # b cannot listen to c's requests, events or inbox...
        spied: list[bytes] = []

        async def spy(msg: Any) -> None:
            spied.append(msg.data)

        for subject in (node_subject("c", "in", "rpc"), node_subject("c", "out", "event"),
                        "_INBOX_c.>", "corral.command.x", "_INBOX.>", ">"):  # fmt: skip
            await node_b.subscribe(subject, cb=spy)
        await node_b.flush()

        # ... nor speak as c.
        heard: list[bytes] = []

        async def listen(msg: Any) -> None:
            heard.append(msg.data)

        await api.nc.subscribe(node_subject("c", "out", "event"), cb=listen)
        await api.nc.subscribe(node_subject("c", "in", "rpc"), cb=listen)
        await api.nc.subscribe("corral.command.>", cb=listen)
        await api.nc.flush()
        await node_b.publish(node_subject("c", "out", "event"), b"forged")
        await node_b.publish(node_subject("c", "in", "rpc"), b"forged")
        await node_b.publish("corral.command.x", b"forged")
        await node_b.flush()

        # Meanwhile c and the replicas work: c's event reaches the replica, replicas notify
        # each other on corral.command.*.
        await node_c.publish(node_subject("c", "out", "event"), b"genuine")
        await node_c.flush()
        await api2.nc.publish("corral.command.x", b"notice")
        await api2.nc.publish(node_subject("c", "in", "rpc"), b"request")
        await api2.nc.flush()
        await asyncio.sleep(0.5)
        assert spied == []
        assert sorted(heard) == [b"genuine", b"notice", b"request"]
        violations = [e for e in errors if "permissions violation" in e.lower()]
        assert len(violations) >= 9, errors
        for nc in (node_b, node_c):
            await nc.close()
        for bus in (api, api2):
            await bus.close()

        # Nobody gets in without a password, nor with another user's.
        anonymous = f"nats://127.0.0.1:{server.port}"
        wrong = f"nats://node-b:{server.passwords['node-c']}@127.0.0.1:{server.port}"
        for url in (anonymous, wrong):
            with pytest.raises(NatsError, match=r"(?i)authorization"):
                await nats.connect(url, allow_reconnect=False, connect_timeout=5)

    try:
        run(main_())
    finally:
        server.remove()


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def save(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, stem: str) -> None:
        (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / f"{stem}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True,
        content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("corral test CA"))
        .issuer_name(name("corral test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    save(ca_key, ca, "ca")

    def leaf(stem: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        save(key, builder.sign(ca_key, hashes.SHA256()), stem)

    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, loopback)
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return {
        "ca": root / "ca.pem",
        "server_cert": root / "server.pem",
        "server_key": root / "server-key.pem",
        "client_cert": root / "client.pem",
        "client_key": root / "client-key.pem",
    }


def _plain_client_is_served(port: int, user: str, password: str) -> bool:
    """Speak the NATS protocol without TLS: does the server answer PING with PONG?"""
    connect = {"verbose": False, "pedantic": False, "user": user, "pass": password}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        got = b""
        try:
            while b"PONG" not in got and b"-ERR" not in got:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return b"PONG" in got


def test_plain_client_is_served_without_tls() -> None:
    # The probe itself: a server without TLS answers a plain client (and the next test's
    # refusal is TLS's doing).
    server = NatsServer().start()
    try:
        user = server.users[0]
        assert _plain_client_is_served(server.port, user.user, user.password)
    finally:
        server.remove()


def test_tls_is_required_and_corral_connects_with_the_ca(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = GeneratedNats(["b"], ["api"], tls=Tls(pki["server_cert"], pki["server_key"])).start()

    async def main_() -> None:
        url = f"tls://{server.creds('node-b')}"
        # Not trusting the CA: refused, never connected in the clear.
        with pytest.raises((ssl.SSLError, NatsError, OSError)):
            await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        # Corral's own client, trusting the CA as docs/fleet.md says (CORRAL_NATS_TLS_CA).
        ca = tls_context(str(pki["ca"]))
        node = await Bus.connect(url, name="node-b", inbox_prefix=node_inbox_prefix("b"), tls=ca)
        api = await Bus.connect(f"tls://{server.creds('api')}", name="api", tls=ca)
        assert node.connected and api.connected

        async def echo(op: str, args: dict[str, Any], data: bytes) -> Any:
            return op

        await node.serve(node_subject("b", "in", "rpc"), echo)
        await node.nc.flush()
        assert await api.request(node_subject("b", "in", "rpc"), "over-tls") == "over-tls"
        await node.close()
        await api.close()

    try:
        assert not _plain_client_is_served(server.port, "api", server.passwords["api"])
        run(main_())
    finally:
        server.remove()


def test_tls_verify_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    tls = Tls(pki["server_cert"], pki["server_key"], pki["ca"], verify=True)
    server = GeneratedNats(["b"], ["api"], tls=tls).start()

    def context(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        if with_cert:
            ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        return ctx

    async def main_() -> None:
        url = f"tls://{server.creds('api')}"
        with pytest.raises((ssl.SSLError, NatsError, OSError)):
            await nats.connect(url, tls=context(False), allow_reconnect=False, connect_timeout=5)
        nc = await nats.connect(url, tls=context(True), allow_reconnect=False, connect_timeout=5)
        assert nc.is_connected
        await nc.close()
        # Corral's own client with its certificate (CORRAL_NATS_TLS_CERT, _KEY).
        bus = await Bus.connect(
            url,
            name="api",
            tls=tls_context(str(pki["ca"]), str(pki["client_cert"]), str(pki["client_key"])),
        )
        assert bus.connected
        await bus.close()

    try:
        assert not _plain_client_is_served(server.port, "api", server.passwords["api"])
        run(main_())
    finally:
        server.remove()
