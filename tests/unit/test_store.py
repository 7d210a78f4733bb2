"""The gateway's store against a real, temporary SQLite file.

The ``check_*`` coroutines take an open database of any dialect; the PostgreSQL integration test
runs the same ones, so both backends are held to one behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

import gateway.store.events
from gateway.ratelimit import RateLimitedLog
from gateway.server import OpenShellService
from gateway.sessions import Outbound, SessionRegistry
from gateway.store import (
    UNSEQUENCED_EPOCH,
    CommandRow,
    CommandStore,
    Database,
    EventStore,
    SandboxRow,
    SandboxStore,
    StoreError,
    migrate,
)
from gateway.store.db import create_engine, packaged_heads, upgrade
from gateway.store.sandboxes import Owners
from gateway.store.schema import metadata
from openshell_wire.convert import WireError, event_to_proto
from openshell_wire.records import (
    CAP_COMMANDS,
    CommandKind,
    Event,
    GapReason,
    GapRecord,
    JournalEpoch,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
    Payload,
    SandboxId,
)
from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.gateway import gateway_config

T0 = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)
TS = 1_764_072_000_000  # 2025-11-25T12:00:00Z


def log(seq: int, message: str | None = None) -> Event:
    return Event(seq, TS + seq, LogRecord(LogStream.STDOUT, message or f"line {seq}"))


def exited(seq: int, code: int, *, ts: int = TS) -> Event:
    return Event(seq, ts, LifecycleRecord(LifecycleKind.EXITED, pid=42, exit_code=code))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state/gateway.db"


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    database = await Database.open(sqlite_url)
    yield database
    await database.close()


# -- scenarios shared with tests/integration/test_store_postgres.py -------------------------------


async def check_schema(db: Database) -> None:
    async with db.engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    # The packaged head, whatever it is now: a new revision must not need this test edited.
    assert set(version) == packaged_heads() and len(version) == 1
    assert {"sandboxes", "events", "signing_keys", "alembic_version"} <= tables


async def check_migrations_match_schema(db: Database) -> None:
    def diff(conn: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def check_idempotent_store(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    assert await events.high_water_mark("sb", "e1") == 0
    batch = [log(s) for s in range(1, 11)]
    assert await events.store_events("sb", "e1", batch) == 10
    assert await events.store_events("sb", "e1", batch) == 10  # a replay: nothing new
    assert await events.store_events("sb", "e1", [log(s) for s in range(5, 16)]) == 15
    assert await events.count("sb") == 15
    assert await events.high_water_mark("sb", "e1") == 15
    # A new journal epoch (a supervisor that lost its journal) numbers from 1 again.
    assert await events.store_events("sb", "e2", [log(1, "again")]) == 1
    assert await events.high_water_mark("sb", "e1") == 15
    stored = await events.tail("sb", 100)
    assert [(e.journal_epoch, e.sequence) for e in stored] == [("e1", s) for s in range(1, 16)] + [("e2", 1)]
    assert stored[0].message == "line 1" and stored[0].kind == "log" and stored[0].stream == "stdout"
    # An empty batch reports the mark without writing.
    assert await events.store_events("sb", "e1", []) == 15


async def check_wire_batch_stores_what_store_events_stores(db: Database) -> None:
    """The protobuf fast path stores exactly the rows of the record path, for every kind."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    batch = [
        log(1),
        Event(2, TS, LogRecord(LogStream.STDERR, "é tab\t", continued=True)),
        Event(3, 0, LogRecord(LogStream.SUPERVISOR, "")),
        Event(4, TS, LifecycleRecord(LifecycleKind.STARTED, pid=7, argv=("sh", "-c", "x"), instance_id="i")),
        Event(5, TS, GapRecord(GapReason.OVERFLOW, 3, 300, 5, 7)),
        log(8, "x" * 20_000),
        Event(9, TS + 9, LifecycleRecord(LifecycleKind.EXITED, pid=7, exit_code=137, signal=9)),
    ]
    assert await events.store_events("sb", "slow", batch) == 9
    wire = pb.EventBatch(events=[event_to_proto(e) for e in batch])
    assert await events.store_wire_batch("sb", "fast", wire.events, known_high_water_mark=0) == 9
    # A replay is stored once; the answer is the larger of the known mark and the batch's last.
    assert await events.store_wire_batch("sb", "fast", wire.events, known_high_water_mark=12) == 12
    assert await events.store_wire_batch("sb", "fast", wire.events[:0], known_high_water_mark=9) == 9
    assert await events.store_events("sb", "slow", batch[:2], known_high_water_mark=5) == 5

    async with db.engine.connect() as conn:
        found = (
            await conn.execute(
                text(
                    "SELECT journal_epoch, sequence, timestamp_ms, kind, stream, message, data "
                    "FROM events WHERE sandbox_id = 'sb' ORDER BY journal_epoch, sequence"
                )
            )
        ).all()
    slow = [tuple(row[1:]) for row in found if row[0] == "slow"]
    fast = [tuple(row[1:]) for row in found if row[0] == "fast"]
    assert len(slow) == len(batch)
    assert fast == slow
    row = await sandboxes.get("sb")
    assert row is not None and row.exit_code == 137


