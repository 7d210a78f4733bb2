"""Initial schema: sandboxes and their events.

Written out by hand rather than from ``metadata``, so that this revision keeps creating exactly
this schema however ``gateway.store.schema`` changes later.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("driver", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=True),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("journal_epoch", sa.Text(), nullable=True),
        sa.Column("connected", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("exited_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("owner_epoch", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("spec", sa.Text(), nullable=True),
    )
    op.create_table(
        "events",
        # INTEGER PRIMARY KEY on SQLite (a rowid alias, so it autoincrements); BIGSERIAL elsewhere.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "sandbox_id",
            sa.Text(),
            sa.ForeignKey("sandboxes.id", ondelete="CASCADE", name="fk_events_sandbox_id"),
            nullable=False,
        ),
        sa.Column("journal_epoch", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "sandbox_id", "journal_epoch", "sequence", name="uq_events_sandbox_epoch_sequence"
        ),
    )
    op.create_index("ix_events_sandbox_id_id", "events", ["sandbox_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_events_sandbox_id_id", table_name="events")
    op.drop_table("events")
    op.drop_table("sandboxes")
