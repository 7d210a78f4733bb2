"""Deleting old events from the ``events`` table in small batches (issue 23 point 3).

What goes: log lines and health records received (``received_at``, the gateway's clock: a
supervisor's clock may be wrong) before an age cutoff, and the oldest of them past a size bound;
lifecycle and gap records only past their own, optional, age cutoff (they are few, the sandbox's
exit is decided from them, and a gap record is what tells a reader lost lines from silence).

What never goes: the newest row of each (sandbox, journal epoch). The acknowledgement a supervisor
resumes after is that journal's highest stored sequence, ``MAX(sequence)``
(:meth:`gateway.store.events.EventStore.high_water_mark`), and the gateway numbers the upstream
paths' records after the same maximum: deleting a journal's newest row would move its mark back, and
a reconnecting supervisor would be told to resume from an older point (or the gateway would number
new records with sequences it already gave). Keeping that one row keeps the mark exactly where it
was, so a replay after retention stores nothing twice and nothing is refused. (A supervisor never
replays records at or below the mark: it resumes after it.)

How: :meth:`EventRetention.next_batch` walks the table up from an id in primary-key order, one page
of at most ``batch_size`` rows at a time, and picks the page's rows that are due; the walk stops
at the first row past every bound (ids grow with time, so what follows is younger; a row committed
out of order is caught by the next run). :meth:`EventRetention.delete` removes the picked ids in
one statement, its own short transaction, taken in turn with this process's other writers on
SQLite (:meth:`gateway.store.db.Database.begin`): a writer waits at most one batch's delete, never a
whole run. On PostgreSQL the delete is by primary key; two replicas deleting the same ids wait for
each other's row locks for one batch at most and the second deletes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, bindparam, delete, func, select

from gateway.store.db import Database, store_errors
from gateway.store.schema import events as events_table

#: Kinds deleted by ``max_age_s`` and ``max_bytes``.
BULK_KINDS = ("log", "health")
#: Kinds deleted only by ``lifecycle_max_age_s``.
RECORD_KINDS = ("lifecycle", "gap")
#: What a row costs beyond its message and data, in the size bound's count (ids, sequence, times,
#: the sandbox id and the index entries, roughly).
ROW_OVERHEAD_BYTES = 64


def row_bytes() -> ColumnElement[int]:
    """A row's size as the size bound counts it (characters of message and data, plus overhead)."""
    e = events_table.c
    return func.length(e.message) + func.coalesce(func.length(e.data), 0) + ROW_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """What is due: bulk rows received before ``bulk_before`` or with an id at or below
    ``bulk_through_id``; lifecycle and gap records received before ``records_before``. None: no
    such bound."""

    bulk_before: datetime | None = None
    bulk_through_id: int | None = None
    records_before: datetime | None = None

    def due(self, *, id: int, kind: str, received_at: datetime) -> bool:
        if kind in RECORD_KINDS:
            return self.records_before is not None and received_at < self.records_before
        return (self.bulk_before is not None and received_at < self.bulk_before) or (
            self.bulk_through_id is not None and id <= self.bulk_through_id
        )

    def beyond(self, *, id: int, received_at: datetime) -> bool:
        """Whether no bound can make this row (nor, ids growing with time, the rows after it) due."""
        times = [t for t in (self.bulk_before, self.records_before) if t is not None]
        return all(received_at >= t for t in times) and (
            self.bulk_through_id is None or id > self.bulk_through_id
        )


@dataclass(slots=True)
class Batch:
    """One page of the walk: the ids to delete and where the next page starts."""

    ids: list[int] = field(default_factory=list)
    next_after: int = 0
    #: The walk reached a row past every bound, or the table's end: nothing more is due this run.
    done: bool = False


@dataclass(frozen=True, slots=True)
class Totals:
    rows: int
    #: None: not measured (no size bound).
    bulk_bytes: int | None


