"""Any replica answers (issue 20 point 3), with real parts: two gateway processes on one real
PostgreSQL database, a real supervisor connected to replica A, the API used through replica B.

- A command POSTed to B reaches the session on A through LISTEN/NOTIFY: B answers delivered: true
  (A recorded that its session wrote it to its stream), and the supervisor applies it.
- A follow of the sandbox's logs on B wakes on the batches A stores (its slow poll is five seconds).
- A's listening connection killed (pg_terminate_backend, found by its application_name) and kept
  from coming back: a command POSTed to B meanwhile is not delivered (B says so); once A listens
  again it reads the table at once and delivers it. One that expired meanwhile is never sent.
- Expiry on one clock: a replica whose clock runs an hour ahead still sees a fresh command pending
  and records its answer (the database's clock decides, not the replica's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from gateway import api as api_module
from gateway import server as server_module
from gateway.app import Gateway
from gateway.notify import CHANNEL, Note, PostgresNotifier, Topic
from gateway.store import CommandStore, Database, SandboxStore, StoreError
from gateway.store import commands as commands_module
from gateway.store.commands import Answer
from gateway.store.events import EventStore
from openshell_wire.records import CommandKind, CommandResult
from openshell_wire.v1 import openshell_pb2 as pb
from tests.integration.test_commands import CONNECT, _get, _hello, _post, _result
from tests.integration.test_control import AGENT, _http
from tests.integration.test_fencing import _batch, _log
from tests.support.gateway import gateway_config
from tests.support.postgres import pg_bindir
from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

#: The tests on PostgreSQL (the last one, on SQLite, runs without it).
needs_pg = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

SANDBOX = "rt"
#: Well under the follower's slow poll (api.FOLLOW_POLL_S): only a notification explains it.
WAKE_WITHIN_S = 2.5


def _replica(workdir: Path, replica_id: str, url: str, *extra: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        heartbeat_interval_s=1.0,
        database_url=url,
        extra=["--set", f"ha.replica_id={replica_id}", *extra],
    )


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


class _Follower:
    """``GET .../logs?follow=1&tail=0`` on a gateway, its lines queued with the time each came."""

    def __init__(self, gateway: GatewayProcess, sandbox_id: str) -> None:
        url = f"http://127.0.0.1:{gateway.http_port}/api/v1/sandboxes/{sandbox_id}/logs?follow=1&tail=0"
        self._response = urllib.request.urlopen(url, timeout=60)
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._response:
                self.lines.put((time.monotonic(), json.loads(raw)))
        except Exception:  # closed by the test: the reading simply ends
            return

    def close(self) -> None:
        self._response.close()

    def wait_for(self, message: str, timeout: float) -> float:
        """When the line ``message`` came (monotonic), waiting at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                at, doc = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if doc.get("message") == message:
                return at
        raise AssertionError(f"the follower did not see {message!r} within {timeout:.1f}s")


@needs_pg
def test_a_command_posted_to_another_replica_reaches_the_session_and_follow_wakes_there(
    tmp_path: Path,
    database_url: str,
    supervisors: list[SupervisorProcess],
) -> None:
    assert WAKE_WITHIN_S < api_module.FOLLOW_POLL_S
    a = _replica(tmp_path / "a", "gw-a", database_url)
    b = _replica(tmp_path / "b", "gw-b", database_url)
    a.start()
    follower: _Follower | None = None
    try:
        b.start()
        sv = SupervisorProcess(tmp_path / "sv", SANDBOX, a.address, [sys.executable, "-u", "-c", AGENT])
        supervisors.append(sv)
        sv.start()
        api_b = f"http://127.0.0.1:{b.http_port}/api/v1"

        def lines() -> list[str]:
            status, doc = _http("GET", f"{api_b}/sandboxes/{SANDBOX}/logs?tail=1000")
            return (
                [e["message"] for e in doc["events"] if e.get("stream") == "stdout"] if status == 200 else []
            )

        wait_until(lambda: "ready" in lines(), timeout=30, what="the agent up, its line read through B")
        follower = _Follower(b, SANDBOX)
        time.sleep(0.5)  # the follower has sent its (empty) tail and waits

        status, created = _http(
            "POST", f"{api_b}/sandboxes/{SANDBOX}/commands", {"kind": "signal", "signal": "SIGUSR1"}
        )
        assert status == 201, created
        assert created["delivered"] is True, "A's session wrote it to its stream, and B was told"

        def command() -> dict[str, Any]:
            status, doc = _http("GET", f"{api_b}/commands/{created['id']}")
            assert status == 200, doc
            return dict(doc)

        wait_until(lambda: command()["state"] == "applied", timeout=20, what="the command applied")
        assert command()["delivered_by"] == "gw-a"
        # Stored through A (seen here as soon as it is), while B's follower, in its own thread, was
        # in a wait begun before it: it woke on A's notification, not at the end of its slow poll.
        stored = wait_until(
            lambda: "got USR1" in lines() and time.monotonic(), timeout=20, interval=0.05, what="stored"
        )
        woke = follower.wait_for("got USR1", timeout=20)
        assert woke - stored < WAKE_WITHIN_S
        assert lines().count("got USR1") == 1
        assert "notifications: the listening connection is down" not in a.log_text() + b.log_text()
    finally:
        if follower is not None:
            follower.close()
        a.stop()
        b.stop()


