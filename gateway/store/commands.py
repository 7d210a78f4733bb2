"""Commands for supervisors: created by the API, delivered by the session, answered once.

A command is ``pending`` from its creation until its supervisor's CommandResult arrives; then it is
``applied`` or ``failed`` (with the supervisor's reason). Pending commands are sent again on every
new session of the sandbox, so a command created while the sandbox is disconnected, or lost with
a cut stream, still arrives. The supervisor applies each id at most once, which makes redelivery
harmless. A result for an unknown or already answered command changes nothing.

Every command carries an expiry (``expires_at``: its creation plus a time to live the API bounds).
A command still pending at its expiry ends ``expired`` and is never sent again: the supervisor
cannot tell an old command from a new one, and a ``stop`` meant for a moment long gone must not
stop a sandbox an hour later. No background task sweeps for them: the queries that read pending
commands for redelivery mark the expired ones in the same transaction (and skip them), and the
reads of the API show a pending command past its expiry as ``expired`` before any write has
marked it. A supervisor's answer that arrives after the expiry (it took the command just before,
or the answer was held up) is recorded in ``late_result`` with its time, but the state stays
``expired``: whoever looked at the command after its expiry was told it would never apply, and
the state does not change under them. On PostgreSQL every expiry is measured on the database's clock
(``statement_timestamp()``: the creation's expiry, and every comparison in the reads, the answer and
the delivery mark), so replicas whose clocks disagree still agree on whether a command has expired;
only the session's last check before it writes a command to its stream uses the replica's clock,
through the time left that the database measured (:meth:`CommandStore.deliverable`). SQLite is one
process and uses its clock.

Routing (issue 20 point 3): a command's creation and its notification (:mod:`gateway.notify`) commit
together, so the replica holding the sandbox's session hears of it at once and hands it over; the
session's write to its stream is recorded (``delivered_at``, ``delivered_by``, only while the command
is pending and unexpired) together with a notification back, which ends the POSTing replica's wait.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement, DateTime, and_, func, insert, literal, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from gateway.notify import Note, Notifier, Topic, publish
from gateway.store.db import Database, StoreError, store_errors, utcnow
from gateway.store.fencing import Fenced, check_owner
from gateway.store.schema import commands as commands_table
from gateway.store.schema import sandboxes as sandboxes_table
from openshell_wire.records import Command, CommandKind, CommandResult

log = logging.getLogger(__name__)

PENDING, APPLIED, FAILED, EXPIRED = "pending", "applied", "failed", "expired"

#: The time to live of a command stored without an expiry: before revision 0007, or by a replica
#: of the previous version during a rolling upgrade (the default of ``commands.ttl_s``).
LEGACY_TTL_S = 300.0
#: The error of an expired command.
EXPIRED_ERROR = "expired: no session of its sandbox took it before its expiry, and it is never sent now"


class Answer(Enum):
    """What a supervisor's CommandResult did to its command."""

    #: The command was pending and unexpired: it is now applied or failed.
    RECORDED = "recorded"
    #: The command had expired: the answer is kept in ``late_result``, the state stays expired.
    LATE = "late"
    #: Unknown, of another sandbox, or already answered: nothing changed.
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class CommandRow:
    command: Command
    sandbox_id: str
    state: str
    error: str | None
    created_at: datetime
    answered_at: datetime | None
    #: After it the command is never sent; past it a pending command reads ``expired``.
    expires_at: datetime
    #: The supervisor's answer (``applied``, ``failed``) when it came after the expiry.
    late_result: str | None = None
    #: The sandbox's generation the command was created for, read in the transaction that stored
    #: it; known only for a command just created (it is not stored: a re-creation fails the old
    #: generation's pending commands), so that its delivery reaches only a session of that sandbox.
    generation: int | None = None
    #: When and by which replica the sandbox's live session wrote it to its stream (None: not yet).
    delivered_at: datetime | None = None
    delivered_by: str | None = None
    #: True when ``create`` found a command stored earlier with the same idempotency key (and the
    #: same request) and answered it instead of storing another.
    replayed: bool = False


class IdempotencyMismatch(Exception):
    """A command POST reused an idempotency key of its sandbox for a different request: nothing
    was stored (the API answers 422)."""

    def __init__(self, sandbox_id: str, key: str, earlier: CommandRow) -> None:
        self.sandbox_id = sandbox_id
        self.key = key
        self.earlier = earlier
        super().__init__(
            f"Idempotency-Key {key!r} was already used for another request on sandbox {sandbox_id!r} "
            f"(command {earlier.command.command_id}, {earlier.command.kind.value}): a retry must "
            "repeat the same request; a new command needs a new key"
        )


