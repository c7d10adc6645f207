"""cmd.io: users, named commands, their access lists, and the owner of a cmd.io token.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ssh_public_keys", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "named_commands",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("template", sa.String(200), nullable=False),
        sa.Column("timeout_ms", sa.Integer),
        sa.Column("sandbox_id", sa.String(40)),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "uq_named_commands_owner_name", "named_commands", ["owner", "name"], unique=True
    )
    op.create_table(
        "named_command_access",
        sa.Column("command_id", sa.String(40), primary_key=True),
        sa.Column("token_id", sa.String(40), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_named_command_access_token", "named_command_access", ["token_id"])
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("owner", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("owner")
    op.drop_table("named_command_access")
    op.drop_table("named_commands")
    op.drop_table("users")