async def check_wire_batch_rejects_what_the_decoder_rejects(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")

    def wire(*items: pb.Event) -> Any:
        return pb.EventBatch(events=list(items)).events

    good = event_to_proto(log(1))
    bad_stream = pb.Event(sequence=2, log=pb.LogEvent(stream=99, message="x"))  # type: ignore[arg-type]
    cases = {
        "without a sequence": wire(pb.Event(log=pb.LogEvent(stream=pb.LOG_STREAM_STDOUT))),
        "unknown log stream 99": wire(good, bad_stream),
        "no known kind": wire(good, pb.Event(sequence=2)),
        "sequence 1 after 1: events must ascend": wire(good, good),
    }
    for reason, batch in cases.items():
        with pytest.raises(WireError, match=reason):
            await events.store_wire_batch("sb", "e1", batch, known_high_water_mark=0)
    assert await events.count("sb") == 0  # a rejected batch stores nothing


async def check_exit_updates_sandbox(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await events.store_events("sb", "e1", [log(1), exited(2, 137, ts=TS + 5000), log(3, "flushed")])
    row = await sandboxes.get("sb")
    assert row is not None
    assert row.exit_code == 137
    assert row.exited_at == datetime.fromtimestamp((TS + 5000) / 1000, UTC)
    lifecycle = await events.tail("sb", 10, kinds=["lifecycle"])
    assert len(lifecycle) == 1
    assert lifecycle[0].message == "main process 42 exited with code 137"
    assert lifecycle[0].data is not None and lifecycle[0].data["exit_code"] == 137
    assert lifecycle[0].data["kind"] == "exited"


async def check_restart_clears_exit_and_nul_survives(db: Database) -> None:
    """A new run of the main process clears the old exit; a NUL byte (which PostgreSQL text
    cannot hold) is stored as U+FFFD instead of failing the batch forever."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await events.store_events("sb", "e1", [exited(1, 3)])
    started = Event(2, TS, LifecycleRecord(LifecycleKind.STARTED, pid=43))
    await events.store_events("sb", "e1", [started, log(3, "a\x00b")])
    row = await sandboxes.get("sb")
    assert row is not None and row.exit_code is None and row.exited_at is None
    wire = pb.Event(sequence=4, timestamp_ms=TS)
    wire.log.stream = pb.LOG_STREAM_STDOUT
    wire.log.message = "c\x00d"
    await events.store_wire_batch("sb", "e1", [wire], known_high_water_mark=3)
    assert [e.message for e in await events.tail("sb", 2)] == ["a\ufffdb", "c\ufffdd"]


async def check_append_unsequenced(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")

    async def push(n: int) -> None:
        items: list[tuple[int, Payload]] = [
            (TS + i, LogRecord(LogStream.STDERR, f"push {n} line {i}")) for i in range(5)
        ]
        await events.append_unsequenced("sb", items)

    await asyncio.gather(*(push(n) for n in range(10)))
    stored = await events.tail("sb", 100)
    assert [e.sequence for e in stored] == list(range(1, 51))
    assert {e.journal_epoch for e in stored} == {UNSEQUENCED_EPOCH}
    # Each call's lines stay together and in order.
    for start in range(0, 50, 5):
        chunk = stored[start : start + 5]
        assert len({e.message.split(" line ")[0] for e in chunk}) == 1
        assert [e.message.split(" line ")[1] for e in chunk] == ["0", "1", "2", "3", "4"]
    await events.append_unsequenced("sb", [(0, LifecycleRecord(LifecycleKind.EXITED, pid=7, exit_code=3))])
    row = await sandboxes.get("sb")
    assert row is not None and row.exit_code == 3 and row.exited_at is not None
    assert await events.high_water_mark("sb", UNSEQUENCED_EPOCH) == 51


def started(seq: int, *, ts: int = TS) -> Event:
    return Event(seq, ts, LifecycleRecord(LifecycleKind.STARTED, pid=42))


async def check_exit_recorded_once(db: Database) -> None:
    """A run's first exit stays: a late or repeated report (journaled, unsequenced, from the wire)
    changes nothing; a new run (STARTED) takes its own exit."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    first_at = datetime.fromtimestamp((TS + 5) / 1000, UTC)
    await events.store_events("sb", "e1", [started(1), exited(2, 3, ts=TS + 5)])

    async def exit_of() -> tuple[int | None, datetime | None]:
        row = await sandboxes.get("sb")
        assert row is not None
        return row.exit_code, row.exited_at

    assert await exit_of() == (3, first_at)
    # A late report in the same journal, and one in another batch of the wire path: kept as records
    # (the journal has no holes), but the sandbox's exit stays the first.
    await events.store_events("sb", "e1", [exited(3, 0, ts=TS + 9)])
    wire = pb.EventBatch(events=[event_to_proto(exited(4, 1, ts=TS + 10))])
    await events.store_wire_batch("sb", "e1", wire.events, known_high_water_mark=3)
    assert await exit_of() == (3, first_at)
    assert await events.count("sb") == 4
    # An upstream ReportMainProcessExit for the exited run: ignored, and not stored either.
    await events.append_unsequenced("sb", [(TS + 20, LifecycleRecord(LifecycleKind.EXITED, exit_code=0))])
    assert await exit_of() == (3, first_at)
    assert await events.high_water_mark("sb", UNSEQUENCED_EPOCH) == 0
    # A restart is a new run: its exit is the sandbox's; a second exit in one batch is not.
    await events.store_events("sb", "e1", [started(5), exited(6, 1, ts=TS + 30), exited(7, 9, ts=TS + 31)])
    assert await exit_of() == (1, datetime.fromtimestamp((TS + 30) / 1000, UTC))
    # Upstream: a run's exit counts once there too, and only after the run started.
    await sandboxes.ensure("up")
    report = LifecycleRecord(LifecycleKind.EXITED, exit_code=5)
    await events.append_unsequenced("up", [(TS, report), (TS + 1, report)])
    await events.append_unsequenced("up", [(TS + 2, LifecycleRecord(LifecycleKind.EXITED, exit_code=6))])
    row = await sandboxes.get("up")
    assert row is not None and row.exit_code == 5
    assert await events.count("up") == 1


async def check_exit_moves_only_by_a_newer_run(db: Database) -> None:
    """A replayed or late lifecycle record cannot move the exit: a STARTED begins a new run only if
    it is later in the run's journal or from the journal connected now, an EXITED counts only if
    it follows the current run's STARTED."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")

    async def connect(session: str, epoch: str) -> None:
        await sandboxes.mark_connected(
            "sb", instance_id="i1", session_id=session, journal_epoch=epoch, owner="gw", at=T0
        )

    async def exit_code() -> int | None:
        row = await sandboxes.get("sb")
        assert row is not None
        return row.exit_code

    await connect("s1", "e1")
    first_run = [started(1), exited(2, 1, ts=TS + 2)]
    await events.store_events("sb", "e1", first_run)
    await events.store_events("sb", "e1", [started(3), exited(4, 0, ts=TS + 4)])
    assert await exit_code() == 0
    # The first run sent again (a replay after a reconnect), on both paths: the newer run's exit stays.
    await events.store_events("sb", "e1", first_run)
    wire = pb.EventBatch(events=[event_to_proto(e) for e in first_run])
    await events.store_wire_batch("sb", "e1", wire.events, known_high_water_mark=0)
    assert await exit_code() == 0
    assert await events.count("sb") == 4, "and nothing is stored twice"

    # A new pod's journal (e2) connects and starts its run; then a late pair of the old journal
    # arrives (its session still draining): e2's run is the sandbox's, running, then exited 0.
    await connect("s2", "e2")
    await events.store_events("sb", "e2", [started(1)])
    assert await exit_code() is None
    await events.store_events("sb", "e1", [started(5), exited(6, 137, ts=TS + 6)])
    assert await exit_code() is None, "an older journal's late run does not count"
    await events.store_events("sb", "e1", [exited(7, 137, ts=TS + 7)])
    assert await exit_code() is None
    await events.store_events("sb", "e2", [exited(2, 0, ts=TS + 8)])
    assert await exit_code() == 0
    await events.store_events("sb", "e1", [started(8), exited(9, 137, ts=TS + 9)])
    row = await sandboxes.get("sb")
    assert row is not None and row.exit_code == 0 and (row.run_epoch, row.run_sequence) == ("e2", 1)


def gap(seq: int, reason: GapReason = GapReason.WRITE_FAILED) -> Event:
    return Event(seq, TS + seq, GapRecord(reason, 1, 0, seq, seq, detail="No space left on device"))


async def check_exit_after_a_gap(db: Database) -> None:
    """A restart whose STARTED was lost in a gap (a write failure, a corrupt record) still shows
    its exit: a gap after the recorded exit leaves the run unknown, and the next EXITED is its
    exit. A gap before the recorded exit proves nothing, and a repeat still changes nothing."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")

    async def exit_code() -> int | None:
        row = await sandboxes.get("sb")
        assert row is not None
        return row.exit_code

    await events.store_events("sb", "e1", [started(1), gap(2, GapReason.CORRUPT), exited(3, 1)])
    assert await exit_code() == 1
    await events.store_events("sb", "e1", [exited(4, 7)])
    assert await exit_code() == 1, "the gap at 2 came before the run's exit: no restart hides in it"
    # The restart's STARTED (5) could not be written; its exit, in a later batch, is the sandbox's.
    await events.store_events("sb", "e1", [gap(6), log(7)])
    await events.store_events("sb", "e1", [exited(8, 0)])
    assert await exit_code() == 0
    await events.store_events("sb", "e1", [exited(9, 9)])
    assert await exit_code() == 0, "a second exit with no gap before it is still ignored"
    # In one batch, on the wire path too.
    wire = pb.EventBatch(events=[event_to_proto(e) for e in (gap(10), exited(11, 2))])
    await events.store_wire_batch("sb", "e1", wire.events, known_high_water_mark=9)
    assert await exit_code() == 2
    # Another journal's gap does not open this one's run.
    await events.store_events("sb", "e0", [gap(20), exited(21, 5)])
    assert await exit_code() == 2


async def check_events_keep_their_sessions_generation(db: Database) -> None:
    """A batch the old sandbox's supervisor had in flight when the id was created again is stored
    under the generation its session began with, and does not touch the new sandbox's row."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    assert await sandboxes.create("sb", driver="kubernetes") == 1
    session_generation = (await sandboxes.ensure("sb")).generation
    await events.store_events("sb", "e1", [started(1)], generation=session_generation)
    assert await sandboxes.create("sb", driver="kubernetes", replaces=lambda row: True) == 2

    batch = pb.EventBatch(events=[event_to_proto(e) for e in (log(2, "late"), exited(3, 137))])
    await events.store_wire_batch("sb", "e1", batch.events, known_high_water_mark=1, generation=1)
    await events.store_events("sb", "e1", [exited(4, 9)], generation=1)
    assert await events.count("sb", generation=2) == 0
    assert [e.sequence for e in await events.tail("sb", 10, generation=1)] == [1, 2, 3, 4]
    # The old session's connection writes are refused too; the new sandbox's own are not.
    at = T0 + timedelta(seconds=5)
    assert not await sandboxes.mark_connected(
        "sb", instance_id="old", session_id="s-old", journal_epoch="e1", owner="gw", at=at, generation=1
    )
    row = await sandboxes.get("sb")
    assert row is not None and row.generation == 2
    assert row.exit_code is None and row.session_id is None and row.run_epoch is None
    assert await sandboxes.mark_connected(
        "sb", instance_id="new", session_id="s-new", journal_epoch="e2", owner="gw", at=at, generation=2
    )
    assert not await sandboxes.mark_disconnected("sb", session_id="s-new", at=at, generation=1)
    assert await sandboxes.mark_disconnected("sb", session_id="s-new", at=at, generation=2)


async def check_list_by_owner(db: Database) -> None:
    """The list's owner filter and paging run in the query: created by the person or of one of
    their teams; a filter naming nobody and no team matches nothing; a re-created id has its new
    creator."""
    store = SandboxStore(db)
    for n, (owner, team) in enumerate([("bob", None), ("dora", "/t/y"), ("alice", "/t/x"), (None, None)] * 3):
        await store.create(f"sb-{n:02d}", driver="test", created_by=owner, team=team)
    bobs = Owners(created_by="bob", teams=["/t/y"])
    assert [r.id for r in await store.list(owners=bobs)] == [
        "sb-00",
        "sb-01",
        "sb-04",
        "sb-05",
        "sb-08",
        "sb-09",
    ]
    assert [r.id for r in await store.list(owners=bobs, limit=4, after="sb-00")] == [
        "sb-01",
        "sb-04",
        "sb-05",
        "sb-08",
    ]
    assert [r.id for r in await store.list(owners=Owners(created_by=None, teams=["/t/x"]))] == [
        "sb-02",
        "sb-06",
        "sb-10",
    ]
    assert await store.list(owners=Owners(created_by=None)) == []
    assert len(await store.list()) == 12
    row = await store.get("sb-02")
    assert row is not None and (row.created_by, row.team) == ("alice", "/t/x")
    assert await store.create("sb-02", driver="test", created_by="bob", replaces=lambda _: True) == 2
    row = await store.get("sb-02")
    assert row is not None and (row.created_by, row.team) == ("bob", None)


async def check_recreate_after_delete(db: Database) -> None:
    """An id whose sandbox is gone can be created again, as the next generation: the row is the
    new sandbox's, the old events stay readable under their generation, old commands fail."""
    sandboxes, events, commands = SandboxStore(db), EventStore(db), CommandStore(db)
    assert await sandboxes.create("sb", driver="kubernetes", spec={"image": "a:1"}) == 1
    await sandboxes.mark_connected(
        "sb", instance_id="i1", session_id="s1", journal_epoch="e1", owner="gw", at=T0
    )
    await events.store_events("sb", "e1", [log(1, "old"), exited(2, 3)])
    pending = await commands.create("sb", CommandKind.STOP, grace_ms=0)

    assert await sandboxes.create("sb", driver="kubernetes") is None, "taken, nothing says it is gone"
    assert await sandboxes.create("sb", driver="kubernetes", replaces=lambda row: False) is None
    assert (await sandboxes.get("sb")).generation == 1  # type: ignore[union-attr]

    # Two creates that both judged generation 1 gone: each waits until both have read the row
    # (where the database lets them: PostgreSQL does; SQLite has one writer, and its no-op insert
    # already holds the other back), so only the update conditional on the generation it read
    # can keep the second from taking the id over again.
    seen: list[int] = []
    both_read = asyncio.Event()

    async def judged_gone(row: SandboxRow) -> bool:
        seen.append(row.generation)
        if len(seen) == 2:
            both_read.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await both_read.wait()
        return row.generation == 1

    winners = await asyncio.gather(
        *(
            sandboxes.create("sb", driver="kubernetes", spec={"image": "b:2"}, replaces=judged_gone)
            for _ in range(2)
        )
    )
    if db.dialect == "postgresql":
        assert seen == [1, 1], "both creates read generation 1"
    assert sorted(winners, key=lambda g: g or 0) == [None, 2], "exactly one create takes the id"
    row = await sandboxes.get("sb")
    assert row is not None and row.generation == 2 and row.spec == {"image": "b:2"}
    assert row.exit_code is None and row.exited_at is None and not row.connected
    assert row.session_id is None and row.journal_epoch is None and row.last_heartbeat_at is None
    old_command = await commands.get(pending.command.command_id)
    assert (
        old_command is not None
        and old_command.state == "failed"
        and "created again" in (old_command.error or "")
    )

    await events.store_events("sb", "e2", [log(1, "new")])
    assert [(e.message, e.generation) for e in await events.tail("sb", 10, generation=2)] == [("new", 2)]
    old = await events.tail("sb", 10, generation=1)
    assert [e.message for e in old] == ["old", "main process 42 exited with code 3"]
    assert {e.generation for e in old} == {1}
    assert await events.count("sb", generation=1) == 2 and await events.count("sb") == 3
    newest = await events.tail("sb", 1)
    assert [e.id for e in await events.after("sb", 0, generation=2)] == [newest[0].id]


async def check_migration_keeps_rows_as_generation_one(db: Database) -> None:
    """Rows written before 0004 (here: through the 0003 schema) read as generation 1."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO sandboxes (id, driver, created_at) VALUES ('old', 'external', :at)"), {"at": T0}
        )
        await conn.execute(
            text(
                "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, message, "
                "received_at) VALUES ('old', 'e1', 1, 0, 'log', 'before', :at)"
            ),
            {"at": T0},
        )
    await upgrade(db.engine)
    await check_schema(db)
    row = await SandboxStore(db).get("old")
    assert row is not None and row.generation == 1
    stored = await EventStore(db).tail("old", 10, generation=1)
    assert [(e.message, e.generation) for e in stored] == [("before", 1)]


async def check_sessions(db: Database) -> None:
    sandboxes = SandboxStore(db)
    await sandboxes.ensure("sb", driver="kubernetes", spec={"image": "busybox"})
    await sandboxes.mark_connected(
        "sb", instance_id="i1", session_id="old", journal_epoch="e1", owner="gw-a", at=T0
    )
    later = T0 + timedelta(seconds=5)
    await sandboxes.mark_connected(
        "sb", instance_id="i1", session_id="new", journal_epoch="e1", owner="gw-b", at=later
    )
    # The old stream's teardown runs after the new session registered: it must change nothing.
    assert not await sandboxes.mark_disconnected("sb", session_id="old", at=later)
    row = await sandboxes.get("sb")
    assert row is not None
    assert row.connected and row.session_id == "new" and row.owner == "gw-b" and row.disconnected_at is None
    assert row.driver == "kubernetes" and row.spec == {"image": "busybox"}
    end = later + timedelta(seconds=1)
    assert await sandboxes.mark_disconnected("sb", session_id="new", at=end)
    assert not await sandboxes.mark_disconnected("sb", session_id="new", at=end)
    row = await sandboxes.get("sb")
    assert row is not None and not row.connected and row.disconnected_at == end


async def check_heartbeats(db: Database) -> None:
    sandboxes = SandboxStore(db)
    for sid in ("a", "b", "c"):
        await sandboxes.ensure(sid)
    beats = {"a": T0, "b": T0 + timedelta(seconds=1), "unknown": T0}
    await sandboxes.record_heartbeats(beats)
    await sandboxes.record_heartbeats({})
    rows = {r.id: r for r in await sandboxes.list()}
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"].last_heartbeat_at == T0
    assert rows["b"].last_heartbeat_at == T0 + timedelta(seconds=1)
    assert rows["c"].last_heartbeat_at is None


async def check_tail_and_after(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await sandboxes.ensure("other")
    gap = Event(6, TS, GapRecord(GapReason.OVERFLOW, 3, 300, 3, 5))
    await events.store_events("sb", "e1", [log(1), log(2), gap, log(7), log(8)])
    await events.store_events("other", "e1", [log(1, "not mine")])
    tail = await events.tail("sb", 3)
    assert [e.sequence for e in tail] == [6, 7, 8]
    assert tail[0].id < tail[1].id < tail[2].id
    assert tail[0].kind == "gap" and tail[0].data is not None and tail[0].data["dropped_records"] == 3
    assert [e.sequence for e in await events.tail("sb", 10, kinds=["log"])] == [1, 2, 7, 8]
    everything = await events.tail("sb", 100)
    assert [e.sequence for e in await events.after("sb", everything[1].id)] == [6, 7, 8]
    assert [e.sequence for e in await events.after("sb", everything[1].id, limit=2)] == [6, 7]
    assert await events.after("sb", everything[-1].id) == []
    assert await events.count("sb") == 5 and await events.count("other") == 1


# -- SQLite -----------------------------------------------------------------------------------------


async def test_migrations_create_the_schema(db: Database) -> None:
    assert db.dialect == "sqlite"
    await check_schema(db)
    await check_migrations_match_schema(db)


async def test_sqlite_connections_are_tuned(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
        assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 1  # NORMAL
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() > 0


async def test_migrating_twice_is_a_no_op(sqlite_url: str) -> None:
    await migrate(sqlite_url)
    first = await Database.open(sqlite_url)
    await SandboxStore(first).ensure("kept")
    await first.close()
    await migrate(sqlite_url)
    again = await Database.open(sqlite_url)
    try:
        await check_schema(again)
        assert await SandboxStore(again).get("kept") is not None
    finally:
        await again.close()


async def test_open_without_migrating_sees_the_existing_schema(sqlite_url: str) -> None:
    await migrate(sqlite_url)
    db = await Database.open(sqlite_url, migrate=False)
    try:
        await check_schema(db)
    finally:
        await db.close()


async def test_store_events_is_idempotent(db: Database) -> None:
    await check_idempotent_store(db)


async def test_wire_batch_stores_what_store_events_stores(db: Database) -> None:
    await check_wire_batch_stores_what_store_events_stores(db)


async def test_wire_batch_rejects_what_the_decoder_rejects(db: Database) -> None:
    await check_wire_batch_rejects_what_the_decoder_rejects(db)


async def test_an_exit_event_updates_the_sandbox(db: Database) -> None:
    await check_exit_updates_sandbox(db)


async def test_restart_clears_exit_and_nul_survives(db: Database) -> None:
    await check_restart_clears_exit_and_nul_survives(db)


async def test_append_unsequenced_numbers_concurrent_calls(db: Database) -> None:
    await check_append_unsequenced(db)


async def test_an_exit_is_recorded_once_per_run(
    db: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limiter is the module's: start this test with a fresh one, whatever ran before.
    monkeypatch.setattr(gateway.store.events, "_ignored_exits", RateLimitedLog(gateway.store.events.log))
    with caplog.at_level(logging.INFO, logger="gateway.store.events"):
        await check_exit_recorded_once(db)
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    # Repeats for the same run and source within a minute are left out: no flood from one peer.
    assert not any("exit code 1 from journal" in m for m in ignored), ignored
    assert any("exit code 0 from journal 'e1' ignored" in m and "shows exit code 3" in m for m in ignored), (
        ignored
    )
    assert any("from upstream report ignored" in m for m in ignored), ignored
    assert any("exit code 9" in m for m in ignored), "a second exit of one batch is named too"


async def test_an_exit_moves_only_by_a_newer_run(db: Database) -> None:
    await check_exit_moves_only_by_a_newer_run(db)


async def test_an_exit_after_a_gap_is_the_next_runs(db: Database) -> None:
    await check_exit_after_a_gap(db)


async def test_events_keep_their_sessions_generation(db: Database) -> None:
    await check_events_keep_their_sessions_generation(db)


async def test_a_deleted_sandbox_id_can_be_created_again(db: Database) -> None:
    await check_recreate_after_delete(db)


async def test_the_list_filters_by_owner_in_the_query(db: Database) -> None:
    await check_list_by_owner(db)


async def test_migration_0004_keeps_rows_as_generation_one(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        await upgrade(engine, "0003")
    finally:
        await engine.dispose()
    db = await Database.open(sqlite_url, migrate=False)
    try:
        await check_migration_keeps_rows_as_generation_one(db)
    finally:
        await db.close()


async def test_mark_disconnected_ignores_a_stale_session(db: Database) -> None:
    await check_sessions(db)


async def test_record_heartbeats(db: Database) -> None:
    await check_heartbeats(db)


async def test_tail_and_after_order(db: Database) -> None:
    await check_tail_and_after(db)


async def test_connecting_keeps_the_exit(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await events.store_events("sb", "e1", [exited(1, 0)])
    await sandboxes.mark_connected(
        "sb", instance_id="i2", session_id="s", journal_epoch="e1", owner="o", at=T0
    )
    row = await sandboxes.get("sb")
    assert row is not None and row.exit_code == 0 and row.connected


async def test_ensure_is_race_safe_and_keeps_the_first_registration(db: Database) -> None:
    sandboxes = SandboxStore(db)
    rows = await asyncio.gather(*(sandboxes.ensure("sb", spec={"n": n}) for n in range(10)))
    assert len({r.created_at for r in rows}) == 1
    assert len({str(r.spec) for r in rows}) == 1
    assert len(await sandboxes.list()) == 1


async def test_datetimes_come_back_aware_and_in_utc(db: Database) -> None:
    sandboxes = SandboxStore(db)
    await sandboxes.ensure("sb")
    local = T0.astimezone(timezone(timedelta(hours=-5)))
    await sandboxes.mark_connected(
        "sb", instance_id="i", session_id="s", journal_epoch="e", owner="o", at=local
    )
    row = await sandboxes.get("sb")
    assert row is not None and row.connected_at == T0 and row.connected_at.tzinfo == UTC
    assert row.created_at.tzinfo == UTC


async def test_delete_removes_the_events_too(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await events.store_events("sb", "e1", [log(1), log(2)])
    await sandboxes.delete("sb")
    assert await sandboxes.get("sb") is None
    assert await events.count("sb") == 0


async def test_unknown_sandbox_is_a_store_error(db: Database) -> None:
    events, sandboxes = EventStore(db), SandboxStore(db)
    with pytest.raises(StoreError, match="'ghost'"):
        await events.store_events("ghost", "e1", [log(1)])
    with pytest.raises(StoreError, match="no such sandbox"):
        await events.append_unsequenced("ghost", [(TS, LogRecord(LogStream.STDOUT, "x"))])
    with pytest.raises(StoreError, match="no such sandbox"):
        await sandboxes.mark_connected(
            "ghost", instance_id="i", session_id="s", journal_epoch="e", owner="o", at=T0
        )


async def test_wait_for_new_wakes_on_a_commit(db: Database) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    await sandboxes.ensure("other")
    waiter = asyncio.create_task(events.wait_for_new("sb", 30))
    other = asyncio.create_task(events.wait_for_new("sb", 30))
    await asyncio.sleep(0.01)
    await events.store_events("other", "e1", [log(1)])
    await asyncio.sleep(0.01)
    assert not waiter.done()  # another sandbox's events do not wake it
    await events.store_events("sb", "e1", [log(1)])
    async with asyncio.timeout(5):
        await asyncio.gather(waiter, other)
    async with asyncio.timeout(5):
        await events.append_unsequenced("sb", [(TS, LogRecord(LogStream.STDOUT, "x"))])
    # With nothing new it returns after the timeout, and leaves no bookkeeping behind.
    async with asyncio.timeout(5):
        await events.wait_for_new("sb", 0.01)
    assert events.notifier()._events == {} and events.notifier()._waiters == {}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "invalid database URL"),
        ("mysql://u:hunter2@db/x", "unsupported database URL"),
        (
            "postgresql://u:hunter2@127.0.0.1:1/x",
            "cannot open database postgresql+asyncpg://u:***@127.0.0.1:1/x",
        ),
    ],
)
async def test_bad_urls_give_a_readable_store_error(url: str, expected: str) -> None:
    with pytest.raises(StoreError) as caught:
        await Database.open(url)
    message = str(caught.value)
    assert expected in message
    assert "hunter2" not in message
    assert "\n" not in message


async def test_unwritable_path_gives_a_readable_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A regular file where a directory should be: fails even for root, unlike permission bits.
    url = f"sqlite:///{blocker}/sub/gateway.db"
    with pytest.raises(
        StoreError, match=r"cannot open database .*a-file/sub/gateway.db.*cannot create directory"
    ):
        await Database.open(url)
    with pytest.raises(StoreError, match="cannot open database"):
        await migrate(url)


async def test_event_stores_over_one_database_share_wakeups_and_numbering(db: Database) -> None:
    await SandboxStore(db).ensure("sb")
    writer, reader = EventStore(db), EventStore(db)
    waiter = asyncio.create_task(reader.wait_for_new("sb", 30))
    await asyncio.sleep(0.01)
    await writer.store_events("sb", "e1", [log(1)])
    async with asyncio.timeout(5):
        await waiter
    await asyncio.gather(
        *(
            store.append_unsequenced("sb", [(TS, LogRecord(LogStream.STDOUT, "x"))] * 3)
            for store in (writer, reader, writer, reader)
        )
    )
    assert await writer.high_water_mark("sb", UNSEQUENCED_EPOCH) == 12


async def test_a_command_is_delivered_only_to_a_session_of_its_generation(
    db: Database, tmp_path: Path
) -> None:
    """A command carries the generation its sandbox had when it was stored: a supervisor of the old
    sandbox still connected when the id was created again does not get the new one's command, and
    the new one does not get a command of the old one (which the re-creation failed)."""
    sandboxes, commands = SandboxStore(db), CommandStore(db)
    registry = SessionRegistry()
    service = OpenShellService(
        config=gateway_config(tmp_path),
        registry=registry,
        sandboxes=sandboxes,
        events=EventStore(db),
        commands=commands,
    )

    def connect(generation: int) -> asyncio.Queue[Any]:
        session = registry.open(
            sandbox_id=SandboxId("sb"),
            instance_id=f"i{generation}",
            journal_epoch=JournalEpoch(f"e{generation}"),
            capabilities=frozenset({CAP_COMMANDS}),
        )
        session.generation = generation
        return session.inbox

    def sent(inbox: asyncio.Queue[Any]) -> list[str]:
        """What a session's handler would write, each marked taken as the write does."""
        items = []
        while not inbox.empty():
            item = inbox.get_nowait()
            if isinstance(item, Outbound):
                items.append(item.message.command.command_id)
                item.taken.set_result(True)  # type: ignore[attr-defined]
        return items

    async def deliver(row: CommandRow, inbox: asyncio.Queue[Any]) -> tuple[bool, list[str]]:
        delivering = asyncio.create_task(service.deliver(row))
        await asyncio.sleep(0)  # queued (or refused) by now
        taken = sent(inbox)
        return await delivering, taken

    assert await sandboxes.create("sb", driver="kubernetes", driver_state={"phase": "Running"}) == 1
    old_inbox = connect(1)
    first = await commands.create("sb", CommandKind.SIGNAL, signal=10)
    assert first.generation == 1
    assert await deliver(first, old_inbox) == (True, [first.command.command_id])

    assert await sandboxes.create("sb", driver="kubernetes", replaces=lambda row: True) == 2
    second = await commands.create("sb", CommandKind.STOP, grace_ms=1000)
    assert second.generation == 2
    assert await deliver(second, old_inbox) == (False, []), "the live session is the old sandbox's"
    assert [c.command.command_id for c in await commands.pending("sb")] == [second.command.command_id]

    new_inbox = connect(2)
    assert not await service.deliver(first), "a command of the old sandbox does not reach the new one"
    assert await deliver(second, new_inbox) == (True, [second.command.command_id])
