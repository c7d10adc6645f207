"""Failed password logins, per client address and per account, for the login throttle.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(80), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure_at", UTCDateTime(), nullable=False),
        sa.Column("blocked_until", UTCDateTime()),
    )


def downgrade() -> None:
    op.drop_table("login_failures")
