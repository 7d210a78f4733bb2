"""A real supervisor resumes after retention deleted its journal's old lines: every line it
journaled meanwhile is stored exactly once, none refused, and the acknowledged mark did not move
back (retention keeps each journal's newest row: docs/log-retention.md).

The gateway is a process (tests/support/procs.py) on a SQLite file; retention runs from this test
on the same file while the gateway is down, so that the supervisor's next hello reads the mark
after retention.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sqlalchemy import update

from gateway.config import RetentionSettings
from gateway.retention import Retention
from gateway.store import Database
from gateway.store.db import utcnow
from gateway.store.retention import EventRetention
from gateway.store.schema import events as events_table
from tests.support.procs import GatewayProcess, SupervisorProcess
from tests.support.waiting import until

SANDBOX = "retention-resume"


def two_phases(release: Path) -> list[str]:
    script = (
        "import os, sys, time\n"
        "for i in range(100): print('phase1', i, flush=True)\n"
        "deadline = time.monotonic() + 120\n"
        "while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline: time.sleep(0.05)\n"
        "for i in range(100): print('phase2', i, flush=True)\n"
        "time.sleep(1)\n"
    )
    return [sys.executable, "-u", "-c", script, str(release)]


async def test_supervisor_resumes_after_retention(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    await asyncio.to_thread(gateway.start)
    release = tmp_path / "release"
    sv = SupervisorProcess(tmp_path / "sv", SANDBOX, gateway.address, two_phases(release))
    supervisors.append(sv)
    sv.start()

    def phase(name: str) -> list[str]:
        return [m for m in gateway.log_lines(SANDBOX) if m.startswith(name)]

    await until(lambda: len(phase("phase1")) == 100, within=60, what="the first 100 lines stored")
    await asyncio.to_thread(gateway.kill)
    (epoch,) = {e["epoch"] for e in gateway.events(SANDBOX)}
    mark = max(e["sequence"] for e in gateway.events(SANDBOX))

    db = await Database.open(f"sqlite+aiosqlite:///{gateway.db_path}", migrate=False)
    try:
        async with db.begin() as conn:
            await conn.execute(update(events_table).values(received_at=utcnow().replace(year=2000)))
        settings = RetentionSettings(batch_size=25, pause_s=0.0, lifecycle_max_age_s=86400)
        result = await Retention(settings, EventRetention(db)).run_once()
    finally:
        await db.close()
    kept = gateway.events(SANDBOX)
    assert result.total > 90 and [e["sequence"] for e in kept] == [mark], kept

    release.touch()  # phase 2 is journaled while the gateway is down
    await asyncio.sleep(1.0)
    await asyncio.to_thread(gateway.start)
    await until(lambda: len(phase("phase2")) >= 100, within=60, what="the second 100 lines stored")
    await asyncio.to_thread(sv.wait, 60)

    stored = gateway.events(SANDBOX)
    assert {e["epoch"] for e in stored} == {epoch}
    sequences = [e["sequence"] for e in stored]
    assert len(sequences) == len(set(sequences)), "a sequence stored twice"
    assert sequences == sorted(sequences) and sequences[0] == mark
    second = phase("phase2")
    assert second == [f"phase2 {i}" for i in range(100)], "each line once, in order"
    # Resumed after the mark: the first line after it is the next sequence.
    after = [e for e in stored if e["sequence"] > mark]
    assert after and after[0]["sequence"] == mark + 1
    log = gateway.log_text()
    assert "Traceback" not in log and "ProtocolError" not in log
    assert "Traceback" not in sv.log_text()
