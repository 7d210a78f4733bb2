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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc

from gateway.app import Gateway
from gateway.config import OtlpLogsSettings
from gateway.metrics import GatewayMetrics
from gateway.otlp_logs import OtlpLogExport
from gateway.sessions import SessionRegistry
from gateway.store import Database, EventStore, SandboxStore
from gateway.store.export_cursor import ExportCursorStore
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