class EventRetention:
    """The retention task's statements; each method is one short transaction or one read."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def totals(self, *, with_bytes: bool) -> Totals:
        """Every row, and ``with_bytes`` the size bound's count of the log and health rows (one
        scan either way; the sizes read every message, so they are asked for only with a bound)."""
        e = events_table.c
        bulk = func.sum(row_bytes()).filter(e.kind.in_(BULK_KINDS)) if with_bytes else func.count()
        with store_errors("cannot measure the events table"):
            async with self._db.engine.connect() as conn:
                row = (await conn.execute(select(func.count(), bulk).select_from(events_table))).one()
        return Totals(rows=int(row[0] or 0), bulk_bytes=int(row[1] or 0) if with_bytes else None)

    async def size_cutoff(self, max_bytes: int) -> int | None:
        """The newest id of a log or health row that does not fit in ``max_bytes`` counted from the
        newest row down; None when all fit. PostgreSQL streams the running sum over the primary key
        backwards and stops at the first row over the bound: it reads what is kept, not the table."""
        e = events_table.c
        running = func.sum(row_bytes()).over(order_by=e.id.desc(), rows=(None, 0)).label("running")
        kept = select(e.id, running).where(e.kind.in_(BULK_KINDS)).subquery()
        query = select(kept.c.id).where(kept.c.running > max_bytes).order_by(kept.c.id.desc()).limit(1)
        with store_errors("cannot measure the events table"):
            async with self._db.engine.connect() as conn:
                found = await conn.scalar(query)
        return None if found is None else int(found)

    async def next_batch(self, after_id: int, cutoffs: Cutoffs, *, batch_size: int) -> Batch:
        """The due rows among the ``batch_size`` rows above ``after_id``, less the newest row of
        each journal (see the module docstring). A read: nothing is locked."""
        e = events_table.c
        page = select(e.id, e.sandbox_id, e.journal_epoch, e.sequence, e.kind, e.received_at)
        page = page.where(e.id > after_id).order_by(e.id).limit(batch_size)
        newest_of = (
            select(func.max(e.sequence))
            .where(e.sandbox_id == bindparam("sandbox_id"), e.journal_epoch == bindparam("journal_epoch"))
            .scalar_subquery()
        )
        batch = Batch(next_after=after_id)
        with store_errors("cannot read the events due for retention"):
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(page)).all()
                if len(rows) < batch_size:
                    batch.done = True
                candidates = []
                for row in rows:
                    if cutoffs.beyond(id=row.id, received_at=row.received_at):
                        batch.done = True
                        break
                    batch.next_after = row.id
                    if cutoffs.due(id=row.id, kind=row.kind, received_at=row.received_at):
                        candidates.append(row)
                # The newest sequence of each journal met: only ever grows, so a row that is not
                # the newest now never becomes it again.
                newest: dict[tuple[str, str], int] = {}
                for row in candidates:
                    key = (row.sandbox_id, row.journal_epoch)
                    if key not in newest:
                        top = await conn.scalar(
                            select(newest_of), {"sandbox_id": key[0], "journal_epoch": key[1]}
                        )
                        newest[key] = int(top) if top is not None else 0
                    if row.sequence < newest[key]:
                        batch.ids.append(row.id)
        return batch

    async def delete(self, ids: list[int]) -> Counter[str]:
        """Delete these rows in one short transaction; the kinds of those that were still there
        (another replica's retention may have deleted some first)."""
        if not ids:
            return Counter()
        statement = (
            delete(events_table)
            .where(events_table.c.id.in_(bindparam("ids", expanding=True)))
            .returning(events_table.c.kind)
        )
        with store_errors(f"cannot delete {len(ids)} events"):
            async with self._db.begin() as conn:
                kinds = (await conn.execute(statement, {"ids": ids})).scalars().all()
        return Counter(kinds)


__all__ = ["BULK_KINDS", "RECORD_KINDS", "Batch", "Cutoffs", "EventRetention", "Totals", "row_bytes"]
