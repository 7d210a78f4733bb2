"""Log retention (gateway.retention, gateway.store.retention) against a real SQLite file.

The ``check_*`` coroutines take an open database of either dialect:
tests/integration/test_retention_postgres.py runs the same ones on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select, text, update

from gateway.config import RetentionSettings
from gateway.metrics import GatewayMetrics
from gateway.retention import Retention
from gateway.sessions import SessionRegistry
from gateway.store import UNSEQUENCED_EPOCH, Database, EventStore, SandboxStore
from gateway.store import retention as store_retention
from gateway.store.db import StoreError, utcnow
from gateway.store.retention import EventRetention, delete_statement, page_query
from gateway.store.schema import events as events_table
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from tests.support.waiting import until

TS = 1_764_072_000_000
DAY = 86400.0


def line(seq: int, message: str | None = None) -> Event:
    return Event(seq, TS + seq, LogRecord(LogStream.STDOUT, message or f"line {seq}"))


def retention(db: Database, **settings: object) -> Retention:
    values: dict[str, object] = {"batch_size": 7, "pause_s": 0.0, **settings}
    return Retention(RetentionSettings.model_validate(values), EventRetention(db))


async def age(db: Database, sandbox_id: str, journal: str, *, through: int, days: float = 10.0) -> None:
    """Make the journal's events up to sequence ``through`` look received ``days`` ago."""
    async with db.begin() as conn:
        await conn.execute(
            update(events_table)
            .where(
                events_table.c.sandbox_id == sandbox_id,
                events_table.c.journal_epoch == journal,
                events_table.c.sequence <= through,
            )
            .values(received_at=utcnow() - timedelta(days=days))
        )


async def stored(db: Database, sandbox_id: str, journal: str) -> list[tuple[int, str]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            select(events_table.c.sequence, events_table.c.kind)
            .where(events_table.c.sandbox_id == sandbox_id, events_table.c.journal_epoch == journal)
            .order_by(events_table.c.sequence)
        )
        return [(int(r[0]), str(r[1])) for r in rows]


# -- scenarios shared with the PostgreSQL integration test ---------------------------------------


async def check_age_bound(db: Database) -> None:
    """Old log lines go; new ones, lifecycle and gap records, and each journal's newest row stay."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    # A journal whose every row is old: its newest is its resume point. (Stored first: ids grow
    # with the time of receipt, which is what the walk relies on.)
    assert await events.store_events("sb", "e0", [line(s) for s in range(1, 11)]) == 10
    await age(db, "sb", "e0", through=10)
    batch = [line(s) for s in range(1, 101)]
    batch[9] = Event(10, TS, LifecycleRecord(LifecycleKind.STARTED, pid=7))
    batch[19] = Event(20, TS, GapRecord(GapReason.OVERFLOW, 5, 500, 11, 15))
    assert await events.store_events("sb", "e1", batch) == 100
    await age(db, "sb", "e1", through=80)

    result = await retention(db).run_once()

    assert result.deleted == {"log": 78 + 9}
    young = [(s, "log") for s in range(81, 101)]
    assert await stored(db, "sb", "e1") == [(10, "lifecycle"), (20, "gap"), *young]
    assert await stored(db, "sb", "e0") == [(10, "log")]
    # Nothing left to do: a second run deletes nothing.
    assert (await retention(db).run_once()).total == 0

    # The lifecycle and gap records go by their own age only.
    result = await retention(db, lifecycle_max_age_s=5 * DAY).run_once()
    assert result.deleted == {"lifecycle": 1, "gap": 1}


async def check_resume_after_retention(db: Database) -> None:
    """A supervisor that resumes after retention deleted all but its journal's last row resumes at
    the same mark: its replay stores each line once, none refused; upstream records keep counting."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    assert await events.store_events("sb", "j", [line(s) for s in range(1, 51)]) == 50
    await events.append_unsequenced("sb", [(TS, LogRecord(LogStream.STDOUT, f"up {i}")) for i in range(5)])
    await age(db, "sb", "j", through=50)
    await age(db, "sb", UNSEQUENCED_EPOCH, through=5)
    assert (await retention(db).run_once()).deleted == {"log": 49 + 4}

    # The mark a hello reads: unchanged, so the supervisor sends what follows it.
    assert await events.high_water_mark("sb", "j") == 50
    # Its replay, as after a cut between the store and the acknowledgement: the batch that was
    # stored (45-50, of which 50 is still there) and what followed. Nothing refused, 50 not twice.
    assert await events.store_events("sb", "j", [line(s) for s in range(45, 61)]) == 60
    assert await events.store_events("sb", "j", [line(s) for s in range(51, 61)]) == 60
    kept = await stored(db, "sb", "j")
    assert [s for s, _ in kept] == [45, 46, 47, 48, 49, 50, *range(51, 61)]
    # The upstream path numbers after its old mark, not from 1 again.
    await events.append_unsequenced("sb", [(TS, LogRecord(LogStream.STDOUT, "after"))])
    assert [s for s, _ in await stored(db, "sb", UNSEQUENCED_EPOCH)] == [5, 6]


