"""The event store: journal records in, log tails and follow streams out.

Supervisors send numbered records (sequence per journal epoch) and replay whatever was not
acknowledged after a reconnect, so the same record may arrive twice. Each batch is stored in one
transaction with ON CONFLICT DO NOTHING on (sandbox, journal epoch, sequence): a replayed record
costs nothing and is stored once, which makes delivery exactly-once in effect. The answer to a
batch is the high-water mark, the highest sequence stored for that journal, which is what the
gateway acknowledges and what a reconnecting supervisor resumes after. A live session knows the
mark (its resume point, then its last acknowledgement), so its batches are not followed by a
query for it: after the commit, the mark is at least the batch's last sequence.

Records from the upstream paths (PushSandboxLogs, ReportMainProcessExit) carry no sequence; the
gateway numbers them itself under the empty journal epoch, one sandbox at a time.

Health records (``supervisor.health``) are stored with kind ``health`` and their numbers in ``data``;
they never touch the sandbox row.

An EXITED lifecycle record also sets the sandbox's exit code in the same transaction, so that the
exit shown by the API and the record in the log can never disagree. An exit is recorded once per
run of the main process: a run begins with a STARTED record (the supervisor journals one for each
start, restarts under ``process.restart`` included), which clears the sandbox's exit; the first
EXITED after it sets the exit, and any later one for the same run (a duplicate or late report, or
a second source) leaves it as it is, with a log line. Journaled records are still stored as they
came (the journal is the supervisor's account, and its sequence must not have holes); an upstream
``ReportMainProcessExit`` that would be ignored is not stored at all. So the sandbox's final exit
is the exit of the last run its supervisor started, whatever arrives after it.

Each event carries the generation of its sandbox when it was stored (``sandboxes.generation``,
read by the INSERT itself, so no extra round trip): the events of a deleted sandbox stay apart from
those of a sandbox created again under its id. Reads take a generation; without one they span all.

Readers of a live log wait on an in-process notifier that each commit pokes. It only says "look
again"; the database stays the source of truth, and waits are bounded, so a missed poke costs at
most one timeout. (With several replicas, PostgreSQL LISTEN/NOTIFY will carry the same poke.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Insert, Select, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.db import Database, StoreError, describe_error, store_errors, utcnow
from gateway.store.schema import UNSEQUENCED_EPOCH
from gateway.store.schema import events as events_table
from gateway.store.schema import sandboxes as sandboxes_table
from openshell_wire.convert import MAX_SEQUENCE, STREAM_FROM_PB, WireError, describe, event_from_proto
from openshell_wire.records import (
    Event,
    HealthRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    Payload,
)
from openshell_wire.v1 import openshell_pb2 as pb

if TYPE_CHECKING:
    from gateway.rpc import RateLimitedLog

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    sandbox_id: str
    journal_epoch: str
    sequence: int
    timestamp_ms: int
    kind: str
    stream: str | None
    message: str
    data: dict[str, Any] | None
    generation: int = 1


class EventNotifier:
    """Wakes the readers of one sandbox's events when new ones have been committed."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}

    def notify(self, sandbox_id: str) -> None:
        # Popping makes the next waiter start from a fresh, unset event: one poke per commit.
        pending = self._events.pop(sandbox_id, None)
        if pending is not None:
            pending.set()

    # The timeout is part of the contract, not a convenience: a poke can be missed between a
    # reader's query and its wait, and the bounded wait is what makes that harmless.
    async def wait_for_new(self, sandbox_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once something new was stored for ``sandbox_id``, or after ``timeout`` seconds."""
        pending = self._events.get(sandbox_id)
        if pending is None:
            pending = self._events[sandbox_id] = asyncio.Event()
        self._waiters[sandbox_id] = self._waiters.get(sandbox_id, 0) + 1
        try:
            async with asyncio.timeout(timeout):
                await pending.wait()
        except TimeoutError:
            pass
        finally:
            left = self._waiters[sandbox_id] - 1
            if left:
                self._waiters[sandbox_id] = left
            else:
                # Without this, every sandbox ever followed would keep an entry forever.
                del self._waiters[sandbox_id]
                if self._events.get(sandbox_id) is pending:
                    del self._events[sandbox_id]


_EVENT_COLUMNS = (
    events_table.c.id,
    events_table.c.sandbox_id,
    events_table.c.journal_epoch,
    events_table.c.sequence,
    events_table.c.timestamp_ms,
    events_table.c.kind,
    events_table.c.stream,
    events_table.c.message,
    events_table.c.data,
    events_table.c.generation,
)


def _stored(row: Row[Any]) -> StoredEvent:
    return StoredEvent(
        id=row.id,
        sandbox_id=row.sandbox_id,
        journal_epoch=row.journal_epoch,
        sequence=row.sequence,
        timestamp_ms=row.timestamp_ms,
        kind=row.kind,
        stream=row.stream,
        message=row.message,
        data=json.loads(row.data) if row.data is not None else None,
        generation=int(row.generation),
    )


#: The columns of an inserted event, in the order of the precompiled INSERT's parameters.
_INSERT_COLUMNS = (
    "sandbox_id",
    "journal_epoch",
    "sequence",
    "timestamp_ms",
    "kind",
    "stream",
    "message",
    "data",
    "received_at",
)


#: The parameters of the precompiled INSERT: the columns above, then the sandbox id again for the
#: subquery that reads the sandbox's current generation.
_INSERT_PARAMS = (*_INSERT_COLUMNS, "gen_sandbox_id")
#: The events' generation, read from the sandbox row by the INSERT itself.
_GENERATION = (
    select(sandboxes_table.c.generation)
    .where(sandboxes_table.c.id == bindparam("gen_sandbox_id"))
    .scalar_subquery()
)

#: The ``data`` of a log row whose line continues in the next record (see ``_row``).
_CONTINUED_DATA = json.dumps({"continued": True}, separators=(",", ":"))
#: Protobuf log stream number -> the ``stream`` column.
_STREAM_VALUE = {number: stream.value for number, stream in STREAM_FROM_PB.items()}


def _text(message: str) -> str:
    """PostgreSQL text cannot hold NUL; store U+FFFD in its place on every database alike."""
    return message.replace("\x00", "\ufffd") if "\x00" in message else message


def _row(
    sandbox_id: str, epoch: str, *, sequence: int, timestamp_ms: int, payload: Payload, received_at: Any
) -> tuple[Any, ...]:
    kind: str
    stream: str | None = None
    data: dict[str, Any] | None
    if isinstance(payload, LogRecord):
        # The hot path (hundreds of lines per batch): no describe(), no JSON unless needed.
        kind, stream, message = "log", payload.stream.value, _text(payload.message)
        data = {"continued": True} if payload.continued else None
    else:
        message = describe(Event(sequence=sequence, timestamp_ms=timestamp_ms, payload=payload))
        if isinstance(payload, LifecycleRecord):
            kind = "lifecycle"
            data = {
                "kind": payload.kind.value,
                "pid": payload.pid,
                "exit_code": payload.exit_code,
                "signal": payload.signal,
                "argv": list(payload.argv),
                "detail": payload.detail,
                "instance_id": payload.instance_id,
                "duration_ms": payload.duration_ms,
            }
        elif isinstance(payload, HealthRecord):
            kind = "health"
            data = {
                "state": payload.state.value,
                "reasons": list(payload.reasons),
                "change": payload.change,
                "cpu_percent": payload.cpu_percent,
                "rss_bytes": payload.rss_bytes,
                "threads": payload.threads,
                "open_files": payload.open_files,
                "processes": payload.processes,
                "memory_current": payload.memory_current,
                "memory_max": payload.memory_max,
                "oom_kills": payload.oom_kills,
                "cpu_throttled_usec": payload.cpu_throttled_usec,
                "pids_current": payload.pids_current,
                "pids_max": payload.pids_max,
                "disks": [
                    {"path": d.path, "used_bytes": d.used_bytes, "total_bytes": d.total_bytes}
                    for d in payload.disks
                ],
            }
        else:
            kind = "gap"
            data = {
                "reason": payload.reason.value,
                "dropped_records": payload.dropped_records,
                "dropped_bytes": payload.dropped_bytes,
                "first_sequence": payload.first_sequence,
                "last_sequence": payload.last_sequence,
                "detail": payload.detail,
            }
    return (
        sandbox_id,
        epoch,
        sequence,
        timestamp_ms,
        kind,
        stream,
        message,
        json.dumps(data, separators=(",", ":")) if data is not None else None,
        received_at,
        sandbox_id,
    )


@dataclass(frozen=True, slots=True)
class ExitState:
    """What a batch's lifecycle records do to the sandbox's exit (see the module docstring)."""

    #: A STARTED came: a new run, so the row's exit is replaced by ``exit`` (None: cleared).
    new_run: bool
    #: (exit code, exited at) of the first EXITED after the batch's last STARTED (or in the batch).
    exit: tuple[int, datetime] | None
    #: Exit codes of further EXITED records of that same run: duplicates, not recorded.
    repeated: tuple[int, ...] = ()


def _exit_state(items: Sequence[tuple[int, Payload]], received_at: datetime) -> ExitState | None:
    found: ExitState | None = None
    for timestamp_ms, payload in items:
        if not isinstance(payload, LifecycleRecord):
            continue
        if payload.kind is LifecycleKind.EXITED:
            # The supervisor's observation time says when it exited; a record without one (the
            # upstream path sometimes) falls back to when we heard of it.
            at = datetime.fromtimestamp(timestamp_ms / 1000, UTC) if timestamp_ms > 0 else received_at
            if found is None:
                found = ExitState(new_run=False, exit=(payload.exit_code, at))
            elif found.exit is None:
                found = ExitState(new_run=found.new_run, exit=(payload.exit_code, at))
            else:
                found = ExitState(found.new_run, found.exit, (*found.repeated, payload.exit_code))
        elif payload.kind is LifecycleKind.STARTED:
            # A new run of the main process: an earlier exit no longer describes the sandbox.
            found = ExitState(new_run=True, exit=None)
    return found


_ignored_exits: RateLimitedLog | None = None


def _log_ignored(sandbox_id: str, codes: Sequence[int], kept: int | None, source: str) -> None:
    """One line for the exits of one call that were ignored; at most one a minute for the same run
    and source, so a peer repeating its report cannot flood the log."""
    global _ignored_exits  # noqa: PLW0603 - made on first use: gateway.rpc imports the store
    if not codes:
        return
    if _ignored_exits is None:
        from gateway.rpc import RateLimitedLog  # noqa: PLC0415 - see above

        _ignored_exits = RateLimitedLog(log)
    which = ", ".join(str(c) for c in codes)
    recorded = f"exit code {kept}" if kept is not None else "by a concurrent report"
    _ignored_exits.log(
        logging.INFO,
        ("exit-ignored", sandbox_id, source, kept),
        f"sandbox {sandbox_id}: exit code {which} from {source} ignored: this run's exit is already "
        f"recorded ({recorded})",
        extra={"sandbox_id": sandbox_id},
    )


def _without_repeated_exits(
    sandbox_id: str, items: Sequence[tuple[int, Payload]], recorded: int | None
) -> list[tuple[int, Payload]]:
    """``items`` without the EXITED records of a run that has its exit already (``recorded``, or
    an earlier EXITED in ``items``): such a report is a duplicate, and would contradict the exit
    the sandbox shows."""
    kept: list[tuple[int, Payload]] = []
    ignored: list[int] = []
    exit_code = recorded
    for timestamp_ms, payload in items:
        if isinstance(payload, LifecycleRecord):
            if payload.kind is LifecycleKind.STARTED:
                exit_code = None
            elif payload.kind is LifecycleKind.EXITED:
                if exit_code is not None:
                    ignored.append(payload.exit_code)
                    continue
                exit_code = payload.exit_code
        kept.append((timestamp_ms, payload))
    _log_ignored(sandbox_id, ignored, exit_code, "upstream report")
    return kept


class _Shared:
    """What every EventStore over one Database must share, however many of them are made."""

    def __init__(self) -> None:
        # A follower made by the API must hear the commits of the store the sessions write with,
        # and two stores numbering the same sandbox must take the same lock.
        self.notifier = EventNotifier()
        self.locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


_shared: weakref.WeakKeyDictionary[Database, _Shared] = weakref.WeakKeyDictionary()


class EventStore:
    """Stores and reads the events of sandboxes; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db
        shared = _shared.get(db)
        if shared is None:
            shared = _shared[db] = _Shared()
        self._notifier = shared.notifier
        self._locks = shared.locks
        # Batches of log lines are the gateway's hottest write. Through Core, SQLAlchemy builds and
        # type-processes a parameter dict per row, which halves the rate SQLite can take; so both
        # INSERTs are compiled once, for this dialect, and executed with plain tuples (executemany).
        unique = ["sandbox_id", "journal_epoch", "sequence"]
        idempotent: Insert
        if db.dialect == "postgresql":
            idempotent = (
                postgresql.insert(events_table)
                .values(generation=_GENERATION)
                .on_conflict_do_nothing(index_elements=unique)
            )
        else:
            idempotent = (
                sqlite.insert(events_table)
                .values(generation=_GENERATION)
                .on_conflict_do_nothing(index_elements=unique)
            )
        self._idempotent_sql = self._compile(idempotent)
        # A plain insert for the events we number ourselves: a collision there is a numbering bug
        # and must fail loudly, not vanish the way a replay does.
        self._append_sql = self._compile(insert(events_table).values(generation=_GENERATION))
        self._sqlite = db.dialect == "sqlite"

    def notifier(self) -> EventNotifier:
        return self._notifier

    async def wait_for_new(self, sandbox_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once events were committed for ``sandbox_id``, or after ``timeout`` seconds."""
        await self._notifier.wait_for_new(sandbox_id, timeout)

    def _compile(self, statement: Insert) -> str:
        compiled = statement.compile(
            dialect=self._db.engine.dialect, column_keys=list(_INSERT_COLUMNS), for_executemany=True
        )
        order = getattr(compiled, "positiontup", None)
        if not getattr(compiled, "positional", False) or list(order or ()) != list(_INSERT_PARAMS):
            raise StoreError(f"the {self._db.dialect} driver does not take positional parameters")
        return str(compiled)

    def _bind_received_at(self, at: datetime) -> Any:
        # Done once per batch instead of once per row, which is the point of the raw path.
        process = events_table.c.received_at.type.bind_processor(self._db.engine.dialect)
        return process(at) if process is not None else at

    @staticmethod
    async def _hwm(conn: AsyncConnection, sandbox_id: str, journal_epoch: str) -> int:
        top = await conn.scalar(
            select(func.max(events_table.c.sequence)).where(
                events_table.c.sandbox_id == sandbox_id, events_table.c.journal_epoch == journal_epoch
            )
        )
        return int(top) if top is not None else 0

    @staticmethod
    async def _record_exit(
        conn: AsyncConnection, sandbox_id: str, exit_: ExitState | None, *, source: str
    ) -> None:
        if exit_ is None:
            return
        code, at = exit_.exit if exit_.exit is not None else (None, None)
        ignored, kept = list(exit_.repeated), code
        if exit_.new_run:
            await conn.execute(
                update(sandboxes_table)
                .where(sandboxes_table.c.id == sandbox_id)
                .values(exit_code=code, exited_at=at)
            )
        elif code is not None:
            # Only a run without an exit yet takes one: conditional, so two reports racing on
            # PostgreSQL also keep the first.
            result = await conn.execute(
                update(sandboxes_table)
                .where(sandboxes_table.c.id == sandbox_id, sandboxes_table.c.exit_code.is_(None))
                .values(exit_code=code, exited_at=at)
            )
            if result.rowcount == 0:
                kept = await conn.scalar(
                    select(sandboxes_table.c.exit_code).where(sandboxes_table.c.id == sandbox_id)
                )
                ignored.insert(0, code)
        _log_ignored(sandbox_id, ignored, kept, source)

    async def store_events(
        self,
        sandbox_id: str,
        journal_epoch: str,
        events: Sequence[Event],
        *,
        known_high_water_mark: int | None = None,
    ) -> int:
        """Store a batch idempotently; return the high-water mark of (sandbox, journal epoch).

        With ``known_high_water_mark`` (what the caller last learned of the mark, e.g. the
        session's resume point and its last acknowledgement) the mark is not read back: once the
        transaction has committed, every sequence in the batch is stored, so the answer is the
        larger of the two. It may under-report a mark raised meanwhile by someone else, which only
        costs an idempotent resend. The sandbox must already be registered (``SandboxStore.ensure``).
        """
        if not events:
            if known_high_water_mark is not None:
                return known_high_water_mark
            return await self.high_water_mark(sandbox_id, journal_epoch)
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        rows = [
            _row(
                sandbox_id,
                journal_epoch,
                sequence=e.sequence,
                timestamp_ms=e.timestamp_ms,
                payload=e.payload,
                received_at=stored_at,
            )
            for e in events
        ]
        exit_ = _exit_state([(e.timestamp_ms, e.payload) for e in events if not e.is_log], received_at)
        last = max(e.sequence for e in events)
        return await self._store_rows(
            sandbox_id,
            journal_epoch,
            rows,
            exit_=exit_,
            last_sequence=last,
            known_high_water_mark=known_high_water_mark,
        )

    async def store_wire_batch(
        self,
        sandbox_id: str,
        journal_epoch: str,
        events: Iterable[pb.Event],
        *,
        known_high_water_mark: int,
    ) -> int:
        """Validate and store the events of an ``EventBatch`` straight from their protobuf form.

        Stores exactly the rows that ``store_events`` stores for the same events decoded with
        ``event_from_proto``, and answers as it does with ``known_high_water_mark``. Log lines, the
        hot path, become rows without an intermediate record; lifecycle and gap records go through
        the decoder. Raises :class:`WireError` (and stores nothing) for an event the decoder
        rejects or a sequence that does not ascend.
        """
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        rows: list[tuple[Any, ...]] = []
        others: list[tuple[int, Payload]] = []
        streams = _STREAM_VALUE
        previous = 0
        for raw in events:
            sequence = raw.sequence
            if sequence and sequence <= MAX_SEQUENCE and raw.WhichOneof("kind") == "log":
                line = raw.log
                stream = streams.get(line.stream)
                if stream is None:
                    raise WireError(f"event {sequence}: unknown log stream {line.stream}")
                if sequence <= previous:
                    raise WireError(f"sequence {sequence} after {previous}: events must ascend")
                rows.append(
                    (
                        sandbox_id,
                        journal_epoch,
                        sequence,
                        raw.timestamp_ms,
                        "log",
                        stream,
                        _text(line.message),
                        _CONTINUED_DATA if line.continued else None,
                        stored_at,
                        sandbox_id,
                    )
                )
            else:
                event = event_from_proto(raw)
                if sequence <= previous:
                    raise WireError(f"sequence {sequence} after {previous}: events must ascend")
                rows.append(
                    _row(
                        sandbox_id,
                        journal_epoch,
                        sequence=sequence,
                        timestamp_ms=event.timestamp_ms,
                        payload=event.payload,
                        received_at=stored_at,
                    )
                )
                if not event.is_log:
                    others.append((event.timestamp_ms, event.payload))
            previous = sequence
        if not rows:
            return known_high_water_mark
        exit_ = _exit_state(others, received_at) if others else None
        return await self._store_rows(
            sandbox_id,
            journal_epoch,
            rows,
            exit_=exit_,
            last_sequence=previous,
            known_high_water_mark=known_high_water_mark,
        )

    async def _store_rows(
        self,
        sandbox_id: str,
        journal_epoch: str,
        rows: list[tuple[Any, ...]],
        *,
        exit_: ExitState | None,
        last_sequence: int,
        known_high_water_mark: int | None,
    ) -> int:
        what = f"cannot store events for sandbox {sandbox_id!r} (journal {journal_epoch!r})"
        if self._sqlite and exit_ is None and known_high_water_mark is not None:
            await self._insert_sqlite(what, rows)
            self._notifier.notify(sandbox_id)
            return max(known_high_water_mark, last_sequence)
        with store_errors(what):
            async with self._db.engine.begin() as conn:
                await conn.exec_driver_sql(self._idempotent_sql, rows)
                await self._record_exit(conn, sandbox_id, exit_, source=f"journal {journal_epoch!r}")
                if known_high_water_mark is None:
                    hwm = await self._hwm(conn, sandbox_id, journal_epoch)
                else:
                    # Committed below: every sequence of the batch is then stored.
                    hwm = max(known_high_water_mark, last_sequence)
        self._notifier.notify(sandbox_id)
        return hwm

    async def _insert_sqlite(self, what: str, rows: list[tuple[Any, ...]]) -> None:
        """One transaction of ``rows`` on the aiosqlite driver connection itself.

        Through SQLAlchemy, a batch costs about ten round trips to the driver's thread (begin,
        execute, commit, cursor and pool bookkeeping), which with batches of a few hundred lines
        is as much as the inserts themselves. The driver begins the transaction implicitly before
        the INSERT (its default isolation level), so this is two round trips, plus the pool's
        rollback on check-in, which is a no-op after the commit.
        """
        with store_errors(what):
            async with self._db.engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                try:
                    await driver.executemany(self._idempotent_sql, rows)
                    await driver.commit()
                except sqlite3.Error as exc:
                    # The pool's reset on check-in rolls the transaction back.
                    raise StoreError(f"{what}: {describe_error(exc)}") from exc

    async def high_water_mark(self, sandbox_id: str, journal_epoch: str) -> int:
        """The highest sequence stored for (sandbox, journal epoch); 0 when there is none."""
        with store_errors(f"cannot read the high-water mark of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return await self._hwm(conn, sandbox_id, journal_epoch)

    def _lock_for(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = self._locks[sandbox_id] = asyncio.Lock()
        return lock

    async def append_unsequenced(self, sandbox_id: str, items: Sequence[tuple[int, Payload]]) -> None:
        """Store records that came without sequence numbers, numbering them after the last one.

        An EXITED record for a run whose exit is already recorded (an upstream supervisor's
        report sent again, or a late one) is dropped with a log line: see the module docstring.
        """
        if not items:
            return
        what = f"cannot append events for sandbox {sandbox_id!r}"
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        lock = self._lock_for(sandbox_id)
        async with lock:
            with store_errors(what):
                async with self._db.engine.begin() as conn:
                    # On PostgreSQL the row lock serialises replicas numbering the same sandbox (the
                    # asyncio lock only covers this process); SQLite renders no FOR UPDATE, and
                    # being single-process it needs none.
                    found = (
                        await conn.execute(
                            select(sandboxes_table.c.id, sandboxes_table.c.exit_code)
                            .where(sandboxes_table.c.id == sandbox_id)
                            .with_for_update()
                        )
                    ).first()
                    if found is None:
                        raise StoreError(f"{what}: no such sandbox")
                    kept = _without_repeated_exits(sandbox_id, items, found.exit_code)
                    if not kept:
                        return
                    exit_ = _exit_state(kept, received_at)
                    top = await self._hwm(conn, sandbox_id, UNSEQUENCED_EPOCH)
                    rows = [
                        _row(
                            sandbox_id,
                            UNSEQUENCED_EPOCH,
                            sequence=top + i,
                            timestamp_ms=ts,
                            payload=payload,
                            received_at=stored_at,
                        )
                        for i, (ts, payload) in enumerate(kept, start=1)
                    ]
                    await conn.exec_driver_sql(self._append_sql, rows)
                    await self._record_exit(conn, sandbox_id, exit_, source="upstream report")
        self._notifier.notify(sandbox_id)

    async def _select(self, what: str, query: Select[Any]) -> list[StoredEvent]:
        with store_errors(what):
            async with self._db.engine.connect() as conn:
                result = await conn.execute(query)
                return [_stored(row) for row in result]

    @staticmethod
    def _of(query: Select[Any], generation: int | None, kinds: Sequence[str] | None) -> Select[Any]:
        if generation is not None:
            query = query.where(events_table.c.generation == generation)
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(list(kinds)))
        return query

    async def tail(
        self,
        sandbox_id: str,
        limit: int = 100,
        *,
        kinds: Sequence[str] | None = None,
        generation: int | None = None,
    ) -> list[StoredEvent]:
        """The last ``limit`` events of the sandbox (optionally of ``kinds`` only, of one
        ``generation`` only), oldest first."""
        query = self._of(
            select(*_EVENT_COLUMNS).where(events_table.c.sandbox_id == sandbox_id), generation, kinds
        )
        query = query.order_by(events_table.c.id.desc()).limit(limit)
        found = await self._select(f"cannot read the events of sandbox {sandbox_id!r}", query)
        found.reverse()
        return found

    async def after(
        self,
        sandbox_id: str,
        after_id: int,
        limit: int = 1000,
        *,
        kinds: Sequence[str] | None = None,
        generation: int | None = None,
    ) -> list[StoredEvent]:
        """Events with an id above ``after_id``, oldest first: the next page of a follow."""
        query = self._of(
            select(*_EVENT_COLUMNS).where(
                events_table.c.sandbox_id == sandbox_id, events_table.c.id > after_id
            ),
            generation,
            kinds,
        )
        query = query.order_by(events_table.c.id).limit(limit)
        return await self._select(f"cannot read the events of sandbox {sandbox_id!r}", query)

    async def count(self, sandbox_id: str, *, generation: int | None = None) -> int:
        query = self._of(
            select(func.count()).select_from(events_table).where(events_table.c.sandbox_id == sandbox_id),
            generation,
            None,
        )
        with store_errors(f"cannot count the events of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                n = await conn.scalar(query)
                return int(n or 0)


__all__ = ["EventNotifier", "EventStore", "StoredEvent"]
