"""The in-memory registry of live supervisor sessions on this gateway process.

A session is one accepted ConnectSupervisor stream. At most one session per sandbox is live:
a new hello for the same sandbox replaces the old session (the supervisor reconnected before
the old stream was noticed dead), and the old stream's handler is told to end through its
inbox. The registry also remembers when each session last spoke; a flusher task writes those
times to the database in one batch every few seconds (``sessions.heartbeat_flush_interval_s``, F).

The database's heartbeat time matters only to readers that ask "heard from within ``fresh_for_s``?"
(:mod:`gateway.sandbox_state`: the API's and the metrics' "connected", another replica's view of
the row, a late hello's ``_held_live``; ``fresh_for_s`` is the largest stale bound of the fixed
interval, upstream's 5 s floor included, + 2F). So a flush does not write every beat: it writes a
session's time only once the time written last is older than W = ``fresh_for_s`` - 2F - 2D, D
being the flush's own deadline (``grpc.batch_store_timeout_s``; ``Liveness.heartbeat_write_after``,
10 s by default; ``take_heartbeats``). The flush that finds a row due starts at most F + D after it
became due (the flush before it ran to its deadline, then the flusher slept F) and commits within
D; a flush that fails at once costs F more. So the row's time is never older than ``fresh_for_s``
while the session is live, also when flushes take their whole deadline, and every reader's verdict
is the one it had when each beat was written. What is written is the flush's own time: the gateway
holds the session and vouches for it while it is within its own stale bound (its stale check ends
it, and the disconnection is written, once it is not), as the replica's lease vouches for all its
sessions. A time written by the supervisor's last beat would advance the row by one beat interval
only; the flush's time advances it by W or more. So a row is written about every W + F (15 s by
default) whatever the heartbeat interval: about 0.67 rows per heartbeat at 10 s intervals (was 1),
fewer as the adaptive interval grows. A session past its own stale bound whose stale check has not
ended it yet gets the time it last spoke instead, if newer. A flush that fails counts nothing as
written: the next one finds the same sessions due.

What a reader sees differently: ``last_heartbeat_at`` means "the gateway holding the session last
vouched for it then" (up to ``fresh_for_s`` ago while it lives; was up to 2F), so a sandbox whose
replica died shows ``disconnected`` since a time up to that much before the death, and stops
showing ``connected`` no later than ``fresh_for_s`` after it (or when the replica's lease lapses,
with leases). A session whose row another claim took (fenced) learns it at its next write, within
W + F + 2D instead of 2F (its event batches are fenced on their own, at once).

A session's ``owner_epoch`` is its claim on the sandbox in the database
(``SandboxStore.mark_connected``), made before it enters the registry; every write of the session
is conditional on it (:mod:`gateway.store.fencing`). The registry orders its sessions by that
epoch too: a session whose claim is older than the live one's (two hellos of one sandbox on this
replica whose claims committed in the other order) is not let in.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from openshell_wire.records import CAP_RECONNECT, JournalEpoch, SandboxId, SessionId
from openshell_wire.v1 import openshell_pb2 as pb

log = logging.getLogger(__name__)


def new_session_id() -> SessionId:
    return SessionId(uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message the handler must send on the session's stream."""

    message: pb.GatewayMessage


@dataclass(frozen=True, slots=True)
class Close:
    """The handler must end the stream (replaced by a newer session, shutdown)."""

    reason: str
    #: A newer claim fenced this session's writes: the stream ends with SessionRejected SUPERSEDED
    #: and this reason, not silently.
    fenced: bool = False


@dataclass(frozen=True, slots=True)
class Inbound:
    message: pb.SupervisorMessage


@dataclass(frozen=True, slots=True)
class InboundEnded:
    """The supervisor closed its side, or the read failed."""

    error: str | None
    #: The read failed on a frame that is not a valid message: the handler raises this.
    malformed: Exception | None = None


@dataclass(frozen=True, slots=True)
class Wake:
    """The handler's own reminder (its stale timer fired, or its batch's store ended): look again.
    Nothing to send; one timer per stale bound and one per stored batch, never one per message."""

    why: str


