"""The NATS server's configuration for a Corral fleet: one user per node, limited to its subjects.

    python -m corral.deploy.nats_config --node b --node c --replica-user api \\
        --tls-cert /etc/corral/tls/nats.pem --tls-key /etc/corral/tls/nats-key.pem \\
        --secrets /etc/corral/nats-users --url tls://host-a.internal:4222 -o /etc/corral/nats.conf

Each node `<id>` gets the user `node-<id>` with `corral.node.bus.node_permissions(<id>)`: it may
publish only on `corral.node.<id>.out.>`, subscribe only on `corral.node.<id>.in.>` and its own
inbox prefix, and answer the requests it receives. A replica user may use all of `corral.>` and
`_INBOX.>` (replicas also notify each other on `corral.command.*`), and answer requests too (a
node's events are acknowledged on the node's own inbox). Nobody else gets in: the server has no
anonymous user.

Passwords are random (URL-safe, so that they fit in `CORRAL_NATS_URL`) and stored in the
configuration as bcrypt hashes (`$2b$...`, which nats-server checks at each connect), so that the
file gives away no credential; `--plain-passwords` stores them as they are. The passwords
themselves go to the `--secrets` file (mode 0600), or to standard error without one. Given an
existing secrets file, users already in it keep their passwords: add a node by running the same
command with one more `--node` and reloading the server (`systemctl reload corral-nats`).

The output is JSON, which nats-server reads as its own configuration syntax.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral.core.models import NODE_ID_PATTERN
from corral.node.bus import PREFIX, check_token, node_permissions

__all__ = [
    "REPLICA_PERMISSIONS",
    "ConfigError",
    "Tls",
    "build_config",
    "main",
    "node_user",
    "read_secrets",
    "write_config",
    "write_secrets",
]

_ROOT = PREFIX.split(".", 1)[0]  # "corral"
REPLICA_PERMISSIONS: dict[str, Any] = {
    "publish": {"allow": [f"{_ROOT}.>", "_INBOX.>"]},
    "subscribe": {"allow": [f"{_ROOT}.>", "_INBOX.>"]},
    "allow_responses": True,
}
DEFAULT_LISTEN = "0.0.0.0:4222"
DEFAULT_BCRYPT_COST = 11  # nats-server's own `nats server passwd` default
PASSWORD_BYTES = 24
# Well above the node protocol's 256 KiB chunks and what the test fleet runs with; a message
# larger than this is refused by the server.
MAX_PAYLOAD = 8 * 1024 * 1024
# The server drops a client it has not heard from in ping_interval * ping_max (a host that
# vanished without closing its connection), as the clients do with the server.
PING_INTERVAL = "5s"
PING_MAX = 3
# A client that cannot take what is written to it for this long is cut as a slow consumer.
WRITE_DEADLINE = "10s"


class ConfigError(ValueError):
    """The configuration asked for cannot be written (a bad node id, user or option)."""


@dataclass(frozen=True)
class Tls:
    """TLS for client connections: every client must then use it (plain ones are refused).

    `verify` also requires a client certificate signed by `ca_file`."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    verify: bool = False

    def __post_init__(self) -> None:
        if self.verify and self.ca_file is None:
            raise ConfigError("verifying client certificates needs the CA file that signs them")

    def as_config(self) -> dict[str, Any]:
        block: dict[str, Any] = {
            "cert_file": str(Path(self.cert_file).absolute()),
            "key_file": str(Path(self.key_file).absolute()),
        }
        if self.ca_file is not None:
            block["ca_file"] = str(Path(self.ca_file).absolute())
        if self.verify:
            block["verify"] = True
        return block


def node_user(node_id: str) -> str:
    """The NATS user of node `node_id`."""
    _check_node_id(node_id)
    return f"node-{node_id}"


def _check_node_id(node_id: str) -> None:
    if not re.fullmatch(NODE_ID_PATTERN, node_id):
        raise ConfigError(
            f"node id {node_id!r}: 1 to 64 letters, digits, '-' or '_' (one NATS subject token)"
        )
    check_token(node_id)


def _check_user(user: str) -> None:
    if not user or not all(c.isalnum() or c in "-_." for c in user):
        raise ConfigError(f"user name {user!r}: letters, digits, '-', '_' or '.'")


