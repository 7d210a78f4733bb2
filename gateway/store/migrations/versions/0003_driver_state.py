"""What the sandbox's driver last saw of it (a pod's phase and reason), as JSON.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: an instant change on PostgreSQL, also on big tables.
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("driver_state", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("driver_state")
