"""Where the OTLP log export stands, and which replica runs it: one row of the ``leadership`` table.

The export tails the ``events`` table by id (:mod:`gateway.otlp_logs`). Its position must outlive
the process (a restart resumes where the last run stopped: nothing lost; what lies above the
stored position, the batch in flight and the records above ids still missing, is sent again), and
one replica at a time should export (N replicas exporting the same table would send everything
N times). Both fit the ``leadership`` table's row for a cluster-wide role, under the name
:data:`EXPORT_NAME` (the column is free text, so this needed no migration; a table of its own, with
a column named for the position, is left for a later schema change):

- ``holder`` is the replica that exports, ``renewed_at`` its lease: it renews it with every step
  of the cursor, and at least every ``lease_s / 3`` while it waits; a row not renewed for
  ``lease_s`` (judged on the database's clock, :meth:`LeadershipStore.now`) is taken over by the
  next replica that asks, from the stored position.
- ``term`` is the position: every event with an id at or below it has been accepted by the
  receiver (or its id given up for a rollback: see :mod:`gateway.otlp_logs`), never more. It only
  grows (:meth:`ExportCursorStore.advance` never moves it back).

Every advance is conditional on the holder, so a replica that was paused past its lease and wakes
up cannot move the position of the replica that took over: it learns it lost the export and stops.
What it sent meanwhile may reach the receiver twice (delivery is at least once; each record
carries its sandbox, journal epoch and sequence for a receiver to drop repeats).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.db import Database, store_errors
from gateway.store.leadership import LeadershipStore
from gateway.store.schema import leadership as leadership_table

#: The ``leadership`` row of the OTLP log export (a Lease's rows are named ``namespace/name``:
#: no Kubernetes name has a colon, so the two never meet).
EXPORT_NAME = "export:otlp-logs"


class ExportCursorStore:
    def __init__(self, db: Database, *, name: str = EXPORT_NAME) -> None:
        self._db = db
        self._name = name
        self._clock = LeadershipStore(db)

    async def claim(self, holder: str, *, lease_s: float) -> int | None:
        """The stored position if ``holder`` holds the export now (it did, or it took it over: no
        holder yet, or a lease not renewed for ``lease_s``), renewing its lease; None while another
        replica's lease runs."""
        now = await self._clock.now()
        table = leadership_table
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        first = (
            insert(table)
            .values(name=self._name, holder=holder, term=0, acquired_at=now, renewed_at=now)
            .on_conflict_do_nothing(index_elements=[table.c.name])
        )
        expired = now - timedelta(seconds=lease_s)
        take = (
            update(table)
            .where(table.c.name == self._name, (table.c.holder == holder) | (table.c.renewed_at < expired))
            .values(holder=holder, renewed_at=now)
        )
        with store_errors("cannot claim the OTLP log export"):
            async with self._db.begin() as conn:
                await conn.execute(first)
                if not (await conn.execute(take)).rowcount:
                    return None
                position = await conn.scalar(select(table.c.term).where(table.c.name == self._name))
        return int(position or 0)

    async def advance(self, holder: str, position: int) -> bool:
        """Store ``position`` (never backwards) and renew the lease, if ``holder`` still holds the
        export; False when another replica took it over (the caller stops exporting)."""
        now = await self._clock.now()
        table = leadership_table
        renew = (
            update(table)
            .where(table.c.name == self._name, table.c.holder == holder)
            .values(renewed_at=now, term=_greatest(table.c.term, position, self._db.dialect))
        )
        with store_errors("cannot store the OTLP log export's position"):
            async with self._db.begin() as conn:
                return bool((await conn.execute(renew)).rowcount)

    async def release(self, holder: str) -> None:
        """Let another replica take over at once (at shutdown): the lease is made expired."""
        table = leadership_table
        gone = (
            update(table)
            .where(table.c.name == self._name, table.c.holder == holder)
            .values(renewed_at=(await self._clock.now()) - timedelta(days=1))
        )
        with store_errors("cannot release the OTLP log export"):
            async with self._db.begin() as conn:
                await conn.execute(gone)

    async def position(self) -> int:
        """The stored position (0: nothing exported yet)."""
        table = leadership_table
        with store_errors("cannot read the OTLP log export's position"):
            async with self._db.engine.connect() as conn:
                found = await conn.scalar(select(table.c.term).where(table.c.name == self._name))
        return int(found or 0)


def _greatest(column: ColumnElement[int], value: int, dialect: str) -> ColumnElement[int]:
    # GREATEST on PostgreSQL, the two-argument MAX on SQLite.
    return func.greatest(column, value) if dialect == "postgresql" else func.max(column, value)


__all__ = ["EXPORT_NAME", "ExportCursorStore"]
