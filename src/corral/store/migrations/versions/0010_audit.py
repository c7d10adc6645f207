"""The audit log: one row per state-changing call.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("token_id", sa.String(64)),
        sa.Column("token_name", sa.String(200)),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("target", sa.String(200)),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("result", sa.String(8), nullable=False),
        sa.Column("address", sa.String(64)),
        sa.Column("request_id", sa.String(140)),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_token", "audit", ["token_id", "id"])
    op.create_index("ix_audit_action", "audit", ["action", "id"])
    op.create_index("ix_audit_target", "audit", ["target", "id"])


def downgrade() -> None:
    op.drop_table("audit")
