"""What a notification per event batch costs concurrent committers on PostgreSQL, and what sending
them after the commit, coalesced, costs instead. One durable server (fsync on), one run, three modes:

- **none**: the baseline, each committer's transaction an INSERT into the real ``events`` table and
  its COMMIT, no notification at all;
- **in transaction**: the same plus ``pg_notify`` in each transaction (the gateway before the fix:
  a notifying transaction takes a cluster-wide lock at its commit, held through the WAL flush);
- **coalesced**: the same commits, each then handing its sandbox id to the gateway's own
  :class:`gateway.notify.PostgresNotifier` (``soon``), which sends them every ``COALESCE_S`` in one
  statement on its listening connection (the gateway now).

One listener on the channel throughout (a replica's), as in a deployment. ``--committers`` concurrent
connections (8 by default) commit one-row batches as fast as they can for ``--seconds`` per mode; each
mode runs twice, interleaved, and the table gives both. Every process it starts is stopped at the end.

Usage: ``python benchmarks/event_notify.py [--committers N] [--seconds S]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # type: ignore[import-untyped]

from gateway.notify import CHANNEL, Note, PostgresNotifier, Topic
from gateway.store import Database, SandboxStore
from tests.support.postgres import running_postgres

INSERT = (
    "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, message, "
    "received_at, generation) VALUES ($1, 'j', $2, 0, 'log', 'stdout', 'a line of a log', now(), 1)"
)


async def _mode(dsn: str, mode: str, *, committers: int, seconds: float, notifier: PostgresNotifier) -> float:
    conns = [await asyncpg.connect(dsn) for _ in range(committers)]
    done = 0
    stop_at = time.monotonic() + seconds
    base = int(time.time() * 1000) * 1000

    async def commit(i: int, conn: asyncpg.Connection) -> None:
        nonlocal done
        sandbox = f"bench-{i}"
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            async with conn.transaction():
                await conn.execute(INSERT, sandbox, base + n)
                if mode == "in transaction":
                    await conn.execute(
                        "SELECT pg_notify($1, $2)", CHANNEL, Note(Topic.EVENTS, sandbox).encode()
                    )
            if mode == "coalesced":
                notifier.soon(Note(Topic.EVENTS, sandbox))
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(commit(i, c) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - started
    for conn in conns:
        await conn.close()
    return done / elapsed


async def _run(dsn_sa: str, dsn: str, *, committers: int, seconds: float) -> dict[str, list[float]]:
    db = await Database.open(dsn_sa)  # migrated to head: the real events table
    for i in range(committers):
        await SandboxStore(db).ensure(f"bench-{i}")
    notifier = PostgresNotifier(db.engine.url, db.engine.dialect, replica="bench")
    await notifier.start()  # the listener, and the coalescing sender
    results: dict[str, list[float]] = {"none": [], "in transaction": [], "coalesced": []}
    try:
        for _ in range(2):
            for mode, rates in results.items():
                rate = await _mode(dsn, mode, committers=committers, seconds=seconds, notifier=notifier)
                rates.append(rate)
                print(f"{mode}: {rate:.0f} commits/s", flush=True)
    finally:
        await notifier.stop()
        await db.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--committers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with running_postgres(fsync=True) as server:
        dsn = server.url("postgres").replace("postgresql+asyncpg://", "postgresql://")
        results = asyncio.run(
            _run(server.url("postgres"), dsn, committers=args.committers, seconds=args.seconds)
        )
    print(f"\n| mode ({args.committers} committers, fsync on) | commits/s (two runs) |")
    print("|---|---|")
    for mode, rates in results.items():
        print(f"| {mode} | {' / '.join(f'{r:.0f}' for r in rates)} |")


if __name__ == "__main__":
    main()
