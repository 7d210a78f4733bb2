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
- Data: pending commands stored without an expiry and older than the legacy time to live are
  marked expired, so replicas of a release before 0007 still serving during the rollout (they read
  only ``state``) do not send them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

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
    _expire_legacy_commands()


#: gateway.store.commands.LEGACY_TTL_S and EXPIRED_ERROR as of this revision (a migration keeps
#: the values it was written with, whatever the code says later).
_LEGACY_TTL_S = 300
_EXPIRED_ERROR = "expired: no session of its sandbox took it before its expiry, and it is never sent now"


def _expire_legacy_commands() -> None:
    """Mark expired the pending commands without an expiry that are past LEGACY_TTL_S already.
    The new code already reads them as expired; a replica of a release before revision 0007,
    still serving during the rollout, reads only ``state`` and would send them at the next hello
    (a stop an hour late). It sends nothing that is not ``pending``. Rows that expire while such a
    replica still serves are not covered (see docs/high-availability.md)."""
    commands = sa.table(
        "commands",
        sa.column("state", sa.Text()),
        sa.column("error", sa.Text()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("expires_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # The database's clock, as the gateway's queries judge expiry on PostgreSQL.
        cutoff: sa.ColumnElement[datetime] = sa.func.now() - sa.literal(timedelta(seconds=_LEGACY_TTL_S))
    else:
        # SQLite stores UTC wall-clock fields (gateway.store.schema.UTCDateTime): a naive UTC bound.
        now = datetime.now(UTC).replace(tzinfo=None)
        cutoff = sa.literal(now - timedelta(seconds=_LEGACY_TTL_S), sa.DateTime())
    op.execute(
        commands.update()
        .where(
            commands.c.state == "pending",
            commands.c.expires_at.is_(None),
            commands.c.created_at < cutoff,
        )
        .values(state="expired", error=sa.func.coalesce(commands.c.error, _EXPIRED_ERROR))
    )


def downgrade() -> None:
    # The commands marked expired stay so: 0007's downgrade maps expired to failed.
    op.drop_table("leadership")
    for table, column in (
        ("commands", "delivered_by"),
        ("commands", "delivered_at"),
        ("sandboxes", "owner_run"),
        ("replicas", "run_id"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
