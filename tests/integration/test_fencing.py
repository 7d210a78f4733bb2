"""Fencing (issue 20 point 1): a session's writes land only while its claim on the sandbox (the
row's ``owner_epoch``, raised by each hello) is the newest.

The store-level test claims a sandbox twice and checks that every write of the older claim (an
event batch, a heartbeat flush, the disconnection, a command result) is refused and writes nothing,
on SQLite and on a real PostgreSQL. The process-level test freezes a real gateway replica (SIGSTOP)
holding a session, lets the same supervisor (a raw client speaking the protocol) move to a second
replica, and wakes the first: what it still had to write must not land, and its stream must end
with SessionRejected SUPERSEDED saying who owns the sandbox now.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from gateway.store import CommandStore, Database, EventStore, SandboxStore
from gateway.store.fencing import Fenced
from openshell_wire.convert import event_to_proto
from openshell_wire.records import CommandKind, CommandResult, Event, LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.postgres import PgServer, pg_bindir
from tests.support.procs import GatewayProcess, wait_until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

needs_postgres = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)


async def _admin(pg_server: PgServer, sql: str) -> None:
    admin = await asyncpg.connect(
        host="127.0.0.1", port=pg_server.port, user=pg_server.user, database="postgres"
    )
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


def _log(sequence: int, message: str) -> pb.Event:
    return event_to_proto(
        Event(sequence=sequence, timestamp_ms=1_000 + sequence, payload=LogRecord(LogStream.STDOUT, message))
    )


async def test_an_older_claims_writes_are_refused_and_write_nothing_on_sqlite(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        await _older_claims_writes_are_refused(db)
    finally:
        await db.close()


@needs_postgres
async def test_an_older_claims_writes_are_refused_and_write_nothing_on_postgresql(database_url: str) -> None:
    db = await Database.open(database_url)
    try:
        await _older_claims_writes_are_refused(db)
    finally:
        await db.close()


async def _older_claims_writes_are_refused(db: Database) -> None:
    sandboxes, events, commands = SandboxStore(db), EventStore(db), CommandStore(db)
    await sandboxes.ensure("sb")
    at = datetime.now(UTC)
    fields: dict[str, Any] = {"instance_id": "i1", "journal_epoch": "j1", "generation": 1}
    old = await sandboxes.mark_connected(
        "sb", session_id="s-old", owner="gw-a", owner_run="ra", at=at, **fields
    )
    assert old is not None
    # The old session's writes land while its claim is the row's.
    assert (
        await events.store_wire_batch(
            "sb", "j1", [_log(1, "old-1")], known_high_water_mark=0, owner_epoch=old
        )
        == 1
    )
    new = await sandboxes.mark_connected(
        "sb", session_id="s-new", owner="gw-b", owner_run="rb", at=at, **fields
    )
    assert new is not None and new > old
    created = await commands.create("sb", CommandKind.STOP, grace_ms=1000, ttl_s=60.0)
    before = await sandboxes.get("sb")
    assert before is not None

    with pytest.raises(Fenced, match=rf"owned by a newer session \(epoch {new}\) on replica gw-b"):
        await events.store_wire_batch(
            "sb", "j1", [_log(2, "old-2"), _log(3, "old-3")], known_high_water_mark=1, owner_epoch=old
        )
    with pytest.raises(Fenced):  # a batch with a lifecycle record goes the other way in the store
        await events.store_events(
            "sb", "j1", [Event(sequence=4, timestamp_ms=5, payload=LogRecord(LogStream.STDOUT, "x"))],
            owner_epoch=old,
        )  # fmt: skip
    assert await sandboxes.record_heartbeats(
        {"sb": at + timedelta(seconds=30)}, sessions={"sb": "s-new"}, epochs={"sb": old}
    ) == {"sb"}
    with pytest.raises(Fenced) as refused:
        await sandboxes.mark_disconnected("sb", session_id="s-old", at=at, generation=1, owner_epoch=old)
    # Counted apart from the writes worth an alert: the routine end of a session that moved.
    assert refused.value.kind == "disconnect_superseded"
    with pytest.raises(Fenced):
        await commands.answer(
            "sb", CommandResult(command_id=created.command.command_id, applied=True), owner_epoch=old
        )

    after = await sandboxes.get("sb")
    assert after == before, "nothing of the older claim was written"
    assert [e.message for e in await events.tail("sb")] == ["old-1"]
    pending = await commands.pending("sb")
    assert [r.command.command_id for r in pending] == [created.command.command_id]

    # The owner's writes land.
    assert (
        await events.store_wire_batch(
            "sb", "j1", [_log(2, "new-2")], known_high_water_mark=1, owner_epoch=new
        )
        == 2
    )
    assert await commands.answer(
        "sb", CommandResult(command_id=created.command.command_id, applied=True), owner_epoch=new
    )
    assert await sandboxes.mark_disconnected("sb", session_id="s-new", at=at, generation=1, owner_epoch=new)
    row = await sandboxes.get("sb")
    assert row is not None and not row.connected and row.owner == "gw-b" and row.owner_run == "rb"


async def test_an_older_claims_delivery_mark_records_nothing_on_sqlite(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        await _older_claims_delivery_mark_records_nothing(db)
    finally:
        await db.close()


@needs_postgres
async def test_an_older_claims_delivery_mark_records_nothing_on_postgresql(database_url: str) -> None:
    db = await Database.open(database_url)
    try:
        await _older_claims_delivery_mark_records_nothing(db)
    finally:
        await db.close()


async def _older_claims_delivery_mark_records_nothing(db: Database) -> None:
    """A paused old owner that wrote a command to its (dead) stream must not mark it delivered:
    the newer session's redelivery would skip it until the next hello."""
    sandboxes, commands = SandboxStore(db), CommandStore(db)
    await sandboxes.ensure("sb")
    at = datetime.now(UTC)
    fields: dict[str, Any] = {"instance_id": "i1", "journal_epoch": "j1", "generation": 1}
    old = await sandboxes.mark_connected(
        "sb", session_id="s-old", owner="gw-a", owner_run="ra", at=at, **fields
    )
    new = await sandboxes.mark_connected(
        "sb", session_id="s-new", owner="gw-b", owner_run="rb", at=at, **fields
    )
    assert old is not None and new is not None and new > old
    created = await commands.create("sb", CommandKind.STOP, grace_ms=1000, ttl_s=60.0)
    command_id = created.command.command_id

    assert await commands.mark_delivered("sb", [command_id], by="gw-a", owner_epoch=old) == []
    row = await commands.get(command_id)
    assert row is not None and row.delivered_at is None and row.delivered_by is None
    assert [r.command.command_id for r, _ in await commands.deliverable(["sb"])] == [command_id]

    # The owner's mark lands.
    assert await commands.mark_delivered("sb", [command_id], by="gw-b", owner_epoch=new) == [command_id]
    row = await commands.get(command_id)
    assert row is not None and row.delivered_by == "gw-b"
    assert await commands.deliverable(["sb"]) == []


