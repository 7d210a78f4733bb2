"""The gateway's OTLP log export (gateway/otlp_logs.py), received by a real OTLP/gRPC receiver
(tests/support/otlp_receiver.py) through the OpenTelemetry SDK's exporter.

In-process, on the store: stored log lines, lifecycle and gap records arrive with their
attributes; a receiver that is down for a while loses nothing once back (the position moves only
after the receiver accepted); a restarted exporter resumes from the stored position without
sending again what was accepted; on PostgreSQL, an event whose transaction commits after a later
one's is still exported, and a second exporter takes over when the first one's lease lapses.
Through processes: a real supervisor's lines and exit reach the receiver through a gateway that is
killed and started again while the receiver is down.
"""

from __future__ import annotations

import asyncio
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from sqlalchemy import delete, insert, update

from gateway.app import Gateway
from gateway.config import OtlpLogsSettings
from gateway.metrics import GatewayMetrics
from gateway.otlp_logs import OtlpLogExport
from gateway.sessions import SessionRegistry
from gateway.store import Database, EventStore, SandboxStore
from gateway.store.db import utcnow
from gateway.store.export_cursor import ExportCursorStore
from gateway.store.schema import events as events_table
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from tests.support import otlp_receiver
from tests.support.gateway import gateway_config
from tests.support.otlp_receiver import OtlpReceiver, ReceivedLog
from tests.support.postgres import pg_bindir
from tests.support.procs import GatewayProcess, SupervisorProcess, free_port
from tests.support.waiting import until

TS = 1_764_072_000_000


def line(seq: int, message: str | None = None, stream: LogStream = LogStream.STDOUT) -> Event:
    return Event(seq, TS + seq, LogRecord(stream, message or f"line {seq}"))


class FixedPortReceiver:
    """The test receiver's services on a port chosen before it listens: an exporter can be
    pointed at it while it is down, and it can come back on the same port."""

    def __init__(self, receiver: OtlpReceiver, port: int) -> None:
        self.receiver = receiver
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            otlp_receiver._Logs(self.receiver), server
        )
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    rx = OtlpReceiver()
    await rx.start()
    try:
        yield rx
    finally:
        await rx.stop()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    yield database
    await database.close()


def settings(endpoint: str, **more: Any) -> OtlpLogsSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "endpoint": endpoint,
        "poll_interval_s": 0.1,
        "timeout_s": 1.0,
        "max_backoff_s": 0.5,
        "lease_s": 3.0,
        **more,
    }
    return OtlpLogsSettings.model_validate(values)


class Running:
    """An export task, cancelled (and its lease released, unless ``crash``) at the end."""

    def __init__(self, export: OtlpLogExport) -> None:
        self.export = export
        self.task = asyncio.create_task(export.run())

    async def stop(self, *, crash: bool = False) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        if not crash:
            await self.export.release()


def by_key(logs: list[ReceivedLog]) -> dict[tuple[str, str, int], list[ReceivedLog]]:
    """The records by (sandbox, journal epoch, sequence): what identifies one."""
    out: dict[tuple[str, str, int], list[ReceivedLog]] = {}
    for r in logs:
        key = (
            r.attributes["openshell.sandbox_id"],
            r.attributes["openshell.journal_epoch"],
            r.attributes["openshell.sequence"],
        )
        out.setdefault(key, []).append(r)
    return out


Keyed = dict[tuple[str, str, int], list[ReceivedLog]]


async def wait_keys(
    receiver: OtlpReceiver, want: Callable[[Keyed], bool], what: str, *, within: float = 30
) -> Keyed:
    def check() -> Keyed | None:
        keyed = by_key(receiver.logs())
        return keyed if want(keyed) else None

    return await receiver.wait_for(check, within=within, what=what)


# -- in-process, SQLite ----------------------------------------------------------------------------