InboxItem = Outbound | Close | Inbound | InboundEnded | Wake


class Inbox:
    """A session's inbox: many writers that never wait (the reader task, the registry, the command
    router, timers), one reader, the session's loop. ``asyncio.Queue``'s API as far as it is used
    (``put_nowait``, ``get_nowait``, ``get``, ``empty``, ``qsize``) without what this does not
    need: a Queue carries four deques (items, getters, putters, and its ``join`` event's waiters)
    of 760 bytes each even when empty, 3.2 KB per session, a fifth of what a session cost the
    gateway above the bare gRPC echo server (``python -m chaos.memprobe``). Here a list (an inbox
    holds a few items at a time: the message being answered, a reminder) and the one waiter.

    As with ``Queue.get``, a ``get`` cancelled while it waits takes nothing: what was put stays
    for the next ``get_nowait`` (the handler's cleanup settles the commands left in it)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[InboxItem] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: InboxItem) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> InboxItem:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> InboxItem:
        while not self._items:
            if self._waiter is not None and not self._waiter.done():
                raise RuntimeError("an inbox has one reader, and another is waiting already")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class Session:
    sandbox_id: SandboxId
    session_id: SessionId
    instance_id: str
    journal_epoch: JournalEpoch
    capabilities: frozenset[str]
    owner_epoch: int
    opened_at: datetime
    #: Silence longer than this ends the session (set when it is accepted).
    stale_after_s: float = 30.0
    #: The highest sequence known to be stored for this journal: the resume point given in the
    #: answer to the hello, then the last acknowledgement (``EventStore.store_wire_batch``).
    acked_through: int = 0
    #: The sandbox's generation when the hello came: the session's writes are about that sandbox
    #: only, not one created again under its id meanwhile.
    generation: int = 1
    #: A write of this session was fenced (a newer claim owns the sandbox): its disconnection is
    #: not written (it would be fenced too).
    fenced: bool = False
    #: Why this session was asked to reconnect elsewhere (drain, rebalance, max age), once it was:
    #: a session is hinted at most once, and its disconnection write may wait for the move.
    hinted: str | None = None
    #: The heartbeat interval last handed to the supervisor (SessionAccepted, then SessionUpdate
    #: when queued: :mod:`gateway.heartbeats`); 0 until accepted.
    heartbeat_interval_s: float = 0.0
    inbox: Inbox = field(default_factory=Inbox)
    #: When the supervisor last spoke, on the monotonic clock: the one clock read per message
    #: (``touch``). Its wall time is derived when a flush asks for it (``last_seen_wall``).
    last_seen_monotonic: float = field(default_factory=time.monotonic)
    #: The latest heartbeat time written to the database (connecting writes ``opened_at``).
    last_flushed_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: ``last_seen_monotonic`` as a wall time, once derived (None: not since the last touch).
    _seen_wall: datetime | None = field(default=None, init=False, repr=False)
    #: A message is being written to the stream (by the reader or the loop: one at a time), and
    #: the loop's wait for the reader's write to end (gateway.server).
    writing: bool = field(default=False, init=False, repr=False)
    write_waiter: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    async def write_ended(self) -> None:
        """Return once no write is in progress on the stream (the reader's, when the loop asks)."""
        while self.writing:
            waiter = self.write_waiter = asyncio.get_running_loop().create_future()
            await waiter

    def wake_writer(self) -> None:
        """The reader's write ended: the loop's write waiting for it may go."""
        waiter = self.write_waiter
        if waiter is not None:
            self.write_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def touch(self, now: float | None = None) -> None:
        self.last_seen_monotonic = time.monotonic() if now is None else now
        self._seen_wall = None

    @property
    def last_seen_wall(self) -> datetime:
        """When the supervisor last spoke, as a wall time: derived from the monotonic time once
        per touch (a flush asks for a few thousand every few seconds; a touch comes with every
        message), then the same value until the next touch."""
        return self.seen_wall_at(datetime.now(UTC), time.monotonic())

    @last_seen_wall.setter
    def last_seen_wall(self, value: datetime) -> None:
        self._seen_wall = value

    def seen_wall_at(self, now_wall: datetime, now_monotonic: float) -> datetime:
        """``last_seen_wall`` from a clock pair the caller read once (a flush: one pair for all)."""
        if self._seen_wall is None:
            ago = now_monotonic - self.last_seen_monotonic
            self._seen_wall = now_wall - timedelta(seconds=max(ago, 0.0))
        return self._seen_wall


class SessionRegistry:
    def __init__(self) -> None:
        self._live: dict[SandboxId, Session] = {}

    def open(
        self,
        *,
        sandbox_id: SandboxId,
        instance_id: str,
        journal_epoch: JournalEpoch,
        capabilities: frozenset[str],
        owner_epoch: int = 0,
        session_id: SessionId | None = None,
        opened_at: datetime | None = None,
    ) -> Session | None:
        """Register a session whose claim returned ``owner_epoch`` (0: none, for tests of the
        registry alone), replacing this sandbox's live one; None (nothing changed) when the live
        one's claim is newer: this session lost the sandbox before it began."""
        old = self._live.get(sandbox_id)
        if old is not None and old.owner_epoch > owner_epoch:
            return None
        opened = opened_at if opened_at is not None else datetime.now(UTC)
        session = Session(
            sandbox_id=sandbox_id,
            session_id=session_id if session_id is not None else new_session_id(),
            instance_id=instance_id,
            journal_epoch=journal_epoch,
            capabilities=capabilities,
            owner_epoch=owner_epoch,
            opened_at=opened,
            # The claim wrote this heartbeat time (before the session got here): the next write
            # is due W after it, not after now.
            last_flushed_wall=opened,
        )
        if old is not None:
            # The old session's beats are not the new one's: heartbeats are written per session,
            # and the flush looks at live sessions only.
            log.info("session replaced", extra={"sandbox_id": sandbox_id, "old_session": old.session_id})
            old.inbox.put_nowait(Close("replaced by a newer session of the same sandbox"))
        self._live[sandbox_id] = session
        return session

    def close(self, session: Session) -> bool:
        """Forget ``session``; False when a newer session already took its place."""
        if self._live.get(session.sandbox_id) is session:
            del self._live[session.sandbox_id]
            return True
        return False

    def is_current(self, session: Session) -> bool:
        return self._live.get(session.sandbox_id) is session

    def touch(self, session: Session) -> None:
        """The supervisor spoke (the session loop calls ``Session.touch`` itself: the same)."""
        session.touch()

    def heartbeat_sessions(self, beats: dict[str, datetime]) -> dict[str, str]:
        """The session each of ``beats`` is about (the live one), for a write conditional on it;
        call it with ``take_heartbeats``' result before awaiting anything."""
        return {sid: self._live[SandboxId(sid)].session_id for sid in beats}

    def heartbeat_epochs(self, beats: dict[str, datetime]) -> dict[str, int]:
        """The claim (``owner_epoch``) of the session each of ``beats`` is about, for a write
        fenced on it; call it with ``heartbeat_sessions``, before awaiting anything."""
        return {sid: self._live[SandboxId(sid)].owner_epoch for sid in beats}

    def fence(self, sandbox_ids: set[str], sessions: dict[str, str]) -> None:
        """A heartbeat flush found these sandboxes claimed by newer sessions (or gone): end their sessions
        here (if still the ones ``sessions`` names) with SessionRejected SUPERSEDED."""
        for sandbox_id in sandbox_ids:
            live = self._live.get(SandboxId(sandbox_id))
            if live is not None and live.session_id == sessions.get(sandbox_id):
                live.fenced = True
                live.inbox.put_nowait(
                    Close(
                        f"sandbox {sandbox_id} is owned by a newer session (or was deleted): this "
                        f"session's claim (epoch {live.owner_epoch}) no longer holds, its heartbeats "
                        "are not recorded",
                        fenced=True,
                    )
                )

    def take_heartbeats(
        self, *, renew_after_s: float | None = None, at: tuple[datetime, float] | None = None
    ) -> dict[str, datetime]:
        """The heartbeat times a flush must write (see the module docstring): with
        ``renew_after_s`` (W, ``Liveness.heartbeat_write_after``), for each live session whose
        time written last is older than W, the flush time while the session is within its own
        stale bound (the gateway vouches for it), else the time it last spoke if that is newer
        (its stale check is about to end it); without it, every time heard that is newer than
        the one written. Nothing counts as written until ``heartbeats_written``: after a failed
        flush the next call finds the same sessions due, with their latest times.

        It runs over every live session on the event loop at each flush: one comparison of two
        datetimes for a session not due, and one clock read for all (``at``: that pair, wall
        and monotonic, read by the caller)."""
        now, now_monotonic = (datetime.now(UTC), time.monotonic()) if at is None else at
        vouch = renew_after_s is not None
        due_before = now - timedelta(seconds=renew_after_s) if renew_after_s is not None else now
        beats: dict[str, datetime] = {}
        for sandbox_id, session in self._live.items():
            written = session.last_flushed_wall
            if written >= due_before:
                continue  # fresh enough for every reader until the flush after next
            seen = session.seen_wall_at(now, now_monotonic)
            if vouch and (now - seen).total_seconds() <= session.stale_after_s:
                beats[sandbox_id] = now
            elif seen > written:
                beats[sandbox_id] = seen
        return beats

    def heartbeats_written(
        self, beats: dict[str, datetime], *, sessions: dict[str, str] | None = None
    ) -> None:
        """The flush of ``beats`` committed: they count as written (the next write of each is due
        W after it), for the sessions ``sessions`` names (``heartbeat_sessions``) if still live:
        a session that replaced one during the flush has its own time, its claim's."""
        for sandbox_id, at in beats.items():
            session = self._live.get(SandboxId(sandbox_id))
            if session is None or (sessions is not None and sessions.get(sandbox_id) != session.session_id):
                continue
            session.last_flushed_wall = max(session.last_flushed_wall, at)

    def get(self, sandbox_id: str) -> Session | None:
        return self._live.get(SandboxId(sandbox_id))

    def __len__(self) -> int:
        return len(self._live)

    def sandbox_ids(self) -> list[SandboxId]:
        """The sandboxes whose live session this replica holds (a copy)."""
        return list(self._live)

    def sessions(self) -> list[Session]:
        """The live sessions (a copy)."""
        return list(self._live.values())

    def close_all(self, reason: str, *, hint: str | None = None, spread_s: float = 0.0) -> int:
        """End every live session; with ``hint``, as ``hint()`` with that reason and ``spread_s``
        (a session hinted already just ends), so a supervisor that speaks ``reconnect`` moves
        within its spread instead of seeing a bare end of stream. The number of hints sent."""
        hinted = 0
        for session in list(self._live.values()):
            if hint is not None and self.hint(session, reason=hint, spread_s=spread_s):
                hinted += 1
            else:
                session.inbox.put_nowait(Close(reason))
        return hinted

    def hint(self, session: Session, *, reason: str, spread_s: float) -> bool:
        """Ask ``session``'s supervisor to reconnect (elsewhere, through the Service) within a
        random delay up to ``spread_s``, then end the stream: a ReconnectHint for a supervisor that
        speaks ``reconnect`` (it reconnects without a backoff penalty), a plain end for one that does
        not (it reconnects after its own backoff). False, and nothing sent, when the session is no
        longer the live one or was hinted already."""
        if not self.is_current(session) or session.hinted is not None:
            return False
        session.hinted = reason
        if CAP_RECONNECT in session.capabilities:
            message = pb.GatewayMessage()
            message.reconnect.reason = reason
            message.reconnect.delay_window_ms = round(spread_s * 1000)
            session.inbox.put_nowait(Outbound(message))
        session.inbox.put_nowait(Close(f"asked to reconnect ({reason})"))
        return True