@needs_postgres
async def test_a_fenced_batch_does_not_wait_for_the_heartbeat_flush_but_a_claim_waits_for_it(
    database_url: str,
) -> None:
    """The fence's row lock (FOR KEY SHARE) does not conflict with the heartbeat flush's UPDATE of
    the same row, held open here as a flush over thousands of rows would hold it: a batch stores
    while the flush's transaction is still open. (FOR NO KEY UPDATE made every batch wait for the
    whole flush.) A claim still waits for a batch holding the fence, and is ordered after it."""
    db = await Database.open(database_url)
    raw = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        sandboxes, events = SandboxStore(db), EventStore(db)
        await sandboxes.ensure("sb")
        at = datetime.now(UTC)
        epoch = await sandboxes.mark_connected(
            "sb", session_id="s1", owner="gw-a", owner_run="ra", instance_id="i1", journal_epoch="j1", at=at
        )
        assert epoch is not None
        flush = raw.transaction()
        await flush.start()
        await raw.execute("UPDATE sandboxes SET last_heartbeat_at = now() WHERE id = 'sb'")
        stored = await asyncio.wait_for(
            events.store_wire_batch(
                "sb", "j1", [_log(1, "during")], known_high_water_mark=0, owner_epoch=epoch
            ),
            5,
        )
        assert stored == 1
        await flush.commit()

        # A batch holding the fence (its transaction open): a claim waits for it.
        batch = raw.transaction()
        await batch.start()
        assert await raw.fetchval("SELECT owner_epoch FROM sandboxes WHERE id = 'sb' FOR KEY SHARE") == epoch
        claim = asyncio.create_task(
            sandboxes.mark_connected(
                "sb",
                session_id="s2",
                owner="gw-b",
                owner_run="rb",
                instance_id="i1",
                journal_epoch="j1",
                at=at,
            )
        )
        await asyncio.sleep(1.0)
        assert not claim.done(), "a claim must wait for a write holding the fence"
        await batch.commit()
        assert await asyncio.wait_for(claim, 5) == epoch + 1
    finally:
        await raw.close()
        await db.close()


# -- two real replicas, one frozen -------------------------------------------------------------


def _hello(sandbox_id: str, journal: str) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.extend(["events", "resume"])
    msg.hello.journal_epoch = journal
    return msg


def _batch(journal: str, *events: pb.Event) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.events.journal_epoch = journal
    msg.events.events.extend(events)
    return msg


def _heartbeat() -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.heartbeat.sent_unix_ms = 1
    return msg


async def _read(call: Any) -> pb.GatewayMessage:
    message = await call.read()
    assert isinstance(message, pb.GatewayMessage), message  # not EOF: the stream must say why
    return message


def _metric_sum(gateway: GatewayProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + "{"))


