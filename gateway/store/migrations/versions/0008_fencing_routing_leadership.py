"""High availability, second part: a per-run identity for owners (fencing), command hand-off
records (routing through any replica), and the leadership term (cluster-wide work runs once).

- ``replicas.run_id``: a random id per gateway process. A replica restarted under the same stable
  id is another run: the sessions its crashed predecessor left are not revived by its lease.
- ``sandboxes.owner_run``: the run id of the replica whose session owns the sandbox, claimed with
  ``owner_epoch`` in one statement; every write for the sandbox checks the epoch (fencing).
- ``commands.delivered_at`` / ``delivered_by``: when and by which replica the owning session wrote
  the command to its stream (a POST on another replica waits for this, not for a local queue).
- ``leadership``: one row per cluster-wide role; ``term`` grows at each change of holder, and the
  leader's writes (driver state) are conditional on it, so a paused ex-leader cannot write.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN on both dialects, never SQLite's batch mode (see 0004).
    op.add_column("replicas", sa.Column("run_id", sa.Text(), nullable=True))
    op.add_column("sandboxes", sa.Column("owner_run", sa.Text(), nullable=True))
    op.add_column("commands", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("commands", sa.Column("delivered_by", sa.Text(), nullable=True))
    op.create_table(
        "leadership",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("term", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leadership")
    for table, column in (
        ("commands", "delivered_by"),
        ("commands", "delivered_at"),
        ("sandboxes", "owner_run"),
        ("replicas", "run_id"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