async def check_records_carry_their_attributes(db: Database, receiver: OtlpReceiver) -> None:
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb-1")
    batch = [
        Event(1, TS, LifecycleRecord(LifecycleKind.STARTED, pid=7, instance_id="inst-a")),
        line(2, "hello"),
        line(3, "oops", LogStream.STDERR),
        Event(4, TS + 4, GapRecord(GapReason.OVERFLOW, 12, 3400, 5, 16, "journal full")),
        line(17, "after the gap"),
        Event(18, TS + 18, LifecycleRecord(LifecycleKind.EXITED, pid=7, exit_code=3)),
    ]
    assert await events.store_events("sb-1", "j1", batch) == 18
    metrics = GatewayMetrics(SessionRegistry())
    run = Running(OtlpLogExport(settings(receiver.endpoint), db, replica="r1", metrics=metrics))
    try:
        got = await wait_keys(receiver, lambda k: len(k) >= 6, "six records")
    finally:
        await run.stop()
    assert sorted(seq for _, _, seq in got) == [1, 2, 3, 4, 17, 18]
    rec = {seq: rs[0] for (_, _, seq), rs in got.items()}
    for r in rec.values():
        assert r.attributes["openshell.sandbox_id"] == "sb-1"
        assert r.attributes["openshell.journal_epoch"] == "j1"
        assert r.attributes["openshell.generation"] == 1
        assert r.resource["service.name"] == "openshell-gateway"
        assert r.resource["service.instance.id"] == "r1"
        assert r.scope == "openshell.gateway.events"
    hello, oops = rec[2], rec[3]
    assert (hello.body, hello.severity_text, hello.attributes["log.iostream"]) == ("hello", "INFO", "stdout")
    assert hello.time_unix_nano == (TS + 2) * 1_000_000
    # SeverityNumber INFO is 9, WARN 13 (as the supervisor's own export ranks the streams).
    assert (oops.severity_number, oops.attributes["log.iostream"]) == (13, "stderr")
    gap = rec[4]
    assert gap.attributes["openshell.kind"] == "gap"
    assert gap.severity_text == "WARN"
    assert gap.attributes["openshell.gap.reason"] == "overflow"
    assert gap.attributes["openshell.gap.first_sequence"] == 5
    assert gap.attributes["openshell.gap.last_sequence"] == 16
    assert gap.attributes["openshell.gap.dropped_records"] == 12
    assert gap.attributes["openshell.gap.dropped_bytes"] == 3400
    # The lost range lies between the records around it: loss, not silence.
    assert rec[2].attributes["openshell.sequence"] < 5 and rec[17].attributes["openshell.sequence"] == 17
    started, exited = rec[1], rec[18]
    assert started.attributes["openshell.lifecycle.kind"] == "started"
    assert started.attributes["openshell.instance_id"] == "inst-a"
    assert exited.attributes["openshell.lifecycle.kind"] == "exited"
    assert exited.attributes["openshell.lifecycle.exit_code"] == 3
    sample = metrics.registry.get_sample_value
    assert sample("openshell_gateway_otlp_log_records_exported_total", {"kind": "log"}) == 3
    assert sample("openshell_gateway_otlp_log_records_exported_total", {"kind": "gap"}) == 1
    assert sample("openshell_gateway_otlp_log_records_exported_total", {"kind": "lifecycle"}) == 2
    assert await ExportCursorStore(db).position() >= 6


async def test_records_carry_their_attributes(db: Database, receiver: OtlpReceiver) -> None:
    await check_records_carry_their_attributes(db, receiver)


async def check_receiver_down_then_back(db: Database) -> None:
    """Nothing is lost while the receiver is down, and a restart sends nothing twice that the
    receiver had accepted."""
    sandboxes, events = SandboxStore(db), EventStore(db)
    await sandboxes.ensure("sb")
    rx = OtlpReceiver()
    down = FixedPortReceiver(rx, free_port())
    metrics = GatewayMetrics(SessionRegistry())
    run = Running(OtlpLogExport(settings(down.endpoint), db, replica="r1", metrics=metrics))
    try:
        assert await events.store_events("sb", "j", [line(s) for s in range(1, 51)]) == 50
        failures = "openshell_gateway_otlp_log_export_failures_total"
        await until(
            lambda: (metrics.registry.get_sample_value(failures) or 0) >= 2,
            within=30,
            what="two failed exports to a closed port",
        )
        assert await ExportCursorStore(db).position() == 0
        assert await events.store_events("sb", "j", [line(s) for s in range(51, 101)]) == 100
        await down.start()
        got = await wait_keys(rx, lambda k: len(k) >= 100, "100 records after the receiver came back")
        assert sorted(seq for _, _, seq in got) == list(range(1, 101))
        await asyncio.sleep(0.5)  # the position stored after the last accepted batch
    finally:
        await run.stop()
    assert await ExportCursorStore(db).position() == 100
    before = len(rx.logs())
    run = Running(OtlpLogExport(settings(down.endpoint), db, replica="r2"))
    try:
        assert await events.store_events("sb", "j", [line(s) for s in range(101, 111)]) == 110
        got = await wait_keys(rx, lambda k: len(k) >= 110, "the 10 records after the restart")
        await asyncio.sleep(0.5)
    finally:
        await run.stop()
        await down.stop()
    # Only the new ten: what the receiver accepted before the restart was not sent again.
    assert len(rx.logs()) - before == 10
    assert all(len(v) == 1 for v in got.values())


