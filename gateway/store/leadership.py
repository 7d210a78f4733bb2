"""The ``leadership`` table: the fence behind the Kubernetes driver's leader (:mod:`gateway.leader`).

A Kubernetes Lease tells who leads, not who may still write: a leader paused (SIGSTOP, a long GC,
a frozen VM) past its lease wakes up believing it leads, with events of its pod watch still to
record. So every driver-state write of the leader's is conditional, in its own transaction, on the
term it was elected for (:meth:`LeaderTerm.hold`, and :meth:`LeaderTerm.holds` in its WHERE), and
a new leader raises the term *before* it does anything: from then on the old leader's writes
change nothing and raise :class:`NotLeader`. On PostgreSQL the write holds the leadership row
share-locked until it commits, so the claim waits for a write in flight rather than pass it.

The term is the Lease's ``leaseTransitions`` at the acquisition (the elector makes it at least one
more than the term recorded here, so a Lease deleted and created again does not start over).
:meth:`LeadershipStore.claim` records it only if it is higher than the one recorded: the Lease's
optimistic concurrency (one update per resourceVersion) gives each term to one acquisition, and an
acquisition that lost the race, or was paused between its Lease update and this claim, can never
take the row back from a newer one. A claim repeated by the same acquisition (same term, same
holder: its first attempt committed but the reply was lost) answers that term again rather than
reading as a newer leader's.

The row's ``name`` is the Lease's namespace and name (``namespace/name``, built by the elector):
two deployments sharing one database but each with its own Lease (same name, other namespaces)
must not share one term. The column is free text, so this needed no migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from gateway.store.db import Database, StoreError, store_errors, utcnow
from gateway.store.schema import leadership as leadership_table


class NotLeader(StoreError):
    """A write conditional on a leader's term found a newer term: another replica leads now, and
    this one's write was not made."""


@dataclass(frozen=True, slots=True)
class LeaderTerm:
    """What a leader's writes carry: the role's name (the Lease's), the holder and its term."""

    name: str
    holder: str
    term: int

    def holds(self) -> ColumnElement[bool]:
        """The SQL condition a fenced write adds to its WHERE: the row still records this term."""
        return exists().where(leadership_table.c.name == self.name, leadership_table.c.term == self.term)

    async def hold(self, conn: AsyncConnection) -> None:
        """At the start of a fenced write's transaction: raise :class:`NotLeader` unless the term
        holds, and on PostgreSQL keep the leadership row share-locked until the commit, so a newer
        leader's claim waits for this write and no write of this term commits after the claim.
        (SQLite has one writer at a time: the claim and the write are serialised anyway.)"""
        found = await conn.execute(
            select(leadership_table.c.term)
            .where(leadership_table.c.name == self.name, leadership_table.c.term == self.term)
            .with_for_update(read=True)
        )
        if found.first() is None:
            await self.check(conn)

    async def check(self, conn: AsyncConnection) -> None:
        """Raise :class:`NotLeader` unless the term still holds (after a fenced write changed no
        row: tells a lost leadership from a row that is not there)."""
        current = (
            await conn.execute(select(leadership_table.c.term).where(leadership_table.c.name == self.name))
        ).scalar_one_or_none()
        if current != self.term:
            raise NotLeader(
                f"replica {self.holder!r} no longer leads {self.name!r}: its term is {self.term}, "
                f"the recorded one {current} (another replica took over)"
            )


@dataclass(frozen=True, slots=True)
class Leadership:
    name: str
    holder: str
    term: int
    acquired_at: datetime
    renewed_at: datetime


class LeadershipStore:
    """Reads and claims the ``leadership`` rows; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, name: str) -> Leadership | None:
        with store_errors(f"cannot read the leadership of {name!r}"):
            async with self._db.engine.connect() as conn:
                row = (
                    await conn.execute(select(leadership_table).where(leadership_table.c.name == name))
                ).one_or_none()
        if row is None:
            return None
        return Leadership(
            name=row.name,
            holder=row.holder,
            term=int(row.term),
            acquired_at=row.acquired_at,
            renewed_at=row.renewed_at,
        )

    async def now(self) -> datetime:
        """The database's clock (``statement_timestamp()`` on PostgreSQL; SQLite is a file on this
        host: this process's clock): what deadlines judged by several replicas are stamped and
        judged with, so that a replica whose clock is off does not judge another's stamp."""
        if self._db.dialect != "postgresql":
            return utcnow()
        with store_errors("cannot read the database's clock"):
            async with self._db.engine.connect() as conn:
                found: datetime = (
                    await conn.execute(select(func.statement_timestamp(type_=DateTime(timezone=True))))
                ).scalar_one()
        return found.astimezone(UTC)

    async def claim(self, name: str, *, holder: str, term: int) -> LeaderTerm | None:
        """Record ``holder`` as the leader of ``name`` at ``term`` if no higher term is recorded, nor
        this term by another holder; the term to write under, or None when a newer leader already
        claimed it. Idempotent: the same claim again (its reply lost) answers the term."""
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        now = utcnow()
        stmt = insert(leadership_table).values(
            name=name, holder=holder, term=term, acquired_at=now, renewed_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[leadership_table.c.name],
            set_={"holder": holder, "term": term, "acquired_at": now, "renewed_at": now},
            # Monotonic: an older acquisition (lost the Lease race, or paused before claiming)
            # never takes the row back. The same acquisition again (a claim whose commit was
            # acknowledged too late to be seen) rewrites its own row: one Lease update gives a term
            # to one holder, so (term, holder) is that acquisition.
            where=or_(
                leadership_table.c.term < term,
                (leadership_table.c.term == term) & (leadership_table.c.holder == holder),
            ),
        )
        with store_errors(f"cannot claim the leadership of {name!r}"):
            async with self._db.begin() as conn:
                result = await conn.execute(stmt)
        return LeaderTerm(name=name, holder=holder, term=term) if result.rowcount else None
