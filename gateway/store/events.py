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
start, restarts under ``process.restart`` included), and the row keeps where the current run began
(``run_epoch``, ``run_sequence``). A STARTED begins a new run, clearing the exit, only if it is
newer than that: later in the same journal, or from another journal that is the one connected now
(a new journal epoch is a new pod's supervisor, and the newest-connected one wins); the first EXITED
of the current run (later in its journal) sets the exit. Anything else leaves the exit as it is,
with a log line: a replayed record, a late one of an earlier run or of an older journal, a second
EXITED of the same run, or a second source (an upstream ``ReportMainProcessExit`` counts for the
current run only while it has no exit yet). One exception: a gap record later in the run's journal
than both the run's STARTED and its last EXITED may hide a restart's STARTED (lost to a write
failure, corruption or overflow), so the next EXITED after the gap is the exit of the run begun, at
the latest, at the gap. Journaled records are still stored as they came (the
journal is the supervisor's account, and its sequence must not have holes); an upstream exit report
that is ignored is not stored at all. So the sandbox's exit is the exit of the newest run, whatever
arrives after it and however often. (A journal that connects after a newer one, as a second pod of
the same sandbox would, counts as the newest: one pod per sandbox is the driver's to ensure.)

Each event carries the generation of its sandbox that its writer names: a session's is the one its
hello found (the session handler passes it, and the INSERT binds it), so a batch the old sandbox's
supervisor still had in flight when the id was created again is stored as the old generation's,
and its lifecycle records do not touch the new sandbox's exit. The events of a deleted sandbox stay
apart from those of a sandbox created again under its id. Reads take a generation; without one they
span all.

A session's batches are fenced (:mod:`gateway.store.fencing`): with the ``owner_epoch`` its claim
returned, a batch is stored only while the sandbox's row still carries that epoch, checked in the
batch's own transaction; once a newer session has claimed the sandbox (the supervisor reconnected
to another replica while this one was paused), the batch raises ``Fenced`` and nothing of it is
committed, so nothing is acknowledged that the owner did not store.

Reads filter in SQL (:class:`LogQuery`: the record's own time, stream, level, a substring of the
message), on either database, and never drop a gap record by stream, level or text: a reader must
tell lost lines from no lines. A follow's page (:meth:`EventStore.page_after`) moves its cursor past
the rows it read whether they matched or not.

Readers of a live log wait on an in-process notifier that each commit pokes. It only says "look
again"; the database stays the source of truth, and waits are bounded, so a missed poke costs at
most one timeout (a reader takes a token before its read, so a poke between its read and its wait
is not missed). On PostgreSQL the replicas' readers are told by a note sent after the commit, not
in its transaction: a transaction that notifies takes a cluster-wide lock at its commit, held
through the WAL flush, which serialised every replica's event commits. The app forwards each
committed sandbox id to :meth:`gateway.notify.Notifier.soon`, which coalesces them (one statement
every few dozen milliseconds); a note lost on the way costs a follower one slow poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    and_,
    cast,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.ratelimit import RateLimitedLog
from gateway.store.db import Database, StoreError, describe_error, store_errors, utcnow
from gateway.store.fencing import Fenced, check_owner
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


#: Log levels from the least severe up, as the store keeps them (lower case, ``warning`` as
#: ``warn``: :func:`gateway.upstream_logs.normalize_level`). ``ocsf`` (an OCSF event's line) ranks
#: as ``info``, as upstream's own level filter ranks it.
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
_LEVEL_RANK = {**{name: rank for rank, name in enumerate(LOG_LEVELS)}, "ocsf": LOG_LEVELS.index("info")}


@dataclass(frozen=True, slots=True)
class LogQuery:
    """What a read keeps of a sandbox's events besides their kinds and generation; each field
    None (or empty) keeps everything. Every condition is evaluated by the database.

    - ``since_ms``/``until_ms``: the record's own time (``timestamp_ms``, the supervisor's clock
      when it journaled the record), inclusive at both ends; a record that came without one
      (0, possible on the upstream path) is placed by when the gateway received it.
    - ``streams``: log lines of those streams; records of other kinds have no stream and are left out.
    - ``min_level``: records at that level or above (one of :data:`LOG_LEVELS`): a structured line
      by its own level (a level this list does not know is kept, as upstream's filter keeps it);
      a lifecycle record is ``info``, a health record ``info`` when healthy and ``warn`` when not
      (the levels :func:`openshell_wire.convert.event_to_log_line` gives them). A captured line
      (stdout, stderr, the supervisor's own notes) carries no level and is left out: a line on
      stderr is not an error, and ``streams`` is the way to ask for stderr.
    - ``text``: log lines and records whose message contains it (case-sensitive, no pattern).

    Gap records are never dropped by ``streams``, ``min_level`` or ``text``: a reader must be able
    to tell lost lines from no lines. By time, a gap record is kept from ``since_ms`` on, also
    after ``until_ms``: the supervisor notes a loss at or after the lost records' time (an overflow
    is noted when the records are evicted, maybe long after they were written), so a gap noted
    after the range may stand for records inside it.
    """

    since_ms: int | None = None
    until_ms: int | None = None
    streams: tuple[str, ...] | None = None
    min_level: str | None = None
    text: str | None = None

    @property
    def narrows(self) -> bool:
        return any(
            v is not None for v in (self.since_ms, self.until_ms, self.streams, self.min_level)
        ) or bool(self.text)


def _at_or_after(at_ms: int, *, after: bool) -> ColumnElement[bool]:
    """The record's time is at or after (``after``) or at or before ``at_ms``."""
    ts, received = events_table.c.timestamp_ms, events_table.c.received_at
    at = datetime.fromtimestamp(at_ms / 1000, UTC)
    if after:
        return or_(and_(ts > 0, ts >= at_ms), and_(ts <= 0, received >= at))
    return or_(and_(ts > 0, ts <= at_ms), and_(ts <= 0, received <= at))


def _level_of_line(dialect: str) -> ColumnElement[Any]:
    """A log row's structured level (from its ``data``), NULL when it has none."""
    if dialect == "postgresql":
        level: ColumnElement[Any] = cast(events_table.c.data, JSONB)["level"].astext
        return level
    return func.json_extract(events_table.c.data, "$.level")


def _at_level(min_level: str, dialect: str) -> ColumnElement[bool]:
    """Records at ``min_level`` or above (see :class:`LogQuery`)."""
    floor = _LEVEL_RANK[min_level]
    kind = events_table.c.kind
    at_or_above = [name for name, rank in _LEVEL_RANK.items() if rank >= floor]
    level = _level_of_line(dialect)
    lines = and_(
        kind == "log",
        events_table.c.data.is_not(None),
        or_(level.in_(at_or_above), and_(level.is_not(None), level != "", level.not_in(list(_LEVEL_RANK)))),
    )
    info = floor <= _LEVEL_RANK["info"]
    warn = floor <= _LEVEL_RANK["warn"]
    # _row writes a health record's data with "state" first and no spaces.
    healthy = events_table.c.data.startswith('{"state":"healthy"')
    health = (kind == "health") if info else and_(kind == "health", ~healthy) if warn else false()
    lifecycle = (kind == "lifecycle") if info else false()
    return or_(lines, health, lifecycle)


def _contains(text: str, dialect: str) -> ColumnElement[bool]:
    """The message contains ``text``, case-sensitively (SQLite's LIKE ignores ASCII case)."""
    message = events_table.c.message
    if dialect == "postgresql":
        return func.strpos(message, text) > 0
    return func.instr(message, text) > 0


def _matching(query: LogQuery, dialect: str) -> ColumnElement[bool]:
    """The condition for the events ``query`` keeps (gap records as :class:`LogQuery` says)."""
    since = _at_or_after(query.since_ms, after=True) if query.since_ms is not None else true()
    content: list[ColumnElement[bool]] = [since]
    if query.until_ms is not None:
        content.append(_at_or_after(query.until_ms, after=False))
    if query.streams is not None:
        content.append(events_table.c.stream.in_(list(query.streams)))
    if query.min_level is not None:
        content.append(_at_level(query.min_level, dialect))
    if query.text:
        # The store keeps U+FFFD for NUL (``_text``), and PostgreSQL cannot bind a NUL.
        content.append(_contains(_text(query.text), dialect))
    return or_(and_(*content), and_(events_table.c.kind == "gap", since))


#: The sandboxes whose last poke an :class:`EventNotifier` remembers (the most recently poked):
#: a reader's token for one forgotten since only waits for its next poke or its timeout.
REMEMBERED_POKES = 10_000


class EventNotifier:
    """Wakes the readers of one sandbox's events when new ones have been committed."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        #: Pokes so far (the tokens of :meth:`watch`), and the last one of each sandbox, oldest
        #: first (bounded by REMEMBERED_POKES).
        self._pokes = 0
        self._last_poke: dict[str, int] = {}
        #: Called with the sandbox id of each commit made here (see :meth:`committed`).
        self.forward: Callable[[str], None] | None = None

    def watch(self, sandbox_id: str) -> int:
        """A token to take before a read: ``wait_for_new(..., since=token)`` then returns at once
        if a poke came since, which a wait begun after the read would otherwise miss."""
        return self._pokes

    def committed(self, sandbox_id: str) -> None:
        """Events of ``sandbox_id`` were committed by this process: wake its readers here and
        hand the id to ``forward`` (the notes to the other replicas, sent after the commit)."""
        self.notify(sandbox_id)
        if self.forward is not None:
            self.forward(sandbox_id)

    def notify(self, sandbox_id: str) -> None:
        self._pokes += 1
        self._last_poke.pop(sandbox_id, None)
        self._last_poke[sandbox_id] = self._pokes
        if len(self._last_poke) > REMEMBERED_POKES:
            del self._last_poke[next(iter(self._last_poke))]
        # Popping makes the next waiter start from a fresh, unset event: one poke per commit.
        pending = self._events.pop(sandbox_id, None)
        if pending is not None:
            pending.set()

    # The timeout is part of the contract, not a convenience: a poke missed all the same (a reader
    # without a token, a note lost between replicas) costs one timeout, not a hang.
    async def wait_for_new(
        self,
        sandbox_id: str,
        timeout: float,  # noqa: ASYNC109
        *,
        since: int | None = None,
    ) -> None:
        """Return once something new was stored for ``sandbox_id`` (since the token ``since`` of
        :meth:`watch`, when given), or after ``timeout`` seconds."""
        if since is not None and self._last_poke.get(sandbox_id, 0) > since:
            return
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
#: The claim a fenced batch checks on the SQLite fast path (``_insert_sqlite``).
_CLAIM_SQL = "SELECT owner_epoch, owner FROM sandboxes WHERE id = ?"

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
    "generation",
)

#: The ``data`` of a log row whose line continues in the next record (see ``_row``).
_CONTINUED_DATA = json.dumps({"continued": True}, separators=(",", ":"))
#: Protobuf log stream number -> the ``stream`` column.
_STREAM_VALUE = {number: stream.value for number, stream in STREAM_FROM_PB.items()}


def _text(message: str) -> str:
    """PostgreSQL text cannot hold NUL; store U+FFFD in its place on every database alike."""
    return message.replace("\x00", "\ufffd") if "\x00" in message else message


def _row(
    sandbox_id: str,
    epoch: str,
    *,
    sequence: int,
    timestamp_ms: int,
    payload: Payload,
    received_at: Any,
    generation: int,
) -> tuple[Any, ...]:
    kind: str
    stream: str | None = None
    data: dict[str, Any] | None
    if isinstance(payload, LogRecord):
        # The hot path (hundreds of lines per batch): no describe(), no JSON unless needed.
        kind, stream, message = "log", payload.stream.value, _text(payload.message)
        data = {"continued": True} if payload.continued else None
        if payload.level or payload.target or payload.fields:
            # A structured line (an upstream supervisor's): its level, target and fields are kept.
            data = dict(data or {})
            if payload.level:
                data["level"] = _text(payload.level)
            if payload.target:
                data["target"] = _text(payload.target)
            if payload.fields:
                data["fields"] = {_text(k): _text(v) for k, v in payload.fields}
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
        generation,
    )


#: A batch's STARTED and EXITED records: (sequence, timestamp in ms, record).
Lifecycle = list[tuple[int, int, LifecycleRecord]]


def _lifecycle(sequence: int, timestamp_ms: int, payload: Payload, into: Lifecycle) -> None:
    if isinstance(payload, LifecycleRecord) and payload.kind in (LifecycleKind.STARTED, LifecycleKind.EXITED):
        into.append((sequence, timestamp_ms, payload))


@dataclass(slots=True)
class _Run:
    """The sandbox row's exit and where its current run began, as lifecycle records move them
    (see the module docstring)."""

    exit_code: int | None
    exited_at: datetime | None
    run_epoch: str | None
    run_sequence: int | None
    #: The journal epoch of the sandbox's newest session: the newest-connected journal.
    current_epoch: str | None
    changed: bool = False

    def started(self, epoch: str, sequence: int) -> bool:
        """Whether a STARTED at (``epoch``, ``sequence``) begins a new run (then it is recorded)."""
        if epoch == self.run_epoch:
            newer = self.run_sequence is None or sequence > self.run_sequence
        else:
            # Another journal: a new pod's supervisor if it is the one connected now (or none is,
            # as with records stored without a session); else an older journal's late record.
            newer = self.current_epoch is None or epoch == self.current_epoch
        if newer:
            self.exit_code, self.exited_at = None, None
            self.run_epoch, self.run_sequence = epoch, sequence
            self.changed = True
        return newer

    def start_may_be_lost(self, epoch: str, sequence: int) -> int | None:
        """For an EXITED at (``epoch``, ``sequence``) while the current run has its exit: the
        position after which a gap record would mean a restart's STARTED may have been lost (the
        current run's STARTED, or -1 before any), or None when no gap could make it the current
        run's (another journal's, or an upstream report)."""
        if self.exit_code is None or epoch == UNSEQUENCED_EPOCH:
            return None
        if self.run_epoch is None:
            return -1 if epoch == self.current_epoch else None
        if epoch != self.run_epoch:
            return None
        if self.run_sequence is None:
            return -1
        return self.run_sequence if sequence > self.run_sequence else None

    def restarted_unseen(self, epoch: str, gap_sequence: int) -> None:
        """A gap at (``epoch``, ``gap_sequence``) after the current run's exit may hide a restart's
        STARTED: the run is unknown from there, and the next EXITED is its exit."""
        self.exit_code, self.exited_at = None, None
        self.run_epoch, self.run_sequence = epoch, gap_sequence
        self.changed = True

    def exited(self, epoch: str, sequence: int, code: int, at: datetime) -> bool:
        """Whether an EXITED at (``epoch``, ``sequence``) is the current run's exit (then it is
        recorded): the run has none yet, and the record follows its STARTED."""
        if self.exit_code is not None:
            return False
        if epoch == UNSEQUENCED_EPOCH:
            # An upstream report carries no position: it can only be about the current run.
            current = True
        elif self.run_epoch is None:
            current = self.current_epoch is None or epoch == self.current_epoch
        else:
            current = epoch == self.run_epoch and (self.run_sequence is None or sequence > self.run_sequence)
        if current:
            self.exit_code, self.exited_at = code, at
            self.changed = True
        return current


def _exit_time(timestamp_ms: int, received_at: datetime) -> datetime:
    # The supervisor's observation time says when it exited; a record without one (the upstream
    # path sometimes) falls back to when we heard of it.
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC) if timestamp_ms > 0 else received_at


_ignored_exits = RateLimitedLog(log)


def _log_ignored(sandbox_id: str, codes: Sequence[int], recorded: int | None, source: str) -> None:
    """One line for the exits of one call that were ignored; at most one a minute for the same run
    and source, so a peer repeating its report cannot flood the log."""
    if not codes:
        return
    which = ", ".join(str(c) for c in codes)
    shown = f"exit code {recorded}" if recorded is not None else "no exit yet"
    _ignored_exits.log(
        logging.INFO,
        ("exit-ignored", sandbox_id, source, recorded),
        f"sandbox {sandbox_id}: exit code {which} from {source} ignored: a repeated or late report "
        f"(the current run's exit is already recorded, or the report is of an earlier run); the "
        f"sandbox shows {shown}",
        extra={"sandbox_id": sandbox_id},
    )


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

    #: Told, after the commit, of a wire batch's gap, lifecycle and health records above the
    #: caller's known mark (new ones, not replays): the gateway's metrics (GatewayMetrics).
    on_records: Callable[[str, Sequence[Payload]], None] | None = None

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
            idempotent = postgresql.insert(events_table).on_conflict_do_nothing(index_elements=unique)
        else:
            idempotent = sqlite.insert(events_table).on_conflict_do_nothing(index_elements=unique)
        self._idempotent_sql = self._compile(idempotent)
        # A plain insert for the events we number ourselves: a collision there is a numbering bug
        # and must fail loudly, not vanish the way a replay does.
        self._append_sql = self._compile(insert(events_table))
        self._sqlite = db.dialect == "sqlite"

    def notifier(self) -> EventNotifier:
        return self._notifier

    def watch(self, sandbox_id: str) -> int:
        """See :meth:`EventNotifier.watch`."""
        return self._notifier.watch(sandbox_id)

    async def wait_for_new(
        self,
        sandbox_id: str,
        timeout: float,  # noqa: ASYNC109
        *,
        since: int | None = None,
    ) -> None:
        """Return once events were committed for ``sandbox_id`` (since the token of
        :meth:`watch`, when given), or after ``timeout`` seconds."""
        await self._notifier.wait_for_new(sandbox_id, timeout, since=since)

    def _compile(self, statement: Insert) -> str:
        compiled = statement.compile(
            dialect=self._db.engine.dialect, column_keys=list(_INSERT_COLUMNS), for_executemany=True
        )
        order = getattr(compiled, "positiontup", None)
        if not getattr(compiled, "positional", False) or list(order or ()) != list(_INSERT_COLUMNS):
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
    async def _generation(conn: AsyncConnection, sandbox_id: str) -> int:
        """The sandbox's current generation, for writers that have none of their own."""
        generation = await conn.scalar(
            select(sandboxes_table.c.generation).where(sandboxes_table.c.id == sandbox_id)
        )
        if generation is None:
            raise StoreError(f"no such sandbox {sandbox_id!r} (register it first)")
        return int(generation)

    @staticmethod
    async def _run_of(conn: AsyncConnection, sandbox_id: str, generation: int) -> _Run | None:
        """The row's exit and current run, locked until the transaction ends (on PostgreSQL: two
        batches, or replicas, applying lifecycle records to one sandbox take turns; SQLite has one
        writer at a time anyway); None when the row is of another generation now."""
        row = (
            await conn.execute(
                select(
                    sandboxes_table.c.exit_code,
                    sandboxes_table.c.exited_at,
                    sandboxes_table.c.run_epoch,
                    sandboxes_table.c.run_sequence,
                    sandboxes_table.c.journal_epoch,
                )
                .where(sandboxes_table.c.id == sandbox_id, sandboxes_table.c.generation == generation)
                .with_for_update()
            )
        ).first()
        if row is None:
            return None
        return _Run(
            exit_code=row.exit_code,
            exited_at=row.exited_at,
            run_epoch=row.run_epoch,
            run_sequence=row.run_sequence,
            current_epoch=row.journal_epoch,
        )

    @staticmethod
    async def _last_gap(
        conn: AsyncConnection,
        sandbox_id: str,
        journal_epoch: str,
        *,
        generation: int,
        after: int,
        before: int,
    ) -> int | None:
        """The sequence of the journal's last gap record strictly between ``after`` and ``before``
        and after its last EXITED record before ``before`` (a gap before the recorded exit cannot
        hide a later restart), or None. This batch's rows count: they are inserted first."""

        def last(*conditions: Any) -> Select[tuple[Any]]:
            return select(func.max(events_table.c.sequence)).where(
                events_table.c.sandbox_id == sandbox_id,
                events_table.c.journal_epoch == journal_epoch,
                events_table.c.generation == generation,
                events_table.c.sequence > after,
                events_table.c.sequence < before,
                *conditions,
            )

        gap = await conn.scalar(last(events_table.c.kind == "gap"))
        if gap is None:
            return None
        # _row writes a lifecycle record's data with "kind" first and no spaces.
        exit_before = await conn.scalar(
            last(events_table.c.kind == "lifecycle", events_table.c.data.startswith('{"kind":"exited"'))
        )
        return int(gap) if exit_before is None or gap > exit_before else None

    @staticmethod
    async def _save_run(conn: AsyncConnection, sandbox_id: str, generation: int, run: _Run) -> None:
        if not run.changed:
            return
        await conn.execute(
            update(sandboxes_table)
            .where(sandboxes_table.c.id == sandbox_id, sandboxes_table.c.generation == generation)
            .values(
                exit_code=run.exit_code,
                exited_at=run.exited_at,
                run_epoch=run.run_epoch,
                run_sequence=run.run_sequence,
            )
        )

    async def _apply_lifecycle(
        self,
        conn: AsyncConnection,
        sandbox_id: str,
        journal_epoch: str,
        *,
        generation: int,
        lifecycle: Lifecycle,
        received_at: datetime,
    ) -> None:
        """Move the sandbox's exit by a journal's STARTED and EXITED records, in their order."""
        run = await self._run_of(conn, sandbox_id, generation)
        if run is None:
            # The id was created again while this supervisor's batch was on its way: its records
            # are its own sandbox's (stored under its generation), not the new one's.
            log.info(
                "lifecycle records of sandbox %s generation %d not applied: the id has been created "
                "again since",
                sandbox_id,
                generation,
                extra={"sandbox_id": sandbox_id},
            )
            return
        ignored: list[int] = []
        for sequence, timestamp_ms, record in lifecycle:
            if record.kind is LifecycleKind.STARTED:
                run.started(journal_epoch, sequence)
                continue
            after = run.start_may_be_lost(journal_epoch, sequence)
            if after is not None:
                # Rare (an exit after the run's exit), so the query costs the hot path nothing.
                gap = await self._last_gap(
                    conn, sandbox_id, journal_epoch, generation=generation, after=after, before=sequence
                )
                if gap is not None:
                    run.restarted_unseen(journal_epoch, gap)
            if not run.exited(
                journal_epoch, sequence, record.exit_code, _exit_time(timestamp_ms, received_at)
            ):
                ignored.append(record.exit_code)
        await self._save_run(conn, sandbox_id, generation, run)
        _log_ignored(sandbox_id, ignored, run.exit_code, f"journal {journal_epoch!r}")

    async def store_events(
        self,
        sandbox_id: str,
        journal_epoch: str,
        events: Sequence[Event],
        *,
        known_high_water_mark: int | None = None,
        generation: int | None = None,
        owner_epoch: int | None = None,
    ) -> int:
        """Store a batch idempotently; return the high-water mark of (sandbox, journal epoch).

        With ``known_high_water_mark`` (what the caller last learned of the mark, e.g. the
        session's resume point and its last acknowledgement) the mark is not read back: once the
        transaction has committed, every sequence in the batch is stored, so the answer is the
        larger of the two. It may under-report a mark raised meanwhile by someone else, which only
        costs an idempotent resend. The sandbox must already be registered (``SandboxStore.ensure``).
        ``generation`` is the sandbox's the events belong to (a session's: the one its hello
        found); without it, the row's current one. With ``owner_epoch`` (the session's claim) the
        batch is fenced: :class:`Fenced`, nothing stored, once the row carries another epoch.
        """
        if not events:
            if known_high_water_mark is not None:
                return known_high_water_mark
            return await self.high_water_mark(sandbox_id, journal_epoch)
        if generation is None:
            generation = await self.generation(sandbox_id)
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        rows = []
        lifecycle: Lifecycle = []
        for e in events:
            rows.append(
                _row(
                    sandbox_id,
                    journal_epoch,
                    sequence=e.sequence,
                    timestamp_ms=e.timestamp_ms,
                    payload=e.payload,
                    received_at=stored_at,
                    generation=generation,
                )
            )
            _lifecycle(e.sequence, e.timestamp_ms, e.payload, lifecycle)
        return await self._store_rows(
            sandbox_id,
            journal_epoch,
            rows,
            generation=generation,
            lifecycle=lifecycle,
            received_at=received_at,
            last_sequence=max(e.sequence for e in events),
            known_high_water_mark=known_high_water_mark,
            owner_epoch=owner_epoch,
        )

    async def store_wire_batch(
        self,
        sandbox_id: str,
        journal_epoch: str,
        events: Iterable[pb.Event],
        *,
        known_high_water_mark: int,
        generation: int | None = None,
        owner_epoch: int | None = None,
    ) -> int:
        """Validate and store the events of an ``EventBatch`` straight from their protobuf form.

        Stores exactly the rows that ``store_events`` stores for the same events decoded with
        ``event_from_proto``, and answers as it does with ``known_high_water_mark``. Log lines, the
        hot path, become rows without an intermediate record; lifecycle and gap records go through
        the decoder. Raises :class:`WireError` (and stores nothing) for an event the decoder
        rejects or a sequence that does not ascend, and :class:`Fenced` (stores nothing) when
        ``owner_epoch`` is given and no longer the row's (see ``store_events``).
        """
        if generation is None:
            generation = await self.generation(sandbox_id)
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        rows: list[tuple[Any, ...]] = []
        lifecycle: Lifecycle = []
        noted: list[Payload] = []  # for on_records
        streams = _STREAM_VALUE
        previous = 0
        for raw in events:
            sequence = raw.sequence
            if (
                sequence
                and sequence <= MAX_SEQUENCE
                and raw.WhichOneof("kind") == "log"
                and not (raw.log.level or raw.log.target or raw.log.fields)
            ):
                # Captured output (every line our supervisor journals); a structured line takes
                # the general path below, which keeps its level, target and fields.
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
                        generation,
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
                        generation=generation,
                    )
                )
                # Records at or below the known mark are replays, stored before: their effect on
                # the exit was had then (and the run's position would ignore them anyway).
                if sequence > known_high_water_mark:
                    _lifecycle(sequence, event.timestamp_ms, event.payload, lifecycle)
                    if not isinstance(event.payload, LogRecord):  # a structured line: not noted
                        noted.append(event.payload)
            previous = sequence
        if not rows:
            return known_high_water_mark
        hwm = await self._store_rows(
            sandbox_id,
            journal_epoch,
            rows,
            generation=generation,
            lifecycle=lifecycle,
            received_at=received_at,
            last_sequence=previous,
            known_high_water_mark=known_high_water_mark,
            owner_epoch=owner_epoch,
        )
        if noted and self.on_records is not None:
            self.on_records(sandbox_id, noted)
        return hwm

    async def _store_rows(
        self,
        sandbox_id: str,
        journal_epoch: str,
        rows: list[tuple[Any, ...]],
        *,
        generation: int,
        lifecycle: Lifecycle,
        received_at: datetime,
        last_sequence: int,
        known_high_water_mark: int | None,
        owner_epoch: int | None = None,
    ) -> int:
        what = f"cannot store events for sandbox {sandbox_id!r} (journal {journal_epoch!r})"
        if self._sqlite and not lifecycle and known_high_water_mark is not None:
            await self._insert_sqlite(what, rows, sandbox_id=sandbox_id, owner_epoch=owner_epoch)
            self._notifier.committed(sandbox_id)
            return max(known_high_water_mark, last_sequence)
        with store_errors(what):
            async with self._db.begin() as conn:
                if owner_epoch is not None and not self._sqlite:
                    # Before the insert on PostgreSQL: the row stays locked until the commit, so a
                    # newer claim waits for this batch or this batch sees it (see check_owner).
                    await check_owner(conn, sandbox_id, owner_epoch, kind="events")
                # The insert first on SQLite: it takes the write lock, so the row read below for
                # the exit (and the claim checked right after) cannot change before this commits.
                await conn.exec_driver_sql(self._idempotent_sql, rows)
                if owner_epoch is not None and self._sqlite:
                    await check_owner(conn, sandbox_id, owner_epoch, kind="events")
                if lifecycle:
                    await self._apply_lifecycle(
                        conn,
                        sandbox_id,
                        journal_epoch,
                        generation=generation,
                        lifecycle=lifecycle,
                        received_at=received_at,
                    )
                if known_high_water_mark is None:
                    hwm = await self._hwm(conn, sandbox_id, journal_epoch)
                else:
                    # Committed below: every sequence of the batch is then stored.
                    hwm = max(known_high_water_mark, last_sequence)
        # Followers here at once; on other replicas through a note sent after the commit, not in
        # it (see the module docstring).
        self._notifier.committed(sandbox_id)
        return hwm

    async def _insert_sqlite(
        self, what: str, rows: list[tuple[Any, ...]], *, sandbox_id: str, owner_epoch: int | None
    ) -> None:
        """One transaction of ``rows`` on the aiosqlite driver connection itself.

        Through SQLAlchemy, a batch costs about ten round trips to the driver's thread (begin,
        execute, commit, cursor and pool bookkeeping), which with batches of a few hundred lines
        is as much as the inserts themselves. The driver begins the transaction implicitly before
        the INSERT (its default isolation level), so this is two round trips, plus the pool's
        rollback on check-in, which is a no-op after the commit. With ``owner_epoch`` the claim is
        read after the INSERT (which holds the write lock until the commit) and the batch is
        rolled back if it moved: one more round trip.
        """
        with store_errors(what):
            # In turn with this process's other writers (Database.writing): a transaction of
            # theirs must not sleep in SQLite's busy handler behind this one.
            async with self._db.writing(), self._db.engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                try:
                    await driver.executemany(self._idempotent_sql, rows)
                    if owner_epoch is not None:
                        cursor = await driver.execute(_CLAIM_SQL, (sandbox_id,))
                        claim = await cursor.fetchone()
                        await cursor.close()
                        if claim is None or int(claim[0]) != owner_epoch:
                            await driver.rollback()
                            raise Fenced(
                                sandbox_id,
                                kind="events",
                                epoch=owner_epoch,
                                current_epoch=None if claim is None else int(claim[0]),
                                owner=None if claim is None else claim[1],
                            )
                    await driver.commit()
                except sqlite3.Error as exc:
                    # The pool's reset on check-in rolls the transaction back.
                    raise StoreError(f"{what}: {describe_error(exc)}") from exc

    async def high_water_mark(self, sandbox_id: str, journal_epoch: str) -> int:
        """The highest sequence stored for (sandbox, journal epoch); 0 when there is none."""
        with store_errors(f"cannot read the high-water mark of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return await self._hwm(conn, sandbox_id, journal_epoch)

    async def generation(self, sandbox_id: str) -> int:
        """The sandbox's current generation; a StoreError when it is not registered."""
        with store_errors(f"cannot read the generation of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return await self._generation(conn, sandbox_id)

    def _lock_for(self, sandbox_id: str) -> asyncio.Lock:
        lock = self._locks.get(sandbox_id)
        if lock is None:
            lock = self._locks[sandbox_id] = asyncio.Lock()
        return lock

    async def append_unsequenced(
        self, sandbox_id: str, items: Sequence[tuple[int, Payload]], *, generation: int | None = None
    ) -> None:
        """Store records that came without sequence numbers, numbering them after the last one,
        as the sandbox's current generation (the upstream paths have no session to name one), or
        with ``generation`` (the one the caller's credential was bound to) only while the sandbox
        is still of it: StoreError, nothing stored, once the id has been created again.

        An EXITED record that is not the current run's exit (an upstream supervisor's report sent
        again, or a late one) is dropped with a log line: see the module docstring.
        """
        if not items:
            return
        what = f"cannot append events for sandbox {sandbox_id!r}"
        received_at = utcnow()
        stored_at = self._bind_received_at(received_at)
        lock = self._lock_for(sandbox_id)
        async with lock:
            with store_errors(what):
                async with self._db.begin() as conn:
                    # On PostgreSQL the row lock serialises replicas numbering the same sandbox (the
                    # asyncio lock only covers this process); SQLite renders no FOR UPDATE, and
                    # being single-process it needs none.
                    if generation is None:
                        generation = await self._generation(conn, sandbox_id)
                    run = await self._run_of(conn, sandbox_id, generation)
                    if run is None:
                        raise StoreError(f"{what}: the sandbox was created again meanwhile")
                    top = await self._hwm(conn, sandbox_id, UNSEQUENCED_EPOCH)
                    rows: list[tuple[Any, ...]] = []
                    ignored: list[int] = []
                    for timestamp_ms, payload in items:
                        sequence = top + len(rows) + 1
                        if isinstance(payload, LifecycleRecord):
                            if payload.kind is LifecycleKind.STARTED:
                                run.started(UNSEQUENCED_EPOCH, sequence)
                            elif payload.kind is LifecycleKind.EXITED and not run.exited(
                                UNSEQUENCED_EPOCH,
                                sequence,
                                payload.exit_code,
                                _exit_time(timestamp_ms, received_at),
                            ):
                                ignored.append(payload.exit_code)
                                continue
                        rows.append(
                            _row(
                                sandbox_id,
                                UNSEQUENCED_EPOCH,
                                sequence=sequence,
                                timestamp_ms=timestamp_ms,
                                payload=payload,
                                received_at=stored_at,
                                generation=generation,
                            )
                        )
                    _log_ignored(sandbox_id, ignored, run.exit_code, "upstream report")
                    if not rows:
                        return
                    await conn.exec_driver_sql(self._append_sql, rows)
                    await self._save_run(conn, sandbox_id, generation, run)
        self._notifier.committed(sandbox_id)

    async def _select(self, what: str, query: Select[Any]) -> list[StoredEvent]:
        with store_errors(what):
            async with self._db.engine.connect() as conn:
                result = await conn.execute(query)
                return [_stored(row) for row in result]

    def _of(
        self,
        query: Select[Any],
        generation: int | None,
        kinds: Sequence[str] | None,
        matching: LogQuery | None = None,
    ) -> Select[Any]:
        if generation is not None:
            query = query.where(events_table.c.generation == generation)
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(list(kinds)))
        if matching is not None and matching.narrows:
            query = query.where(_matching(matching, self._db.dialect))
        return query

    async def tail(
        self,
        sandbox_id: str,
        limit: int = 100,
        *,
        kinds: Sequence[str] | None = None,
        generation: int | None = None,
        matching: LogQuery | None = None,
    ) -> list[StoredEvent]:
        """The last ``limit`` events of the sandbox (optionally of ``kinds`` only, of one
        ``generation`` only, those ``matching`` keeps only), oldest first."""
        query = self._of(
            select(*_EVENT_COLUMNS).where(events_table.c.sandbox_id == sandbox_id),
            generation,
            kinds,
            matching,
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

    async def page_after(
        self,
        sandbox_id: str,
        after_id: int,
        limit: int = 1000,
        *,
        kinds: Sequence[str] | None = None,
        generation: int | None = None,
        matching: LogQuery | None = None,
    ) -> tuple[list[StoredEvent], int]:
        """The next page of a follow that keeps only what ``matching`` keeps: the events above
        ``after_id``, oldest first, and the id the next page starts after. That is the newest id
        read past, matching or not, so that a follower whose filter matches little does not scan
        the same rows again at every wake-up."""
        if matching is None or not matching.narrows:
            page = await self.after(sandbox_id, after_id, limit, kinds=kinds, generation=generation)
            return page, page[-1].id if page else after_id
        what = f"cannot read the events of sandbox {sandbox_id!r}"
        with store_errors(what):
            async with self._db.engine.connect() as conn:
                # The bound first: rows committed after it are the next page's, whatever their id.
                top = await conn.scalar(
                    select(func.max(events_table.c.id)).where(events_table.c.sandbox_id == sandbox_id)
                )
                if top is None or top <= after_id:
                    return [], after_id
                query = self._of(
                    select(*_EVENT_COLUMNS).where(
                        events_table.c.sandbox_id == sandbox_id,
                        events_table.c.id > after_id,
                        events_table.c.id <= top,
                    ),
                    generation,
                    kinds,
                    matching,
                )
                result = await conn.execute(query.order_by(events_table.c.id).limit(limit))
                page = [_stored(row) for row in result]
        return page, page[-1].id if len(page) == limit else int(top)

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


__all__ = ["LOG_LEVELS", "EventNotifier", "EventStore", "LogQuery", "StoredEvent"]
