"""The store fails under a running gateway: a real PostgreSQL database is made read-only while a
supervisor dies (SIGKILL), then writable again.

- The API stops showing the dead sandbox connected within the heartbeat bound, although the
  write that clears its flag failed (the state is derived from the heartbeat too).
- Supervisors that call meanwhile get UNAVAILABLE with a retry hint (and, on the session stream,
  SessionRejected with ``retry_after_ms``), never UNKNOWN; the gateway logs no traceback.
- Once the database is writable again, the failed disconnection write lands (it is retried) and a
  waiting supervisor connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc import aio

from gateway.config import SessionSettings
from gateway.sandbox_state import Liveness
from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.postgres import PgServer, pg_bindir
from tests.support.procs import GatewayProcess, SupervisorProcess, writer_command
from tests.support.waiting import until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

HEARTBEAT_S, GRACE_S, FLUSH_S = 0.5, 1.0, 0.5  # GatewayProcess's settings
FRESH_FOR_S = Liveness.from_settings(
    SessionSettings(heartbeat_interval_s=HEARTBEAT_S, grace_s=GRACE_S, heartbeat_flush_interval_s=FLUSH_S)
).fresh_for_s


async def _admin(pg: PgServer, database: str = "postgres") -> Any:
    return await asyncpg.connect(host="127.0.0.1", port=pg.port, user=pg.user, database=database)


async def _set_read_only(pg: PgServer, database: str, on: bool) -> None:
    """New sessions of ``database`` start read-only (or not); the gateway's open ones are ended,
    so its pool reconnects with the new default."""
    admin = await _admin(pg)
    try:
        await admin.execute(
            f'ALTER DATABASE "{database}" SET default_transaction_read_only = {"on" if on else "off"}'
        )
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()


async def _row(pg: PgServer, database: str, sandbox_id: str) -> Any:
    conn = await _admin(pg, database)
    try:
        return await conn.fetchrow(
            "SELECT connected, disconnected_at FROM sandboxes WHERE id = $1", sandbox_id
        )
    finally:
        await conn.close()


def _api(gateway: GatewayProcess, sandbox_id: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{gateway.http_port}/api/v1/sandboxes/{sandbox_id}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        return {"state": f"http {exc.code}"}


def _metric(gateway: GatewayProcess, series: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
    raise AssertionError(f"{series} not in /metrics")


def _kill_tree(sv: SupervisorProcess) -> list[psutil.Process]:
    """SIGKILL the supervisor (no goodbye on the stream); its main process is killed after."""
    assert sv.proc is not None
    children = psutil.Process(sv.proc.pid).children(recursive=True)
    sv.proc.kill()
    sv.proc.wait(10)
    for child in children:
        child.kill()
    return children


async def test_a_read_only_database_while_a_supervisor_dies(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    gw = GatewayProcess(tmp_path / "gw", extra=["--database-url", pg_server.url(database)])
    gw.start()
    try:
        sv = SupervisorProcess(tmp_path / "sv", "sb-dies", gw.address, ["sleep", "60"])
        supervisors.append(sv)
        sv.start()
        await until(lambda: _api(gw, "sb-dies").get("state") == "connected", within=30, what="connected")

        await _set_read_only(pg_server, database, True)
        _kill_tree(sv)
        # The write that clears the flag fails, yet the API stops showing the sandbox connected
        # within the heartbeat bound (plus the time for the gateway to see the stream break).
        gone = await until(
            lambda: (body := _api(gw, "sb-dies"))["state"] != "connected" and body,
            within=FRESH_FOR_S + 5,
            what="sb-dies not shown connected",
        )
        assert gone["state"] == "disconnected" and gone["connected"] is False, gone
        assert gone["disconnected_since"] is not None
        assert (await _row(pg_server, database, "sb-dies"))["connected"], "the disconnection write failed"
        # The metrics count it by the same rule (counted again within a few seconds).
        await until(
            lambda: (
                _metric(gw, 'openshell_gateway_sandboxes{state="connected"}') == 0
                and _metric(gw, 'openshell_gateway_sandboxes{state="disconnected"}') == 1
            ),
            within=15,
            what="the sandboxes gauge",
        )

        # Meanwhile, callers get UNAVAILABLE with a retry hint, never UNKNOWN.
        async with aio.insecure_channel(gw.address) as channel:
            hello = pb.SupervisorMessage()
            hello.hello.sandbox_id = "sb-late"
            call = channel.stream_stream(
                "/openshell.v1.OpenShell/ConnectSupervisor",
                request_serializer=pb.SupervisorMessage.SerializeToString,
                response_deserializer=pb.GatewayMessage.FromString,
            )([hello])
            replies = []
            with pytest.raises(aio.AioRpcError) as info:
                async for reply in call:
                    replies.append(reply)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert "store unavailable" in (info.value.details() or "")
            pushback = dict(info.value.trailing_metadata() or ())
            assert int(pushback["grpc-retry-pushback-ms"]) > 0
            (rejected,) = replies
            assert rejected.session_rejected.retry_after_ms > 0
            assert "store unavailable" in rejected.session_rejected.reason

            report = channel.unary_unary(
                "/openshell.v1.OpenShell/ReportMainProcessExit",
                request_serializer=pb.ReportMainProcessExitRequest.SerializeToString,
                response_deserializer=pb.ReportMainProcessExitResponse.FromString,
            )
            with pytest.raises(aio.AioRpcError) as info:
                await report(pb.ReportMainProcessExitRequest(sandbox_id="sb-dies", exit_code=3))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert int(dict(info.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0

        # A real supervisor that starts now is refused with the reason, and keeps trying.
        waiting = SupervisorProcess(tmp_path / "sv2", "sb-waits", gw.address, ["sleep", "60"])
        supervisors.append(waiting)
        waiting.start()
        await until(lambda: "store unavailable" in waiting.log_text(), within=20, what="sb-waits refused")

        await _set_read_only(pg_server, database, False)

        # The disconnection is written once the database takes writes again (the retry), and
        # the waiting supervisor gets its session.
        async def disconnected() -> bool:
            row = await _row(pg_server, database, "sb-dies")
            return row is not None and not row["connected"] and row["disconnected_at"] is not None

        await until(disconnected, within=30, what="the retried disconnection write")
        await until(lambda: _api(gw, "sb-waits").get("state") == "connected", within=30, what="sb-waits")
        assert "UNKNOWN" not in waiting.log_text()
        _kill_tree(waiting)
    finally:
        gw.stop()
    log = gw.log_text()
    assert "Traceback" not in log, log[-4000:]
    assert "disconnection of sandbox sb-dies recorded after" in log


async def test_a_gateway_stops_while_a_disconnection_write_still_fails(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """The retrying write is owned: shutdown gives it the grace period, then cancels it (the
    gateway exits on SIGTERM by itself, with a warning, instead of waiting for the database).
    A live supervisor's heartbeats cannot be flushed meanwhile: logged, without a traceback."""
    gw = GatewayProcess(tmp_path / "gw", extra=["--database-url", pg_server.url(database)])
    gw.start()
    try:
        sv = SupervisorProcess(tmp_path / "sv", "sb-stuck", gw.address, ["sleep", "60"])
        lives = SupervisorProcess(tmp_path / "lives", "sb-lives", gw.address, ["sleep", "60"])
        supervisors.extend([sv, lives])
        sv.start()
        lives.start()
        for sandbox_id in ("sb-stuck", "sb-lives"):
            await until(
                lambda sid=sandbox_id: _api(gw, sid).get("state") == "connected",
                within=30,
                what=f"{sandbox_id} connected",
            )
        await _set_read_only(pg_server, database, True)
        _kill_tree(sv)
        await until(lambda: "cannot record that sandbox sb-stuck" in gw.log_text(), within=20, what="a retry")
        await until(lambda: "heartbeat flush failed" in gw.log_text(), within=20, what="a failed flush")
    finally:
        gw.stop()
    assert gw.proc is not None and gw.proc.returncode == 0, gw.log_text()[-3000:]
    log = gw.log_text()
    # sb-stuck's, and sb-lives' own, ended by the shutdown.
    assert "2 disconnection(s) not written" in log and "gateway stopped" in log
    assert "Traceback" not in log, log[-3000:]
    _kill_tree(lives)