def _users(node_ids: Iterable[str], replica_users: Iterable[str]) -> dict[str, Any]:
    """Every user name, replicas' first, mapped to its permissions."""
    nodes = list(node_ids)
    replicas = list(replica_users)
    if not replicas:
        raise ConfigError("at least one replica user is needed: the replicas could not connect")
    users: dict[str, Any] = {}
    for user in replicas:
        _check_user(user)
        if user in users:
            raise ConfigError(f"replica user {user!r} given twice")
        users[user] = REPLICA_PERMISSIONS
    for node_id in nodes:
        user = node_user(node_id)
        if user in users:
            raise ConfigError(f"{user!r} is given twice (node {node_id!r}, or a replica user)")
        users[user] = node_permissions(node_id)
    return users


def hash_password(password: str, cost: int = DEFAULT_BCRYPT_COST) -> str:
    try:
        import bcrypt
    except ImportError as exc:
        raise ConfigError(
            "hashing passwords needs the bcrypt package (pip install 'corral[nats]'), "
            "or pass --plain-passwords"
        ) from exc
    if not 4 <= cost <= 31:
        raise ConfigError(f"bcrypt cost {cost}: from 4 to 31")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def build_config(
    node_ids: Iterable[str],
    replica_users: Iterable[str],
    passwords: Mapping[str, str],
    *,
    listen: str = DEFAULT_LISTEN,
    tls: Tls | None = None,
    plain_passwords: bool = False,
    bcrypt_cost: int = DEFAULT_BCRYPT_COST,
    monitor: str | None = None,
    server_name: str | None = None,
) -> dict[str, Any]:
    """The configuration (a dict to dump as JSON); `passwords` maps every user to its password."""
    entries: list[dict[str, Any]] = []
    for user, permissions in _users(node_ids, replica_users).items():
        password = passwords.get(user)
        if not password:
            raise ConfigError(f"no password for user {user!r}")
        stored = password if plain_passwords else hash_password(password, bcrypt_cost)
        entries.append({"user": user, "password": stored, "permissions": permissions})
    config: dict[str, Any] = {
        "listen": listen,
        "authorization": {"users": entries},
        "max_payload": MAX_PAYLOAD,
        "ping_interval": PING_INTERVAL,
        "ping_max": PING_MAX,
        "write_deadline": WRITE_DEADLINE,
    }
    if server_name:
        config["server_name"] = server_name
    if tls is not None:
        config["tls"] = tls.as_config()
    if monitor:
        # Monitoring (/healthz, /varz, /connz) answers without authentication: keep it local.
        config["http"] = monitor
    return config


def write_config(
    out: IO[str],
    node_ids: Iterable[str],
    replica_users: Iterable[str],
    *,
    passwords: Mapping[str, str] | None = None,
    **options: Any,
) -> dict[str, str]:
    """Write the configuration to `out`; returns every user's password (those in `passwords`
    kept, the others made up). `options` are build_config's."""
    node_ids, replica_users = list(node_ids), list(replica_users)
    wanted = _users(node_ids, replica_users)
    known = dict(passwords or {})
    complete = {user: known.get(user) or new_password() for user in wanted}
    config = build_config(node_ids, replica_users, complete, **options)
    out.write(json.dumps(config, indent=2) + "\n")
    return complete


def read_secrets(path: Path) -> dict[str, str]:
    """`USER PASSWORD` lines (comments with #), as write_secrets writes them."""
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: expected 'USER PASSWORD'")
        found[parts[0]] = parts[1]
    return found


def write_secrets(
    path: Path,
    passwords: Mapping[str, str],
    node_ids: Iterable[str],
    url: str | None = None,
) -> None:
    """The passwords, readable by root alone, with each party's CORRAL_NATS_URL when the
    server's `url` is known."""
    nodes = {node_user(n): n for n in node_ids}
    lines = ["# NATS users of the Corral fleet: USER PASSWORD. Keep this file secret."]
    lines += [f"{user} {password}" for user, password in passwords.items()]
    if url:
        lines.append("#")
        lines += [f"# {line}" for line in connection_lines(passwords, nodes, url)]
    with _replacing(path, 0o600) as file:
        file.write("\n".join(lines) + "\n")


