"""Identity: who created a sandbox and its team, the pod uid its projected token is bound to,
and the keys sandbox tokens are signed with.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("created_by", "team", "pod_uid")


def upgrade() -> None:
    # Nullable, no default: a catalog change on PostgreSQL, a plain ADD COLUMN on SQLite (never
    # batch mode, which would copy the table and cascade its drop to every event).
    for column in COLUMNS:
        op.add_column("sandboxes", sa.Column(column, sa.Text(), nullable=True))
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.Text(), primary_key=True),
        sa.Column("algorithm", sa.Text(), nullable=False),
        sa.Column("private_pem", sa.Text(), nullable=False),
        sa.Column("public_pem", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sign_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verify_until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE sandboxes DROP COLUMN {column}")
