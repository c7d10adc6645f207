"""Sandboxes, commands (the history) and tokens.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64)),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("template", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("error", sa.Text),
    )
    live_name = sa.text("state != 'deleted' AND name IS NOT NULL")
    op.create_index(
        "uq_sandboxes_live_name", "sandboxes", ["name"], unique=True,
        sqlite_where=live_name, postgresql_where=live_name,
    )  # fmt: skip
    live = sa.text("state != 'deleted'")
    op.create_index(
        "uq_sandboxes_live_slot", "sandboxes", ["node_id", "slot"], unique=True,
        sqlite_where=live, postgresql_where=live,
    )  # fmt: skip
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])

    op.create_table(
        "commands",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("sandbox_id", sa.String(40), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("args", sa.JSON),
        sa.Column("cwd", sa.Text, nullable=False),
        sa.Column("user", sa.String(32), nullable=False),
        sa.Column("env_keys", sa.JSON, nullable=False),
        sa.Column("timeout_ms", sa.Integer, nullable=False),
        sa.Column("max_output_bytes", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("signal", sa.Integer),
        sa.Column("stdout_bytes", sa.Integer, nullable=False),
        sa.Column("stderr_bytes", sa.Integer, nullable=False),
        sa.Column("stdout_truncated", sa.Boolean, nullable=False),
        sa.Column("stderr_truncated", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("duration_ms", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("source", sa.String(32), nullable=False),
    )
    op.create_index("ix_commands_sandbox_created", "commands", ["sandbox_id", "created_at"])
    op.create_index("ix_commands_status", "commands", ["status"])

    op.create_table(
        "tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("sandbox_ids", sa.JSON),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("last_used_at", UTCDateTime()),
    )


def downgrade() -> None:
    op.drop_table("tokens")
    op.drop_table("commands")
    op.drop_table("sandboxes")