async def test_receiver_down_then_back(db: Database) -> None:
    await check_receiver_down_then_back(db)


async def test_kinds_select_what_is_exported(db: Database, receiver: OtlpReceiver) -> None:
    events = EventStore(db)
    await SandboxStore(db).ensure("sb")
    await events.store_events(
        "sb", "j", [line(1), Event(2, TS, LifecycleRecord(LifecycleKind.STARTED, pid=1))]
    )
    run = Running(OtlpLogExport(settings(receiver.endpoint, kinds=["lifecycle"]), db, replica="r1"))
    try:
        got = await wait_keys(receiver, lambda k: len(k) >= 1, "the lifecycle record")
        await asyncio.sleep(0.5)
    finally:
        await run.stop()
    assert [seq for _, _, seq in got] == [2]
    assert await ExportCursorStore(db).position() == 2


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="is not http://host:port"):
        OtlpLogsSettings.model_validate({"endpoint": "collector:4317"})
    with pytest.raises(ValueError, match="at most half of lease_s"):
        OtlpLogsSettings.model_validate({"lease_s": 10, "timeout_s": 8})


# -- PostgreSQL ------------------------------------------------------------------------------------

needs_pg = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Database]:
    database = await Database.open(pg_url)
    yield database
    await database.close()


@needs_pg
async def test_postgres_attributes(pg: Database, receiver: OtlpReceiver) -> None:
    await check_records_carry_their_attributes(pg, receiver)


@needs_pg
async def test_postgres_receiver_down_then_back(pg: Database) -> None:
    await check_receiver_down_then_back(pg)


@needs_pg
async def test_postgres_late_commit_is_exported(pg: Database, receiver: OtlpReceiver) -> None:
    """An event whose id was drawn before a later event's but committed after it (two
    transactions) reaches the receiver all the same: the tail looks for the skipped id again."""
    events = EventStore(pg)
    await SandboxStore(pg).ensure("slow")
    await SandboxStore(pg).ensure("fast")
    run = Running(OtlpLogExport(settings(receiver.endpoint), pg, replica="r1"))
    try:
        await events.store_events("fast", "j", [line(1)])
        await wait_keys(receiver, lambda k: len(k) >= 1, "the first record")
        async with pg.engine.connect() as conn:
            trans = await conn.begin()
            # The slow batch draws its id now and commits later, by hand (the store's own
            # statement, with its columns).
            await conn.exec_driver_sql(
                "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, "
                "message, received_at, generation) VALUES ('slow', 'j', 1, 1, 'log', 'stdout', 'late', "
                "now(), 1)"
            )
            await events.store_events("fast", "j", [line(2)])
            await wait_keys(
                receiver, lambda k: ("fast", "j", 2) in k, "the later-drawn, earlier-committed record"
            )
            await asyncio.sleep(0.3)
            await trans.commit()
        got = await wait_keys(receiver, lambda k: ("slow", "j", 1) in k, "the late-committed record")
        assert got[("slow", "j", 1)][0].body == "late"
        await asyncio.sleep(0.5)
    finally:
        await run.stop()
    assert await ExportCursorStore(pg).position() == 3


@needs_pg
async def test_postgres_one_exporter_and_takeover(pg: Database, receiver: OtlpReceiver) -> None:
    """Two replicas' exporters: one exports; when it dies without releasing (a crash), the other
    takes over after the lease from the stored position, and every record arrives."""
    events = EventStore(pg)
    await SandboxStore(pg).ensure("sb")
    first = Running(OtlpLogExport(settings(receiver.endpoint), pg, replica="r1"))
    await asyncio.sleep(0.5)
    second = Running(OtlpLogExport(settings(receiver.endpoint), pg, replica="r2"))
    try:
        await events.store_events("sb", "j", [line(s) for s in range(1, 21)])
        await wait_keys(receiver, lambda k: len(k) >= 20, "the first 20 records")
        await asyncio.sleep(0.5)
        assert {r.resource["service.instance.id"] for r in receiver.logs()} == {"r1"}
        await first.stop(crash=True)
        await events.store_events("sb", "j", [line(s) for s in range(21, 41)])
        got = await wait_keys(receiver, lambda k: len(k) >= 40, "the next 20, from the second replica")
    finally:
        await second.stop()
    assert sorted(seq for _, _, seq in got) == list(range(1, 41))
    assert {r.resource["service.instance.id"] for r in receiver.logs()[20:]} == {"r2"}


