"""Commands for supervisors, kept until answered.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "commands",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column(
            "sandbox_id",
            sa.Text(),
            sa.ForeignKey("sandboxes.id", ondelete="CASCADE", name="fk_commands_sandbox_id"),
            nullable=False,
        ),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_commands_sandbox_id_state", "commands", ["sandbox_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_commands_sandbox_id_state", table_name="commands")
    op.drop_table("commands")
