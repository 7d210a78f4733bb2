"""What the heartbeat flush costs per heartbeat, measured alone on a real SQLite store.

Two parts, each as this process's CPU time (``time.process_time``: aiosqlite's worker thread
included, which a sampling profiler shows as busy even while it waits on its queue):

- **a row**: ``SandboxStore.record_heartbeats`` of half the sessions (5 s of beats at a 10 s
  interval), fenced as the gateway writes it, the median of six flushes, per row;
- **the bookkeeping**: ``SessionRegistry`` touches of half the sessions, then one
  ``take_heartbeats`` and ``heartbeats_written`` (a flush's share on the event loop), per beat,
  with the flush's write-when-due rule (``Liveness.heartbeat_write_after``, 25 s by default).

The flush's cost per heartbeat is then a row's cost x the rows per heartbeat (1 when every beat
was written; 0.37 at 10 s intervals with the rule: a row every 30 s) plus the bookkeeping.

Usage: ``python benchmarks/heartbeat_flush.py [--sessions N]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.config import SessionSettings
from gateway.sandbox_state import Liveness
from gateway.sessions import SessionRegistry
from gateway.store import Database, SandboxStore
from openshell_wire.records import JournalEpoch, SandboxId


async def _row_us(sessions: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(f"sqlite+aiosqlite:///{Path(tmp) / 'gateway.db'}")
        try:
            store = SandboxStore(db)
            epochs: dict[str, int] = {}
            at = datetime.now(UTC)
            for i in range(sessions):
                sandbox_id = f"sb-{i:05d}"
                await store.ensure(sandbox_id)
                epoch = await store.mark_connected(
                    sandbox_id,
                    instance_id="i",
                    session_id=f"s-{sandbox_id}",
                    journal_epoch="e",
                    owner="here",
                    at=at,
                )
                assert epoch is not None
                epochs[sandbox_id] = epoch
            rows = list(epochs)[: sessions // 2]
            per_row: list[float] = []
            for _ in range(6):
                now = datetime.now(UTC)
                began = time.process_time()
                await store.record_heartbeats(
                    dict.fromkeys(rows, now),
                    sessions={sid: f"s-{sid}" for sid in rows},
                    epochs={sid: epochs[sid] for sid in rows},
                )
                per_row.append((time.process_time() - began) / len(rows) * 1e6)
            return statistics.median(per_row)
        finally:
            await db.close()


def _bookkeeping_us(sessions: int, write_after_s: float) -> tuple[float, float]:
    """Per beat: the registry's share, and the rows per beat the rule wrote (flushes 5 s apart)."""
    registry = SessionRegistry()
    opened = datetime.now(UTC) - timedelta(seconds=60)
    for i in range(sessions):
        registry.open(
            sandbox_id=SandboxId(f"sb-{i:05d}"),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=frozenset(),
            opened_at=opened + timedelta(seconds=i % 30),
        )
    live = registry.sessions()
    spent, beats, rows = 0.0, 0, 0
    wall, mono = datetime.now(UTC), time.monotonic()
    for flush in range(60):
        half = live[: sessions // 2] if flush % 2 else live[sessions // 2 :]
        t = 5.0 * flush
        began = time.process_time()
        for session in half:
            session.touch(mono + t)
        taken = registry.take_heartbeats(
            renew_after_s=write_after_s, at=(wall + timedelta(seconds=t), mono + t)
        )
        registry.heartbeats_written(taken)
        spent += time.process_time() - began
        beats += len(half)
        rows += len(taken)
    return spent / beats * 1e6, rows / beats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3000)
    args = parser.parse_args()
    settings = SessionSettings()
    write_after = Liveness.from_settings(settings).heartbeat_write_after(settings.heartbeat_flush_interval_s)
    row = asyncio.run(_row_us(args.sessions))
    book, rows_per_beat = _bookkeeping_us(args.sessions, write_after)
    print(f"{args.sessions} sessions, 10 s interval, flush every 5 s, write after {write_after:g} s")
    print(f"record_heartbeats: {row:.1f} us CPU per row (median of 6 flushes of {args.sessions // 2})")
    print(f"registry bookkeeping: {book:.2f} us per heartbeat; rows per heartbeat: {rows_per_beat:.2f}")
    print(
        f"flush per heartbeat: {row * rows_per_beat + book:.1f} us (every beat written: {row + book:.1f} us)"
    )


if __name__ == "__main__":
    main()