async def _row(database_url: str) -> tuple[Any, list[str]]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        row = await conn.fetchrow("SELECT * FROM sandboxes WHERE id = 'sb-f'")
        messages = [
            r["message"] for r in await conn.fetch("SELECT message FROM events WHERE sandbox_id = 'sb-f'")
        ]
    finally:
        await conn.close()
    assert row is not None
    return row, messages


@needs_postgres
async def test_a_frozen_replica_woken_after_its_supervisor_moved_writes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    # A long heartbeat bound: A's session must not end by going stale while A is frozen, so what
    # ends it is the fence. Beats still flush every 0.5 s (GatewayProcess).
    common = {"heartbeat_interval_s": 30.0, "database_url": database_url}
    a = GatewayProcess(tmp_path / "a", extra=["--set", "ha.replica_id=gw-a"], **common)  # type: ignore[arg-type]
    b = GatewayProcess(tmp_path / "b", extra=["--set", "ha.replica_id=gw-b"], **common)  # type: ignore[arg-type]
    a.start()  # A migrates first: B then finds the schema in place
    try:
        b.start()
        async with aio.insecure_channel(a.address) as to_a, aio.insecure_channel(b.address) as to_b:
            call_a = pb_grpc.OpenShellStub(to_a).ConnectSupervisor()
            await call_a.write(_hello("sb-f", "j1"))
            accepted_a = (await _read(call_a)).session_accepted
            assert accepted_a.owner_epoch >= 1
            await call_a.write(_batch("j1", _log(1, "a-1")))
            assert (await _read(call_a)).event_ack.acked_through_sequence == 1
            await call_a.write(_heartbeat())
            await _read(call_a)  # the echo: A has the beat, to flush

            a.signal(signal.SIGSTOP)
            try:
                # Sent to the frozen A: in flight until it wakes (the kernel holds the bytes).
                await call_a.write(_batch("j1", _log(2, "a-2"), _log(3, "a-3")))
                await call_a.write(_heartbeat())
                # The supervisor gives A up and moves to B, which claims the sandbox anew. A may be
                # frozen inside a heartbeat flush's transaction, holding the row: B's claim then
                # waits for it until PostgreSQL ends that idle transaction
                # (database.idle_in_transaction_timeout_s) and B answers OVERLOADED meanwhile; a
                # supervisor retries after the hint, as this does.
                refusals: list[pb.SessionRejected] = []
                async with asyncio.timeout(40):
                    while True:
                        call_b = pb_grpc.OpenShellStub(to_b).ConnectSupervisor()
                        await call_b.write(_hello("sb-f", "j1"))
                        answer_b = await _read(call_b)
                        if answer_b.WhichOneof("payload") == "session_accepted":
                            break
                        assert answer_b.session_rejected.code == pb.REJECT_CODE_OVERLOADED, answer_b
                        refusals.append(answer_b.session_rejected)
                        call_b.cancel()
                        await asyncio.sleep(max(answer_b.session_rejected.retry_after_ms / 1000, 0.2))
                accepted_b = answer_b.session_accepted
                assert accepted_b.owner_epoch > accepted_a.owner_epoch, ("the newest hello's claim", refusals)
                assert accepted_b.resume_after_sequence == 1
                await call_b.write(_batch("j1", _log(2, "b-2")))
                assert (await _read(call_b)).event_ack.acked_through_sequence == 2
            finally:
                a.signal(signal.SIGCONT)

            # A wakes: its stream ends with the reason, nothing of what it had is acknowledged.
            async with asyncio.timeout(20):
                answer = await _read(call_a)
                while answer.WhichOneof("payload") == "heartbeat":
                    answer = await _read(call_a)
            assert answer.WhichOneof("payload") == "session_rejected", answer
            rejected = answer.session_rejected
            assert rejected.code == pb.REJECT_CODE_SUPERSEDED, rejected
            assert f"epoch {accepted_b.owner_epoch}" in rejected.reason and "gw-b" in rejected.reason, (
                rejected
            )
            wait_until(
                lambda: _metric_sum(a, "openshell_gateway_fenced_writes_total") >= 1,
                timeout=10,
                what="A counting the fenced write",
            )
            # Let A's flusher and its session's teardown run their course (several flushes).
            await asyncio.sleep(1.5)
            row, messages = await _row(database_url)
            assert (row["owner"], row["owner_epoch"], row["session_id"]) == (
                "gw-b",
                accepted_b.owner_epoch,
                accepted_b.session_id,
            ), "the row still names B's session and claim"
            assert row["connected"] and row["disconnected_at"] is None, "A's disconnection did not land"
            assert sorted(messages) == ["a-1", "b-2"], "nothing of A's stream stored after B's claim"
            assert "session fenced" in a.log_text()
            await call_b.done_writing()
            call_a.cancel()
            call_b.cancel()
    finally:
        a.stop()
        b.stop()
