"""SQLAlchemy models. Schema changes go through Alembic migrations (store/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column
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

    @classmethod
    def in_memory(cls, values: dict[str, Any]) -> CommandRow:
        """A row built in memory, never added to a session (command rows are written with
        Core statements): `values` go straight into its dict, the other columns None. The
        constructor fires the ORM's events for every attribute (~40 us a row, two rows a
        command); this takes ~4 us, and the row reads and sets as one it built."""
        if cls.__mapper__.configured is False:
            configure_mappers()  # attribute access needs it; the first query would do it
        row = cls._sa_class_manager.new_instance()
        row.__dict__.update(_BLANK_COMMAND)
        row.__dict__.update(values)
        return row


_BLANK_COMMAND: dict[str, Any] = dict.fromkeys(c.key for c in CommandRow.__table__.columns)


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


class AuditRow(Base):
    """One state-changing call: who, what, on what, with what result, when, from where."""

    __tablename__ = "audit"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # time-ordered
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    token_id: Mapped[str | None] = mapped_column(String(64))
    token_name: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(String(8))
    address: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(140))

    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_token", "token_id", "id"),
        Index("ix_audit_action", "action", "id"),
        Index("ix_audit_target", "target", "id"),
    )


# --- idempotency keys (migration 0011) -----------------------------------------------------------


class IdempotencyKeyRow(Base):
    """A create or command start made with an `Idempotency-Key`: claimed (with the request's
    fingerprint) before the work, tied to what it made in the same transaction, and holding the
    answer once it is given (api/idempotency.py)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    token_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # pending, done
    owner: Mapped[str] = mapped_column(String(80))  # the process doing the work
    resource_kind: Mapped[str | None] = mapped_column(String(16), default=None)
    resource_id: Mapped[str | None] = mapped_column(String(40), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    headers: Mapped[list[list[str]] | None] = mapped_column(JSON, default=None)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


# --- webhooks (migration 0012) -------------------------------------------------------------------


class WebhookRow(Base):
    """A URL that gets the events it asked for, signed with its secret (core/webhooks.py)."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(40))  # who made it: it sees only its own
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    sandbox_id: Mapped[str | None] = mapped_column(String(40), default=None)
    secret: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookDeliveryRow(Base):
    """One event for one webhook, until a 2xx answer or the retry window's end. Stored with the
    event, so a restart resumes it; claimed by one process at a time (`claimed_until`)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook", "webhook_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class WebhookAttemptRow(Base):
    """One try at a delivery: what the receiver answered (or what went wrong), and when."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_webhook", "webhook_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(40))
    delivery_id: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class SecretRow(Base):
    """A stored secret (core/secrets.py): its value encrypted when the server has a key
    (`enc:` and a Fernet token), else `raw:` and the text."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
