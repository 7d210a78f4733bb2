"""Sandbox generations: a deleted sandbox's id can be created again, its old events kept apart.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("sandboxes", "events")


def upgrade() -> None:
    # NOT NULL with a constant default: existing rows are generation 1. On PostgreSQL (11 and
    # later) that is a catalog change, instant also on a big events table. On SQLite it is a plain
    # ALTER TABLE ADD COLUMN, never batch mode: batch mode would copy "sandboxes" into a new table
    # and drop the old one, and with foreign keys on, that drop cascades to every event.
    for table in TABLES:
        op.add_column(
            table, sa.Column("generation", sa.BigInteger(), nullable=False, server_default=sa.text("1"))
        )


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN: PostgreSQL, and SQLite from 3.35 (again without copying tables).
    for table in reversed(TABLES):
        op.execute(f"ALTER TABLE {table} DROP COLUMN generation")
