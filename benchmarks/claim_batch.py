"""What the hellos' batched claim (``SandboxStore.claim_many``) costs per hello, by batch size.

A burst of hellos is claimed in batches (gateway/batching.py): one transaction of a constant
number of statements per batch, so a claim's cost is the batch's fixed part (its statements'
round trips through the driver, their compilation or cache lookups, the commit) shared by the
batch, plus each request's own part. This measures both on a fresh database: ``--batches``
batches of each size in ``--sizes``, each request registering a new sandbox (the scale bench's
hellos: unknown sandboxes, ``sessions.register_unknown``), timed in process CPU (the event loop's
thread and the driver's, on SQLite its worker thread) and wall time.

The baseline, in the same run on the same engine: the raw insert of the same rows (one
``INSERT`` run for the batch's parameter sets in one transaction), the least a batch that writes
those rows can cost through SQLAlchemy.

``--code DIR`` imports the gateway from another checkout (e.g. ``git worktree add /tmp/base
<commit>``) to measure the code before a change in the same hour.

Usage: ``python benchmarks/claim_batch.py [--sizes 1,4,16,64] [--batches N] [--database-url URL]
[--code DIR] [--out PATH]`` (default: a fresh SQLite file; on PostgreSQL, an empty database each
run: the ids would collide, and the server's own CPU is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="batch sizes, comma-separated")
    parser.add_argument("--batches", type=int, default=60, help="batches of each size")
    parser.add_argument("--database-url", default=None, help="an empty database (default: SQLite)")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(args.code.resolve()))
    from sqlalchemy import insert

    from gateway.store import SandboxStore
    from gateway.store.db import Database
    from gateway.store.sandboxes import ClaimRequest
    from gateway.store.schema import sandboxes as sandboxes_table

    url = args.database_url or f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='claim_batch_')}/gateway.db"
    db = await Database.open(url)
    store = SandboxStore(db)

    def request(sandbox_id: str) -> Any:
        return ClaimRequest(
            sandbox_id,
            instance_id="i-" + sandbox_id,
            session_id=uuid.uuid4().hex,
            journal_epoch="e1",
            owner="bench",
            owner_run="run",
            at=datetime.now(UTC),
            connection_epoch=1,
            live_for_s=30.0,
            read_high_water_mark=True,
            register=True,
        )

    # The inputs are built before the clock starts: only the store's work is timed.
    def claim_batches(tag: str, size: int) -> list[list[Any]]:
        return [[request(f"{tag}-{size}-{b}-{k}") for k in range(size)] for b in range(args.batches)]

    def raw_batches(tag: str, size: int) -> list[list[dict[str, Any]]]:
        now = datetime.now(UTC)
        return [
            [
                {"id": f"{tag}-{size}-{b}-{k}", "driver": "external", "created_at": now, "spec": None}
                for k in range(size)
            ]
            for b in range(args.batches)
        ]

    async def claims(batches: list[list[Any]]) -> None:
        for batch in batches:
            outcomes = await store.claim_many(batch)
            if any(isinstance(o, BaseException) or o is None for o in outcomes):
                raise SystemExit(f"a claim failed: {outcomes}")

    async def raw(batches: list[list[dict[str, Any]]]) -> None:
        for rows in batches:
            async with db.begin() as conn:
                await conn.execute(insert(sandboxes_table), rows)

    results: dict[str, Any] = {}
    try:
        # Warm: the statements compiled (a batch of one registers with a single execution, a
        # larger one with many: both forms), the connection open.
        for size in (1, 2):
            await claims(claim_batches("warm", size))
            await raw(raw_batches("warm-raw", size))
        sizes = sorted({int(s) for s in args.sizes.split(",")})
        for size in sizes:
            row: dict[str, Any] = {}
            n = args.batches * size
            inputs = {"raw insert": raw_batches("raw", size), "claim_many": claim_batches("claim", size)}
            for name, fn in (("raw insert", raw), ("claim_many", claims)):
                cpu, wall = time.process_time(), time.perf_counter()
                await fn(inputs[name])
                row[name] = {
                    "cpu_us_per_item": round((time.process_time() - cpu) / n * 1e6, 1),
                    "wall_us_per_item": round((time.perf_counter() - wall) / n * 1e6, 1),
                }
            row["ratio"] = round(
                row["claim_many"]["cpu_us_per_item"] / row["raw insert"]["cpu_us_per_item"], 2
            )
            results[str(size)] = row
    finally:
        await db.close()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "dialect": db.dialect,
        "code": str(args.code),
        "commit": _commit(args.code),
        "batches": args.batches,
        "results": results,
    }


def _commit(code: Path) -> str | None:
    """The checkout's commit, so that a result says which code it measured."""
    done = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def main() -> None:
    args = _args()
    report = asyncio.run(_run(args))
    print(f"{report['dialect']}, {report['batches']} batches of each size, code {report['code']}")
    print("| batch size | claim_many CPU us / claim | raw insert CPU us / row | ratio | claim wall us |")
    print("|---|---|---|---|---|")
    for size, row in report["results"].items():
        claim, raw = row["claim_many"], row["raw insert"]
        print(
            f"| {size} | {claim['cpu_us_per_item']} | {raw['cpu_us_per_item']} | {row['ratio']}x "
            f"| {claim['wall_us_per_item']} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
