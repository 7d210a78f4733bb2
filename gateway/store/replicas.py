"""The ``replicas`` lease table: one row per gateway replica, renewed by its owner
(:mod:`gateway.replicas`) and read by every replica to tell which owners are alive
(:mod:`gateway.sandbox_state`).

A row says what the replica last said of itself: its address, how many sessions it held, whether
it is draining, when it started and when it last renewed. Times are the writing replica's clock,
as heartbeat times are: replicas are assumed to keep their clocks in step (NTP), well within
``ha.lease_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.db import Database, store_errors
from gateway.store.schema import replicas as replicas_table


@dataclass(frozen=True, slots=True)
class ReplicaLease:
    id: str
    address: str
    sessions: int
    draining: bool
    started_at: datetime
    renewed_at: datetime


class ReplicaStore:
    """Reads and writes the ``replicas`` table; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def renew(
        self,
        replica_id: str,
        *,
        address: str,
        sessions: int,
        draining: bool,
        started_at: datetime,
        renewed_at: datetime,
        forget_before: datetime | None = None,
    ) -> None:
        """Write the replica's row, creating it if missing (a row deleted meanwhile comes back with
        the next renewal). With ``forget_before``, rows of other replicas last renewed before it
        are deleted in the same transaction: a lapsed row and a missing one mean the same (dead),
        and the ids of pods gone for good must not pile up."""
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        values = {
            "id": replica_id,
            "address": address,
            "sessions": sessions,
            "draining": draining,
            "started_at": started_at,
            "renewed_at": renewed_at,
        }
        stmt = insert(replicas_table).values(**values)
        # started_at is part of the update: a replica restarted under the same id is a new run.
        stmt = stmt.on_conflict_do_update(
            index_elements=[replicas_table.c.id],
            set_={k: stmt.excluded[k] for k in values if k != "id"},
        )
        with store_errors(f"cannot renew the lease of replica {replica_id!r}"):
            async with self._db.engine.begin() as conn:
                await conn.execute(stmt)
                if forget_before is not None:
                    await conn.execute(
                        delete(replicas_table).where(
                            replicas_table.c.renewed_at < forget_before, replicas_table.c.id != replica_id
                        )
                    )

    async def mark_draining(self, replica_id: str) -> None:
        with store_errors(f"cannot mark replica {replica_id!r} draining"):
            async with self._db.engine.begin() as conn:
                await conn.execute(
                    update(replicas_table).where(replicas_table.c.id == replica_id).values(draining=True)
                )

    async def delete(self, replica_id: str) -> None:
        with store_errors(f"cannot delete the lease of replica {replica_id!r}"):
            async with self._db.engine.begin() as conn:
                await conn.execute(delete(replicas_table).where(replicas_table.c.id == replica_id))

    async def leases(self) -> list[ReplicaLease]:
        """Every row, alive or not (the caller compares ``renewed_at`` with its clock)."""
        with store_errors("cannot read the replicas' leases"):
            async with self._db.engine.connect() as conn:
                result = await conn.execute(select(replicas_table).order_by(replicas_table.c.id))
                return [
                    ReplicaLease(
                        id=r.id,
                        address=r.address,
                        sessions=int(r.sessions),
                        draining=bool(r.draining),
                        started_at=r.started_at,
                        renewed_at=r.renewed_at,
                    )
                    for r in result
                ]