async def check_size_bound(db: Database) -> None:
    """Past max_bytes, the oldest log lines go, whatever their age, and what is left fits."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    payload = "x" * 936  # 1,000 bytes a row with the overhead
    assert await events.store_events("sb", "j", [line(s, payload) for s in range(1, 201)]) == 200
    metrics = GatewayMetrics(SessionRegistry())
    run = Retention(
        RetentionSettings(max_age_s=None, max_bytes=50_000, batch_size=13, pause_s=0.0),
        EventRetention(db),
        metrics=metrics,
    )
    result = await run.run_once()
    assert result.deleted == {"log": 150}
    assert [s for s, _ in await stored(db, "sb", "j")] == list(range(151, 201))
    totals = await EventRetention(db).totals(with_bytes=True)
    assert totals.rows == 50 and totals.bulk_bytes == 50_000
    assert (
        metrics.registry.get_sample_value("openshell_gateway_retention_deleted_events_total", {"kind": "log"})
        == 150
    )
    assert metrics.registry.get_sample_value("openshell_gateway_retained_events") == 50


async def check_writers_keep_flowing(db: Database, *, rows: int, bound_s: float) -> tuple[float, float]:
    """While retention deletes ``rows`` old rows, another sandbox's batches keep being stored: no
    store waits longer than ``bound_s``, and none waits for the whole deletion. Returns the
    deletion's duration and the longest store."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("old")
    await sandboxes.ensure("live")
    chunk = 2000
    for start in range(1, rows + 1, chunk):
        await events.store_events("old", "j", [line(s) for s in range(start, min(start + chunk, rows + 1))])
    await age(db, "old", "j", through=rows)

    latencies: list[float] = []
    during: list[float] = []
    stop = asyncio.Event()
    deleting = asyncio.Event()

    async def writer() -> None:
        seq = 0
        while not stop.is_set():
            batch = [line(s) for s in range(seq + 1, seq + 101)]
            began = time.monotonic()
            await events.store_events("live", "w", batch, known_high_water_mark=seq)
            took = time.monotonic() - began
            latencies.append(took)
            if deleting.is_set():
                during.append(took)
            seq += 100
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.2)
        deleting.set()
        began = time.monotonic()
        result = await retention(db, batch_size=1000, pause_s=0.01).run_once()
        deletion_s = time.monotonic() - began
        deleting.clear()
    finally:
        stop.set()
        await task
    assert result.deleted == {"log": rows - 1}
    worst = max(during)
    assert len(during) >= 5, f"only {len(during)} stores during a {deletion_s:.2f}s deletion"
    assert worst < bound_s, f"a store waited {worst:.3f}s (deletion {deletion_s:.2f}s)"
    assert worst < deletion_s / 2, f"a store waited {worst:.3f}s of a {deletion_s:.2f}s deletion"
    return deletion_s, worst


class Statements:
    """Counts the statements on the ``events`` table sent through a database's engine."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        event.listen(db.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FROM events" in statement:
            self.count += 1


async def interleaved(db: Database, *, journals: int, rows: int) -> None:
    """``journals`` journals of sandbox sb, stored a row of each at a time (as a fleet logs), all old."""
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    for s in range(1, rows + 1):
        for j in range(journals):
            await events.store_events("sb", f"j{j}", [line(s)])
    async with db.begin() as conn:
        await conn.execute(update(events_table).values(received_at=utcnow() - timedelta(days=10)))


async def check_statements_per_page(db: Database) -> None:
    """A page costs one read and one delete, however many journals it holds (the newest-row rule is
    inside them, not a lookup per journal); a later run starts after the rows the first settled."""
    await interleaved(db, journals=40, rows=5)
    store = EventRetention(db)
    run = Retention(RetentionSettings(batch_size=20, pause_s=0.0), store)
    statements = Statements(db)

    result = await run.run_once()

    # The measurement, then 200 rows in 10 full pages and an empty one: 11 reads, and a delete for
    # each of the 8 pages holding sequences 1-4 (the last two hold only the newest rows).
    assert statements.count == 1 + 11 + 8, statements.count
    assert result.deleted == {"log": 40 * 4}
    assert [s for s, _ in await stored(db, "sb", "j7")] == [5]
    async with db.engine.connect() as conn:
        last = await conn.scalar(select(events_table.c.id).order_by(events_table.c.id.desc()).limit(1))
    assert store.walk_start == last

    # Only the 40 newest rows are left, kept for good: the next run reads past them, not through.
    statements.count = 0
    assert (await run.run_once()).total == 0
    assert statements.count == 1 + 1, statements.count


async def check_full_walk_catches_resumed_journal(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal's kept newest row that a later record made deletable lies before the walk's start:
    the next walk from id 0 (every FULL_WALK_S, and the first after a start) deletes it."""
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    await events.store_events("sb", "idle", [line(s) for s in range(1, 4)])
    await age(db, "sb", "idle", through=3)
    store = EventRetention(db)
    run = Retention(RetentionSettings(batch_size=2, pause_s=0.0), store)
    assert (await run.run_once()).deleted == {"log": 2}
    await events.store_events("sb", "idle", [line(4)])  # the journal resumes, 3 is no longer its newest

    assert (await run.run_once()).total == 0  # 3 is before the start: kept, for now
    monkeypatch.setattr(store_retention, "FULL_WALK_S", 0.0)
    assert (await run.run_once()).deleted == {"log": 1}
    assert await stored(db, "sb", "idle") == [(4, "log")]
    # A new process (a restart) walks from id 0 at once.
    assert EventRetention(db).walk_start == 0