#: A point in time for the queries: the replica's clock (a value) or the database's (SQL).
When = datetime | ColumnElement[datetime]


def _db_clock() -> ColumnElement[datetime]:
    # The statement's start, not the transaction's (now()): a long transaction must not hold time.
    # Typed as the plain type: arithmetic with a timedelta binds an interval, not a UTCDateTime.
    return func.statement_timestamp(type_=DateTime(timezone=True))


def _args(command: Command) -> dict[str, int]:
    if command.kind is CommandKind.STOP:
        return {"grace_ms": command.grace_ms}
    if command.kind is CommandKind.SIGNAL:
        return {"signal": command.signal}
    return {"interval_ms": command.interval_ms}


def _past_expiry(now: When) -> ColumnElement[bool]:
    c = commands_table.c
    # Each side spelled out (no NOT over a NULL comparison): a row without an expiry is a legacy one.
    return or_(
        c.expires_at <= now,
        and_(c.expires_at.is_(None), c.created_at <= now - timedelta(seconds=LEGACY_TTL_S)),
    )


def _before_expiry(now: When) -> ColumnElement[bool]:
    c = commands_table.c
    return or_(
        c.expires_at > now,
        and_(c.expires_at.is_(None), c.created_at > now - timedelta(seconds=LEGACY_TTL_S)),
    )


def _row(row: Row[Any], now: datetime) -> CommandRow:
    args: dict[str, int] = json.loads(row.args)
    expires_at = row.expires_at or row.created_at + timedelta(seconds=LEGACY_TTL_S)
    state, error = row.state, row.error
    if state == PENDING and expires_at <= now:
        # Not marked yet (nothing has read it for redelivery since): it is expired all the same.
        state, error = EXPIRED, EXPIRED_ERROR
    return CommandRow(
        command=Command(command_id=row.id, kind=CommandKind(row.kind), **args),
        sandbox_id=row.sandbox_id,
        state=state,
        error=error,
        created_at=row.created_at,
        answered_at=row.answered_at,
        expires_at=expires_at,
        late_result=row.late_result,
        generation=getattr(row, "generation", None),
        delivered_at=row.delivered_at,
        delivered_by=row.delivered_by,
    )


