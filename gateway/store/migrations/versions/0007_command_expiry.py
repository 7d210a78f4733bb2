"""Command expiry: a command carries the time after which it is never sent, and a late answer for
one that expired is kept apart from the state.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no backfill: a row without an expiry (stored before this revision, or by a replica
    # still running the previous version during a rolling upgrade) expires
    # gateway.store.commands.LEGACY_TTL_S after its creation, a rule the queries apply. A plain
    # ALTER TABLE ADD COLUMN on both dialects, never SQLite's batch mode (see 0004).
    op.add_column("commands", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("commands", sa.Column("late_result", sa.Text(), nullable=True))


def downgrade() -> None:
    # Expired commands would read as pending again under the previous code: they are failed first.
    op.execute(
        "UPDATE commands SET state = 'failed', "
        "error = coalesce(error, 'expired before any session took it') WHERE state = 'expired'"
    )
    for column in ("late_result", "expires_at"):
        op.execute(f"ALTER TABLE commands DROP COLUMN {column}")
