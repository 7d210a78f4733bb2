"""Journal append throughput against raw appends of the same bytes, per fsync policy, in one run.

The design target is that ``Journal.append`` runs at least half as fast as the cheapest thing that
could be called a journal: writing the same encoded ``Event`` bytes to a plain file opened for
append, with one ``write`` + ``flush`` per record and the same fsync policy (per record for
ALWAYS, every ``fsync_interval_s`` for INTERVAL, never for NEVER). The baseline gets its payload
bytes pre-encoded, so the ratio charges the journal for encoding, framing, CRC and bookkeeping.

Both sides append in batches and yield to the event loop between batches, so that the journal's
``run_fsync_loop`` and the baseline's equivalent loop actually run during the INTERVAL case.

Usage: ``python benchmarks/journal_append.py [--records N] [--out PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openshell_wire.convert import encode_event
from openshell_wire.records import Event, LogRecord, LogStream
from supervisor.journal import FsyncPolicy, Journal, JournalOptions

_BATCH = 1000
_ALWAYS_RECORDS = 2000
_TS = 1_760_000_000_000


def _lines(n: int) -> list[LogRecord]:
    # ~100-byte encoded events: an 80-character message plus sequence, timestamp and framing.
    return [LogRecord(LogStream.STDOUT, f"{i:08d} " + "benchmark log line payload " * 3) for i in range(n)]


async def _journal_run(directory: Path, policy: FsyncPolicy, records: list[LogRecord]) -> float:
    options = JournalOptions(directory=directory, fsync=policy, max_bytes=1 << 40)
    journal = Journal.open(options)
    fsync_task = asyncio.create_task(journal.run_fsync_loop(), name="bench-journal-fsync")
    try:
        start = time.perf_counter()
        append = journal.append
        for begin in range(0, len(records), _BATCH):
            for record in records[begin : begin + _BATCH]:
                append(record, timestamp_ms=_TS)
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
    finally:
        fsync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fsync_task
        journal.close()
    return elapsed


async def _raw_fsync_loop(fd: int, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        os.fsync(fd)


def _open_append(path: Path) -> BinaryIO:
    # The baseline: a buffered file in append mode, as a hand-rolled log writer would use.
    return open(path, "ab")


async def _raw_run(path: Path, policy: FsyncPolicy, payloads: list[bytes], interval: float) -> float:
    f = _open_append(path)
    fd = f.fileno()
    fsync_task = (
        asyncio.create_task(_raw_fsync_loop(fd, interval), name="bench-raw-fsync")
        if policy is FsyncPolicy.INTERVAL
        else None
    )
    try:
        always = policy is FsyncPolicy.ALWAYS
        write = f.write
        flush = f.flush
        start = time.perf_counter()
        for begin in range(0, len(payloads), _BATCH):
            for payload in payloads[begin : begin + _BATCH]:
                write(payload)
                flush()
                if always:
                    os.fsync(fd)
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
    finally:
        if fsync_task is not None:
            fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fsync_task
        f.close()
    return elapsed


async def _measure(root: Path, policy: FsyncPolicy, n: int, rounds: int) -> dict[str, float | int | str]:
    records = _lines(n)
    payloads = [encode_event(Event(i + 1, _TS, r)) for i, r in enumerate(records)]
    interval = JournalOptions(directory=root).fsync_interval_s
    journal_best = raw_best = float("inf")
    # Interleave the two sides and keep each one's best round, so that a burst of background I/O
    # hurts one round of each rather than one side.
    for round_ in range(rounds):
        jdir = root / f"journal-{policy.value}-{round_}"
        rpath = root / f"raw-{policy.value}-{round_}.log"
        journal_best = min(journal_best, await _journal_run(jdir, policy, records))
        raw_best = min(raw_best, await _raw_run(rpath, policy, payloads, interval))
        shutil.rmtree(jdir, ignore_errors=True)
        rpath.unlink(missing_ok=True)
    journal_rate = n / journal_best
    raw_rate = n / raw_best
    return {
        "policy": policy.value,
        "records": n,
        "payload_bytes_mean": round(sum(map(len, payloads)) / n, 1),
        "journal_records_per_s": round(journal_rate),
        "raw_records_per_s": round(raw_rate),
        "ratio": round(journal_rate / raw_rate, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=200_000, help="records per run (ALWAYS uses fewer)")
    parser.add_argument("--always-records", type=int, default=_ALWAYS_RECORDS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side; the best one counts")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "journal_append.json"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="journal-bench-", dir=args.dir) as tmp:
        for policy in (FsyncPolicy.NEVER, FsyncPolicy.INTERVAL, FsyncPolicy.ALWAYS):
            n = args.always_records if policy is FsyncPolicy.ALWAYS else args.records
            results.append(asyncio.run(_measure(Path(tmp), policy, n, args.rounds)))

    print(f"{'policy':<10} {'records':>8} {'journal rec/s':>14} {'raw rec/s':>12} {'ratio':>6}")
    for r in results:
        print(
            f"{r['policy']:<10} {r['records']:>8} {r['journal_records_per_s']:>14,} "
            f"{r['raw_records_per_s']:>12,} {r['ratio']:>6.2f}"
        )
    report = {
        "benchmark": "journal_append",
        "target": "journal rec/s >= 0.5 x raw rec/s for each fsync policy",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rounds": args.rounds,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
