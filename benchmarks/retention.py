"""What a retention run costs on a large ``events`` table, on SQLite and PostgreSQL, in one run.

The table: ``--events`` rows (1,000,000) over ``--journals`` journals (5,000: 1,000 sandboxes with
5 journal epochs each), stored in time order (each step, one row per journal, as a fleet logs), the
first row of each journal a lifecycle record (kept by default), the first half of every journal
received 30 days ago (due under ``max_age_s`` 7 days), the second half now. The table is loaded
once per database, then copied for each variant (a file copy on SQLite, ``CREATE DATABASE ...
TEMPLATE`` on PostgreSQL), so each starts from the same rows:

- **raw**: the baseline: the same walk (a page of ``batch_size`` rows in id order, the due ones
  deleted by id in one statement) without the newest-row rule: the least a batched delete costs;
- **before** (``--before FILE``, e.g. the previous ``gateway/store/retention.py`` from git): the
  store module given, driven by the gateway's own :class:`gateway.retention.Retention`;
- **after**: the current ``gateway.store.retention``, driven the same way.

Each variant runs twice: the first run deletes the due half; the second finds nothing new due (what
every later run costs while nothing ages). Measured: the statements retention sent (counted on
the engine, the writer's excluded), the pages walked, statements per page, the run's duration
(``pause_s`` included) and, while it runs, the longest wait of a writer storing batches of 100
lines every 5 ms into another sandbox (as ``EventStore.store_events`` does for a session).

Usage: ``python benchmarks/retention.py [--events N] [--journals N] [--batch-size N] [--pause S]
[--before FILE] [--only sqlite|postgresql] [--out PATH]``. PostgreSQL is the server
tests/support/postgres.py runs (skipped without its binaries), fsync off as in the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import event, insert, select, text

from gateway.config import RetentionSettings
from gateway.retention import Retention
from gateway.store import Database, EventStore, SandboxStore
from gateway.store import retention as current_store
from gateway.store.db import utcnow
from gateway.store.schema import events as events_table
from openshell_wire.records import Event, LogRecord, LogStream
from tests.support.postgres import PostgresUnavailable, running_postgres

EPOCHS_PER_SANDBOX = 5
MAX_AGE_S = 7 * 86400
#: Set in the task that runs retention: the engine listener counts only its statements.
COUNTING: contextvars.ContextVar[bool] = contextvars.ContextVar("COUNTING", default=False)


class Counter:
    statements = 0

    def attach(self, db: Database) -> None:
        def count(*_: Any) -> None:
            if COUNTING.get():
                self.statements += 1

        event.listen(db.engine.sync_engine, "before_cursor_execute", count)


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("retention_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rows(events: int, journals: int, now: datetime) -> Iterator[list[dict[str, Any]]]:
    per_journal = events // journals
    old = now - timedelta(days=30)
    chunk: list[dict[str, Any]] = []
    for step in range(per_journal):
        received = old + timedelta(seconds=step) if step < per_journal // 2 else now
        for j in range(journals):
            chunk.append(
                {
                    "sandbox_id": f"sb-{j // EPOCHS_PER_SANDBOX}",
                    "journal_epoch": f"epoch-{j % EPOCHS_PER_SANDBOX}",
                    "sequence": step + 1,
                    "timestamp_ms": 1_764_072_000_000 + step,
                    "kind": "lifecycle" if step == 0 else "log",
                    "stream": None if step == 0 else "stdout",
                    "message": f"line {step} of journal {j}: agent step thinking about the next move",
                    "data": None,
                    "received_at": received,
                    "generation": 1,
                }
            )
            if len(chunk) >= 20_000:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def load(db: Database, *, events: int, journals: int) -> None:
    sandboxes = SandboxStore(db)
    for s in range(journals // EPOCHS_PER_SANDBOX):
        await sandboxes.ensure(f"sb-{s}")
    await sandboxes.ensure("live")
    now = utcnow()
    for chunk in rows(events, journals, now):
        async with db.begin() as conn:
            if db.dialect == "postgresql":
                raw = (await conn.get_raw_connection()).driver_connection
                columns = list(chunk[0])
                await raw.copy_records_to_table(
                    "events", records=[tuple(r[c] for c in columns) for r in chunk], columns=columns
                )
            else:
                await conn.execute(insert(events_table), chunk)
    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("COMMIT"))
            await conn.execute(text("VACUUM ANALYZE events"))
        else:
            await conn.exec_driver_sql("ANALYZE")


async def raw_run(db: Database, *, batch_size: int, pause_s: float) -> dict[str, int]:
    """The baseline: the walk and the deletes by id, no newest-row rule."""
    e = events_table.c
    cutoff = utcnow() - timedelta(seconds=MAX_AGE_S)
    after, pages, deleted = 0, 0, 0
    while True:
        async with db.engine.connect() as conn:
            page = (
                await conn.execute(
                    select(e.id, e.kind, e.received_at).where(e.id > after).order_by(e.id).limit(batch_size)
                )
            ).all()
        pages += 1
        ids = []
        done = len(page) < batch_size
        for row in page:
            if row.received_at >= cutoff:
                done = True
                break
            after = row.id
            if row.kind == "log":
                ids.append(row.id)
        if ids:
            async with db.begin() as conn:
                result = await conn.execute(events_table.delete().where(e.id.in_(ids)))
                deleted += result.rowcount
        if done:
            return {"pages": pages, "deleted": deleted}
        await asyncio.sleep(pause_s)


async def writer(db: Database, stop: asyncio.Event, waits: list[float]) -> None:
    events, seq = EventStore(db), 0
    while not stop.is_set():
        batch = [
            Event(s, 1_764_072_000_000 + s, LogRecord(LogStream.STDOUT, f"live {s}"))
            for s in range(seq + 1, seq + 101)
        ]
        began = time.monotonic()
        await events.store_events("live", "w", batch, known_high_water_mark=seq)
        waits.append(time.monotonic() - began)
        seq += 100
        await asyncio.sleep(0.005)


async def one_run(
    db: Database, counter: Counter, *, variant: str, args: argparse.Namespace, store: Any
) -> dict[str, Any]:
    waits: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(writer(db, stop, waits))
    await asyncio.sleep(0.2)
    waits.clear()
    before = counter.statements

    async def retention() -> dict[str, int]:
        COUNTING.set(True)
        if variant == "raw":
            return await raw_run(db, batch_size=args.batch_size, pause_s=args.pause)
        store.pages = 0
        settings = RetentionSettings(max_age_s=MAX_AGE_S, batch_size=args.batch_size, pause_s=args.pause)
        result = await Retention(settings, store).run_once()
        return {"pages": store.pages, "deleted": result.total}

    began = time.monotonic()
    try:
        done = await asyncio.create_task(retention())
    finally:
        seconds = time.monotonic() - began
        stop.set()
        await task
    statements = counter.statements - before
    return {
        "deleted": done["deleted"],
        "pages": done["pages"],
        "statements": statements,
        "statements_per_page": round(statements / max(done["pages"], 1), 1),
        "seconds": round(seconds, 2),
        "longest_insert_wait_ms": round(max(waits, default=0.0) * 1000, 1),
        "inserts_during": len(waits),
    }


def store_for(variant: str, before: ModuleType | None, db: Database) -> Any:
    if variant == "raw":
        return None
    module: Any = before if variant == "before" else current_store

    class Paged(module.EventRetention):  # type: ignore[misc,name-defined]
        pages = 0

        async def next_batch(self, *a: Any, **k: Any) -> Any:
            self.pages += 1
            return await super().next_batch(*a, **k)

    return Paged(db)


@contextlib.asynccontextmanager
async def databases(kind: str, args: argparse.Namespace, root: Path) -> AsyncIterator[Any]:
    """Yields a function variant -> url of a fresh copy of the loaded table."""
    if kind == "sqlite":
        source = root / "source.db"
        db = await Database.open(f"sqlite:///{source}")
        began = time.monotonic()
        await load(db, events=args.events, journals=args.journals)
        await db.close()
        print(f"sqlite: loaded {args.events:,} events in {time.monotonic() - began:.0f}s", flush=True)

        def copy(variant: str) -> str:
            target = root / f"{variant}.db"
            shutil.copyfile(source, target)
            return f"sqlite:///{target}"

        yield copy
        return
    with running_postgres() as server:
        admin = await Database.open(server.url("postgres"), migrate=False)
        async with admin.engine.connect() as conn:
            await conn.execute(text("COMMIT"))
            await conn.execute(text("CREATE DATABASE bench_source"))
        db = await Database.open(server.url("bench_source"))
        began = time.monotonic()
        await load(db, events=args.events, journals=args.journals)
        await db.close()
        print(f"postgresql: loaded {args.events:,} events in {time.monotonic() - began:.0f}s", flush=True)
        made: list[str] = []

        def copy(variant: str) -> str:
            made.append(variant)
            return server.url(f"bench_{variant}")

        async def create(variant: str) -> None:
            async with admin.engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                await conn.execute(text(f"CREATE DATABASE bench_{variant} TEMPLATE bench_source"))

        try:
            yield (copy, create)
        finally:
            await admin.close()


async def measure(kind: str, args: argparse.Namespace, before: ModuleType | None) -> dict[str, Any]:
    variants = ["raw", *(["before"] if before is not None else []), "after"]
    results: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="openshell-retention-bench-"))
    try:
        async with databases(kind, args, root) as made:
            for variant in variants:
                if kind == "postgresql":
                    copy, create = made
                    await create(variant)
                    url = copy(variant)
                else:
                    url = made(variant)
                db = await Database.open(url, migrate=False)
                counter = Counter()
                counter.attach(db)
                store = store_for(variant, before, db)
                try:
                    first = await one_run(db, counter, variant=variant, args=args, store=store)
                    second = await one_run(db, counter, variant=variant, args=args, store=store)
                finally:
                    await db.close()
                results[variant] = {"first": first, "second": second}
                print(f"{kind} {variant}: {json.dumps(results[variant])}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| database | variant | run | deleted | pages | statements | per page | seconds"
        " | longest insert wait (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, variants in results.items():
        for variant, runs in variants.items():
            for run, r in runs.items():
                lines.append(
                    f"| {kind} | {variant} | {run} | {r['deleted']:,} | {r['pages']:,}"
                    f" | {r['statements']:,} | {r['statements_per_page']} | {r['seconds']}"
                    f" | {r['longest_insert_wait_ms']} |"
                )
    return "\n".join(lines)


def write(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The table, and the JSON at ``--out`` (rewritten after each database: a long run keeps what
    it measured if stopped)."""
    text_table = table(results)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus",
        "load_average_1m": round(os.getloadavg()[0], 1),
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**meta, "results": results, "table": text_table.splitlines()}, indent=2) + "\n"
    )
    return text_table


async def main_async(args: argparse.Namespace) -> str:
    before = load_module(args.before) if args.before is not None else None
    results: dict[str, Any] = {}
    for kind in ("sqlite", "postgresql"):
        if args.only not in (None, kind):
            continue
        try:
            results[kind] = await measure(kind, args, before)
        except PostgresUnavailable as exc:
            print(f"{kind}: skipped: {exc}", flush=True)
            continue
        write(args, results)
    return table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--journals", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=0.05, help="pause_s between batches (the default's)")
    parser.add_argument(
        "--before", type=Path, default=None, help="an older gateway/store/retention.py to compare"
    )
    parser.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retention.json")
    print(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
