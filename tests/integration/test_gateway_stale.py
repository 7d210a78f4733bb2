"""The gateway's own stale check on a real gateway process (SQLite), under load of its hot path.

A session's handler ends a session whose supervisor sent nothing for its stale bound, and only
such a session: one timer per bound (set again for what is left when it fires early), not a
wait per message. Here supervisors that beat and send events all along (for several bounds)
keep their one session, with every record acknowledged and stored once, while sessions that
go silent at once, or after beating for a while (the timer set again and again first), are
ended by the gateway (``session stale``) and shown disconnected; exactly those.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from openshell_wire.records import CAP_EVENTS, CAP_RESUME
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess, wait_until
from tests.support.simsup import SimSupervisor, stored_problems

LIVE = 30
SILENT = 8
BEAT_THEN_SILENT = 8
#: How long the live ones run: several stale bounds (0.5 s interval + 1 s grace).
LIVE_FOR_S = 7.0


async def _silent_session(
    address: str, sandbox_id: str, *, beat_for_s: float, accepted: list[str] | None = None
) -> tuple[float, float, str]:
    """Hello (again after the retry hint while admission refuses it), beat every 0.3 s for
    ``beat_for_s``, then say nothing while reading: (when the beats stopped, when the gateway
    ended the stream, how it ended)."""
    for attempt in itertools.count(1):
        channel = aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        call: Any = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        hello = pb.SupervisorMessage()
        hello.hello.sandbox_id = sandbox_id
        hello.hello.instance_id = uuid.uuid4().hex[:12]
        hello.hello.connection_epoch = attempt
        hello.hello.capabilities.extend([CAP_RESUME, CAP_EVENTS])
        hello.hello.journal_epoch = uuid.uuid4().hex[:12]
        await call.write(hello)
        first = await asyncio.wait_for(call.read(), 30)
        if first.WhichOneof("payload") == "session_accepted":
            if accepted is not None:
                accepted.append(sandbox_id)
            break
        await channel.close()
        refused = first.session_rejected
        assert refused.code == pb.REJECT_CODE_OVERLOADED and attempt < 20, first
        await asyncio.sleep(refused.retry_after_ms / 1000)
    try:

        async def beat() -> float:
            until = time.monotonic() + beat_for_s
            while time.monotonic() < until:
                message = pb.SupervisorMessage()
                message.heartbeat.sent_unix_ms = int(time.time() * 1000)
                await call.write(message)
                await asyncio.sleep(0.3)
            return time.monotonic()

        beats = asyncio.create_task(beat())
        answers = 0
        try:
            while True:
                out = await asyncio.wait_for(call.read(), 60)
                if out is aio.EOF:
                    ended = time.monotonic()
                    assert beats.done(), f"{sandbox_id}: ended while it beat, after {answers} answers"
                    return beats.result(), ended, f"end of stream after {answers} answers"
                assert out.WhichOneof("payload") == "heartbeat", out
                answers += 1
        finally:
            beats.cancel()
    except grpc.RpcError as exc:
        return time.monotonic(), time.monotonic(), f"status {exc.code()}"
    finally:
        await channel.close()


async def _scenario(gateway: GatewayProcess, db_url: str) -> None:
    address = gateway.address
    stop = asyncio.Event()
    live = [
        SimSupervisor(sandbox_id=f"live-{i:02d}", addresses=lambda: [address], write_every_s=0.2)
        for i in range(LIVE)
    ]
    runs = [asyncio.create_task(sim.run(stop)) for sim in live]
    try:
        started = time.monotonic()
        quiet = [
            *(_silent_session(address, f"silent-{i:02d}", beat_for_s=0) for i in range(SILENT)),
            *(_silent_session(address, f"beat-{i:02d}", beat_for_s=3.0) for i in range(BEAT_THEN_SILENT)),
        ]
        ends = await asyncio.gather(*quiet)
        for stopped, ended, how in ends:
            assert how.startswith("end of stream"), how
            # Ended after its silence, never while it beat (2.8 s of beats is ~2 bounds).
            assert ended > stopped, (stopped, ended)
        assert all(int(how.split()[-2]) >= 8 for _, _, how in ends[SILENT:]), ends[SILENT:]
        await asyncio.sleep(max(0.0, LIVE_FOR_S - (time.monotonic() - started)))
        assert all(sim.connected for sim in live)
        # Everything written is acknowledged (a stored batch's ack is sent without waiting for the
        # next message), then the live ones leave.
        deadline = time.monotonic() + 30
        while any(sim.acked < sim.written for sim in live):
            assert time.monotonic() < deadline, [(s.sandbox_id, s.acked, s.written) for s in live]
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
    for sim in live:
        assert len(sim.sessions) == 1, (sim.sandbox_id, sim.sessions)
        assert not sim.violations, sim.violations
        assert sim.rtts, f"{sim.sandbox_id}: no heartbeat answered"
    assert await stored_problems(db_url, live) == []


def test_only_silent_sessions_end_stale(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gateway")
    gateway.start()
    try:
        asyncio.run(_scenario(gateway, f"sqlite+aiosqlite:///{gateway.db_path}"))

        def disconnected() -> set[str]:
            with sqlite3.connect(gateway.db_path) as db:
                rows = db.execute("SELECT id FROM sandboxes WHERE NOT connected").fetchall()
            return {row[0] for row in rows}

        quiet = {f"silent-{i:02d}" for i in range(SILENT)} | {
            f"beat-{i:02d}" for i in range(BEAT_THEN_SILENT)
        }
        wait_until(lambda: quiet <= disconnected(), timeout=20, what="the silent sessions shown disconnected")
    finally:
        gateway.stop()
    log = gateway.log_text()
    assert log.count("session stale: nothing received") == SILENT + BEAT_THEN_SILENT, log[-5000:]
    assert "Traceback" not in log, log[-5000:]


async def _frozen(gateway: GatewayProcess) -> None:
    accepted: list[str] = []
    sessions = [
        asyncio.create_task(
            _silent_session(gateway.address, f"frozen-{i:02d}", beat_for_s=FROZEN_BEAT_S, accepted=accepted)
        )
        for i in range(FROZEN)
    ]
    try:
        deadline = time.monotonic() + 30
        while len(accepted) < FROZEN:
            assert time.monotonic() < deadline, f"{len(accepted)} of {FROZEN} accepted"
            await asyncio.sleep(0.1)
        # Frozen for longer than the stale bound while every supervisor beats: what they sent
        # meanwhile waits in the socket, and the timers are all overdue when the process runs again.
        gateway.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            gateway.signal(signal.SIGCONT)
        ends = await asyncio.gather(*sessions)
    finally:
        for task in sessions:
            task.cancel()
    for stopped, ended, how in ends:
        assert how.startswith("end of stream"), how
        assert ended > stopped, (stopped, ended)


FROZEN = 20
FREEZE_S = 2.5
#: Beats go on after the freeze, then stop: the sessions end stale, after their beats.
FROZEN_BEAT_S = 12.0


def test_a_gateway_frozen_past_the_bound_ends_no_session_whose_beats_came(tmp_path: Path) -> None:
    """A gateway process stopped (SIGSTOP: a CPU-throttled pod, a long pause) for longer than the
    stale bound while its supervisors beat: on waking, their beats are in its sockets but not
    yet in the sessions' inboxes when the overdue stale checks run. None of those sessions is
    ended (a check that comes late looks once more); they end stale only once they go silent."""
    gateway = GatewayProcess(tmp_path / "gateway")
    gateway.start()
    try:
        asyncio.run(_frozen(gateway))
    finally:
        gateway.signal(signal.SIGCONT)
        gateway.stop()
    log = gateway.log_text()
    assert log.count("session stale: nothing received") == FROZEN, log[-5000:]