async def _admin(url: str, sql: str) -> list[Any]:
    """Run ``sql`` from the server's ``postgres`` database (a database cannot shut itself)."""
    conn = await asyncpg.connect(_plain(url).rsplit("/", 1)[0] + "/postgres")
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


@needs_pg
async def test_a_command_posted_while_the_owners_listener_is_down_is_redelivered_when_it_returns(
    tmp_path: Path,
    database_url: str,
    supervisors: list[SupervisorProcess],
) -> None:
    # The periodic redelivery far away: only the one at the listener's reconnection explains it.
    a = _replica(tmp_path / "a", "gw-a", database_url, "--set", "commands.redeliver_interval_s=600")
    b = _replica(tmp_path / "b", "gw-b", database_url, "--set", "commands.delivery_wait_s=1")
    a.start()
    db_name = database_url.rsplit("/", 1)[1]
    try:
        b.start()
        sv = SupervisorProcess(tmp_path / "sv", SANDBOX, a.address, [sys.executable, "-u", "-c", AGENT])
        supervisors.append(sv)
        sv.start()
        api_b = f"http://127.0.0.1:{b.http_port}/api/v1"

        def usr1() -> int:
            status, doc = _http("GET", f"{api_b}/sandboxes/{SANDBOX}/logs?tail=1000")
            return [e["message"] for e in doc.get("events", [])].count("got USR1") if status == 200 else 0

        def state(command_id: str) -> dict[str, Any]:
            status, doc = _http("GET", f"{api_b}/commands/{command_id}")
            assert status == 200, doc
            return dict(doc)

        def post(body: dict[str, Any]) -> dict[str, Any]:
            status, doc = _http("POST", f"{api_b}/sandboxes/{SANDBOX}/commands", body)
            assert status == 201, doc
            return dict(doc)

        wait_until(
            lambda: _http("GET", f"{api_b}/sandboxes/{SANDBOX}")[1].get("state") == "connected",
            timeout=30,
            what="B showing the sandbox connected (to A)",
        )
        wait_until(
            lambda: state(post({"kind": "heartbeat", "interval_ms": 1000})["id"])["state"] == "applied",
            timeout=30,
            what="the supervisor connected to A and taking commands",
        )

        # No new connection to the database (the pools keep theirs), then A's listener killed.
        await _admin(database_url, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
        try:
            killed = await _admin(
                database_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'openshell-listen gw-a'",
            )
            assert [r[0] for r in killed] == [True], "exactly one listening connection, A's"
            wait_until(
                lambda: "notifications: the listening connection is down" in a.log_text(),
                timeout=10,
                what="A noticing its listener is gone",
            )
            missed = post({"kind": "signal", "signal": "SIGUSR1", "expires_in_s": 120})
            doomed = post({"kind": "signal", "signal": "SIGUSR1", "expires_in_s": 1})
            assert missed["delivered"] is False and doomed["delivered"] is False, "A heard nothing"
            wait_until(lambda: state(doomed["id"])["state"] == "expired", timeout=10, what="expired")
            assert state(missed["id"])["state"] == "pending" and usr1() == 0
        finally:
            await _admin(database_url, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')

        # A listens again and reads the table at once (the periodic round is ten minutes away).
        wait_until(lambda: state(missed["id"])["state"] == "applied", timeout=20, what="redelivered")
        assert state(missed["id"])["delivered_by"] == "gw-a"
        assert "notifications: listening again" in a.log_text()
        await asyncio.sleep(1.5)  # anything else sent would have been applied by now
        assert usr1() == 1, "the expired command's signal never reached the agent"
        after = state(doomed["id"])
        assert (after["state"], after["delivered_at"], after["late_result"]) == ("expired", None, None)
        assert doomed["id"] not in sv.log_text()
    finally:
        a.stop()
        b.stop()


@needs_pg
async def test_command_expiry_follows_the_database_clock_not_the_replicas(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = await Database.open(database_url)
    try:
        await SandboxStore(db).ensure("clock")
        commands = CommandStore(db)
        created = await commands.create("clock", CommandKind.SIGNAL, signal=10, ttl_s=60)
        # Read and answered by a replica whose clock runs an hour ahead.
        ahead = commands_module.utcnow() + timedelta(hours=1)
        monkeypatch.setattr(commands_module, "utcnow", lambda: ahead)
        seen = await commands.get(created.command.command_id)
        assert seen is not None and seen.state == "pending"
        assert [r.command.command_id for r in await commands.pending("clock")] == [created.command.command_id]
        result = CommandResult(command_id=created.command.command_id, applied=True)
        assert await commands.answer("clock", result) is Answer.RECORDED
        done = await commands.get(created.command.command_id)
        assert done is not None and done.state == "applied" and done.answered_at is not None
        assert done.answered_at < ahead - timedelta(minutes=30), "stamped by the database's clock"
    finally:
        await db.close()


async def test_a_command_whose_notification_never_came_is_delivered_by_the_periodic_round(
    tmp_path: Path,
) -> None:
    """One gateway on SQLite (its in-process notifier): a command stored without any notification
    (as when the owner's listener missed it) reaches the live session within a redelivery round,
    is recorded delivered by this replica, and is not sent again by the rounds after."""
    gw = Gateway(gateway_config(tmp_path, {"commands": {"redeliver_interval_s": 0.3}}))
    await gw.start()
    try:
        async with aio.insecure_channel(gw.grpc_address) as channel:
            raw = channel.stream_stream(
                CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
            )
            call = raw()
            await call.write(_hello("quiet"))
            assert (await call.read()).WhichOneof("payload") == "session_accepted"
            assert gw.db is not None
            # A store without a notifier: nobody is told of this command.
            created = await CommandStore(gw.db).create("quiet", CommandKind.SIGNAL, signal=10, ttl_s=60)
            sent = await asyncio.wait_for(call.read(), timeout=10)
            assert sent.command.command_id == created.command.command_id
            # Recorded right after the write (the router awaits the session's hand-off).
            for _ in range(100):
                row = await CommandStore(gw.db).get(created.command.command_id)
                if row is not None and row.delivered_at is not None:
                    break
                await asyncio.sleep(0.05)
            assert row is not None and row.delivered_at is not None and row.delivered_by == gw.identity.id
            # Delivered: the next rounds leave it alone (only a new session's hello sends it again).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call.read(), timeout=1.0)
            call.cancel()
    finally:
        await gw.stop()


async def test_a_command_answered_before_its_delivery_mark_reads_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One gateway on SQLite, a supervisor that answers each command as soon as it reads it, and
    the owner's delivery mark held back (a slow pool checkout or commit on a loaded replica): the
    answer commits first. The POST still answers delivered: true (the answer records the delivery
    and tells the waiting POST), and the command's delivered_at/delivered_by are set: a client
    told "false" would post the action again."""
    real = commands_module.CommandStore.mark_delivered

    async def slow(self: CommandStore, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(commands_module.CommandStore, "mark_delivered", slow)
    gw = Gateway(gateway_config(tmp_path, {"commands": {"delivery_wait_s": 2.0}}))
    await gw.start()
    try:
        async with aio.insecure_channel(gw.grpc_address) as channel:
            raw = channel.stream_stream(
                CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
            )
            call = raw()
            await call.write(_hello("race"))
            assert (await call.read()).WhichOneof("payload") == "session_accepted"

            async def answer_at_once() -> None:
                while True:
                    msg = await call.read()
                    if msg.WhichOneof("payload") == "command":
                        await call.write(_result(msg.command.command_id))

            answering = asyncio.create_task(answer_at_once())
            try:
                for _ in range(3):
                    status, created = await _post(gw, "race", {"kind": "signal", "signal": "SIGUSR1"})
                    assert status == 201, created
                    doc = await _get(gw, f"/api/v1/commands/{created['id']}")
                    assert doc["state"] == "applied"
                    assert created["delivered"] is True, "applied, so delivered"
                    assert doc["delivered_at"] is not None and doc["delivered_by"] == gw.identity.id
            finally:
                answering.cancel()
                call.cancel()
    finally:
        await gw.stop()


async def test_the_redelivery_rounds_outlive_a_failure_that_is_not_the_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic round's read fails once with a plain bug (not a StoreError): it is logged and
    the next round delivers a command stored without any notification; the ticker used to die
    silently, and with it every redelivery for the life of the process."""
    real = commands_module.CommandStore.deliverable
    failed: list[bool] = []

    async def broken_once(self: CommandStore, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise ValueError("an odd row")
        return await real(self, *args, **kwargs)

    gw = Gateway(gateway_config(tmp_path, {"commands": {"redeliver_interval_s": 0.3}}))
    await gw.start()
    try:
        async with aio.insecure_channel(gw.grpc_address) as channel:
            raw = channel.stream_stream(
                CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
            )
            call = raw()
            await call.write(_hello("odd"))
            assert (await call.read()).WhichOneof("payload") == "session_accepted"
            monkeypatch.setattr(commands_module.CommandStore, "deliverable", broken_once)
            for _ in range(40):
                if failed:
                    break
                await asyncio.sleep(0.05)
            assert failed, "a round ran (and failed)"
            assert gw.db is not None
            created = await CommandStore(gw.db).create("odd", CommandKind.SIGNAL, signal=10, ttl_s=60)
            sent = await asyncio.wait_for(call.read(), timeout=10)
            assert sent.command.command_id == created.command.command_id
            assert "command redelivery: an odd row" in caplog.text
            call.cancel()
    finally:
        await gw.stop()


async def test_an_outage_that_ends_every_session_logs_a_line_not_one_per_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Four sessions whose batches all fail with a store error (the database away): each ends with
    "store unavailable", and the gateway's log says so once for all of them, not once each."""

    async def down(self: EventStore, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("the database is away")

    monkeypatch.setattr(EventStore, "store_wire_batch", down)
    caplog.set_level(logging.INFO, logger="gateway.server")
    gw = Gateway(gateway_config(tmp_path, {}))
    await gw.start()
    try:
        async with aio.insecure_channel(gw.grpc_address) as channel:
            raw = channel.stream_stream(
                CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
            )
            calls = []
            for i in range(4):
                call = raw()
                await call.write(_hello(f"out-{i}"))
                assert (await call.read()).WhichOneof("payload") == "session_accepted"
                calls.append(call)
            for call in calls:
                await call.write(_batch("e1", _log(1, "x")).SerializeToString())
            for call in calls:
                while True:
                    msg = await asyncio.wait_for(call.read(), timeout=10)
                    if msg is aio.EOF or msg.WhichOneof("payload") == "session_rejected":
                        break
                call.cancel()
        for _ in range(40):  # the handlers' last lines
            if sum("store unavailable" in r.getMessage() for r in caplog.records) >= 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session closed")]
        assert len(closed) == 1 and "store unavailable" in closed[0], closed
    finally:
        await gw.stop()


@needs_pg
async def test_event_batches_send_their_notes_after_the_commit_coalesced(
    database_url: str,
) -> None:
    """Twenty batches of one sandbox in a row, and a raw listener on the channel: it hears the
    sandbox's events note, but far fewer than one per batch, since no batch's transaction sends one
    (a transaction that notifies takes a cluster-wide lock through its commit's flush, which
    serialised every replica's event commits); the notifier sends them after the commits,
    coalesced."""
    db = await Database.open(database_url)
    listener = await asyncpg.connect(_plain(database_url))
    heard: list[str] = []
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[3]))
    notifier = PostgresNotifier(db.engine.url, db.engine.dialect, replica="gw-burst")
    try:
        await SandboxStore(db).ensure("burst")
        events = EventStore(db)
        events.notifier().forward = lambda sandbox_id: notifier.soon(Note(Topic.EVENTS, sandbox_id))
        await notifier.start()
        batches = 20
        for i in range(1, batches + 1):
            await events.store_wire_batch("burst", "j1", [_log(i, f"line {i}")], known_high_water_mark=i - 1)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # any later note
        assert heard, "the other replicas are told"
        assert {Note.decode(p) for p in heard} == {Note(Topic.EVENTS, "burst")}
        assert len(heard) <= batches // 4, f"{len(heard)} notes for {batches} batches: not coalesced"
    finally:
        await notifier.stop()
        await listener.close()
        await db.close()


class _HourAhead(datetime):
    """``datetime`` for a replica whose clock runs an hour ahead of the database's."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime.now(tz) + timedelta(hours=1)


@needs_pg
async def test_a_hello_sends_a_fresh_pending_command_whatever_the_replicas_clock_says(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's session code on a clock an hour ahead of the database's: a command with a
    minute left is still sent at the hello (the database measures the time left). It used to
    compare the database's expiry with this replica's clock and skip the command."""
    gw = Gateway(
        gateway_config(
            tmp_path,
            # The periodic redelivery far away: only the hello's pending read can send it.
            {"database": {"url": database_url}, "commands": {"redeliver_interval_s": 600}},
        )
    )
    await gw.start()
    try:
        assert gw.db is not None
        await SandboxStore(gw.db).ensure("skew")
        created = await CommandStore(gw.db).create("skew", CommandKind.SIGNAL, signal=10, ttl_s=60)
        monkeypatch.setattr(server_module, "datetime", _HourAhead)
        async with aio.insecure_channel(gw.grpc_address) as channel:
            raw = channel.stream_stream(
                CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
            )
            call = raw()
            await call.write(_hello("skew"))
            assert (await call.read()).WhichOneof("payload") == "session_accepted"
            sent = await asyncio.wait_for(call.read(), timeout=5)
            assert sent.command.command_id == created.command.command_id
            call.cancel()
    finally:
        await gw.stop()
