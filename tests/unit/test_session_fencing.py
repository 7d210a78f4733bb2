"""Fencing in one process (issue 20 point 1): the real service over a real SQLite store, driven
directly. A session whose sandbox another replica claimed (a claim written straight to the store,
as that replica's hello would) has its next batch refused: nothing stored, nothing acknowledged,
the stream ends SUPERSEDED with the reason, the row is left to the newer claim. The registry
keeps the session with the newer claim, and a heartbeat flush that found a claim moved ends that
session the same way. (Two real replicas on PostgreSQL: tests/integration/test_fencing.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from gateway.metrics import GatewayMetrics
from gateway.server import OpenShellService
from gateway.sessions import Close, Session, SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxStore
from openshell_wire.convert import event_to_proto
from openshell_wire.records import CAP_EVENTS, Event, JournalEpoch, LogRecord, LogStream, SandboxId
from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.gateway import gateway_config
from tests.support.handler_call import HandlerCall


def _batch(sequence: int, message: str) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.events.journal_epoch = "e1"
    msg.events.events.append(
        event_to_proto(Event(sequence=sequence, timestamp_ms=1, payload=LogRecord(LogStream.STDOUT, message)))
    )
    return msg


async def _messages(queue: asyncio.Queue[pb.SupervisorMessage]) -> AsyncIterator[pb.SupervisorMessage]:
    while True:
        yield await queue.get()


async def test_a_batch_after_another_replicas_claim_is_refused_and_ends_the_session(tmp_path: Path) -> None:
    db = await Database.open(gateway_config(tmp_path).database.url)
    registry = SessionRegistry()
    metrics = GatewayMetrics(registry)
    sandboxes, events = SandboxStore(db), EventStore(db)
    svc = OpenShellService(
        config=gateway_config(tmp_path),
        registry=registry,
        sandboxes=sandboxes,
        events=events,
        commands=CommandStore(db),
        metrics=metrics,
    )
    inbound: asyncio.Queue[pb.SupervisorMessage] = asyncio.Queue()
    hello = pb.SupervisorMessage()
    hello.hello.sandbox_id = "sb"
    hello.hello.instance_id = "i1"
    hello.hello.capabilities.append(CAP_EVENTS)
    hello.hello.journal_epoch = "e1"
    inbound.put_nowait(hello)
    call = HandlerCall(svc.ConnectSupervisor, _messages(inbound))
    try:
        accepted = (await asyncio.wait_for(anext(call), 5)).session_accepted
        assert accepted.owner_epoch >= 1
        inbound.put_nowait(_batch(1, "mine"))
        assert (await asyncio.wait_for(anext(call), 5)).event_ack.acked_through_sequence == 1
        # Another replica's hello for the sandbox (its supervisor moved there).
        theirs = await sandboxes.mark_connected(
            "sb", instance_id="i1", session_id="s-b", journal_epoch="e1", owner="gw-b", at=datetime.now(UTC)
        )
        assert theirs == accepted.owner_epoch + 1
        before = await sandboxes.get("sb")
        inbound.put_nowait(_batch(2, "not stored"))
        answer = await asyncio.wait_for(anext(call), 5)
        assert answer.WhichOneof("payload") == "session_rejected", answer
        assert answer.session_rejected.code == pb.REJECT_CODE_SUPERSEDED
        assert f"newer session (epoch {theirs}) on replica gw-b" in answer.session_rejected.reason
        try:
            extra = await asyncio.wait_for(anext(call), 5)
            raise AssertionError(f"the stream must end, got {extra}")
        except StopAsyncIteration:
            pass
        await svc.drain(timeout_s=5)
        assert [e.message for e in await events.tail("sb")] == ["mine"]
        assert await sandboxes.get("sb") == before, "nor the session's end (its disconnection)"
        value = metrics.registry.get_sample_value("openshell_gateway_fenced_writes_total", {"kind": "events"})
        assert value == 1
        assert len(registry) == 0
    finally:
        await call.aclose()
        await svc.drain(timeout_s=5)
        await db.close()


def _open(registry: SessionRegistry, *, epoch: int) -> Session | None:
    return registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i1",
        journal_epoch=JournalEpoch("e1"),
        capabilities=frozenset(),
        owner_epoch=epoch,
    )


def test_the_registry_keeps_the_session_with_the_newer_claim() -> None:
    registry = SessionRegistry()
    newer = _open(registry, epoch=5)
    assert newer is not None
    assert _open(registry, epoch=4) is None, "a claim overtaken before its session began"
    assert registry.get("sb") is newer
    assert newer.inbox.empty()
    newest = _open(registry, epoch=6)
    assert newest is not None and registry.get("sb") is newest
    assert newer.inbox.get_nowait() == Close("replaced by a newer session of the same sandbox")


def test_a_heartbeat_flush_that_found_the_claim_moved_ends_the_session() -> None:
    registry = SessionRegistry()
    session = _open(registry, epoch=3)
    assert session is not None
    registry.fence({"sb"}, {"sb": "another session"})
    assert session.inbox.empty(), "only the session the flush was about"
    registry.fence({"sb"}, {"sb": session.session_id})
    closed = session.inbox.get_nowait()
    assert isinstance(closed, Close) and closed.fenced and "epoch 3" in closed.reason
    assert session.fenced, "its disconnection is not written"
