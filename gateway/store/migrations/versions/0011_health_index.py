"""A partial index of the health events, ``(sandbox_id, generation, id) WHERE kind = 'health'``:
the fleet summary finds each sandbox's newest health report through it (gateway/store/fleet.py)
instead of walking back over the sandbox's log lines, which cost a scan of every line of a sandbox
that logs much and reports health seldom.

On PostgreSQL the index is built in the migration's transaction (the migrations run in one, under
the migration lock), so the build holds inserts into ``events`` for as long as it scans the table:
seconds per few million rows. Event batches stored meanwhile wait (a supervisor's batch waits up to
``grpc.batch_store_timeout_s``, then is sent again: nothing is lost). Run the migration Job at a
quiet time on a very large table.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHERE = sa.text("kind = 'health'")


def upgrade() -> None:
    op.create_index(
        "ix_events_health",
        "events",
        ["sandbox_id", "generation", "id"],
        sqlite_where=_WHERE,
        postgresql_where=_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_events_health", table_name="events")
