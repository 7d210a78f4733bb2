"""The invariants every chaos scenario checks on what the gateway stored, whatever the fault:

- **nothing lost unexplained**: in every journal epoch of a sandbox the stored sequences, with the
  ranges their gap records stand for, cover 1..the highest stored sequence (a hole is a lost event);
- **no duplicate**: no sequence stored twice, no line of the main process stored twice (a replay that
  slipped past the gateway's deduplication would store the same line under a new sequence);
- **every dropped line counted**: the main process's lines missing from the store are no more than the
  records the gap records say were dropped (and, for a main process that ended, none is missing
  unless gaps count it);
- **the main process never restarted by a cut**: exactly the expected number of STARTED lifecycle
  records, at most one EXITED per start, with the expected exit code;
- **resumed within the bound after the heal**: :func:`resumed_after` gives the time from the heal to the
  first RECONNECTED record after it (the supervisor journals one after every outage it noticed), for the
  scenario to compare with its bound.

The events are read from the gateway's database by URL (SQLite or PostgreSQL), so the checks are the
same whatever the deployment a scenario builds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import create_async_engine


@dataclass(frozen=True, slots=True)
class StoredEvent:
    epoch: str
    sequence: int
    timestamp_ms: int
    kind: str
    stream: str | None
    message: str
    data: dict[str, Any] | None


async def stored_events(database_url: str, sandbox_ids: Iterable[str]) -> dict[str, list[StoredEvent]]:
    """Every stored event of each sandbox, in the order stored (an id with none maps to [])."""
    ids = list(sandbox_ids)
    found: dict[str, list[StoredEvent]] = {sandbox_id: [] for sandbox_id in ids}
    if not ids:
        return found
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, message, data "
                    "FROM events WHERE sandbox_id IN :ids ORDER BY id"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": ids},
            )
            for sandbox_id, epoch, sequence, timestamp_ms, kind, stream, message, data in rows:
                found[sandbox_id].append(
                    StoredEvent(
                        epoch=epoch,
                        sequence=int(sequence),
                        timestamp_ms=int(timestamp_ms),
                        kind=kind,
                        stream=stream,
                        message=message,
                        data=json.loads(data) if data else None,
                    )
                )
    finally:
        await engine.dispose()
    return found


@dataclass(frozen=True, slots=True)
class Expect:
    """What one sandbox's store must show."""

    sandbox_id: str
    #: The main process writes ``f"{prefix} {i}"`` for i in range(lines) (tests/support/procs.py
    #: writer_command); None: its lines are not checked.
    lines: int | None = None
    prefix: str = "line"
    #: The main process has written all ``lines`` (it exited): every one is stored or counted by a gap.
    #: False while it still writes: only "no duplicate" and "no line beyond ``lines``" are checked.
    complete: bool = True
    #: The main process's exit code the store must hold; None: it must not have exited.
    exit_code: int | None = None
    #: STARTED records expected: 1 unless the scenario restarts the main process itself.
    starts: int = 1


def _lifecycle(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.kind == "lifecycle" and e.data is not None and e.data.get("kind") == kind]


def check_sandbox(events: list[StoredEvent], expect: Expect, *, limit: int = 10) -> list[str]:
    """The invariants' violations for one sandbox (empty when all hold); each names the sandbox."""
    sid = expect.sandbox_id
    problems: list[str] = []
    if not events:
        return [f"{sid}: nothing stored"]
    dropped = 0
    by_epoch: dict[str, list[StoredEvent]] = {}
    for event in events:
        by_epoch.setdefault(event.epoch, []).append(event)
    for epoch, epoch_events in by_epoch.items():
        sequences = [e.sequence for e in epoch_events]
        if len(sequences) != len(set(sequences)):
            twice = sorted({q for q in sequences if sequences.count(q) > 1})
            problems.append(f"{sid}: epoch {epoch}: sequences stored twice: {twice[:limit]}")
        covered = set(sequences)
        for gap in epoch_events:
            if gap.kind != "gap" or gap.data is None:
                continue
            dropped += int(gap.data.get("dropped_records", 0))
            first, last = int(gap.data.get("first_sequence", 0)), int(gap.data.get("last_sequence", 0))
            if first > 0 and last >= first:
                covered.update(range(first, last + 1))
        holes = sorted(set(range(1, max(sequences) + 1)) - covered)
        if holes:
            problems.append(
                f"{sid}: epoch {epoch}: {len(holes)} events lost (no gap record covers them), "
                f"first {holes[:limit]}"
            )
    if expect.lines is not None:
        written = [e.message for e in events if e.kind == "log" and e.stream in ("stdout", "stderr")]
        numbers: list[int] = []
        for message in written:
            head, _, tail = message.rstrip(".").partition(" ")
            if head == expect.prefix and tail.isdigit():
                numbers.append(int(tail))
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        if twice:
            problems.append(f"{sid}: {len(twice)} lines stored twice, first {twice[:limit]}")
        beyond = sorted(n for n in set(numbers) if n >= expect.lines)
        if beyond:
            problems.append(f"{sid}: lines never written stored: {beyond[:limit]}")
        if expect.complete:
            missing = sorted(set(range(expect.lines)) - set(numbers))
            if len(missing) > dropped:
                problems.append(
                    f"{sid}: {len(missing)} lines missing but gap records count {dropped} dropped, "
                    f"first missing {missing[:limit]}"
                )
    starts = _lifecycle(events, "started")
    if len(starts) != expect.starts:
        problems.append(f"{sid}: main process started {len(starts)} times, expected {expect.starts}")
    exits = _lifecycle(events, "exited")
    if len(exits) > max(len(starts), 1):
        problems.append(f"{sid}: {len(exits)} exits stored for {len(starts)} starts")
    if expect.exit_code is None and exits:
        problems.append(f"{sid}: the main process exited ({exits[0].message}) but should still run")
    if expect.exit_code is not None:
        if not exits:
            problems.append(f"{sid}: no exit stored (expected exit code {expect.exit_code})")
        elif (code := (exits[-1].data or {}).get("exit_code")) != expect.exit_code:
            problems.append(f"{sid}: exit code {code} stored, expected {expect.exit_code}")
    return problems


def resumed_after(events: list[StoredEvent], heal_unix_ms: int) -> float | None:
    """Seconds from the heal to the first RECONNECTED record journaled at or after it, or None when the
    store holds none (the supervisor never noticed the cut, or never came back)."""
    times = [e.timestamp_ms for e in _lifecycle(events, "reconnected") if e.timestamp_ms >= heal_unix_ms]
    return (min(times) - heal_unix_ms) / 1000 if times else None