# -- processes: a real supervisor, a gateway killed and started again ----------------------------


def lines_then_exit(n: int, code: int) -> list[str]:
    script = (
        "import sys, time\n"
        "for i in range(int(sys.argv[1])): print('otlp-export line', i, flush=True)\n"
        "time.sleep(0.5)\n"
        "sys.exit(int(sys.argv[2]))\n"
    )
    return [sys.executable, "-u", "-c", script, str(n), str(code)]


async def test_supervisor_lines_reach_the_receiver_across_a_gateway_restart(
    tmp_path: Path, supervisors: list[SupervisorProcess]
) -> None:
    rx = OtlpReceiver()
    port = FixedPortReceiver(rx, free_port())
    gateway = GatewayProcess(
        tmp_path / "gateway",
        extra=[
            "--set", "otlp_logs.enabled=true",
            "--set", f"otlp_logs.endpoint={port.endpoint}",
            "--set", "otlp_logs.poll_interval_s=0.2",
            "--set", "otlp_logs.timeout_s=1",
            "--set", "otlp_logs.max_backoff_s=1",
            "--set", "otlp_logs.lease_s=4",
        ],
    )  # fmt: skip
    try:
        await asyncio.to_thread(gateway.start)
        sv = SupervisorProcess(tmp_path / "sv", "otlp-export", gateway.address, lines_then_exit(200, 4))
        supervisors.append(sv)
        sv.start()
        assert await asyncio.to_thread(sv.wait, 60) == 4, sv.log_text()[-3000:]
        # Stored while the receiver is down; the gateway dies without a word, and comes back.
        stored = await asyncio.to_thread(gateway.log_lines, "otlp-export")
        assert len([s for s in stored if s.startswith("otlp-export line")]) == 200
        await asyncio.to_thread(gateway.kill)
        await asyncio.to_thread(gateway.start)
        await port.start()

        def complete(k: Keyed) -> bool:
            bodies = {str(v[0].body) for v in k.values()}
            exits = [v[0] for v in k.values() if v[0].attributes.get("openshell.lifecycle.kind") == "exited"]
            return {f"otlp-export line {i}" for i in range(200)} <= bodies and bool(exits)

        # The restarted gateway has the same replica id: it takes its row back at once.
        got = await wait_keys(rx, complete, "every line", within=60)
    finally:
        await port.stop()
        await asyncio.to_thread(gateway.stop)
    lines = [v[0] for v in got.values() if str(v[0].body).startswith("otlp-export line")]
    assert {r.attributes["openshell.sandbox_id"] for r in lines} == {"otlp-export"}
    seqs = sorted(int(r.attributes["openshell.sequence"]) for r in lines)
    assert seqs == list(range(seqs[0], seqs[0] + 200)), "the lines' sequences are consecutive"
    exited = [v[0] for v in got.values() if v[0].attributes.get("openshell.lifecycle.kind") == "exited"]
    assert exited[0].attributes["openshell.lifecycle.exit_code"] == 4
    assert "Traceback" not in gateway.log_text()


