"""Images: which node's store holds which image.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_images",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("image_id", sa.String(80), primary_key=True),
        sa.Column("refs", sa.JSON, nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("added_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_images")
