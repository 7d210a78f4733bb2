"""Commands for supervisors: created by the API, delivered by the session, answered once.

A command is ``pending`` from its creation until its supervisor's CommandResult arrives; then it is
``applied`` or ``failed`` (with the supervisor's reason). Pending commands are sent again on every
new session of the sandbox, so a command created while the sandbox is disconnected, or lost with
a cut stream, still arrives. The supervisor applies each id at most once, which makes redelivery
harmless. A result for an unknown or already answered command changes nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row

from gateway.store.db import Database, StoreError, store_errors, utcnow
from gateway.store.schema import commands as commands_table
from gateway.store.schema import sandboxes as sandboxes_table
from openshell_wire.records import Command, CommandKind, CommandResult

PENDING, APPLIED, FAILED = "pending", "applied", "failed"


@dataclass(frozen=True, slots=True)
class CommandRow:
    command: Command
    sandbox_id: str
    state: str
    error: str | None
    created_at: datetime
    answered_at: datetime | None
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


def _row(row: Row[Any]) -> CommandRow:
    args: dict[str, int] = json.loads(row.args)
    return CommandRow(
        command=Command(command_id=row.id, kind=CommandKind(row.kind), **args),
        sandbox_id=row.sandbox_id,
        state=row.state,
        error=row.error,
        created_at=row.created_at,
        answered_at=row.answered_at,
    )


class CommandStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, sandbox_id: str, kind: CommandKind, *, grace_ms: int = 0, signal: int = 0, interval_ms: int = 0
    ) -> CommandRow:
        command = Command(
            command_id=uuid.uuid4().hex, kind=kind, grace_ms=grace_ms, signal=signal, interval_ms=interval_ms
        )
        now = utcnow()
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
                    )
                )
        return CommandRow(command, sandbox_id, PENDING, None, now, None, generation=int(generation))

    async def pending(self, sandbox_id: str) -> list[CommandRow]:
        query = (
            select(commands_table)
            .where(commands_table.c.sandbox_id == sandbox_id, commands_table.c.state == PENDING)
            .order_by(commands_table.c.created_at, commands_table.c.id)
        )
        with store_errors(f"cannot read the pending commands of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return [_row(r) for r in await conn.execute(query)]

    async def list(self, sandbox_id: str, limit: int = 100) -> list[CommandRow]:
        query = (
            select(commands_table)
            .where(commands_table.c.sandbox_id == sandbox_id)
            .order_by(commands_table.c.created_at.desc(), commands_table.c.id)
            .limit(limit)
        )
        with store_errors(f"cannot list the commands of sandbox {sandbox_id!r}"):
            async with self._db.engine.connect() as conn:
                return [_row(r) for r in await conn.execute(query)]

    async def get(self, command_id: str) -> CommandRow | None:
        with store_errors(f"cannot read command {command_id!r}"):
            async with self._db.engine.connect() as conn:
                row = (
                    await conn.execute(select(commands_table).where(commands_table.c.id == command_id))
                ).first()
        return _row(row) if row is not None else None

    async def answer(self, sandbox_id: str, result: CommandResult) -> bool:
        """Record the supervisor's answer; False when the command was unknown or already answered."""
        with store_errors(f"cannot record the result of command {result.command_id!r}"):
            async with self._db.engine.begin() as conn:
                done = await conn.execute(
                    update(commands_table)
                    .where(
                        commands_table.c.id == result.command_id,
                        commands_table.c.sandbox_id == sandbox_id,
                        commands_table.c.state == PENDING,
                    )
                    .values(
                        state=APPLIED if result.applied else FAILED,
                        error=result.error or None,
                        answered_at=utcnow(),
                    )
                )
        return bool(done.rowcount)
