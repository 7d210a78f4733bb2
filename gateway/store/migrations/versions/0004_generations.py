"""Sandbox generations: a deleted sandbox's id can be created again, its old events kept apart;
and where the current run began, so a replayed or late lifecycle record cannot move the exit.

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
    # Nullable, no default: existing rows have no recorded run yet (their next STARTED begins one).
    op.add_column("sandboxes", sa.Column("run_epoch", sa.Text(), nullable=True))
    op.add_column("sandboxes", sa.Column("run_sequence", sa.BigInteger(), nullable=True))
    # Built in the migration's transaction: on a large PostgreSQL events table, writes to it wait
    # for the build (run the upgrade in a quiet moment).
    op.create_index("ix_events_sandbox_id_generation_id", "events", ["sandbox_id", "generation", "id"])


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN: PostgreSQL, and SQLite from 3.35 (again without copying tables).
    op.drop_index("ix_events_sandbox_id_generation_id", table_name="events")
    for column in ("run_sequence", "run_epoch"):
        op.execute(f"ALTER TABLE sandboxes DROP COLUMN {column}")
    for table in reversed(TABLES):
        op.execute(f"ALTER TABLE {table} DROP COLUMN generation")
