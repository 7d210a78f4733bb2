"""Idempotent command POSTs: a command remembers the client's ``Idempotency-Key`` and a digest of
the request that created it, unique per sandbox, so a POST retried after its answer was lost (a
replica stopping mid-request) answers the command it already stored instead of storing it twice.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no backfill: commands stored without a key (before this revision, by a replica of
    # the previous release during a rollout, or POSTed without one) never match a key, since the
    # unique index treats NULLs as distinct on both dialects. Plain ADD COLUMN (see 0004).
    op.add_column("commands", sa.Column("idempotency_key", sa.Text(), nullable=True))
    op.add_column("commands", sa.Column("request_digest", sa.Text(), nullable=True))
    op.create_index(
        "ux_commands_sandbox_id_idempotency_key", "commands", ["sandbox_id", "idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_commands_sandbox_id_idempotency_key", table_name="commands")
    for column in ("request_digest", "idempotency_key"):
        op.execute(f"ALTER TABLE commands DROP COLUMN {column}")
