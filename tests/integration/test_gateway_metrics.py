"""The gateway's issue 23 metrics, read from its metrics listener's text exposition (``GET /metrics``
on the ops listener), never from its internals, while a supervisor speaks the real protocol to an
in-process gateway over gRPC: gaps by reason and the records they lost, lifecycle records and
restarts, the health of the sandboxes held and their OOM kills, heartbeats answered, reconnections,
the resume backlog, bytes of stored batches, database statement latency and errors.

The supervisor here is a raw ``ConnectSupervisor`` stream (as tests/integration/test_fencing.py
drives one), so that each record kind can be sent exactly once and a replay sent on purpose; no
label may name a sandbox (checked on the whole exposition).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from gateway.app import Gateway
from openshell_wire.convert import event_to_proto
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    HealthRecord,
    HealthState,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
async def gw(db_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(gateway_config(tmp_path, {"database": {"url": db_url}}))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def scrape(gw: Gateway) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.ops_url}/metrics") as resp:
        assert resp.status == 200
        body = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def hello(sandbox_id: str, journal: str, *, last: int) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.extend(["events", "resume"])
    msg.hello.journal_epoch = journal
    msg.hello.journal_first_sequence = 1 if last else 0
    msg.hello.journal_last_sequence = last
    return msg


def batch(journal: str, *events: Event) -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.events.journal_epoch = journal
    msg.events.events.extend(event_to_proto(e) for e in events)
    return msg


def heartbeat() -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.heartbeat.sent_unix_ms = 1
    return msg


async def read(call: Any, kind: str) -> pb.GatewayMessage:
    """The next message of ``kind`` (session updates and commands in between are skipped)."""
    while True:
        message = await asyncio.wait_for(call.read(), 10)
        assert isinstance(message, pb.GatewayMessage), message
        if message.WhichOneof("payload") == kind:
            return message
        assert message.WhichOneof("payload") in ("session_update", "command"), message


RECORDS = (
    Event(1, 1000, LogRecord(LogStream.STDOUT, "hello")),
    Event(2, 1001, GapRecord(GapReason.OVERFLOW, dropped_records=40, dropped_bytes=4000, first_sequence=2,
                             last_sequence=41)),
    Event(3, 1002, GapRecord(GapReason.WRITE_FAILED, dropped_records=2, dropped_bytes=20, first_sequence=42,
                             last_sequence=43, detail="No space left on device")),
    Event(4, 1003, LifecycleRecord(LifecycleKind.STARTED, pid=7, detail="restart 1/5 after exit code 1")),
    Event(5, 1004, HealthRecord(HealthState.UNHEALTHY, reasons=("OOM kill",), change=True, oom_kills=3)),
)  # fmt: skip


async def test_supervisor_records_heartbeats_and_reconnects_move_the_metrics(gw: Gateway) -> None:
    before = await scrape(gw)
    # Every family is there before anything happened (gaps by their known reasons at 0).
    assert value(before, "openshell_gateway_supervisor_gaps_total", reason="overflow") == 0
    assert value(before, "openshell_gateway_sandbox_health", state="unknown") == 0
    assert value(before, "openshell_gateway_heartbeats_total") == 0
    assert value(before, "openshell_gateway_session_reconnects_total") == 0
    assert value(before, "openshell_gateway_event_bytes_received_total") == 0
    assert value(before, "openshell_gateway_sandboxes_not_exited") == 0

    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        await call.write(hello("sb-m", "j1", last=5))
        await read(call, "session_accepted")
        # A session with no health record yet: unknown.
        assert value(await scrape(gw), "openshell_gateway_sandbox_health", state="unknown") == 1
        await call.write(batch("j1", *RECORDS))
        ack = await read(call, "event_ack")
        assert ack.event_ack.acked_through_sequence == 5
        await call.write(heartbeat())
        await read(call, "heartbeat")
        await call.write(heartbeat())
        await read(call, "heartbeat")
        # A replay of what was acknowledged (a lost ack): stored once, counted once.
        await call.write(batch("j1", *RECORDS))
        await read(call, "event_ack")

        held = await scrape(gw)
        assert value(held, "openshell_gateway_supervisor_gaps_total", reason="overflow") == 1
        assert value(held, "openshell_gateway_supervisor_gaps_total", reason="write_failed") == 1
        assert value(held, "openshell_gateway_supervisor_gaps_total", reason="corrupt") == 0
        assert value(held, "openshell_gateway_supervisor_gap_dropped_records_total", reason="overflow") == 40
        assert (
            value(held, "openshell_gateway_supervisor_gap_dropped_records_total", reason="write_failed") == 2
        )
        assert value(held, "openshell_gateway_supervisor_lifecycle_records_total", kind="started") == 1
        assert value(held, "openshell_gateway_main_process_restarts_total") == 1
        assert value(held, "openshell_gateway_supervisor_health_changes_total", state="unhealthy") == 1
        assert value(held, "openshell_gateway_sandbox_health", state="unhealthy") == 1
        assert value(held, "openshell_gateway_sandbox_health", state="unknown") == 0
        assert value(held, "openshell_gateway_sandbox_oom_kills") == 3
        assert value(held, "openshell_gateway_heartbeats_total") == 2
        # Five records held, none stored yet: a backlog of five at the hello.
        assert value(held, "openshell_gateway_resume_backlog_records_count") == 1
        assert value(held, "openshell_gateway_resume_backlog_records_sum") == 5
        assert value(held, "openshell_gateway_session_reconnects_total") == 0
        # Both batches' bytes (repeats included, as events_received counts them).
        one_batch = batch("j1", *RECORDS).events.ByteSize()
        assert value(held, "openshell_gateway_event_bytes_received_total") == 2 * one_batch
        assert value(held, "openshell_gateway_events_received_total") == 2 * len(RECORDS)
        # Every statement of the hello and the batches went through the one hook.
        assert (value(held, "openshell_gateway_db_statement_seconds_count", statement="insert") or 0) > 0
        assert (value(held, "openshell_gateway_db_statement_seconds_count", statement="select") or 0) > 0
        # No label names a sandbox.
        assert not [key for key in held if any("sb-m" in v for _, v in key[1])]
        call.cancel()

    # The session ended: its health leaves the counts.
    for _ in range(100):
        after = await scrape(gw)
        if value(after, "openshell_gateway_sessions") == 0:
            break
        await asyncio.sleep(0.05)
    assert total(after, "openshell_gateway_sandbox_health") == 0
    assert value(after, "openshell_gateway_sandbox_oom_kills") == 0

    # The supervisor comes back with one more record: a reconnection with a backlog of one, whose
    # health is unknown until it reports again in this session.
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        await call.write(hello("sb-m", "j1", last=6))
        accepted = await read(call, "session_accepted")
        assert accepted.session_accepted.resume_after_sequence == 5
        back = await scrape(gw)
        assert value(back, "openshell_gateway_session_reconnects_total") == 1
        assert value(back, "openshell_gateway_resume_backlog_records_count") == 2
        assert value(back, "openshell_gateway_resume_backlog_records_sum") == 6
        assert value(back, "openshell_gateway_sandbox_health", state="unknown") == 1
        assert value(back, "openshell_gateway_sandbox_health", state="unhealthy") == 0
        healthy = Event(6, 1005, HealthRecord(HealthState.HEALTHY, change=True, oom_kills=3))
        await call.write(batch("j1", healthy))
        await read(call, "event_ack")
        back = await scrape(gw)
        assert value(back, "openshell_gateway_sandbox_health", state="healthy") == 1
        assert value(back, "openshell_gateway_supervisor_health_changes_total", state="healthy") == 1
        assert value(back, "openshell_gateway_supervisor_gaps_total", reason="overflow") == 1
        # Counted with the sandboxes gauge (again once its count is 5 s old): one not exited.
        for _ in range(200):
            if value(await scrape(gw), "openshell_gateway_sandboxes_not_exited") == 1:
                break
            await asyncio.sleep(0.05)
        assert value(await scrape(gw), "openshell_gateway_sandboxes_not_exited") == 1
        call.cancel()


async def test_database_statements_and_errors_are_counted_by_kind(gw: Gateway) -> None:
    """A statement of the gateway's engine is timed, one that fails is counted by its class (the
    two families are the process's: counted from what they showed before)."""
    errors, selects = "openshell_gateway_db_errors_total", "openshell_gateway_db_statement_seconds_count"
    before = await scrape(gw)
    assert gw.db is not None
    async with gw.db.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await conn.execute(text("SELECT 2"))
    with pytest.raises(Exception, match=r"no such table|does not exist"):
        async with gw.db.engine.connect() as conn:
            await conn.execute(text("SELECT * FROM no_such_table"))
    after = await scrape(gw)
    # SQLite's error is an OperationalError, PostgreSQL's (undefined table) a ProgrammingError.
    error = "OperationalError" if gw.db.dialect == "sqlite" else "ProgrammingError"
    assert (value(after, errors, error=error) or 0) - (value(before, errors, error=error) or 0) == 1
    # At least: the gateway's own background work (lease renewals, counts) may select meanwhile.
    assert (value(after, selects, statement="select") or 0) - (
        value(before, selects, statement="select") or 0
    ) >= 2
