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
the state does not change under them. Expiry is measured on the clock of the gateway replica that
reads or answers, so replicas' clocks must agree to within the precision wanted (NTP does).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, or_, select, update
from sqlalchemy.engine import Row

from gateway.store.db import Database, StoreError, store_errors, utcnow
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


def _args(command: Command) -> dict[str, int]:
    if command.kind is CommandKind.STOP:
        return {"grace_ms": command.grace_ms}
    if command.kind is CommandKind.SIGNAL:
        return {"signal": command.signal}
    return {"interval_ms": command.interval_ms}


def _past_expiry(now: datetime) -> ColumnElement[bool]:
    c = commands_table.c
    # Each side spelled out (no NOT over a NULL comparison): a row without an expiry is a legacy one.
    return or_(
        c.expires_at <= now,
        and_(c.expires_at.is_(None), c.created_at <= now - timedelta(seconds=LEGACY_TTL_S)),
    )


def _before_expiry(now: datetime) -> ColumnElement[bool]:
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
    )


class CommandStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        sandbox_id: str,
        kind: CommandKind,
        *,
        grace_ms: int = 0,
        signal: int = 0,
        interval_ms: int = 0,
        ttl_s: float = LEGACY_TTL_S,
    ) -> CommandRow:
        """Store a pending command that expires ``ttl_s`` from now (the API bounds it)."""
        if not ttl_s > 0:
            raise ValueError(f"a command's time to live must be positive, got {ttl_s!r}")
        command = Command(
            command_id=uuid.uuid4().hex, kind=kind, grace_ms=grace_ms, signal=signal, interval_ms=interval_ms
        )
        now = utcnow()
        expires_at = now + timedelta(seconds=ttl_s)
        with store_errors(f"cannot create a command for sandbox {sandbox_id!r}"):
            async with self._db.engine.begin() as conn:
                generation = await conn.scalar(
                    select(sandboxes_table.c.generation).where(sandboxes_table.c.id == sandbox_id)
                )
                if generation is None:
                    raise StoreError(f"cannot create a command for sandbox {sandbox_id!r}: no such sandbox")
                await conn.execute(
                    insert(commands_table).values(
                        id=command.command_id,
                        sandbox_id=sandbox_id,
                        kind=kind.value,
                        args=json.dumps(_args(command)),
                        state=PENDING,
                        created_at=now,
                        expires_at=expires_at,
                    )
                )
        return CommandRow(
            command, sandbox_id, PENDING, None, now, None, expires_at, generation=int(generation)
        )

    async def pending(self, sandbox_id: str, *, now: datetime | None = None) -> list[CommandRow]:
        """The commands to send to a new session, in creation order: those pending and unexpired.
        Those pending past their expiry are marked ``expired`` in the same transaction."""
        now = utcnow() if now is None else now
        c = commands_table.c
        mine = and_(c.sandbox_id == sandbox_id, c.state == PENDING)
        query = select(commands_table).where(mine, _before_expiry(now)).order_by(c.created_at, c.id)
        with store_errors(f"cannot read the pending commands of sandbox {sandbox_id!r}"):
            async with self._db.engine.begin() as conn:
                expired = await conn.execute(
                    update(commands_table)
                    .where(mine, _past_expiry(now))
                    .values(state=EXPIRED, error=EXPIRED_ERROR)
                )
                rows = [_row(r, now) for r in await conn.execute(query)]
        if expired.rowcount:
            log.info(
                "%d command(s) expired before a session took them: not sent",
                expired.rowcount,
                extra={"sandbox_id": sandbox_id},
            )
        return rows

    async def list(
        self, sandbox_id: str, limit: int = 100, *, now: datetime | None = None
    ) -> list[CommandRow]:
        query = (
            select(commands_table)
            .where(commands_table.c.sandbox_id == sandbox_id)
            .order_by(commands_table.c.created_at.desc(), commands_table.c.id)
            .limit(limit)
        )
        now = utcnow() if now is None else now
        with store_errors(f"cannot list the commands of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return [_row(r, now) for r in await conn.execute(query)]

    async def get(self, command_id: str, *, now: datetime | None = None) -> CommandRow | None:
        now = utcnow() if now is None else now
        with store_errors(f"cannot read command {command_id!r}"):
            async with self._db.engine.connect() as conn:
                row = (
                    await conn.execute(select(commands_table).where(commands_table.c.id == command_id))
                ).first()
        return _row(row, now) if row is not None else None

    async def answer(self, sandbox_id: str, result: CommandResult, *, now: datetime | None = None) -> Answer:
        """Record the supervisor's answer: the command's state if it was pending and unexpired;
        its ``late_result`` (the state stays ``expired``) if it had expired and had no answer yet."""
        now = utcnow() if now is None else now
        c = commands_table.c
        outcome = APPLIED if result.applied else FAILED
        this = and_(c.id == result.command_id, c.sandbox_id == sandbox_id)
        with store_errors(f"cannot record the result of command {result.command_id!r}"):
            async with self._db.engine.begin() as conn:
                done = await conn.execute(
                    update(commands_table)
                    .where(this, c.state == PENDING, _before_expiry(now))
                    .values(state=outcome, error=result.error or None, answered_at=now)
                )
                if done.rowcount:
                    return Answer.RECORDED
                error = EXPIRED_ERROR
                if result.error:
                    error = f"{EXPIRED_ERROR}; the late answer's error: {result.error}"
                late = await conn.execute(
                    update(commands_table)
                    .where(
                        this,
                        or_(c.state == EXPIRED, and_(c.state == PENDING, _past_expiry(now))),
                        c.late_result.is_(None),
                    )
                    .values(state=EXPIRED, error=error, late_result=outcome, answered_at=now)
                )
        return Answer.LATE if late.rowcount else Answer.IGNORED
