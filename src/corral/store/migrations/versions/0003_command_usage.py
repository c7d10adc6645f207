"""Commands: CPU time, peak memory and whether the OOM killer ended them.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(sa.Column("cpu_ms", sa.BigInteger))
        batch.add_column(sa.Column("peak_memory_bytes", sa.BigInteger))
        batch.add_column(
            sa.Column("oom_killed", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("oom_killed")
        batch.drop_column("peak_memory_bytes")
        batch.drop_column("cpu_ms")
