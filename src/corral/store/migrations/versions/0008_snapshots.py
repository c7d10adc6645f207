"""Snapshots: a sandbox's files captured on its node, to start sandboxes from.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=True, unique=True),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("sandbox_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("template", sa.String(200), nullable=False),
        sa.Column("image", sa.Text, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_snapshots_sandbox_id", "snapshots", ["sandbox_id"])
    op.create_index("ix_snapshots_expires_at", "snapshots", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_snapshots_expires_at", "snapshots")
    op.drop_index("ix_snapshots_sandbox_id", "snapshots")
    op.drop_table("snapshots")