def _api_or_error(gateway: GatewayProcess, sandbox_id: str) -> object:
    try:
        return _api(gateway, sandbox_id)
    except OSError as exc:  # the gateway went away mid-request
        return exc


def _postgres_processes(pg: PgServer) -> list[psutil.Process]:
    """The server's postmaster (found by its port) and every backend it forked."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-p" in cmdline and str(pg.port) in cmdline:
            return [proc, *proc.children(recursive=True)]
    raise AssertionError(f"no postgres process listening on port {pg.port}")


async def test_a_gateway_stops_within_its_bound_while_the_database_hangs(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """A database that hangs (every postgres process stopped: connections open, nothing answers)
    rather than one that fails: an API request, the disconnection writes and the closing of the
    database each wait for it. The shutdown phases share one deadline, so the gateway exits within
    grpc.shutdown_grace_s + 10 s, what the chart gives it after the preStop drain
    (terminationGracePeriodSeconds), with nothing logged as a traceback."""
    grace_s = 5.0  # the default: each phase bounded by it alone added up to more than the pod has
    gw = GatewayProcess(
        tmp_path / "gw",
        extra=["--database-url", pg_server.url(database), "--set", f"grpc.shutdown_grace_s={grace_s}"],
    )
    gw.start()
    stopped: list[psutil.Process] = []
    try:
        lives = SupervisorProcess(tmp_path / "lives", "sb-lives", gw.address, ["sleep", "60"])
        dies = SupervisorProcess(tmp_path / "dies", "sb-dies", gw.address, ["sleep", "60"])
        supervisors.extend([lives, dies])
        lives.start()
        dies.start()
        for sandbox_id in ("sb-lives", "sb-dies"):
            await until(
                lambda sid=sandbox_id: _api(gw, sid).get("state") == "connected",
                within=30,
                what=f"{sandbox_id} connected",
            )
        stopped = _postgres_processes(pg_server)
        for proc in stopped:
            proc.suspend()
        _kill_tree(dies)  # its disconnection write now hangs, and so do the heartbeat flushes
        # An API request that waits for the database too (its answer does not matter).
        asking = asyncio.create_task(asyncio.to_thread(_api_or_error, gw, "sb-lives"))
        await asyncio.sleep(2)
        assert gw.proc is not None
        began = asyncio.get_running_loop().time()
        gw.signal(signal.SIGTERM)
        bound = grace_s + 10
        try:
            await asyncio.to_thread(gw.proc.wait, bound + 20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the gateway did not stop in {bound + 20:.0f}s") from None
        took = asyncio.get_running_loop().time() - began
        await asking
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
        gw.stop()
    log = gw.log_text()
    assert gw.proc.returncode == 0, log[-3000:]
    assert took < bound, f"stopping took {took:.1f}s, past the pod's {bound:.0f}s: {log[-3000:]}"
    assert "2 disconnection(s) not written" in log and "gateway stopped" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    _kill_tree(lives)


def _first_session_end(sv: SupervisorProcess, *, after: int) -> str | None:
    """The reason of the first session end the supervisor logged past ``after`` characters."""
    for line in sv.log_text()[after:].splitlines():
        for prefix in ("session ended (", "gateway unreachable (", "gateway busy ("):
            _, found, rest = line.partition(prefix)
            if found:
                return rest
    return None


async def test_a_hung_database_is_answered_with_a_rejection_not_a_timeout(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """A database that hangs rather than fails (every postgres process stopped) must still be
    answered: a supervisor that says hello meanwhile, and one whose event batch is being stored,
    are told SessionRejected with a retry hint within grpc.store_timeout_s (the batch's deadline,
    grpc.batch_store_timeout_s, set alike here), before their own
    connect timeout or stale bound. A timeout would count as offline on the supervisor, and
    offline.policy stop could stop a healthy sandbox over the gateway's database."""
    gw = GatewayProcess(
        tmp_path / "gw",
        # Stale bounds (the supervisor's: 3 heartbeat intervals) above the store deadline: a batch
        # store holds back the session's heartbeat answers until its deadline.
        heartbeat_interval_s=2.0,
        grace_s=5.0,
        extra=[
            "--database-url",
            pg_server.url(database),
            "--set",
            "grpc.store_timeout_s=2",
            "--set",
            "grpc.batch_store_timeout_s=2",
        ],
    )
    gw.start()
    stopped: list[psutil.Process] = []
    waits = ["gateway.connect_timeout_s=5"]  # the default, above the store deadline
    try:
        writes = SupervisorProcess(
            tmp_path / "writes", "sb-writes", gw.address, writer_command(600, delay=0.05), settings=waits
        )
        arrives = SupervisorProcess(
            tmp_path / "arrives", "sb-arrives", gw.address, ["sleep", "60"], settings=waits
        )
        supervisors.extend([writes, arrives])
        writes.start()
        await until(lambda: _api(gw, "sb-writes").get("state") == "connected", within=30, what="connected")
        offsets = {"writes": len(writes.log_text()), "arrives": 0}
        stopped = _postgres_processes(pg_server)
        for proc in stopped:
            proc.suspend()
        arrives.start()
        ends = {}
        for name, sv in (("writes", writes), ("arrives", arrives)):
            ends[name] = await until(
                lambda sv=sv, at=offsets[name]: _first_session_end(sv, after=at),
                within=20,
                what=f"{name}: a session end",
            )
        for proc in stopped:
            proc.resume()
        stopped = []
        for name, reason in ends.items():
            # "rejected: ..." at the hello, "session ended by the gateway: ..." mid-session: both
            # a SessionRejected, which the supervisor counts as an answer.
            assert "store unavailable, retry later" in reason, f"{name}: {reason}"
        # The database is back: the rejected supervisors connect after their retry hint.
        await until(lambda: _api(gw, "sb-arrives").get("state") == "connected", within=30, what="arrives")
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
        gw.stop()
    log = gw.log_text()
    assert "did not answer within 2s" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


