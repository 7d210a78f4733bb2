"""The Go scale simulator (chaos/sim) against a real gateway, and its obedience to the gateway's words.

The simulator is what the scale figures rest on, so its own checks must hold where the truth is
known: ~100 simulated supervisors writing events into a real gateway (SQLite) for a few seconds, with
no violation seen by the simulator (resume points and acks against its journals) and the gateway-side
check passing (every acknowledged sequence stored once with its text, none above what was written).
Then, against a scripted peer on the real protocol: SessionRejected.retry_after_ms is waited out
(at least that long, at most x1.2 plus slack), a ReconnectHint is followed by a reconnect within its
window and no backoff, and SessionUpdate's interval is the one the heartbeats then keep.

The first build takes ~25-45 s cold (Go modules and plugins); it is cached by the hash of the sources.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from chaos.scale import SimRun, SimulatorUnavailable, build_simulator, sim_args, stored_problems
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess, free_port


@pytest.fixture(scope="module")
def simulator() -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: chaos/build.sh needs go >= 1.26 to build the simulator")
    try:
        return build_simulator()
    except SimulatorUnavailable as exc:
        pytest.fail(f"the simulator did not build: {exc}")


def test_simulated_fleet_against_a_gateway_loses_and_doubles_nothing(
    simulator: Path, tmp_path: Path, gateway: GatewayProcess
) -> None:
    gateway.heartbeat_interval_s = 1.0
    gateway.start()
    n = 100
    run = SimRun(
        simulator,
        sim_args(
            gateway.address,
            watch_pid=gateway.proc.pid if gateway.proc else None,
            n=n,
            prefix="simt",
            rate=50,
            duration_s=8,
            event_every_s=1.0,
            extra=["-events-per-tick", "3", "-drain", "20s"],
        ),
        tmp_path / "sim.json",
    )
    run.start()
    try:
        result = run.result(timeout_s=90)
    finally:
        run.kill()
    assert result["violations"] == 0, result["violation_samples"]
    assert max(s["up"] for s in result["series"]) == n, result["errors"]
    assert result["heartbeats_echoed"] > 0
    # Everything written was acknowledged (the drain waited for it) and is stored exactly so.
    assert result["events_written"] >= n * 2 * 3, result
    assert result["events_acked"] == result["events_written"], result["errors"]
    assert stored_problems(f"sqlite+aiosqlite:///{gateway.db_path}", result) == []


class _ScriptedPeer(pb_grpc.OpenShellServicer):
    """Per sandbox: the first hello is refused with retry_after_ms; the second session gets a
    SessionUpdate to a short interval, then after a few heartbeats a ReconnectHint; the third is
    held. Records when each hello, heartbeat and hint happened."""

    RETRY_AFTER_MS = 1500
    HINT_WINDOW_MS = 6000
    FIRST_INTERVAL_MS = 5000
    UPDATED_INTERVAL_MS = 300

    def __init__(self) -> None:
        self.hellos: dict[str, list[float]] = defaultdict(list)
        self.beats: dict[str, list[float]] = defaultdict(list)
        self.hinted_at: dict[str, float] = {}

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[pb.SupervisorMessage, pb.GatewayMessage],
    ) -> AsyncIterator[pb.GatewayMessage]:
        messages = request_iterator.__aiter__()
        hello = (await anext(messages)).hello
        sid = hello.sandbox_id
        self.hellos[sid].append(time.monotonic())
        attempt = len(self.hellos[sid])
        if attempt == 1:
            yield pb.GatewayMessage(
                session_rejected=pb.SessionRejected(
                    code=pb.REJECT_CODE_OVERLOADED, reason="scripted", retry_after_ms=self.RETRY_AFTER_MS
                )
            )
            return
        yield pb.GatewayMessage(
            session_accepted=pb.SessionAccepted(
                session_id=uuid.uuid4().hex,
                heartbeat_interval_secs=self.FIRST_INTERVAL_MS // 1000,
                heartbeat_interval_ms=self.FIRST_INTERVAL_MS,
                stale_after_ms=3 * self.FIRST_INTERVAL_MS,
                resume_after_sequence=hello.journal_last_sequence,
            )
        )
        if attempt == 2:
            yield pb.GatewayMessage(
                session_update=pb.SessionUpdate(heartbeat_interval_ms=self.UPDATED_INTERVAL_MS)
            )
        async for message in messages:
            if message.WhichOneof("payload") != "heartbeat":
                continue
            self.beats[sid].append(time.monotonic())
            yield pb.GatewayMessage(
                heartbeat=pb.GatewayHeartbeat(echo_unix_ms=message.heartbeat.sent_unix_ms)
            )
            if attempt == 2 and len(self.beats[sid]) >= 6:
                self.hinted_at[sid] = time.monotonic()
                yield pb.GatewayMessage(
                    reconnect=pb.ReconnectHint(reason="scripted", delay_window_ms=self.HINT_WINDOW_MS)
                )
                return


async def test_retry_after_reconnect_hint_and_session_update_are_obeyed(
    simulator: Path, tmp_path: Path
) -> None:
    peer = _ScriptedPeer()
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(peer, server)  # type: ignore[no-untyped-call]
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    n = 30
    run = SimRun(
        simulator, sim_args(address, n=n, prefix="obey", rate=0, duration_s=18), tmp_path / "obey.json"
    )
    try:
        run.start()
        result: dict[str, Any] = await asyncio.to_thread(run.result, timeout_s=60)
    finally:
        run.kill()
        await server.stop(grace=None)
    assert result["violations"] == 0, result["violation_samples"]
    assert set(peer.hellos) == {f"obey-{i:06d}" for i in range(n)}
    # retry_after x U(1, 1.2): never sooner; later only by scheduling slack.
    retry_waits = sorted(h[1] - h[0] for h in peer.hellos.values() if len(h) > 1)
    assert len(retry_waits) == n and retry_waits[0] >= 1.5, retry_waits[:3]
    assert retry_waits[-1] < 1.5 * 1.2 + 1.5, retry_waits[-3:]
    assert result["hints"] == n and result["session_updates"] == n, result
    hint_waits = []
    for sid, hellos in peer.hellos.items():
        assert len(hellos) == 3, (sid, len(hellos), result["errors"])
        hint_waits.append(hellos[2] - peer.hinted_at[sid])
        # The updated interval (300 ms +/- 20 %), not the first one (5 s): 6 beats within ~2 s.
        gaps = [b - a for a, b in zip(peer.beats[sid][:6], peer.beats[sid][1:6], strict=False)]
        assert max(gaps[1:]) < 1.0, (sid, gaps)
    # U(0, window), no backoff instead or on top: spread over the whole 6 s window (a backoff after
    # a short session would wait at most ~1 s), none past it (plus slack).
    assert max(hint_waits) < 6.0 + 1.5, sorted(hint_waits)[-3:]
    assert min(hint_waits) < 2.0 and max(hint_waits) > 3.0, sorted(hint_waits)
