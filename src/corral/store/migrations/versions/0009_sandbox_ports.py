"""Sandbox ports: the ports of a sandbox that are served at a URL.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_ports",
        sa.Column("sandbox_id", sa.String(40), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sandbox_ports")