# -- SQLite ----------------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    yield database
    await database.close()


async def test_age_bound(db: Database) -> None:
    await check_age_bound(db)


async def test_resume_after_retention(db: Database) -> None:
    await check_resume_after_retention(db)


async def test_size_bound(db: Database) -> None:
    await check_size_bound(db)


async def test_writers_keep_flowing(db: Database) -> None:
    # SQLite has one write lock: a store waits at most for one 1,000-row delete (measured here:
    # a few ms to some tens on a loaded 2-core machine), never for the 40,000-row run. 1 s is far
    # above one batch and far below the run on this machine.
    deletion_s, worst = await check_writers_keep_flowing(db, rows=40_000, bound_s=1.0)
    print(f"SQLite: 40,000 rows deleted in {deletion_s:.2f}s, longest store {worst * 1000:.1f} ms")


async def test_retention_task_runs_and_stops(db: Database) -> None:
    """The loop (as the gateway spawns it) runs a first time, and ends at its cancellation."""
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    await events.store_events("sb", "j", [line(s) for s in range(1, 11)])
    await age(db, "sb", "j", through=10)
    loop = Retention(RetentionSettings(interval_s=0.05, pause_s=0.0), EventRetention(db))
    task = asyncio.create_task(loop.run())
    await until(lambda: _one_left(db), within=10, what="the retention run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _one_left(db: Database) -> bool:
    return len(await stored(db, "sb", "j")) == 1


async def test_statements_per_page(db: Database) -> None:
    await check_statements_per_page(db)


async def test_full_walk_catches_resumed_journal(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await check_full_walk_catches_resumed_journal(db, monkeypatch)


async def test_failed_delete_does_not_move_the_start(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk's start moves past a page only once its delete succeeded: a run that failed
    (the database away) leaves its rows to the next run, not to the next walk from id 0."""
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    await events.store_events("sb", "j", [line(s) for s in range(1, 11)])
    await age(db, "sb", "j", through=10)
    store = EventRetention(db)
    run = Retention(RetentionSettings(batch_size=4, pause_s=0.0), store)
    real_delete = store.delete

    async def failing(ids: list[int]) -> object:
        raise StoreError("the database is away")

    monkeypatch.setattr(store, "delete", failing)
    with pytest.raises(StoreError):
        await run.run_once()
    assert store.walk_start == 0
    monkeypatch.setattr(store, "delete", real_delete)
    assert (await run.run_once()).deleted == {"log": 9}


async def test_sqlite_plans_probe_the_unique_index(db: Database) -> None:
    """SQLite: the page is a range of the rowid, the delete rowid lookups, and each row's newest
    sequence one search of the unique (sandbox_id, journal_epoch, sequence) index."""
    async with db.engine.connect() as conn:
        indexes = (await conn.exec_driver_sql("PRAGMA index_list(events)")).all()
        unique = None
        for index in indexes:
            columns = (await conn.exec_driver_sql(f"PRAGMA index_info('{index[1]}')")).all()
            if [c[2] for c in columns] == ["sandbox_id", "journal_epoch", "sequence"]:
                unique = str(index[1])
        assert unique is not None, indexes
        for statement, walk in (
            (page_query(5, batch_size=1000), "SEARCH events USING INTEGER PRIMARY KEY (rowid>?)"),
            (delete_statement([1, 2, 3]), "SEARCH events USING INTEGER PRIMARY KEY (rowid=?)"),
        ):
            sql = str(statement.compile(db.engine, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(str(r[3]) for r in await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
            assert walk in plan, plan
            assert f"SEARCH newer USING COVERING INDEX {unique} (sandbox_id=? AND journal_epoch=?)" in plan, (
                plan
            )
            assert "SCAN" not in plan, plan


async def test_totals_count_on_sqlite(db: Database) -> None:
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    await events.store_events("sb", "j", [line(s) for s in range(1, 11)])
    totals = await EventRetention(db).totals(with_bytes=False)
    assert (totals.rows, totals.exact) == (10, True)
    async with db.engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM events")) == 10


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RetentionSettings.model_validate({"batch_size": 0})
    with pytest.raises(ValueError, match="max_age_s"):
        RetentionSettings.model_validate({"max_age_s": -1})
