"""Database faults under a running gateway, with a real PostgreSQL server stopped and started
(issue 20 point 5):

- readiness: gRPC health (services "" and openshell.v1.OpenShell) and /readyz turn NOT_SERVING while
  the database is down, and SERVING again once it is back;
- PostgreSQL restarted under traffic (supervisors writing numbered lines): every line stored exactly
  once and in order, no session ended over it, one log line per outage;
- a multi-host URL whose first host is dead reaches the live one (target_session_attrs=read-write);
- a migration's DDL gives up on a table lock after lock_timeout and is tried again, and the wait
  for another migration's advisory lock is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import DatabaseSettings
from gateway.notify import PostgresNotifier
from gateway.store import Database
from gateway.store import db as dbmod
from tests.support.postgres import PgServer, PostgresUnavailable, pg_bindir, running_postgres
from tests.support.procs import GatewayProcess, SupervisorProcess, free_port, writer_command
from tests.support.waiting import until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

SERVICES = ("", "openshell.v1.OpenShell")


async def _connect(pg: PgServer, database: str = "postgres") -> Any:
    return await asyncpg.connect(host="127.0.0.1", port=pg.port, user=pg.user, database=database)


def _readyz(gw: GatewayProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.ops_port}/readyz", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _readyz_body(gw: GatewayProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.ops_port}/readyz", timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return body


async def _health(gw: GatewayProcess) -> set[int]:
    """The status of each of the two health services (one value when they agree)."""
    async with aio.insecure_channel(gw.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = set()
        for service in SERVICES:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            statuses.add(answer.status)
        return statuses


async def test_grpc_health_and_readyz_follow_the_database(
    tmp_path: Path, pg_server: PgServer, database: str
) -> None:
    gw = GatewayProcess(
        tmp_path / "gw",
        extra=["--database-url", pg_server.url(database), "--set", "database.pool_timeout_s=3"],
    )
    gw.start()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        assert await _health(gw) == {serving}
        assert _readyz(gw) == 200
        pg_server.stop()
        try:
            # Both probes say so while the database is down: no replica left in a balancer that could
            # only reject its supervisors.
            await until(_health_is(gw, not_serving), within=20, what="gRPC health NOT_SERVING")
            assert _readyz(gw) == 503
            # With the reason the new connections fail for, not only that the probe gave up.
            assert "unreachable: " in _readyz_body(gw)["checks"]["database"]["reason"]
        finally:
            pg_server.start()
        await until(_health_is(gw, serving), within=30, what="gRPC health SERVING again")
        await until(lambda: _readyz(gw) == 200, within=30, what="/readyz ready again")
    finally:
        gw.stop()
    log = gw.log_text()
    # A change is logged once each way, not once per check.
    assert log.count("gRPC health NOT_SERVING") == 1, log[-3000:]
    assert log.count("gRPC health SERVING again") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def _health_is(gw: GatewayProcess, status: int) -> Any:
    async def check() -> bool:
        return await _health(gw) == {status}

    return check


async def _stored_lines(pg: PgServer, database: str, sandbox_id: str) -> list[tuple[str, int, str]]:
    conn = await _connect(pg, database)
    try:
        rows = await conn.fetch(
            "SELECT journal_epoch, sequence, message FROM events"
            " WHERE sandbox_id = $1 AND kind = 'log' ORDER BY id",
            sandbox_id,
        )
        return [(r["journal_epoch"], r["sequence"], r["message"]) for r in rows]
    finally:
        await conn.close()


async def test_postgres_restarted_under_traffic_loses_and_doubles_nothing(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """Three supervisors write numbered lines while PostgreSQL is restarted twice (a clean stop and
    a crash). Every line is stored exactly once, in order; the batches caught by a restart wait and
    are retried, so no session ends over it and nobody is told the store is unavailable."""
    lines = 400
    gw = GatewayProcess(
        tmp_path / "gw",
        # Stale bounds (6 s on the supervisor, 7 s here) above a restart: heartbeats are answered
        # after the batch being stored, which waits for the database.
        heartbeat_interval_s=2.0,
        grace_s=5.0,
        extra=["--database-url", pg_server.url(database)],
    )
    gw.start()
    ids = [f"sb-traffic-{i}" for i in range(3)]
    try:
        for sandbox_id in ids:
            sv = SupervisorProcess(
                tmp_path / sandbox_id,
                sandbox_id,
                gw.address,
                writer_command(lines, delay=0.02),
                # Acknowledged segments deleted soon: a lost acknowledged line cannot be resent.
                settings=["journal.segment_bytes=4096"],
            )
            supervisors.append(sv)
            sv.start()

        async def writing() -> bool:
            counts = [len(await _stored_lines(pg_server, database, sid)) for sid in ids]
            return all(c >= 20 for c in counts)

        await until(writing, within=30, what="every supervisor writing")
        for mode in ("fast", "immediate"):
            pg_server.stop(mode)
            await asyncio.sleep(1.0)
            pg_server.start()
            await asyncio.sleep(1.5)
        for sv in supervisors:
            assert sv.wait(60) == 0, sv.log_text()[-3000:]
        for sandbox_id in ids:
            stored = await _stored_lines(pg_server, database, sandbox_id)
            keys = [(epoch, seq) for epoch, seq, _ in stored]
            assert len(keys) == len(set(keys)), f"{sandbox_id}: a (epoch, sequence) stored twice"
            assert [m for _, _, m in stored] == [f"line {i}" for i in range(lines)], sandbox_id
    finally:
        gw.stop()
    log = gw.log_text()
    for sv in supervisors:
        assert "store unavailable" not in sv.log_text(), sv.log_text()[-3000:]
        # A resume below what was acknowledged is an acknowledged line the database lost.
        assert "below our acknowledged" not in sv.log_text(), sv.log_text()[-3000:]
    assert "answered UNAVAILABLE" not in log, log[-3000:]
    # One line per outage, not per session or per attempt.
    outages = log.count("unreachable (")
    assert 1 <= outages <= 2, log[-3000:]
    assert log.count("reachable again after") == outages, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


async def test_a_long_outage_ends_sessions_unavailable_with_one_log_line(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """PostgreSQL down for longer than an event batch's deadline: the writing sessions end with
    SessionRejected and UNAVAILABLE plus a retry hint (never UNKNOWN), the gateway logs the outage
    once (not once per session or per attempt), and once the database is back every line is stored
    exactly once, in order."""
    lines = 300
    gw = GatewayProcess(
        tmp_path / "gw",
        heartbeat_interval_s=2.0,
        grace_s=5.0,
        extra=[
            "--database-url",
            pg_server.url(database),
            "--set",
            "grpc.batch_store_timeout_s=3",
            "--set",
            "database.pool_timeout_s=2",
        ],
    )
    gw.start()
    ids = [f"sb-outage-{i}" for i in range(3)]
    try:
        for sandbox_id in ids:
            sv = SupervisorProcess(
                tmp_path / sandbox_id, sandbox_id, gw.address, writer_command(lines, delay=0.02)
            )
            supervisors.append(sv)
            sv.start()

        async def writing() -> bool:
            counts = [len(await _stored_lines(pg_server, database, sid)) for sid in ids]
            return all(c >= 20 for c in counts)

        await until(writing, within=30, what="every supervisor writing")
        pg_server.stop()
        try:
            await until(
                lambda: all("store unavailable" in sv.log_text() for sv in supervisors),
                within=30,
                what="every session told the store is unavailable",
            )
        finally:
            pg_server.start()
        for sv in supervisors:
            assert sv.wait(60) == 0, sv.log_text()[-3000:]
        for sandbox_id in ids:
            stored = await _stored_lines(pg_server, database, sandbox_id)
            keys = [(epoch, seq) for epoch, seq, _ in stored]
            assert len(keys) == len(set(keys)), f"{sandbox_id}: a (epoch, sequence) stored twice"
            assert [m for _, _, m in stored] == [f"line {i}" for i in range(lines)], sandbox_id
    finally:
        gw.stop()
    log = gw.log_text()
    for sv in supervisors:
        assert "UNKNOWN" not in sv.log_text(), sv.log_text()[-3000:]
    assert log.count("unreachable (") == 1, log[-4000:]
    assert log.count("reachable again after") == 1, log[-4000:]
    # The rate-limited lines of the outage: one each, whatever the number of sessions.
    assert log.count("answered UNAVAILABLE") == 1, log[-4000:]
    assert log.count("cannot record that sandbox") <= 1, log[-4000:]
    assert "Traceback" not in log, log[-4000:]


async def test_a_multi_host_url_reaches_the_live_primary(pg_server: PgServer, database: str) -> None:
    """The form a Patroni cluster is reached by: the first host is down, the second the primary."""
    dead = free_port()
    url = (
        f"postgresql+asyncpg://{pg_server.user}@/{database}"
        f"?host=127.0.0.1:{dead}&host=127.0.0.1:{pg_server.port}&target_session_attrs=read-write"
    )
    db = await Database.open(url)
    try:
        async with db.engine.begin() as conn:
            port = (await conn.exec_driver_sql("SELECT inet_server_port()")).scalar()
            await conn.exec_driver_sql("CREATE TABLE reached (n int)")
        assert port == pg_server.port
    finally:
        await db.close()


def _blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A port on 127.0.0.1 that drops SYNs, as a dead node's address does: a listener whose accept
    queue is full and never accepted from (no root or netns needed). Returns what to close."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    # The queue fills as the handshakes complete; a SYN after that goes unanswered.
    time.sleep(0.3)
    return listener, fillers, port


async def test_a_first_host_that_blackholes_does_not_keep_the_pool_or_listener_from_the_primary(
    pg_server: PgServer, database: str
) -> None:
    """A multi-host URL whose first host drops packets (a dead node, a partition): each host gets its
    own connect_timeout_s, so the live primary second is reached, by the pool and by the listener.
    (asyncpg's own walk gave one timeout to all hosts: the first used it up, the second was never
    tried, and every new connection failed for as long as the first host blackholed.)"""
    listener, fillers, dead = _blackhole()
    url = (
        f"postgresql+asyncpg://{pg_server.user}@/{database}"
        f"?host=127.0.0.1:{dead}&host=127.0.0.1:{pg_server.port}&target_session_attrs=read-write"
    )
    settings = DatabaseSettings(connect_timeout_s=1.0, pool_timeout_s=4.0)
    try:
        db = await Database.open(url, migrate=False, settings=settings)
        try:
            async with db.engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT inet_server_port()")).scalar() == pg_server.port
            notifier = PostgresNotifier(db.engine.url, db.engine.dialect, replica="t", connect_timeout_s=1.0)
            await notifier.start()
            try:
                await until(lambda: notifier.live, within=10, what="the listener on the live host")
            finally:
                await notifier.stop()
        finally:
            await db.close()
    finally:
        for sock in (listener, *fillers):
            sock.close()


async def test_idle_in_transaction_timeout_is_set_after_connecting_not_at_startup(
    pg_server: PgServer, database: str
) -> None:
    """The bound is SET once connected (pg_settings says 'session'): PgBouncer refuses a startup
    parameter it does not track (08P01), which is a refusal to report, not an outage to retry."""
    db = await Database.open(
        pg_server.url(database), migrate=False, settings=DatabaseSettings(idle_in_transaction_timeout_s=7)
    )
    try:
        async with db.engine.connect() as conn:
            setting, source = (
                await conn.exec_driver_sql(
                    "SELECT setting, source FROM pg_settings"
                    " WHERE name = 'idle_in_transaction_session_timeout'"
                )
            ).one()
        assert (setting, source) == ("7000", "session")
    finally:
        await db.close()
    refused = asyncpg.exceptions.ProtocolViolationError("unsupported startup parameter: x")
    assert refused.sqlstate == "08P01"
    assert not dbmod.is_transient(refused)
    assert dbmod.is_transient(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))


def _postgres_processes(pg: PgServer) -> list[Any]:
    import psutil

    assert pg.control is not None
    pid = int((pg.control[1] / "postmaster.pid").read_text().split()[0])
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


async def test_a_frozen_primary_does_not_hold_the_pool(pg_server: PgServer, database: str) -> None:
    """The pool's connections are on a primary that then freezes (SIGSTOP: a hung node whose replica
    was promoted; its kernel still acknowledges, so nothing ever fails on its own). Callers give up
    at their own deadlines; statement_timeout_s then ends the waits they left behind (the pool's
    ping included), the stuck connections are dropped, not reused, and new calls reach the other
    host. Without the bound each abandoned call kept its pool slot forever, the pool filled, and
    nothing reached the promoted host."""
    try:
        other = contextlib.ExitStack()
        second = other.enter_context(running_postgres())
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    with other:
        admin = await _connect(second)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()
        url = (
            f"postgresql+asyncpg://{pg_server.user}@/{database}?host=127.0.0.1:{pg_server.port}"
            f"&host=127.0.0.1:{second.port}&target_session_attrs=read-write"
        )
        settings = DatabaseSettings(
            pool_size=2, max_overflow=0, pool_timeout_s=4.0, connect_timeout_s=1.0, statement_timeout_s=1.0
        )
        db = await Database.open(url, migrate=False, settings=settings)

        async def port() -> int:
            async with db.engine.connect() as conn:
                return int((await conn.exec_driver_sql("SELECT inet_server_port()")).scalar_one())

        async def two_at_once() -> list[int]:
            # Both pool slots in use together: both pooled connections are on the first host.
            async with db.engine.connect() as one, db.engine.connect() as two:
                return [
                    int((await c.exec_driver_sql("SELECT inet_server_port()")).scalar_one())
                    for c in (one, two)
                ]

        async def reaches_second() -> bool:
            try:
                return await asyncio.wait_for(port(), 3) == second.port
            except Exception:
                return False

        frozen: list[Any] = []
        try:
            assert await two_at_once() == [pg_server.port, pg_server.port]
            # Read now: the pooled connections' backends are among the postmaster's children.
            frozen = _postgres_processes(pg_server)
            for proc in frozen:
                proc.suspend()
            # Callers with a deadline of their own (as the gRPC paths have) give up on both slots.
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(port(), 0.3)
            await until(reaches_second, within=20, what="a new call on the promoted host")
        finally:
            for proc in frozen:
                with contextlib.suppress(Exception):
                    proc.resume()
            await asyncio.wait_for(db.close(), 15)


async def test_migrations_wait_for_locks_with_a_bound_and_say_so(
    pg_server: PgServer, database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A long transaction on a table the next revision alters: the DDL gives up after lock_timeout
    (instead of queueing every query on that table behind it), the migration is rolled back and tried
    again, logged with the statement; once the transaction ends it completes. Another migration's
    advisory lock is waited for without a bound, logged with who holds it."""
    monkeypatch.setattr(dbmod, "MIGRATION_LOCK_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(dbmod, "MIGRATION_RETRY_INITIAL_S", 0.2, raising=False)
    monkeypatch.setattr(dbmod, "MIGRATION_WAIT_LOG_S", 0.5, raising=False)
    caplog.set_level(logging.WARNING, logger="gateway.store.db")
    url = pg_server.url(database)
    engine = dbmod.create_engine(url)
    holder = await _connect(pg_server, database)
    try:
        await dbmod.upgrade(engine, "0007")
        # A reader's open transaction on commands (0008 adds columns to it).
        reader = holder.transaction()
        await reader.start()
        await holder.execute("SELECT count(*) FROM commands")
        migrating = asyncio.create_task(dbmod.upgrade(engine))
        await until(lambda: "migration attempt 1/" in caplog.text, within=15, what="a lock timeout")
        assert "ALTER TABLE" in caplog.text, caplog.text
        assert not migrating.done()
        await reader.rollback()
        await asyncio.wait_for(migrating, 30)

        caplog.clear()
        # Another migration holding the advisory lock (as migration_transaction takes it).
        other = holder.transaction()
        await other.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", dbmod._PG_MIGRATION_LOCK_KEY)
        waiting = asyncio.create_task(dbmod.upgrade(engine))
        await until(lambda: "for the migration lock" in caplog.text, within=15, what="the wait logged")
        assert f"pid {holder.get_server_pid()}" in caplog.text, caplog.text
        assert not waiting.done()
        await other.rollback()
        await asyncio.wait_for(waiting, 30)
    finally:
        await holder.close()
        await engine.dispose()
    check = await _connect(pg_server, database)
    try:
        assert {await check.fetchval("SELECT version_num FROM alembic_version")} == set(
            dbmod.packaged_heads()
        )
    finally:
        await check.close()
