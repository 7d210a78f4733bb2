"""One write at a time on a session's stream, in one process: the real service over a real
SQLite store, its call's context the fake of tests/support/handler_call (a write returns when
the next message is read, and a second write while one is unread fails as gRPC's would).

The reader task answers heartbeats and the session's loop writes everything else: they take
turns. And when the loop ends on a store failure while the reader is still writing a heartbeat
answer, that write ends before the rejection is written (gRPC would refuse the rejection, and the
supervisor would get an internal error instead of OVERLOADED and its retry hint)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.server import OpenShellService
from gateway.sessions import Outbound, Session, SessionRegistry
from gateway.store import CommandStore, Database, EventStore, SandboxStore, StoreError
from openshell_wire.convert import event_to_proto
from openshell_wire.records import CAP_EVENTS, Event, LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.gateway import gateway_config
from tests.support.handler_call import HandlerCall
from tests.support.waiting import until


class _FailingEvents(EventStore):
    """A real store whose batches fail (the database refused the transaction) once ``release``
    is set."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.failed = asyncio.Event()

    async def store_wire_batch(self, *args: Any, **kwargs: Any) -> int:
        self.started.set()
        await self.release.wait()
        self.failed.set()
        raise StoreError("the database refused the batch")


async def _messages(queue: asyncio.Queue[pb.SupervisorMessage]) -> AsyncIterator[pb.SupervisorMessage]:
    while True:
        yield await queue.get()


def _hello() -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = "sb"
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.append(CAP_EVENTS)
    msg.hello.journal_epoch = "e1"
    return msg


def _heartbeat(sent: int) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.heartbeat.sent_unix_ms = sent
    return msg


def _batch() -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.events.journal_epoch = "e1"
    record = LogRecord(LogStream.STDOUT, "a line")
    msg.events.events.append(event_to_proto(Event(sequence=1, timestamp_ms=1, payload=record)))
    return msg


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[OpenShellService, _FailingEvents]]:
    config = gateway_config(tmp_path)
    db = await Database.open(config.database.url)
    events = _FailingEvents(db)
    svc = OpenShellService(
        config=config,
        registry=SessionRegistry(),
        sandboxes=SandboxStore(db),
        events=events,
        commands=CommandStore(db),
    )
    try:
        yield svc, events
    finally:
        await svc.drain(timeout_s=5)
        await db.close()


async def _accepted(
    svc: OpenShellService, queue: asyncio.Queue[pb.SupervisorMessage]
) -> tuple[HandlerCall, Session]:
    queue.put_nowait(_hello())
    call = HandlerCall(svc.ConnectSupervisor, _messages(queue), resume_on_read=True)
    assert (await asyncio.wait_for(anext(call), 5)).HasField("session_accepted")
    session = svc._registry.get("sb")
    assert session is not None
    return call, session


async def test_the_loop_waits_for_the_readers_heartbeat_answer(
    stores: tuple[OpenShellService, _FailingEvents],
) -> None:
    svc, _ = stores
    queue: asyncio.Queue[pb.SupervisorMessage] = asyncio.Queue()
    call, session = await _accepted(svc, queue)
    try:
        queue.put_nowait(_heartbeat(7))
        await until(lambda: session.writing, within=5, what="the reader writing the answer")
        hint = pb.GatewayMessage()
        hint.reconnect.reason = "test"
        session.inbox.put_nowait(Outbound(hint))
        await asyncio.sleep(0.1)  # the loop takes it and must wait for its turn
        assert (await asyncio.wait_for(anext(call), 5)).heartbeat.echo_unix_ms == 7
        assert (await asyncio.wait_for(anext(call), 5)).reconnect.reason == "test"
        # A heartbeat that comes while the loop writes is answered by the loop.
        session.inbox.put_nowait(Outbound(hint))
        await until(lambda: session.writing, within=5, what="the loop writing")
        queue.put_nowait(_heartbeat(8))
        await asyncio.sleep(0.1)
        assert (await asyncio.wait_for(anext(call), 5)).HasField("reconnect")
        assert (await asyncio.wait_for(anext(call), 5)).heartbeat.echo_unix_ms == 8
    finally:
        await call.aclose()


async def test_a_store_failure_while_the_reader_writes_is_still_answered_overloaded(
    stores: tuple[OpenShellService, _FailingEvents],
) -> None:
    svc, events = stores
    queue: asyncio.Queue[pb.SupervisorMessage] = asyncio.Queue()
    call, session = await _accepted(svc, queue)
    try:
        queue.put_nowait(_batch())  # its store fails: the session ends on a store failure
        await asyncio.wait_for(events.started.wait(), 5)
        # The reader writes a heartbeat answer (the client has not read it yet) when it fails.
        queue.put_nowait(_heartbeat(9))
        await until(lambda: session.writing, within=5, what="the reader writing the answer")
        events.release.set()
        await asyncio.wait_for(events.failed.wait(), 5)
        await asyncio.sleep(0.1)
        assert (await asyncio.wait_for(anext(call), 5)).heartbeat.echo_unix_ms == 9
        rejected = await asyncio.wait_for(anext(call), 5)
        assert rejected.session_rejected.code == pb.REJECT_CODE_OVERLOADED, rejected
        assert rejected.session_rejected.retry_after_ms > 0
        with pytest.raises(Exception, match="store unavailable"):
            await asyncio.wait_for(anext(call), 5)
    finally:
        await call.aclose()
