"""The supervisor's session against a hand-made gateway that says odd things.

The gateway here is a real grpc.aio server whose ConnectSupervisor handler sends raw bytes, so it
can send what our gateway never would: message kinds from the future, acknowledgements for
another journal, rejections with a retry-after. The supervisor must keep its session and its
records through all of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from openshell_wire.configfile import load_settings
from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from supervisor.agent import journal_options
from supervisor.config import SupervisorConfig
from supervisor.journal import Journal
from supervisor.session import Session

Handler = Callable[[AsyncIterator[pb.SupervisorMessage], Any], AsyncIterator[bytes]]


async def _serve(handler: Handler) -> tuple[aio.Server, int]:
    server = aio.server()
    rpc = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=pb.SupervisorMessage.FromString, response_serializer=lambda b: b
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("openshell.v1.OpenShell", {"ConnectSupervisor": rpc})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _accepted(resume: int = 0) -> bytes:
    msg = pb.GatewayMessage()
    msg.session_accepted.session_id = "s1"
    msg.session_accepted.heartbeat_interval_secs = 1
    msg.session_accepted.heartbeat_interval_ms = 200
    msg.session_accepted.capabilities.extend(["events", "resume"])
    msg.session_accepted.resume_after_sequence = resume
    return msg.SerializeToString()


def _ack(epoch: str, through: int) -> bytes:
    msg = pb.GatewayMessage()
    msg.event_ack.journal_epoch = epoch
    msg.event_ack.acked_through_sequence = through
    return msg.SerializeToString()


def _session(tmp_path: Path, port: int) -> tuple[Session, Journal]:
    config = load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": "odd",
            "gateway": {"address": f"127.0.0.1:{port}", "connect_timeout_s": 2},
            "journal": {"directory": str(tmp_path / "journal")},
            "session": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.5},
        },
        use_env=False,
    )
    journal = Journal.open(journal_options(config))
    return Session(config=config, journal=journal, instance_id="i1"), journal


async def _deliver(session: Session, journal: Journal, limit_s: float = 20) -> None:
    runner = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(session.wait_acked(journal.last_sequence), limit_s)
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        journal.close()


async def test_unknown_kinds_and_foreign_acks_are_ignored(tmp_path: Path) -> None:
    seen: list[int] = []

    async def handler(requests: AsyncIterator[pb.SupervisorMessage], context: Any) -> AsyncIterator[bytes]:
        hello = await anext(requests)
        epoch = hello.hello.journal_epoch
        yield _accepted()
        yield bytes([0xC2, 0x0C, 0x00])  # GatewayMessage field 200: a kind from the future
        async for msg in requests:
            if msg.WhichOneof("payload") == "events":
                last = msg.events.events[-1].sequence
                seen.extend(e.sequence for e in msg.events.events)
                yield _ack("someone-else", last)  # another journal's ack must not trim ours
                yield _ack(epoch, last)
            elif msg.WhichOneof("payload") == "heartbeat":
                yield pb.GatewayMessage(heartbeat=pb.GatewayHeartbeat()).SerializeToString()

    server, port = await _serve(handler)
    try:
        session, journal = _session(tmp_path, port)
        for i in range(50):
            journal.append(LogRecord(LogStream.STDOUT, f"l{i}"))
        target = journal.last_sequence
        await _deliver(session, journal)
        assert seen == list(range(1, target + 1))
        assert session.status.sessions == 1, "nothing odd should have cost the session"
    finally:
        await server.stop(None)


async def test_rejection_with_retry_after_is_honoured_then_delivery_completes(tmp_path: Path) -> None:
    attempts: list[float] = []

    async def handler(requests: AsyncIterator[pb.SupervisorMessage], context: Any) -> AsyncIterator[bytes]:
        hello = await anext(requests)
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            msg = pb.GatewayMessage()
            msg.session_rejected.reason = "busy"
            msg.session_rejected.code = pb.REJECT_CODE_OVERLOADED
            msg.session_rejected.retry_after_ms = 700
            yield msg.SerializeToString()
            return
        yield _accepted()
        async for msg in requests:
            if msg.WhichOneof("payload") == "events":
                yield _ack(hello.hello.journal_epoch, msg.events.events[-1].sequence)

    server, port = await _serve(handler)
    try:
        session, journal = _session(tmp_path, port)
        journal.append(LogRecord(LogStream.STDOUT, "only"))
        await _deliver(session, journal)
        assert len(attempts) == 2
        assert attempts[1] - attempts[0] >= 0.7, "the gateway's retry_after is a floor for the backoff"
        assert "busy" in session.status.last_error
    finally:
        await server.stop(None)


async def test_resume_point_above_the_journal_moves_sequences_past_it(tmp_path: Path) -> None:
    """The gateway holds sequences our disk lost: new records must never reuse them."""

    async def handler(requests: AsyncIterator[pb.SupervisorMessage], context: Any) -> AsyncIterator[bytes]:
        hello = await anext(requests)
        yield _accepted(resume=hello.hello.journal_last_sequence + 100)
        async for msg in requests:
            if msg.WhichOneof("payload") == "events":
                yield _ack(hello.hello.journal_epoch, msg.events.events[-1].sequence)

    server, port = await _serve(handler)
    try:
        session, journal = _session(tmp_path, port)
        journal.append(LogRecord(LogStream.STDOUT, "before"))
        runner = asyncio.create_task(session.run())
        try:
            await asyncio.wait_for(session.wait_acked(101), 10)
            journal.append(LogRecord(LogStream.STDOUT, "after"))
            assert journal.last_sequence == 102
            await asyncio.wait_for(session.wait_acked(102), 10)
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            journal.close()
    finally:
        await server.stop(None)


async def test_an_internal_error_costs_one_attempt_not_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(requests: AsyncIterator[pb.SupervisorMessage], context: Any) -> AsyncIterator[bytes]:
        hello = await anext(requests)
        yield _accepted()
        async for msg in requests:
            if msg.WhichOneof("payload") == "events":
                yield _ack(hello.hello.journal_epoch, msg.events.events[-1].sequence)

    server, port = await _serve(handler)
    try:
        session, journal = _session(tmp_path, port)
        journal.append(LogRecord(LogStream.STDOUT, "still delivered"))
        real = journal.mark_sent
        calls = {"n": 0}

        def flaky(sequence: int) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug on the send path")
            real(sequence)

        monkeypatch.setattr(journal, "mark_sent", flaky)
        await _deliver(session, journal)
        assert session.status.attempts >= 2
        assert "failed unexpectedly" in caplog.text
    finally:
        await server.stop(None)