async def test_gateway_runs_the_export_and_releases_it_at_stop(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    """The gateway owns the exporter task: it exports while running, and its stop lets another
    replica take the export over at once (not after the lease)."""
    config = gateway_config(
        tmp_path,
        {"otlp_logs": {"enabled": True, "endpoint": receiver.endpoint, "poll_interval_s": 0.1}},
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        assert gateway.db is not None
        await SandboxStore(gateway.db).ensure("sb")
        await EventStore(gateway.db).store_events("sb", "j", [line(1), line(2)])
        await wait_keys(receiver, lambda k: len(k) >= 2, "the two lines")
        exporting = gateway.metrics.registry.get_sample_value("openshell_gateway_otlp_log_exporter")
        assert exporting == 1
    finally:
        await gateway.stop()
    db = await Database.open(config.database.url)
    try:
        # The lease is 30 s by default: only a released row is taken at once.
        assert await ExportCursorStore(db).claim("another-replica", lease_s=30) == 2
    finally:
        await db.close()


# -- defects found in review (issue 23 point 3): each test failed on the code before the fix -------


class RefusingLogs(logs_service_pb2_grpc.LogsServiceServicer):
    """A receiver that wants an API key (``x-api-key: secret``): without it, UNAUTHENTICATED."""

    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        if dict(context.invocation_metadata() or ()).get("x-api-key") != "secret":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid x-api-key")
        self.receiver.log_requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()


@pytest.fixture
async def keyed_receiver() -> AsyncIterator[OtlpReceiver]:
    rx = OtlpReceiver()
    server = grpc.aio.server()
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(RefusingLogs(rx), server)  # type: ignore[no-untyped-call]
    rx.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield rx
    finally:
        await server.stop(grace=0.5)


def failures(metrics: GatewayMetrics) -> float:
    return metrics.registry.get_sample_value("openshell_gateway_otlp_log_export_failures_total") or 0


async def test_position_stays_below_records_not_accepted(db: Database) -> None:
    """A page with a hole (id 3 missing, as an uncommitted id on PostgreSQL) that the receiver
    refuses: the lease is renewed at every retry, but the stored position stays below the page
    (it was stored at 2, inside the page, so a restart would never have sent 1 and 2)."""
    await SandboxStore(db).ensure("sb")
    await EventStore(db).store_events("sb", "j", [line(s) for s in range(1, 5)])
    async with db.begin() as conn:
        await conn.execute(delete(events_table).where(events_table.c.id == 3))
    rx = OtlpReceiver()
    down = FixedPortReceiver(rx, free_port())
    metrics = GatewayMetrics(SessionRegistry())
    run = Running(OtlpLogExport(settings(down.endpoint), db, replica="r1", metrics=metrics))
    try:
        await until(lambda: failures(metrics) >= 3, within=30, what="three failed exports")
        assert await ExportCursorStore(db).position() == 0
        await down.start()
        got = await wait_keys(rx, lambda k: len(k) >= 3, "the three records once the receiver is back")
        assert sorted(seq for _, _, seq in got) == [1, 2, 4]
    finally:
        await run.stop()
        await down.stop()


async def test_memory_bounded_by_max_pending_ids_across_a_large_id_gap(
    db: Database, receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Two million ids missing between two rows (retention, or ids spent by rollbacks): only the
    newest max_pending_ids are looked for again, the rest counted as given up at once; the
    exporter does not build an entry per missing id first (250 MiB before the fix)."""
    await SandboxStore(db).ensure("sb")
    events = EventStore(db)
    await events.store_events("sb", "j", [line(1)])
    run = Running(OtlpLogExport(settings(receiver.endpoint, max_pending_ids=1000), db, replica="r1"))
    tracemalloc.start()
    try:
        await wait_keys(receiver, lambda k: len(k) >= 1, "the first record")
        tracemalloc.reset_peak()
        async with db.begin() as conn:
            await conn.execute(
                insert(events_table).values(
                    id=2_000_001, sandbox_id="sb", journal_epoch="j", sequence=2, timestamp_ms=TS,
                    kind="log", stream="stdout", message="far", received_at=utcnow(), generation=1,
                )
            )  # fmt: skip
        await wait_keys(receiver, lambda k: ("sb", "j", 2) in k, "the record after the gap")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await run.stop()
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert "1998999 missing event ids given up" in caplog.text


async def test_lag_shows_the_waiting_events_during_an_outage(db: Database) -> None:
    """The receiver goes down while the export is caught up: the lag gauge counts what waits (it
    stayed 0 before the fix, so the failing-export alert, lag > 0 and failures, never fired)."""
    await SandboxStore(db).ensure("sb")
    events = EventStore(db)
    rx = OtlpReceiver()
    port = FixedPortReceiver(rx, free_port())
    await port.start()
    metrics = GatewayMetrics(SessionRegistry())
    run = Running(OtlpLogExport(settings(port.endpoint), db, replica="r1", metrics=metrics))
    lag = "openshell_gateway_otlp_log_export_lag_events"
    try:
        await events.store_events("sb", "j", [line(s) for s in range(1, 11)])
        await wait_keys(rx, lambda k: len(k) >= 10, "the first ten")
        await until(lambda: metrics.registry.get_sample_value(lag) == 0, within=10, what="lag 0")
        await port.stop()
        await events.store_events("sb", "j", [line(s) for s in range(11, 111)])
        await until(lambda: failures(metrics) >= 2, within=30, what="two failed exports")
        await events.store_events("sb", "j", [line(s) for s in range(111, 161)])
        await until(
            lambda: (metrics.registry.get_sample_value(lag) or 0) >= 150,
            within=30,
            what="the lag counting the 150 events waiting",
        )
    finally:
        await run.stop()


async def test_a_failed_export_says_why(
    db: Database, keyed_receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await SandboxStore(db).ensure("sb")
    await EventStore(db).store_events("sb", "j", [line(1)])
    metrics = GatewayMetrics(SessionRegistry())
    run = Running(OtlpLogExport(settings(keyed_receiver.endpoint), db, replica="r1", metrics=metrics))
    try:
        await until(lambda: failures(metrics) >= 1, within=30, what="a refused export")
        await asyncio.sleep(0.2)
    finally:
        await run.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.otlp_logs"]
    assert any("UNAUTHENTICATED" in m and "no valid x-api-key" in m for m in warnings), warnings


async def test_header_names_with_capitals_are_sent(db: Database, keyed_receiver: OtlpReceiver) -> None:
    """gRPC refuses metadata keys with capitals (INTERNAL, invalid metadata): the config lowercases
    them (gRPC's keys are case-insensitive)."""
    await SandboxStore(db).ensure("sb")
    await EventStore(db).store_events("sb", "j", [line(1)])
    s = settings(keyed_receiver.endpoint, headers={"X-Api-Key": "secret"})
    run = Running(OtlpLogExport(s, db, replica="r1"))
    try:
        await wait_keys(keyed_receiver, lambda k: len(k) >= 1, "the record sent with the key")
    finally:
        await run.stop()


async def test_the_export_survives_an_unexpected_error(
    db: Database, receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A row the export cannot read (its data not JSON): the error is logged with its traceback,
    the task goes on; once the row is repaired it is exported (the task had ended before)."""
    await SandboxStore(db).ensure("sb")
    events = EventStore(db)
    await events.store_events("sb", "j", [line(1)])
    async with db.begin() as conn:
        await conn.execute(update(events_table).where(events_table.c.id == 1).values(data="{not json"))
    run = Running(OtlpLogExport(settings(receiver.endpoint), db, replica="r1"))
    try:
        await until(
            lambda: any(r.exc_info for r in caplog.records if r.name == "gateway.otlp_logs"),
            within=10,
            what="the error logged with its traceback",
        )
        async with db.begin() as conn:
            await conn.execute(update(events_table).where(events_table.c.id == 1).values(data=None))
        await events.store_events("sb", "j", [line(2)])
        got = await wait_keys(receiver, lambda k: len(k) >= 2, "both records after the repair")
        assert not run.task.done()
    finally:
        await run.stop()
    assert sorted(seq for _, _, seq in got) == [1, 2]


@needs_pg
async def test_postgres_late_commit_across_a_handover(pg: Database, receiver: OtlpReceiver) -> None:
    """An id still uncommitted when the export changes hands (a rollout: SIGTERM releases, another
    replica takes over at once): the new holder looks for it too (it started after the stored
    position's first read id, never looking below it, before the fix)."""
    events = EventStore(pg)
    await SandboxStore(pg).ensure("slow")
    await SandboxStore(pg).ensure("fast")
    first = Running(OtlpLogExport(settings(receiver.endpoint), pg, replica="r1"))
    second: Running | None = None
    try:
        await events.store_events("fast", "j", [line(1)])
        await wait_keys(receiver, lambda k: len(k) >= 1, "the first record")
        async with pg.engine.connect() as conn:
            trans = await conn.begin()
            await conn.exec_driver_sql(
                "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, "
                "message, received_at, generation) VALUES ('slow', 'j', 1, 1, 'log', 'stdout', 'late', "
                "now(), 1)"
            )
            await events.store_events("fast", "j", [line(2)])
            await wait_keys(receiver, lambda k: ("fast", "j", 2) in k, "the earlier-committed record")
            await asyncio.sleep(0.3)
            await first.stop()
            second = Running(OtlpLogExport(settings(receiver.endpoint), pg, replica="r2"))
            await asyncio.sleep(0.5)
            await trans.commit()
        got = await wait_keys(receiver, lambda k: ("slow", "j", 1) in k, "the late record, from r2")
        assert got[("slow", "j", 1)][0].resource["service.instance.id"] == "r2"
    finally:
        if second is not None:
            await second.stop()
