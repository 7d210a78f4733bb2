"""Upstream interoperability (issue 21): the connection epoch of the session that claimed a sandbox
(``SupervisorHello.connection_epoch``, upstream's HA field 3), and the policy an upstream supervisor
synced with UpdateConfig (its serialized ``openshell.sandbox.v1.SandboxPolicy``, the version this
gateway gave it and its SHA-256), handed back by GetSandboxConfig.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("connection_epoch", "policy", "policy_version", "policy_hash")


def upgrade() -> None:
    # Plain ADD COLUMN (see 0004). A row of a release before this one has connection epoch 0 (none
    # sent) and no policy: an upstream supervisor then syncs its own, as on a new sandbox.
    op.add_column(
        "sandboxes",
        sa.Column("connection_epoch", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("sandboxes", sa.Column("policy", sa.LargeBinary(), nullable=True))
    op.add_column(
        "sandboxes", sa.Column("policy_version", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )
    op.add_column("sandboxes", sa.Column("policy_hash", sa.Text(), nullable=True))


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE sandboxes DROP COLUMN {column}")
