"""Command expiry in the store, and what ``delivered`` means, against a real SQLite file.

``check_command_expiry`` takes an open database of any dialect: tests/integration/test_commands.py
runs it on a real PostgreSQL server too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from gateway.server import OpenShellService
from gateway.sessions import Close, SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxStore
from gateway.store.commands import EXPIRED_ERROR, LEGACY_TTL_S, Answer
from gateway.store.db import utcnow
from gateway.store.schema import commands as commands_table
from openshell_wire.records import CAP_COMMANDS, CommandKind, CommandResult, JournalEpoch, SandboxId
from tests.support.gateway import gateway_config
from tests.support.handler_call import HandlerCall


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/state/gateway.db")
    yield database
    await database.close()


def _result(command_id: str, *, applied: bool = True, error: str = "") -> CommandResult:
    return CommandResult(command_id=command_id, applied=applied, error=error)


async def check_command_expiry(db: Database) -> None:
    """A pending command past its expiry is never handed out for redelivery and ends expired (the
    read that skips it marks it); an answer after the expiry is kept as the late result without
    turning the state back; rows without an expiry (before revision 0007) expire LEGACY_TTL_S
    after their creation."""
    await SandboxStore(db).ensure("sb")
    commands = CommandStore(db)
    long = await commands.create("sb", CommandKind.STOP, grace_ms=0, ttl_s=60)
    short = await commands.create("sb", CommandKind.SIGNAL, signal=10, ttl_s=1)
    assert short.expires_at == short.created_at + timedelta(seconds=1)
    t0 = short.created_at
    both = [long.command.command_id, short.command.command_id]
    assert [r.command.command_id for r in await commands.pending("sb", now=t0)] == both

    # Past the short one's expiry: a read shows it expired before anything has marked it ...
    later = t0 + timedelta(seconds=2)
    seen = await commands.get(short.command.command_id, now=later)
    assert seen is not None and (seen.state, seen.error) == ("expired", EXPIRED_ERROR)
    assert (await commands.get(short.command.command_id, now=t0)).state == "pending"  # type: ignore[union-attr]
    # ... and redelivery skips it and marks it, for every reader from then on.
    assert [r.command.command_id for r in await commands.pending("sb", now=later)] == [
        long.command.command_id
    ]
    marked = await commands.get(short.command.command_id, now=t0)
    assert marked is not None and marked.state == "expired" and marked.answered_at is None

    # The supervisor's answer after the expiry: recorded, the state stays expired; only once.
    assert await commands.answer("sb", _result(short.command.command_id), now=later) is Answer.LATE
    late = await commands.get(short.command.command_id)
    assert late is not None and (late.state, late.late_result) == ("expired", "applied")
    assert late.answered_at == later
    assert await commands.answer("sb", _result(short.command.command_id), now=later) is Answer.IGNORED

    # An answer in time is the command's outcome, once; another sandbox's answer changes nothing.
    assert await commands.answer("other", _result(long.command.command_id), now=later) is Answer.IGNORED
    assert await commands.answer("sb", _result(long.command.command_id), now=later) is Answer.RECORDED
    done = await commands.get(long.command.command_id, now=t0 + timedelta(days=1))
    assert done is not None and (done.state, done.late_result) == ("applied", None)
    assert await commands.answer("sb", _result(long.command.command_id), now=later) is Answer.IGNORED

    # A pending command nobody read since its expiry: a late failure is marked expired at once,
    # its reason kept next to the expiry's.
    unread = await commands.create("sb", CommandKind.SIGNAL, signal=12, ttl_s=1)
    failed = _result(unread.command.command_id, applied=False, error="no main process")
    assert await commands.answer("sb", failed, now=unread.expires_at) is Answer.LATE
    row = await commands.get(unread.command.command_id, now=t0)
    assert row is not None and (row.state, row.late_result) == ("expired", "failed")
    assert "no main process" in (row.error or "") and EXPIRED_ERROR in (row.error or "")

    # Rows stored without an expiry: LEGACY_TTL_S from their creation.
    now = utcnow()
    async with db.engine.begin() as conn:
        for command_id, age_s in (("legacy-old", LEGACY_TTL_S + 1), ("legacy-new", 1.0)):
            await conn.execute(
                insert(commands_table).values(
                    id=command_id,
                    sandbox_id="sb",
                    kind="signal",
                    args='{"signal": 10}',
                    state="pending",
                    created_at=now - timedelta(seconds=age_s),
                )
            )
    assert [r.command.command_id for r in await commands.pending("sb", now=now)] == ["legacy-new"]
    old = await commands.get("legacy-old", now=now)
    assert old is not None and old.state == "expired"
    new = await commands.get("legacy-new", now=now)
    assert new is not None and new.expires_at == new.created_at + timedelta(seconds=LEGACY_TTL_S)
    listed = {r.command.command_id: r.state for r in await commands.list("sb", now=now)}
    assert listed == {
        long.command.command_id: "applied",
        short.command.command_id: "expired",
        unread.command.command_id: "expired",
        "legacy-old": "expired",
        "legacy-new": "pending",
    }


async def test_command_expiry(db: Database) -> None:
    await check_command_expiry(db)


def _service(db: Database, tmp_path: Path, registry: SessionRegistry) -> OpenShellService:
    config = gateway_config(tmp_path, {"commands": {"delivery_wait_s": 0.5}})
    return OpenShellService(
        config=config,
        registry=registry,
        sandboxes=SandboxStore(db),
        events=EventStore(db),
        commands=CommandStore(db),
    )


async def test_delivered_means_a_session_took_it_not_that_one_exists(db: Database, tmp_path: Path) -> None:
    """A session in the registry whose handler never writes (stuck, or dead and not yet noticed)
    does not make a command delivered; nor does an expired command reach a live session."""
    registry = SessionRegistry()
    service = _service(db, tmp_path, registry)
    await SandboxStore(db).ensure("sb")
    commands = CommandStore(db)
    registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i1",
        journal_epoch=JournalEpoch("e1"),
        capabilities=frozenset({CAP_COMMANDS}),
    )
    row = await commands.create("sb", CommandKind.SIGNAL, signal=10)
    assert await service.deliver(row) is False, "nobody wrote it to a stream"
    assert (await commands.get(row.command.command_id)).state == "pending"  # type: ignore[union-attr]

    gone = await commands.create("sb", CommandKind.SIGNAL, signal=10, ttl_s=1)
    session = registry.get("sb")
    assert session is not None
    while not session.inbox.empty():
        session.inbox.get_nowait()
    assert await service.deliver(replace(gone, expires_at=gone.created_at)) is False
    assert session.inbox.empty(), "an expired command is not even queued"


async def test_delivered_is_settled_by_the_write(db: Database, tmp_path: Path) -> None:
    """The session's handler settles delivery after gRPC took the message (its context.write
    returned), and as not delivered when the write is cancelled or fails."""
    registry = SessionRegistry()
    service = _service(db, tmp_path, registry)
    service._config.commands.delivery_wait_s = 30.0  # settled by the handler, never by the wait
    await SandboxStore(db).ensure("sb")
    session = registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i1",
        journal_epoch=JournalEpoch("e1"),
        capabilities=frozenset({CAP_COMMANDS}),
    )
    commands = CommandStore(db)
    for write_fails in (True, False):
        row = await commands.create("sb", CommandKind.SIGNAL, signal=10)
        delivering = asyncio.create_task(service.deliver(row))
        handler = HandlerCall.running(lambda call: service._serve(session, call.write))
        message = await anext(handler)
        assert message.command.command_id == row.command.command_id
        await asyncio.sleep(0)
        assert not delivering.done(), "handed to gRPC, not yet written"
        if write_fails:
            await handler.aclose()
        else:
            session.inbox.put_nowait(Close("test: done"))
            assert [m async for m in handler] == []
        assert await delivering is not write_fails

    # One that expires while it waits in the inbox (the handler busy meanwhile) is never written.
    row = await commands.create("sb", CommandKind.SIGNAL, signal=10)
    soon = replace(row, expires_at=utcnow() + timedelta(seconds=0.2))
    delivering = asyncio.create_task(service.deliver(soon))
    await asyncio.sleep(0.3)
    session.inbox.put_nowait(Close("test: done"))
    assert [m async for m in HandlerCall.running(lambda call: service._serve(session, call.write))] == []
    assert await delivering is False
