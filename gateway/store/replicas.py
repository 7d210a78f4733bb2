"""The ``replicas`` lease table: one row per gateway replica, renewed by its owner
(:mod:`gateway.replicas`) and read by every replica to tell which owners are alive
(:mod:`gateway.sandbox_state`).

A row says what the replica last said of itself: its address, how many sessions it held, whether
it is draining, when it started, when it last renewed, and the run (a random id per process) that
wrote it, so a replica restarted under the same id is told apart from its predecessor.

One clock: on PostgreSQL a renewal writes ``renewed_at = now()`` and forgets old rows against
``now() - interval``, and a snapshot reads the database's ``now()`` with the rows, so a lease is
written and judged on the database's clock and a replica whose own clock is off changes nothing.
SQLite is one process: it keeps that process's clock (``renewed_at`` as given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from gateway.store.db import Database, store_errors, utcnow
from gateway.store.schema import replicas as replicas_table


@dataclass(frozen=True, slots=True)
class ReplicaLease:
    id: str
    address: str
    sessions: int
    draining: bool
    started_at: datetime
    renewed_at: datetime
    #: The run that wrote the row (None: written by a release before run ids).
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a renewal replaced: the run that held the row and when it had renewed (both None when
    there was no row), and the time the renewal was written at (the database's on PostgreSQL)."""

    previous_run: str | None
    previous_renewed_at: datetime | None
    now: datetime


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """Every row, and the database's clock when they were read (None on SQLite: the reader's own
    clock is the one leases were written with), with the reader's clock at that same instant
    (``local_now``: the midpoint of the statement that read the database's, None without one)."""

    rows: list[ReplicaLease]
    database_now: datetime | None
    local_now: datetime | None = None


def _lease(r: Row[Any]) -> ReplicaLease:
    return ReplicaLease(
        id=r.id,
        address=r.address,
        sessions=int(r.sessions),
        draining=bool(r.draining),
        started_at=r.started_at,
        renewed_at=r.renewed_at,
        run_id=r.run_id,
    )


class ReplicaStore:
    """Reads and writes the ``replicas`` table; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _of_run(self, replica_id: str, run: str | None) -> ColumnElement[bool]:
        """The row of ``replica_id``, and only while ``run`` holds it (when given): a process never
        marks or deletes the row another live process with the same id has taken over."""
        c = replicas_table.c
        return c.id == replica_id if run is None else and_(c.id == replica_id, c.run_id == run)

    async def renew(
        self,
        replica_id: str,
        *,
        run: str | None = None,
        address: str,
        sessions: int,
        draining: bool,
        started_at: datetime,
        renewed_at: datetime,
        forget_after_s: float | None = None,
    ) -> Renewal:
        """Write the replica's row, creating it if missing (a row deleted meanwhile comes back with
        the next renewal), and say which run held it before. ``renewed_at`` is used on SQLite only;
        PostgreSQL writes its own ``now()``. With ``forget_after_s``, rows of other replicas not
        renewed for that long are deleted in the same transaction: a lapsed row and a missing one
        mean the same (dead), and the ids of pods gone for good must not pile up."""
        postgres = self._db.dialect == "postgresql"
        insert = postgresql.insert if postgres else sqlite.insert
        c = replicas_table.c
        with store_errors(f"cannot renew the lease of replica {replica_id!r}"):
            async with self._db.begin() as conn:
                if postgres:
                    # now() is the transaction's start: the same instant for every statement here.
                    now: datetime = (await conn.execute(select(func.now()))).scalar_one()
                    previous = (
                        await conn.execute(
                            select(c.run_id, c.renewed_at).where(c.id == replica_id).with_for_update()
                        )
                    ).first()
                else:
                    now = renewed_at
                    previous = (
                        await conn.execute(select(c.run_id, c.renewed_at).where(c.id == replica_id))
                    ).first()
                values = {
                    "id": replica_id,
                    "address": address,
                    "sessions": sessions,
                    "draining": draining,
                    "started_at": started_at,
                    "renewed_at": now,
                    "run_id": run,
                }
                stmt = insert(replicas_table).values(**values)
                # started_at and run_id are part of the update: a replica restarted under the same
                # id is a new run, and its predecessor's sessions must not count as its own.
                stmt = stmt.on_conflict_do_update(
                    index_elements=[c.id], set_={k: stmt.excluded[k] for k in values if k != "id"}
                )
                await conn.execute(stmt)
                if forget_after_s is not None:
                    before = now - timedelta(seconds=forget_after_s)
                    await conn.execute(
                        delete(replicas_table).where(c.renewed_at < before, c.id != replica_id)
                    )
        return Renewal(
            previous_run=previous.run_id if previous is not None else None,
            previous_renewed_at=previous.renewed_at if previous is not None else None,
            now=now,
        )

    async def mark_draining(self, replica_id: str, *, run: str | None = None) -> None:
        """Mark the row draining (only ``run``'s, when given)."""
        with store_errors(f"cannot mark replica {replica_id!r} draining"):
            async with self._db.begin() as conn:
                await conn.execute(
                    update(replicas_table).where(self._of_run(replica_id, run)).values(draining=True)
                )

    async def delete(self, replica_id: str, *, run: str | None = None) -> None:
        """Delete the row (only ``run``'s, when given)."""
        with store_errors(f"cannot delete the lease of replica {replica_id!r}"):
            async with self._db.begin() as conn:
                await conn.execute(delete(replicas_table).where(self._of_run(replica_id, run)))

    async def leases(self) -> list[ReplicaLease]:
        """Every row, alive or not."""
        return (await self.snapshot()).rows

    async def snapshot(self, *, clock: Callable[[], datetime] = utcnow) -> LeaseSnapshot:
        """Every row, alive or not, with the database's clock of the same read on PostgreSQL (the
        clock the rows were renewed on, which a reader must compare them with) and ``clock``'s
        reading at that instant. Both are taken on the connection already checked out, around one
        statement (``clock_timestamp()``, the time it ran, against the midpoint of ``clock``
        before and after it): a wait for the pool, its pre-ping or a new connection's handshake
        would otherwise count as skew and make every lease look older by that much."""
        with store_errors("cannot read the replicas' leases"):
            async with self._db.engine.connect() as conn:
                database_now: datetime | None = None
                local_now: datetime | None = None
                if self._db.dialect == "postgresql":
                    before = clock()
                    database_now = (await conn.execute(select(func.clock_timestamp()))).scalar_one()
                    local_now = before + (clock() - before) / 2
                result = await conn.execute(select(replicas_table).order_by(replicas_table.c.id))
                return LeaseSnapshot(
                    rows=[_lease(r) for r in result], database_now=database_now, local_now=local_now
                )
