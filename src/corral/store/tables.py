"""SQLAlchemy models. Schema changes go through Alembic migrations (store/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always returned as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(String(64))
    slot: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    template: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(
            "uq_sandboxes_live_name",
            "name",
            unique=True,
            sqlite_where=text("state != 'deleted' AND name IS NOT NULL"),
            postgresql_where=text("state != 'deleted' AND name IS NOT NULL"),
        ),
        Index(
            "uq_sandboxes_live_slot",
            "node_id",
            "slot",
            unique=True,
            sqlite_where=text("state != 'deleted'"),
            postgresql_where=text("state != 'deleted'"),
        ),
        Index("ix_sandboxes_state", "state"),
    )


class CommandRow(Base):
    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    sandbox_id: Mapped[str] = mapped_column(String(40))
    node_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    command: Mapped[str] = mapped_column(Text)
    args: Mapped[list[str] | None] = mapped_column(JSON)
    cwd: Mapped[str] = mapped_column(Text)
    user: Mapped[str] = mapped_column(String(32))
    env_keys: Mapped[list[str]] = mapped_column(JSON)
    timeout_ms: Mapped[int] = mapped_column(Integer)
    max_output_bytes: Mapped[int] = mapped_column(Integer)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    stdout_bytes: Mapped[int] = mapped_column(Integer, default=0)
    stderr_bytes: Mapped[int] = mapped_column(Integer, default=0)
    stdout_truncated: Mapped[bool] = mapped_column(default=False)
    stderr_truncated: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32), default="native")
    cpu_ms: Mapped[int | None] = mapped_column(BigInteger)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    oom_killed: Mapped[bool] = mapped_column(default=False)

    __table_args__ = (
        Index("ix_commands_sandbox_created", "sandbox_id", "created_at"),
        Index("ix_commands_status", "status"),
    )


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    sandbox_ids: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The cmd.io user who made it with `cmd-tokens new` (such tokens have no scopes and no
    # sandboxes: they only run the named commands whose access lists hold them).
    owner: Mapped[str | None] = mapped_column(String(64), default=None)


# --- cmd.io: users, their named commands, and the access lists (migration 0002) ---------------


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ssh_public_keys: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class NamedCommandRow(Base):
    __tablename__ = "named_commands"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(Text)
    env: Mapped[dict[str, str]] = mapped_column(JSON)
    template: Mapped[str] = mapped_column(String(200))
    timeout_ms: Mapped[int | None] = mapped_column(Integer)
    # Set: runs in this existing sandbox (kept) instead of a fresh one per run.
    sandbox_id: Mapped[str | None] = mapped_column(String(40), default=None)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("uq_named_commands_owner_name", "owner", "name", unique=True),)


class NamedCommandAccessRow(Base):
    __tablename__ = "named_command_access"

    command_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_named_command_access_token", "token_id"),)


# --- the login throttle (migration 0004) ---------------------------------------------------------


class LoginFailureRow(Base):
    """Recent failed logins for one key: a client address or an account."""

    __tablename__ = "login_failures"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime] = mapped_column(UTCDateTime())
    blocked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


# --- the fleet: nodes and leader leases (migration 0005) -----------------------------------------


class NodeRow(Base):
    """A node as the control plane knows it. `epoch` grows at each registration, so that what
    an earlier run of the node still sends is told apart and refused."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # online, offline, draining
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str] = mapped_column(String(32))
    protocol: Mapped[int] = mapped_column(Integer)
    # What it registered with: capacity, templates, enforceable limits, host execution.
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    # What its last heartbeat said: sandboxes and commands running there.
    load: Mapped[dict[str, Any]] = mapped_column(JSON)
    draining: Mapped[bool] = mapped_column(default=False)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LeaseRow(Base):
    """A named lease one process holds until `expires_at`: singleton loops run under one."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VolumeRow(Base):
    """A named persistent directory on one node; sandboxes on that node mount it."""

    __tablename__ = "volumes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    node_id: Mapped[str] = mapped_column(String(64))
    size_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SnapshotRow(Base):
    """A sandbox's files captured on its node; sandboxes started from it run on that node."""

    __tablename__ = "snapshots"
    __table_args__ = (
        Index("ix_snapshots_sandbox_id", "sandbox_id"),
        Index("ix_snapshots_expires_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    node_id: Mapped[str] = mapped_column(String(64))
    sandbox_id: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16))
    template: Mapped[str] = mapped_column(String(200))
    image: Mapped[str | None] = mapped_column(Text, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NodeImageRow(Base):
    """An image in one node's store, as that node last said (the node's store is the truth for
    its files): what listing and placement need without asking every node."""

    __tablename__ = "node_images"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    image_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    refs: Mapped[list[str]] = mapped_column(JSON)  # its references there
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # the store's Image, as JSON
    size: Mapped[int] = mapped_column(BigInteger)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SandboxPortRow(Base):
    """A port of a sandbox served at a URL (api/ports): private (a token of the sandbox's) or
    public (no token)."""

    __tablename__ = "sandbox_ports"

    sandbox_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    port: Mapped[int] = mapped_column(Integer, primary_key=True)
    public: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SecretRow(Base):
    """A stored secret (core/secrets.py): its value encrypted when the server has a key
    (`enc:` and a Fernet token), else `raw:` and the text."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
