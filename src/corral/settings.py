"""One settings object for the server, read from `CORRAL_*` environment variables and CLI flags."""

from __future__ import annotations

import ipaddress
import re
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.core.models import NODE_ID_PATTERN
from corral.runtime.netpolicy import parse_open
from corral.runtime.uids import pool_range


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8700
    data_dir: Path = Path("./data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default SQLite (WAL) in the data dir"
    )
    database_connections: int = Field(
        default=20,
        ge=1,
        description="PostgreSQL connections kept per process (as many again in a burst)",
    )
    admin_key: str | None = Field(
        default=None, description="Admin token; generated on first start when unset"
    )
    log_level: str = "info"
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json: one JSON object a line (every request, and every other record); "
        "text: lines for a terminal",
    )
    metrics_token: str | None = Field(
        default=None,
        description="Who may read /metrics: unset, the admin key or a token with the metrics "
        "scope; 'public', anyone; any other value, also a bearer of that value",
    )
    audit_retention_days: float = Field(
        default=90, ge=0, description="Audit entries older than this are pruned; 0 keeps them all"
    )

    runtime: Literal["namespaces", "fake"] = "namespaces"
    nats_url: str | None = Field(
        default=None, description="NATS server of a fleet (nats://host:4222); none: one process"
    )
    # A user and password go in the URL (nats://user:password@host:4222), best through the
    # environment: arguments are visible to other users.
    nats_creds: str | None = Field(default=None, description="NATS credentials file")
    nats_tls_ca: str | None = Field(default=None, description="CA bundle that signed NATS's cert")
    nats_tls_cert: str | None = Field(default=None, description="Client certificate for NATS")
    nats_tls_key: str | None = Field(default=None, description="Its private key")
    local_node: bool = Field(default=True, description="Run the built-in node in this process")
    host_exec_user: str | None = Field(
        default=None, description="Agent: the host user CMDOP host commands run as (off: none)"
    )
    node_id: str = Field(default="local", pattern=NODE_ID_PATTERN)
    node_lost_after_s: float = Field(
        default=15.0,
        gt=0,
        description="A node silent this long is offline: its running commands become lost",
    )
    uid_base: int = Field(
        default=200_000, ge=1, description="First host uid of the per-sandbox pool"
    )
    uid_count: int = Field(
        default=60_000, ge=1, description="Sandbox slots; each has a block of 1024 host uids"
    )
    cgroup_root: str = Field(default="corral", description="cgroup directory name used by the node")
    cgroup_favor_dynmods: bool = Field(
        default=True,
        description="Remount the host's cgroup2 hierarchy with favordynmods (kernel 6.0+) at "
        "start, where it is not already: every command moves processes between cgroups, and "
        "without it the first move after a quiet spell waits for an RCU grace period (15-25 ms "
        "per first exec measured here); the option stays set after the node stops",
    )

    templates_dir: Path | None = Field(
        default=None,
        description="Root file system templates, one directory each holding usr/ (and "
        "optionally etc/); default <data dir>/templates. 'host' (the host's /usr) is built in",
    )

    # Sandbox limits applied when a sandbox's spec leaves them out (0: no limit).
    default_memory_mb: int = Field(default=4096, ge=0)
    default_pids: int = Field(default=4096, ge=0)
    default_cpu: float = Field(default=0.0, ge=0)
    default_disk_mb: int = Field(
        default=10_240, ge=0, description="A sparse file system per sandbox: bounds its writes"
    )

    default_volume_mb: int = Field(
        default=1024, ge=3, description="The size of a volume made without one"
    )

    # Container images (each node keeps its own store under <data dir>/images).
    insecure_registries: str = Field(
        default="",
        description="Registries (comma-separated host:port, as image references name them) "
        "reached over plain HTTP or TLS without verification; every other is HTTPS, verified",
    )
    max_image_bytes: int = Field(
        default=8 * 1024**3,
        ge=1024,
        description="The largest image a node pulls or imports (its compressed layers, or the "
        "archive's bytes)",
    )
    image_store_max_bytes: int = Field(
        default=0,
        ge=0,
        description="What a node's image store may hold (its blobs); 0: bounded by its disk",
    )

    network_open: str = Field(
        default="",
        description="Protected destinations (host addresses, 169.254.0.0/16) that sandboxes may "
        "reach when their own allow list includes them: comma-separated ADDRESS:PORT (TCP and "
        "UDP) or ADDRESS (every port), e.g. 169.254.169.254:80,10.0.0.5:5432",
    )

    dns_upstream: str = Field(
        default="",
        description="The resolver (an IPv4 address) a node's DNS forwarder asks for sandboxes "
        "whose allow-list names hosts; default: the host's first resolv.conf name server",
    )
    egress_ca_file: str = Field(
        default="",
        description="CA certificates (PEM) the egress proxy verifies the servers of intercepted "
        "HTTPS against (requests with injected headers); default: the host's trust store",
    )
    egress_private_answers: bool = Field(
        default=False,
        description="Let allowed host names resolve to private addresses (RFC 1918, "
        "100.64.0.0/10): off, an answer naming one is not made reachable (DNS rebinding)",
    )
    secrets_key: str = Field(
        default="",
        description="A key that encrypts stored secrets at rest (any text; a Fernet key is "
        "derived from it); without it secrets are stored in the clear in the 0600 database",
    )

    warm_pool: int = Field(
        default=2,
        ge=0,
        le=256,
        description="Sandboxes kept started with the default spec (template, limits, no "
        "network), so that such a create answers at once; 0 turns the pool off",
    )

    # Defaults and bounds for commands.
    default_timeout_ms: int = Field(default=300_000, ge=1)
    max_timeout_ms: int = Field(default=24 * 3600 * 1000, ge=1)
    default_max_output_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    max_output_bytes_limit: int = Field(default=256 * 1024 * 1024, ge=0)
    kill_grace_ms: int = Field(
        default=2_000, ge=0, description="SIGTERM to SIGKILL grace on cancel"
    )

    # Admission control.
    max_request_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_sandboxes: int = Field(default=2_000, ge=1)
    max_running_commands_per_sandbox: int = Field(default=64, ge=1)
    rate_limit_per_second: float = Field(
        default=0.0, ge=0, description="Requests per second per token; 0 disables"
    )
    rate_limit_burst: int = Field(default=200, ge=1)
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Open HTTP and WebSocket connections; past it new ones get 503 (an eighth "
        "more are read to answer so). Default: the bound and its eighth take half the "
        "descriptor limit; the other half is kept for sandboxes, logs and the store",
    )
    request_head_timeout_seconds: float = Field(
        default=5.0, gt=0, description="A request head must be complete this soon after it began"
    )
    keep_alive_seconds: float = Field(
        default=5.0, gt=0, description="An idle connection between requests is closed after this"
    )

    # Streams and files.
    heartbeat_seconds: float = Field(default=15.0, gt=0, description="Idle stream keep-alive")
    ws_start_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="WebSocket: time from the upgrade to the first frame",
    )
    ws_max_frame_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="WebSocket: largest client frame (else 1009)"
    )
    max_upload_bytes: int = Field(default=4 * 1024**3, ge=1, description="Compressed upload")
    max_upload_expanded_bytes: int = Field(default=8 * 1024**3, ge=1, description="Unpacked")
    max_upload_entries: int = Field(default=1_000_000, ge=1)
    tools_dir: Path | None = Field(
        default=None,
        description="Host directory shown read-only in every sandbox at /opt/corral "
        "(default: <data dir>/tools, filled at start-up with deno)",
    )

    # Faces.
    ssh_port: int | None = Field(
        default=None, description="SSH front (cmd.io face); off when unset"
    )
    ssh_host_key: Path | None = Field(default=None, description="Default: <data dir>/ssh_host_key")
    admin_email: str | None = Field(default=None, description="run-dat-sheesh admin login")
    admin_password: str | None = Field(default=None, description="run-dat-sheesh admin login")

    # Sandbox ports served at a URL (api/ports).
    public_domain: str | None = Field(
        default=None,
        description="Serve port P of sandbox S at Host <P>-<S>.<this> (a wildcard DNS name; "
        "optionally with :port)",
    )
    public_scheme: Literal["http", "https"] = Field(
        default="https", description="The scheme of the host-form URLs the API hands out"
    )
    tls_cert: Path | None = Field(
        default=None,
        description="Serve HTTPS with this certificate chain (PEM; e.g. for the domain and "
        "*.<CORRAL_PUBLIC_DOMAIN>)",
    )
    tls_key: Path | None = Field(default=None, description="The certificate's private key (PEM)")
    max_port_connections: int = Field(
        default=256, ge=1, description="Open connections to one sandbox's ports at once"
    )

    # Webhooks (core/webhooks.py).
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhooks reach loopback, private and link-local addresses (off: SSRF)",
    )
    webhook_retry_base_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="First retry delay of a failed delivery"
    )
    webhook_retry_for_seconds: float = Field(
        default=86_400.0, gt=0, le=7 * 86_400, description="How long an event is retried"
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Time a receiver has to answer one delivery"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CORRAL_TLS_CERT and CORRAL_TLS_KEY go together")
        return self

    @field_validator("public_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower().strip(".")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?", value):
            raise ValueError("CORRAL_PUBLIC_DOMAIN must be a DNS name, optionally with :port")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _uids_fit(self) -> Settings:
        last = pool_range(self.uid_base, self.uid_count).stop - 1
        if last >= 2**32 - 1:
            raise ValueError(
                f"CORRAL_UID_BASE + 1024 x (CORRAL_UID_COUNT + 1) passes the last host uid "
                f"({last}): lower one of them"
            )
        return self

    @field_validator("dns_upstream")
    @classmethod
    def _dns_upstream(cls, value: str) -> str:
        if value:
            ipaddress.IPv4Address(value.strip())
        return value.strip()

    @field_validator("network_open")
    @classmethod
    def _open_destinations(cls, value: str) -> str:
        return ",".join(str(entry) for entry in parse_open(value))

    @property
    def effective_templates_dir(self) -> Path:
        return self.templates_dir or self.data_dir / "templates"

    @field_validator("insecure_registries")
    @classmethod
    def _registries(cls, value: str) -> str:
        entries = [r.strip() for r in value.split(",") if r.strip()]
        for entry in entries:
            if not re.fullmatch(
                r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?", entry
            ):
                raise ValueError(f"{entry!r} is not a registry's host[:port] (no scheme, no path)")
        return ",".join(entries)

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def insecure_registry_list(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.insecure_registries.split(",") if r.strip())

    @property
    def effective_tools_dir(self) -> Path:
        return self.tools_dir or self.data_dir / "tools"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'corral.db'}"

    def resolve_admin_key(self) -> tuple[str, bool]:
        """The admin key and whether it was generated just now (to print it once)."""
        if self.admin_key:
            return self.admin_key, False
        path = self.data_dir / "admin.key"
        if path.exists():
            return path.read_text().strip(), False
        key = "crl_admin_" + secrets.token_urlsafe(32)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = path.open("x", encoding="ascii")
        path.chmod(0o600)
        with fd:
            fd.write(key + "\n")
        return key, True
