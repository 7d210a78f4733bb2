"""The heartbeat flush of a real gateway process (SQLite) with simulated supervisors over the real
protocol: a sandbox's heartbeat time is written only when the one written last would otherwise go
stale for a reader (gateway/sessions.py), not once per heartbeat; and the readers' verdicts hold:
the API shows every beating sandbox connected at every look, its row's time is never older than
``fresh_for_s``, and once the gateway dies (kill -9: no disconnection written) the heartbeat rule
alone shows each sandbox disconnected no later than ``fresh_for_s`` after the death."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.config import SessionSettings
from gateway.sandbox_state import Liveness, SandboxState, is_connected, sandbox_state
from gateway.store import Database, SandboxStore
from tests.support.procs import GatewayProcess
from tests.support.simsup import SimSupervisor

SESSIONS = 30
WATCH_S = 10.0
#: GatewayProcess's settings: 0.5 s heartbeats, 1 s grace, a flush every 0.5 s.
SETTINGS = SessionSettings(heartbeat_interval_s=0.5, grace_s=1.0, heartbeat_flush_interval_s=0.5)
LIVENESS = Liveness.from_settings(SETTINGS)
#: The flush's deadline here (grpc.batch_store_timeout_s, 10 s by default: with it this test's
#: 0.5 s flushes would have to write every time).
FLUSH_DEADLINE_S = 1.0
#: How old a written time may grow before the flush writes a newer one (4 s here: the upstream
#: floor's 6 s bound + 2 flushes, less 2 flushes and 2 deadlines).
WRITE_AFTER_S = LIVENESS.heartbeat_write_after(
    SETTINGS.heartbeat_flush_interval_s, flush_deadline_s=FLUSH_DEADLINE_S
)


def _rows_written(gateway: GatewayProcess) -> float:
    url = f"http://127.0.0.1:{gateway.ops_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    prefix = "openshell_gateway_heartbeat_rows_written_total "
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def _api_states(gateway: GatewayProcess) -> dict[str, str]:
    url = f"http://127.0.0.1:{gateway.http_port}/api/v1/sandboxes"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return {sb["id"]: sb["state"] for sb in json.loads(resp.read())["sandboxes"]}


async def _scenario(gateway: GatewayProcess, store: SandboxStore) -> None:
    stop = asyncio.Event()
    sims = [
        SimSupervisor(sandbox_id=f"beat-{i:02d}", addresses=lambda: [gateway.address])
        for i in range(SESSIONS)
    ]
    runs = [asyncio.create_task(sim.run(stop)) for sim in sims]
    try:
        deadline = time.monotonic() + 60
        while not all(sim.connected for sim in sims):
            assert time.monotonic() < deadline, "the sessions did not all come up"
            await asyncio.sleep(0.1)
        written: dict[str, datetime] = {}
        changes: Counter[str] = Counter()
        problems: list[str] = []
        beats_before = sum(len(sim.rtts) for sim in sims)
        rows_before = await asyncio.to_thread(_rows_written, gateway)
        end = time.monotonic() + WATCH_S
        while time.monotonic() < end:
            rows = {row.id: row for row in await store.list() if row.id.startswith("beat-")}
            now = datetime.now(UTC)
            for sid, row in rows.items():
                at = row.last_heartbeat_at or row.connected_at
                assert at is not None
                if sid in written and written[sid] != at:
                    changes[sid] += 1
                written[sid] = at
                if not is_connected(row, now=now, liveness=LIVENESS):
                    problems.append(f"{sid}: row {(now - at).total_seconds():.1f}s old at {now}")
            states = await asyncio.to_thread(_api_states, gateway)
            problems += [
                f"{sid}: API says {states.get(sid)}" for sid in rows if states.get(sid) != "connected"
            ]
            await asyncio.sleep(0.2)
        beats = sum(len(sim.rtts) for sim in sims) - beats_before
        rows = await asyncio.to_thread(_rows_written, gateway) - rows_before
        # Every session beat all along (the API and the rule above saw them all live).
        assert all(sim.connected and len(sim.sessions) == 1 for sim in sims), [s.sessions for s in sims]
        assert not problems, problems[:10]
        # One row per heartbeat before (a flush every 0.5 s wrote every beat of the last 0.5 s:
        # ~20 changes per row in 10 s); now a write once the written time is 4 s old (the
        # flush's own time: 0.6 s of slack for a row written with a beat's time instead).
        assert beats >= SESSIONS * WATCH_S, f"only {beats} heartbeats answered"
        most = int(WATCH_S / (WRITE_AFTER_S - 0.6)) + 1
        assert max(changes.values(), default=0) <= most, f"row writes in {WATCH_S:g}s: {changes}"
        # The gateway's own count says the same (what it wrote, not only what a reader noticed).
        assert 0 < rows <= SESSIONS * most, (rows, beats)
        # Kill -9: nothing writes the disconnection, the rows stay flagged connected. The rule
        # alone shows them disconnected once their time is fresh_for_s old: never later than
        # fresh_for_s after the gateway died, since the row's time is one it wrote while alive.
        last_beat = datetime.now(UTC)
        gateway.kill()
        left = [row for row in await store.list() if row.id.startswith("beat-")]
        assert len(left) == SESSIONS and all(row.connected for row in left)
        # "Disconnected since" its row's time: at most fresh_for_s before the gateway died.
        assert all(
            row.last_heartbeat_at is not None
            and row.last_heartbeat_at >= last_beat - timedelta(seconds=LIVENESS.fresh_for_s)
            for row in left
        ), [(row.id, row.last_heartbeat_at) for row in left]
        shown_until = last_beat + timedelta(seconds=LIVENESS.fresh_for_s)
        assert all(
            sandbox_state(row, now=shown_until, liveness=LIVENESS) is SandboxState.DISCONNECTED
            for row in left
        ), [(row.id, row.last_heartbeat_at) for row in left]
    finally:
        stop.set()
        await asyncio.wait(runs, timeout=15)
        for run in runs:
            run.cancel()


def test_heartbeat_times_are_written_when_due_and_readers_see_every_session_live(tmp_path: Path) -> None:
    gateway = GatewayProcess(
        tmp_path / "gateway", extra=["--set", f"grpc.batch_store_timeout_s={FLUSH_DEADLINE_S}"]
    )
    assert (gateway.heartbeat_interval_s, gateway.grace_s) == (
        SETTINGS.heartbeat_interval_s,
        SETTINGS.grace_s,
    )
    gateway.start()

    async def main() -> None:
        db = await Database.open(f"sqlite+aiosqlite:///{gateway.db_path}")
        try:
            await _scenario(gateway, SandboxStore(db))
        finally:
            await db.close()

    try:
        asyncio.run(main())
    finally:
        gateway.stop()
