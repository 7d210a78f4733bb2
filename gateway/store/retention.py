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
at the first row past every bound (ids grow with time, so what follows is younger). Whether a row
is its journal's newest is asked in the same statement, one probe of the unique index
``(sandbox_id, journal_epoch, sequence)`` per row (the database's work, not a round trip per
journal), and asked again inside the delete, so a row is deleted only if a newer one of its journal
exists at that moment. :meth:`EventRetention.delete` removes the picked ids in one statement, its
own short transaction, taken in turn with this process's other writers on SQLite
(:meth:`gateway.store.db.Database.begin`): a writer waits at most one batch's delete, never a whole
run. On PostgreSQL the delete is by primary key; two replicas deleting the same ids wait for each
other's row locks for one batch at most and the second deletes nothing.

Where a walk starts: a walk asked to start at id 0 starts after the rows an earlier walk of this
process settled (:class:`WalkStart`): deleted, or kept for good by this configuration (lifecycle and
gap records without ``lifecycle_max_age_s``, and each journal's newest row, however old), and
received at least :data:`SETTLE_S` before that walk. Without it every run would read again, from id
0, every record kept forever and every idle journal's newest row: a walk that grows for as long as
the gateway runs. What the shortcut can miss (a journal's newest row that a later record made
deletable, a row committed with a lower id long after its neighbours, and on SQLite a row given an
id again after every row above the start went, which takes every sandbox that logged since being
deleted: SQLite reuses the highest ids) is caught by a walk from id 0 every :data:`FULL_WALK_S`, and
by the first walk after a start.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, delete, func, select, text
from sqlalchemy.sql.dml import ReturningDelete
from sqlalchemy.sql.selectable import ScalarSelect

from gateway.store.db import Database, store_errors, utcnow
from gateway.store.schema import events as events_table

#: Kinds deleted by ``max_age_s`` and ``max_bytes``.
BULK_KINDS = ("log", "health")
#: Kinds deleted only by ``lifecycle_max_age_s``.
RECORD_KINDS = ("lifecycle", "gap")
#: What a row costs beyond its message and data, in the size bound's count (ids, sequence, times,
#: the sandbox id and the index entries, roughly).
ROW_OVERHEAD_BYTES = 64
#: A walk's start moves only past rows received this long before the walk: a transaction that took
#: a lower id and commits later (PostgreSQL hands ids out before the commit) would have to stay open
#: this long, and replicas' clocks (each stamps ``received_at``) must agree within it.
SETTLE_S = 600.0
#: A walk from id 0 at least this often (and first after a start), for what the start skips.
FULL_WALK_S = 86400.0


def row_bytes() -> ColumnElement[int]:
    """A row's size as the size bound counts it (characters of message and data, plus overhead)."""
    e = events_table.c
    return func.length(e.message) + func.coalesce(func.length(e.data), 0) + ROW_OVERHEAD_BYTES


def newest_sequence() -> ScalarSelect[int]:
    """The highest sequence of the outer ``events`` row's journal: a probe of the unique index."""
    newer = events_table.alias("newer")
    outer = events_table.c
    return (
        select(func.max(newer.c.sequence))
        .where(newer.c.sandbox_id == outer.sandbox_id, newer.c.journal_epoch == outer.journal_epoch)
        .scalar_subquery()
    )


def page_query(after_id: int, *, batch_size: int) -> Select[tuple[int, str, datetime, bool]]:
    """A page of the walk: the ``batch_size`` rows above ``after_id`` in id order (a range of the
    primary key), each with whether it is its journal's newest."""
    e = events_table.c
    newest = (e.sequence >= newest_sequence()).label("newest")
    return select(e.id, e.kind, e.received_at, newest).where(e.id > after_id).order_by(e.id).limit(batch_size)


def delete_statement(ids: list[int]) -> ReturningDelete[tuple[str]]:
    """Delete these ids (primary-key lookups) unless a row is its journal's newest by then."""
    e = events_table.c
    return delete(events_table).where(e.id.in_(ids), e.sequence < newest_sequence()).returning(e.kind)


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
    #: Exact, or PostgreSQL's estimate (``exact`` False): see :meth:`EventRetention.totals`.
    rows: int
    #: None: not measured (no size bound).
    bulk_bytes: int | None
    exact: bool = True


@dataclass(slots=True)
class WalkStart:
    """Where this process's walks start (see the module docstring): ``settled`` is the highest id
    up to which every row was deleted or is kept for good; a page's advance is ``pending`` until
    its delete has succeeded (a failed run must not skip the rows it failed to delete)."""

    settled: int = 0
    pending: int | None = None
    #: The walk under way still runs over settled rows only (it may move ``settled``).
    contiguous: bool = False
    #: When the last walk from id 0 began (time.monotonic); None: never in this process.
    last_full: float | None = None


class EventRetention:
    """The retention task's statements; each method is one short transaction or one read."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._walk = WalkStart()

    @property
    def walk_start(self) -> int:
        """The id after which the next walk from 0 will start."""
        return self._walk.settled

    async def totals(self, *, with_bytes: bool) -> Totals:
        """Every row, and ``with_bytes`` the size bound's count of the log and health rows.

        With the sizes it is one scan (they read every message, so they are asked for only with a
        bound) and exact. Without, PostgreSQL answers with its planner's estimate (the rows per
        page autovacuum last measured times the table's pages now: no scan, as ``count(*)`` would
        be on every replica every run) and an exact count only while the table was never analysed.
        SQLite counts (its ``count(*)`` reads the smallest index, not the rows)."""
        e = events_table.c
        with store_errors("cannot measure the events table"):
            async with self._db.engine.connect() as conn:
                if not with_bytes and self._db.dialect == "postgresql":
                    estimate = await conn.scalar(
                        text(
                            "SELECT CASE WHEN c.relpages > 0 THEN c.reltuples / c.relpages"
                            " * (pg_relation_size(c.oid) / current_setting('block_size')::float8)"
                            " WHEN c.reltuples >= 0 THEN 0 END"
                            " FROM pg_class c WHERE c.oid = 'events'::regclass"
                        )
                    )
                    if estimate is not None:
                        return Totals(rows=round(float(estimate)), bulk_bytes=None, exact=False)
                bulk = func.sum(row_bytes()).filter(e.kind.in_(BULK_KINDS)) if with_bytes else func.count()
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

    def _begin_walk(self, after_id: int) -> int:
        walk = self._walk
        if after_id == 0:
            now = time.monotonic()
            if walk.last_full is None or now - walk.last_full >= FULL_WALK_S:
                walk.settled, walk.last_full = 0, now
            walk.pending, walk.contiguous = None, True
            return walk.settled
        if walk.pending is not None and after_id >= walk.pending:
            # The caller went on after the previous page: its delete succeeded (or it had none).
            walk.settled, walk.pending = max(walk.settled, walk.pending), None
        return after_id

    async def next_batch(self, after_id: int, cutoffs: Cutoffs, *, batch_size: int) -> Batch:
        """The due rows among the ``batch_size`` rows above ``after_id``, less the newest row of
        each journal (see the module docstring); ``after_id`` 0 starts a walk, after what earlier
        walks settled. One read: nothing is locked."""
        start = self._begin_walk(after_id)
        page = page_query(start, batch_size=batch_size)
        batch = Batch(next_after=start)
        settled_before = utcnow() - timedelta(seconds=SETTLE_S)
        walk = self._walk
        advance: int | None = None
        with store_errors("cannot read the events due for retention"):
            async with self._db.engine.connect() as conn:
                rows = (await conn.execute(page)).all()
        if len(rows) < batch_size:
            batch.done = True
        for row in rows:
            if cutoffs.beyond(id=row.id, received_at=row.received_at):
                batch.done = True
                break
            batch.next_after = row.id
            due = cutoffs.due(id=row.id, kind=row.kind, received_at=row.received_at)
            if due and not row.newest:
                batch.ids.append(row.id)
            if walk.contiguous:
                kept_for_good = row.newest or (row.kind in RECORD_KINDS and cutoffs.records_before is None)
                if (due or kept_for_good) and row.received_at < settled_before:
                    advance = row.id
                else:
                    walk.contiguous = False
        if advance is not None:
            if batch.ids:
                walk.pending = advance  # settled once the caller has deleted this batch
            else:
                walk.settled = max(walk.settled, advance)
        return batch

    async def delete(self, ids: list[int]) -> Counter[str]:
        """Delete these rows, those still not their journal's newest, in one short transaction; the
        kinds of those that were still there (another replica's retention may have deleted some
        first)."""
        if not ids:
            return Counter()
        with store_errors(f"cannot delete {len(ids)} events"):
            async with self._db.begin() as conn:
                kinds = [str(kind) for kind in (await conn.execute(delete_statement(ids))).scalars()]
        walk = self._walk
        if walk.pending is not None:
            walk.settled, walk.pending = max(walk.settled, walk.pending), None
        return Counter(kinds)


__all__ = [
    "BULK_KINDS",
    "FULL_WALK_S",
    "RECORD_KINDS",
    "SETTLE_S",
    "Batch",
    "Cutoffs",
    "EventRetention",
    "Totals",
    "WalkStart",
    "delete_statement",
    "newest_sequence",
    "page_query",
    "row_bytes",
]