class CommandStore:
    def __init__(self, db: Database, *, notifier: Notifier | None = None) -> None:
        self._db = db
        #: Told of each committed note (the in-process notifier hands it on; PostgreSQL's has
        #: the server deliver it). None: nobody routes (a store used on its own).
        self._notifier = notifier
        self._pg = db.dialect == "postgresql"

    def _clock(self, now: datetime | None) -> When:
        """``now`` if given (tests); else the database's clock on PostgreSQL, this process's on
        SQLite (one process, one clock)."""
        if now is not None:
            return now
        return _db_clock() if self._pg else utcnow()

    def _reads(self, now: datetime | None, *columns: Any) -> tuple[Any, ...]:
        """The columns of a read, plus the database's time on PostgreSQL (see ``_now_of``)."""
        if now is None and self._pg:
            return (*columns, _db_clock().label("db_now"))
        return columns

    @staticmethod
    def _now_of(row: Row[Any], now: datetime | None) -> datetime:
        if now is not None:
            return now
        db_now = getattr(row, "db_now", None)
        return db_now if isinstance(db_now, datetime) else utcnow()

    def _committed(self, notes: Sequence[Note]) -> None:
        if self._notifier is not None:
            for note in notes:
                self._notifier.committed(note)

    async def create(
        self,
        sandbox_id: str,
        kind: CommandKind,
        *,
        grace_ms: int = 0,
        signal: int = 0,
        interval_ms: int = 0,
        ttl_s: float = LEGACY_TTL_S,
        idempotency_key: str | None = None,
        request_digest: str | None = None,
    ) -> CommandRow:
        """Store a pending command that expires ``ttl_s`` from now (the API bounds it).

        With ``idempotency_key``: if the sandbox has a command stored with that key already, it
        is returned (``replayed``) and nothing is stored, provided it was created by the same
        request (``request_digest``); else :class:`IdempotencyMismatch`. Two creations racing
        with one key (two replicas) store one command: the unique index refuses the second,
        which then answers the first's."""
        if not ttl_s > 0:
            raise ValueError(f"a command's time to live must be positive, got {ttl_s!r}")
        if idempotency_key is not None:
            earlier = await self._keyed(sandbox_id, idempotency_key, request_digest)
            if earlier is not None:
                return earlier
        command = Command(
            command_id=uuid.uuid4().hex, kind=kind, grace_ms=grace_ms, signal=signal, interval_ms=interval_ms
        )
        clock = self._clock(None)
        c = commands_table.c
        note = Note(Topic.COMMAND, sandbox_id, command.command_id)
        with store_errors(f"cannot create a command for sandbox {sandbox_id!r}"):
            try:
                async with self._db.begin() as conn:
                    generation = await conn.scalar(
                        select(sandboxes_table.c.generation).where(sandboxes_table.c.id == sandbox_id)
                    )
                    if generation is None:
                        raise StoreError(
                            f"cannot create a command for sandbox {sandbox_id!r}: no such sandbox"
                        )
                    stored = await conn.execute(
                        insert(commands_table)
                        .values(
                            id=command.command_id,
                            sandbox_id=sandbox_id,
                            kind=kind.value,
                            args=json.dumps(_args(command)),
                            state=PENDING,
                            created_at=clock,
                            expires_at=clock + timedelta(seconds=ttl_s),
                            idempotency_key=idempotency_key,
                            request_digest=request_digest,
                        )
                        .returning(c.created_at, c.expires_at)
                    )
                    now, expires_at = stored.one()
                    # In the same transaction: the owning replica hears of it only once it is stored.
                    await publish(conn, note)
            except IntegrityError:
                # Another creation with this key committed first (on another replica): its
                # command is the answer. Anything else (the sandbox deleted meanwhile) fails.
                if idempotency_key is None:
                    raise
                earlier = await self._keyed(sandbox_id, idempotency_key, request_digest)
                if earlier is None:
                    raise
                return earlier
        self._committed([note])
        return CommandRow(
            command, sandbox_id, PENDING, None, now, None, expires_at, generation=int(generation)
        )

    async def _keyed(self, sandbox_id: str, key: str, request_digest: str | None) -> CommandRow | None:
        """The sandbox's command stored with idempotency key ``key``, marked ``replayed``; None if
        there is none; :class:`IdempotencyMismatch` if it was created by another request."""
        c = commands_table.c
        query = select(*self._reads(None, commands_table)).where(
            c.sandbox_id == sandbox_id, c.idempotency_key == key
        )
        with store_errors(f"cannot read the command of idempotency key {key!r}"):
            async with self._db.engine.connect() as conn:
                row = (await conn.execute(query)).first()
        if row is None:
            return None
        earlier = dataclasses.replace(_row(row, self._now_of(row, None)), replayed=True)
        if row.request_digest != request_digest:
            raise IdempotencyMismatch(sandbox_id, key, earlier)
        return earlier

    async def pending(self, sandbox_id: str, *, now: datetime | None = None) -> list[CommandRow]:
        """The commands to send to a new session, in creation order: those pending and unexpired.
        Those pending past their expiry are marked ``expired`` in the same transaction."""
        return [row for row, _ in await self.pending_left(sandbox_id, now=now)]

    async def pending_left(
        self, sandbox_id: str, *, now: datetime | None = None
    ) -> list[tuple[CommandRow, timedelta]]:
        """:meth:`pending`, each with the time it has left on the database's clock (as
        :meth:`deliverable`), which the caller turns into a deadline on its own clock.

        Every hello of a session with ``commands`` reads this, so it is one read, without a write
        transaction, unless a row has expired: only then are the expired ones marked (the same
        conditional UPDATE as before, idempotent; a row found expired here is expired for the
        UPDATE too, time only moves forward)."""
        (left,) = await self.pending_left_many([sandbox_id], now=now)
        return left

    async def pending_left_many(
        self, sandbox_ids: Sequence[str], *, now: datetime | None = None
    ) -> builtins.list[builtins.list[tuple[CommandRow, timedelta]]]:
        """:meth:`pending_left` of many sandboxes (in order; an id given twice is answered twice)
        in one read, ``WHERE sandbox_id IN (...)``, and at most one write marking the expired rows
        of all of them: a burst of hellos reads its pending commands in a few round trips, not one
        per hello (issue 22)."""
        if not sandbox_ids:
            return []
        ids = sorted(set(sandbox_ids))
        clock = self._clock(now)
        c = commands_table.c
        mine = and_(c.sandbox_id.in_(ids), c.state == PENDING)
        query = select(*self._reads(now, commands_table)).where(mine).order_by(c.created_at, c.id)
        found: dict[str, builtins.list[tuple[CommandRow, timedelta]]] = {i: [] for i in ids}
        expired: dict[str, int] = {}
        what = f"sandbox {ids[0]!r}" if len(ids) == 1 else f"{len(ids)} sandboxes ({ids[0]!r}...)"
        with store_errors(f"cannot read the pending commands of {what}"):
            async with self._db.engine.connect() as conn:
                for r in await conn.execute(query):
                    at = self._now_of(r, now)
                    row = _row(r, at)  # EXPIRED when past its expiry on that clock
                    if row.state == PENDING:
                        found[row.sandbox_id].append((row, row.expires_at - at))
                    else:
                        expired[row.sandbox_id] = expired.get(row.sandbox_id, 0) + 1
            if expired:
                async with self._db.begin() as conn:
                    marked = await conn.execute(
                        update(commands_table)
                        .where(c.sandbox_id.in_(sorted(expired)), c.state == PENDING, _past_expiry(clock))
                        .values(state=EXPIRED, error=EXPIRED_ERROR)
                    )
                if marked.rowcount:
                    log.info(
                        "%d command(s) expired before a session took them: not sent",
                        marked.rowcount,
                        extra={"sandbox_id": ids[0]} if len(ids) == 1 else {"sandbox_ids": sorted(expired)},
                    )
        return [builtins.list(found[i]) for i in sandbox_ids]

    async def list(
        self, sandbox_id: str, limit: int = 100, *, now: datetime | None = None
    ) -> list[CommandRow]:
        query = (
            select(*self._reads(now, commands_table))
            .where(commands_table.c.sandbox_id == sandbox_id)
            .order_by(commands_table.c.created_at.desc(), commands_table.c.id)
            .limit(limit)
        )
        with store_errors(f"cannot list the commands of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return [_row(r, self._now_of(r, now)) for r in await conn.execute(query)]

    async def get(self, command_id: str, *, now: datetime | None = None) -> CommandRow | None:
        query = select(*self._reads(now, commands_table)).where(commands_table.c.id == command_id)
        with store_errors(f"cannot read command {command_id!r}"):
            async with self._db.engine.connect() as conn:
                row = (await conn.execute(query)).first()
        return _row(row, self._now_of(row, now)) if row is not None else None

    async def answer(
        self,
        sandbox_id: str,
        result: CommandResult,
        *,
        now: datetime | None = None,
        owner_epoch: int | None = None,
        by: str | None = None,
    ) -> Answer:
        """Record the supervisor's answer: the command's state if it was pending and unexpired;
        its ``late_result`` (the state stays ``expired``) if it had expired and had no answer yet.
        With ``owner_epoch`` (the answering session's claim) only while the sandbox's row still
        carries it: else :class:`~gateway.store.fencing.Fenced`, nothing recorded (a paused
        replica's late answer cannot overwrite what the owner's session recorded).

        An answer proves the command reached the supervisor: a recorded one (in time or late)
        also records ``delivered_at``/``delivered_by`` (``by``, the answering replica) if the
        delivery mark has not yet, and tells the replicas (a POST waits for it). The owner's mark
        runs after the session wrote the command, so the supervisor's answer can commit first:
        without this the command stayed ``applied`` with no ``delivered_at``, and its POST
        answered ``delivered: false``, inviting a second, doubled command."""
        clock = self._clock(now)
        c = commands_table.c
        outcome = APPLIED if result.applied else FAILED
        this = and_(c.id == result.command_id, c.sandbox_id == sandbox_id)
        delivered = {
            # Bound as the columns' types: a value goes through their storage format (SQLite).
            "delivered_at": func.coalesce(
                c.delivered_at, literal(clock, c.delivered_at.type) if isinstance(clock, datetime) else clock
            ),
            "delivered_by": func.coalesce(c.delivered_by, literal(by, c.delivered_by.type)),
        }
        note = Note(Topic.DELIVERED, sandbox_id, result.command_id)
        with store_errors(f"cannot record the result of command {result.command_id!r}"):
            async with self._db.begin() as conn:

                async def fence(*, first: bool) -> None:
                    # PostgreSQL: first, the row stays locked until the commit, so a newer claim
                    # waits for this answer or this answer sees it. SQLite: after the write, whose
                    # lock (taken by the first write, not a read) keeps the claim out until then.
                    if owner_epoch is not None and first == (self._db.dialect != "sqlite"):
                        await check_owner(conn, sandbox_id, owner_epoch, kind="command_result")

                await fence(first=True)
                done = await conn.execute(
                    update(commands_table)
                    .where(this, c.state == PENDING, _before_expiry(clock))
                    .values(state=outcome, error=result.error or None, answered_at=clock, **delivered)
                )
                if done.rowcount:
                    await fence(first=False)
                    await publish(conn, note)
                    answered = Answer.RECORDED
                else:
                    error = EXPIRED_ERROR
                    if result.error:
                        error = f"{EXPIRED_ERROR}; the late answer's error: {result.error}"
                    late = await conn.execute(
                        update(commands_table)
                        .where(
                            this,
                            or_(c.state == EXPIRED, and_(c.state == PENDING, _past_expiry(clock))),
                            c.late_result.is_(None),
                        )
                        .values(
                            state=EXPIRED, error=error, late_result=outcome, answered_at=clock, **delivered
                        )
                    )
                    await fence(first=False)
                    answered = Answer.LATE if late.rowcount else Answer.IGNORED
                    if late.rowcount:
                        await publish(conn, note)
        if answered is not Answer.IGNORED:
            self._committed([note])
        return answered

    async def deliverable(
        self, sandbox_ids: Collection[str], *, now: datetime | None = None
    ) -> Sequence[tuple[CommandRow, timedelta]]:
        """The commands a replica holding the sessions of ``sandbox_ids`` must still hand over, in
        one query for all of them: pending, unexpired, never written to a stream (``delivered_at``
        unset: one written to a session that then died goes out at the next hello, with every
        pending one), in creation order, each with its sandbox's current generation (a pending
        command is of it: a re-creation fails the earlier one's) and the time it has left on the
        database's clock, which the caller turns into a deadline on its own clock."""
        if not sandbox_ids:
            return []
        clock = self._clock(now)
        c = commands_table.c
        query = (
            select(*self._reads(now, commands_table, sandboxes_table.c.generation.label("generation")))
            .join(sandboxes_table, sandboxes_table.c.id == c.sandbox_id)
            .where(
                c.sandbox_id.in_(sorted(sandbox_ids)),
                c.state == PENDING,
                c.delivered_at.is_(None),
                _before_expiry(clock),
            )
            .order_by(c.created_at, c.id)
        )
        # (``list`` is a method of this class: the builtin's name does not reach here.)
        found: builtins.list[tuple[CommandRow, timedelta]] = []
        with store_errors("cannot read the commands to deliver"):
            async with self._db.engine.connect() as conn:
                for r in await conn.execute(query):
                    at = self._now_of(r, now)
                    row = _row(r, at)
                    found.append((row, row.expires_at - at))
        return found

    async def mark_delivered(
        self,
        sandbox_id: str,
        command_ids: Sequence[str],
        *,
        by: str,
        owner_epoch: int | None = None,
        now: datetime | None = None,
    ) -> Sequence[str]:
        """Record that the sandbox's live session on replica ``by`` wrote these commands to its
        stream, for those still pending and unexpired and not recorded yet, and tell the replicas
        (a POST waits for it); returns the ids recorded.

        With ``owner_epoch`` (the claim of the session that wrote them) only while the sandbox's
        row still carries it, checked in the same transaction: a paused old owner writing to a
        stream that is already dead must not mark a command delivered, or the new owner's
        redelivery would skip it until the next hello. A fenced mark records nothing (returns
        no ids) and raises nothing: the session itself is fenced at its next write."""
        if not command_ids:
            return []
        clock = self._clock(now)
        c = commands_table.c
        try:
            with store_errors(f"cannot record the delivery of commands of sandbox {sandbox_id!r}"):
                async with self._db.begin() as conn:

                    async def fence(*, first: bool) -> None:
                        # As in ``answer``: PostgreSQL locks the row first, SQLite checks after the
                        # write that took its lock (a raise rolls the write back).
                        if owner_epoch is not None and first == (self._db.dialect != "sqlite"):
                            await check_owner(conn, sandbox_id, owner_epoch, kind="delivery")

                    await fence(first=True)
                    marked = await conn.execute(
                        update(commands_table)
                        .where(
                            c.id.in_(list(command_ids)),
                            c.sandbox_id == sandbox_id,
                            c.state == PENDING,
                            c.delivered_at.is_(None),
                            _before_expiry(clock),
                        )
                        .values(delivered_at=clock, delivered_by=by)
                        .returning(c.id)
                    )
                    done = [str(i) for i in marked.scalars()]
                    await fence(first=False)
                    notes = [Note(Topic.DELIVERED, sandbox_id, i) for i in done]
                    for note in notes:
                        await publish(conn, note)
        except Fenced as exc:
            log.info(
                "delivery of %d command(s) not recorded: %s (they stay deliverable to the owner)",
                len(command_ids),
                exc,
                extra={"sandbox_id": sandbox_id},
            )
            return []
        self._committed(notes)
        return done