async def test_heartbeats_are_answered_while_a_batch_waits_for_a_hung_database(
    tmp_path: Path, pg_server: PgServer, database: str, supervisors: list[SupervisorProcess]
) -> None:
    """The database hangs (every postgres process stopped) for longer than the supervisor's stale
    bound (3 heartbeat intervals: 1.5 s) but less than an event batch's deadline
    (grpc.batch_store_timeout_s): the session answers heartbeats while the batch waits, so the
    supervisor keeps its session, and the batch is stored and acknowledged once the database is
    back (every line lands). Before, the session answered nothing until the batch was stored, and
    the supervisor ended the session as stale."""
    gw = GatewayProcess(
        tmp_path / "gw",
        extra=["--database-url", pg_server.url(database), "--set", "grpc.batch_store_timeout_s=20"],
    )
    gw.start()
    stopped: list[psutil.Process] = []
    lines = 300
    try:
        writes = SupervisorProcess(
            tmp_path / "writes", "sb-hb", gw.address, writer_command(lines, delay=0.03), settings=()
        )
        supervisors.append(writes)
        writes.start()
        await until(lambda: _api(gw, "sb-hb").get("state") == "connected", within=30, what="connected")
        await asyncio.sleep(0.5)  # lines are being stored
        offset = len(writes.log_text())
        stopped = _postgres_processes(pg_server)
        for proc in stopped:
            proc.suspend()
        await asyncio.sleep(5)  # past the supervisor's stale bound, with batches waiting
        for proc in stopped:
            proc.resume()
        stopped = []

        async def all_stored() -> bool:
            conn = await _admin(pg_server, database)
            try:
                count = await conn.fetchval(
                    "SELECT count(*) FROM events"
                    " WHERE sandbox_id = 'sb-hb' AND kind = 'log' AND stream = 'stdout'"
                )
            finally:
                await conn.close()
            return bool(count == lines)

        await until(all_stored, within=30, what="every line stored once the database is back")
        # Read before the gateway stops (which ends the session).
        ended = _first_session_end(writes, after=offset)
        served = gw.log_text()
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
        gw.stop()
    assert ended is None, writes.log_text()[offset:][-3000:]
    # (The session may have ended since, normally: the writer is done and its supervisor exits.)
    assert "session stale" not in served and "store unavailable" not in served, served[-3000:]
    assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