@contextlib.contextmanager
def _replacing(path: Path, mode: int) -> Iterator[IO[str]]:
    """Write `path` whole or not at all; a file already there keeps its owner, group and mode
    (the NATS server's group may have been given read access)."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            try:
                before = path.stat()
            except FileNotFoundError:
                os.fchmod(file.fileno(), mode)
            else:
                os.fchown(file.fileno(), before.st_uid, before.st_gid)
                os.fchmod(file.fileno(), before.st_mode & 0o7777)
            yield file
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def connection_lines(passwords: Mapping[str, str], nodes: Mapping[str, str], url: str) -> list[str]:
    """What each party puts in its env file to connect as its own user."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("nats", "tls") or not sep or not rest or "@" in rest or "/" in rest:
        raise ConfigError(f"--url {url!r}: expected nats://HOST:PORT or tls://HOST:PORT")
    lines = []
    for user, password in passwords.items():
        where = f"node {nodes[user]} (agent.env)" if user in nodes else "replicas (server.env)"
        lines.append(f"{where}: CORRAL_NATS_URL={scheme}://{user}:{password}@{rest}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corral.deploy.nats_config",
        description="Write a nats-server configuration for a Corral fleet: one user per node, "
        "allowed only that node's subjects, and the replicas' users.",
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="ID",
        help="a node id (repeat for each node); its user is node-ID",
    )
    parser.add_argument(
        "--replica-user",
        action="append",
        default=[],
        metavar="USER",
        help="a user for API replicas (repeat for more) [default: api]",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"client address [default: {DEFAULT_LISTEN}]",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="CA of client certificates (with --tls-verify)"
    )
    parser.add_argument(
        "--tls-verify", action="store_true", help="require a client certificate signed by --tls-ca"
    )
    parser.add_argument(
        "--plain-passwords",
        action="store_true",
        help="store passwords as they are instead of bcrypt hashes",
    )
    parser.add_argument(
        "--bcrypt-cost",
        type=int,
        default=DEFAULT_BCRYPT_COST,
        metavar="N",
        help=f"bcrypt work factor [default: {DEFAULT_BCRYPT_COST}]",
    )
    parser.add_argument(
        "--monitor",
        metavar="HOST:PORT",
        help="serve NATS monitoring there (unauthenticated: keep it local)",
    )
    parser.add_argument("--server-name", metavar="NAME", help="the server's name in its logs")
    parser.add_argument(
        "--secrets",
        type=Path,
        metavar="FILE",
        help="read and write the passwords here (mode 0600) instead of "
        "printing them; users already in it keep theirs",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help="the server as clients reach it (tls://host:4222), to print each "
        "party's CORRAL_NATS_URL",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="write the configuration there [default: standard output]",
    )
    args = parser.parse_args(argv)

    try:
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise ConfigError("TLS needs both --tls-cert and --tls-key")
            tls = Tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_verify)
        elif args.tls_ca or args.tls_verify:
            raise ConfigError("--tls-ca and --tls-verify need --tls-cert and --tls-key")
        known = read_secrets(args.secrets) if args.secrets and args.secrets.exists() else {}
        options = {
            "listen": args.listen,
            "tls": tls,
            "plain_passwords": args.plain_passwords,
            "bcrypt_cost": args.bcrypt_cost,
            "monitor": args.monitor,
            "server_name": args.server_name,
        }
        replicas = args.replica_user or ["api"]
        nodes = {node_user(n): n for n in args.node}
        if args.url:
            connection_lines({}, {}, args.url)  # checked before anything is written
        if args.output:
            with _replacing(args.output, 0o640) as out:
                passwords = write_config(out, args.node, replicas, passwords=known, **options)
        else:
            passwords = write_config(sys.stdout, args.node, replicas, passwords=known, **options)
        if args.secrets:
            write_secrets(args.secrets, passwords, args.node, args.url)
            print(f"nats_config: passwords in {args.secrets}", file=sys.stderr)
        else:
            print("# NATS users: USER PASSWORD", file=sys.stderr)
            for user, password in passwords.items():
                print(f"{user} {password}", file=sys.stderr)
            if args.url:
                for line in connection_lines(passwords, nodes, args.url):
                    print(f"# {line}", file=sys.stderr)
    except (ConfigError, OSError) as exc:
        print(f"nats_config: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
