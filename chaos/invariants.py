"""The invariants every chaos scenario checks on what the gateway stored, whatever the fault:

- **nothing lost unexplained**: in every journal epoch of a sandbox the stored sequences, with the
  ranges their gap records stand for, cover 1..the highest stored sequence (a hole is a lost event);
- **gaps only where allowed, and each one honest**: a sandbox whose journal cannot drop (the default:
  :attr:`Expect.gap_reasons` empty) holds no gap record at all; an allowed gap has an allowed reason
  and is consistent with what the supervisor's journal writes (supervisor/journal: a gap takes the
  first sequence of the range it stands for and counts exactly ``last - first + 1`` records), none
  of its range stored, no two ranges overlapping; the records they count stay within
  :attr:`Expect.max_dropped`;
- **no duplicate**: no sequence stored twice, no line of the main process stored twice (a replay that
  slipped past the gateway's deduplication would store the same line under a new sequence);
- **in order**: within an epoch the main process's line numbers ascend with the sequence (it writes in
  order and the journal appends in order; a replay under the wrong sequences breaks that);
- **every dropped line counted where it was dropped**: each run of the main process's lines missing
  from the store lies between two stored neighbours with gap records between their sequences that
  count at least as many records (a gap elsewhere explains nothing), and only lines in
  :attr:`Expect.droppable` may be missing;
- **the main process never restarted by a cut**: exactly the expected number of STARTED lifecycle
  records, at most one EXITED per start, with the expected exit code;
- **no lost tail**: :func:`tail_problems` compares the highest sequence stored per epoch with the
  supervisor's own last sequence (its journal's state file, once it exited), which the hole check
  cannot see;
- **resumed within the bound after the heal**: :func:`resumed_after` gives the time from the heal to the
  first RECONNECTED record after it (the supervisor journals one after every outage it noticed), for the
  scenario to compare with its bound.

The events are read from the gateway's database by URL (SQLite or PostgreSQL), so the checks are the
same whatever the deployment a scenario builds.
"""

from __future__ import annotations

import itertools
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
    #: The gap reasons (``"overflow"``, ``"write_failed"``, ...) this sandbox's journal may write;
    #: empty (the default): a journal that cannot drop, so any gap record is a violation.
    gap_reasons: frozenset[str] = frozenset()
    #: At most this many records counted dropped by the gaps (None: no bound beyond the checks).
    max_dropped: int | None = 0
    #: Only lines ``first <= n < last`` may be missing (dropped and counted), e.g. those written
    #: after the fault; None: any line a gap explains.
    droppable: tuple[int, int] | None = None


def _lifecycle(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.kind == "lifecycle" and e.data is not None and e.data.get("kind") == kind]


@dataclass(frozen=True, slots=True)
class _Gap:
    epoch: int
    sequence: int
    first: int
    last: int
    dropped: int
    reason: str


def _gap_problems(
    sid: str, epoch: str, gaps: list[_Gap], stored: set[int], expect: Expect, *, limit: int
) -> list[str]:
    """Each gap record checked against how the supervisor's journal writes one (supervisor/journal
    segments.py and journal.py: an OVERFLOW, WRITE_FAILED or CORRUPT gap takes the first sequence of
    the consecutive records it replaces and counts exactly ``last - first + 1`` of them; a split gap
    keeps that), and against the others."""
    problems: list[str] = []
    for gap in gaps:
        what = f"{sid}: epoch {epoch}: gap record {gap.sequence} ({gap.reason}, {gap.first}..{gap.last})"
        if gap.reason not in expect.gap_reasons:
            allowed = sorted(expect.gap_reasons) or "none: this journal must not drop"
            problems.append(f"{what}: reason not allowed here (allowed: {allowed})")
        if gap.last < gap.first or gap.first < 1:
            problems.append(f"{what}: empty or invalid range")
            continue
        if gap.sequence != gap.first:
            problems.append(f"{what}: stored as sequence {gap.sequence}, not the first of its range")
        if gap.dropped != gap.last - gap.first + 1:
            problems.append(f"{what}: counts {gap.dropped} records for {gap.last - gap.first + 1} sequences")
        inside = sorted(q for q in stored if gap.first <= q <= gap.last and q != gap.sequence)
        if inside:
            problems.append(f"{what}: covers stored sequences {inside[:limit]}")
    ordered = sorted((g for g in gaps if g.last >= g.first), key=lambda g: (g.first, g.last))
    for lower, upper in itertools.pairwise(ordered):
        if upper.first <= lower.last:
            problems.append(
                f"{sid}: epoch {epoch}: gap records {lower.sequence} ({lower.first}..{lower.last}) and "
                f"{upper.sequence} ({upper.first}..{upper.last}) overlap (one drop counted twice)"
            )
    return problems


def check_sandbox(
    events: list[StoredEvent], expect: Expect, *, limit: int = 10, settled: bool = True
) -> list[str]:
    """The invariants' violations for one sandbox (empty when all hold); each names the sandbox. With
    ``settled`` False (a scenario that failed midway) only what holds at any moment is checked:
    holes, duplicates, the gaps, the order; not the exit, the lines' completeness, the starts."""
    sid = expect.sandbox_id
    problems: list[str] = []
    if not events:
        return [f"{sid}: nothing stored"]
    by_epoch: dict[str, list[StoredEvent]] = {}
    for event in events:
        by_epoch.setdefault(event.epoch, []).append(event)
    # Epochs in the order first stored: a position (epoch index, sequence) orders records across a
    # journal restarted on a new epoch.
    epoch_index = {epoch: i for i, epoch in enumerate(by_epoch)}
    gaps: list[_Gap] = []
    for epoch, epoch_events in by_epoch.items():
        sequences = [e.sequence for e in epoch_events]
        if len(sequences) != len(set(sequences)):
            twice = sorted({q for q in sequences if sequences.count(q) > 1})
            problems.append(f"{sid}: epoch {epoch}: sequences stored twice: {twice[:limit]}")
        stored = set(sequences)
        covered = set(stored)
        epoch_gaps = [
            _Gap(
                epoch=epoch_index[epoch],
                sequence=e.sequence,
                first=int(e.data.get("first_sequence", 0)),
                last=int(e.data.get("last_sequence", 0)),
                dropped=int(e.data.get("dropped_records", 0)),
                reason=str(e.data.get("reason")),
            )
            for e in epoch_events
            if e.kind == "gap" and e.data is not None
        ]
        problems += _gap_problems(sid, epoch, epoch_gaps, stored, expect, limit=limit)
        for gap in epoch_gaps:
            if gap.first > 0 and gap.last >= gap.first:
                covered.update(range(gap.first, gap.last + 1))
        gaps += epoch_gaps
        holes = sorted(set(range(1, max(sequences) + 1)) - covered)
        if holes:
            problems.append(
                f"{sid}: epoch {epoch}: {len(holes)} events lost (no gap record covers them), "
                f"first {holes[:limit]}"
            )
    dropped = sum(g.dropped for g in gaps)
    if expect.max_dropped is not None and dropped > expect.max_dropped:
        problems.append(
            f"{sid}: gap records count {dropped} dropped records, at most {expect.max_dropped} allowed"
        )
    if expect.lines is not None:
        problems += _line_problems(events, expect, gaps, epoch_index, limit=limit)
    if not settled:
        return problems
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


def _line_problems(
    events: list[StoredEvent], expect: Expect, gaps: list[_Gap], epoch_index: dict[str, int], *, limit: int
) -> list[str]:
    """The main process's lines: none twice, none never written, in order, and (complete) every
    missing run explained by gap records where it was dropped."""
    assert expect.lines is not None
    sid = expect.sandbox_id
    problems: list[str] = []
    # (line number, position) of each of the main process's lines stored, in the order stored.
    lines: list[tuple[int, tuple[int, int]]] = []
    for e in events:
        if e.kind != "log" or e.stream not in ("stdout", "stderr"):
            continue
        head, _, tail = e.message.rstrip(".").partition(" ")
        if head == expect.prefix and tail.isdigit():
            lines.append((int(tail), (epoch_index[e.epoch], e.sequence)))
    numbers = [n for n, _ in lines]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        problems.append(f"{sid}: {len(twice)} lines stored twice, first {twice[:limit]}")
    beyond = sorted(n for n in set(numbers) if n >= expect.lines)
    if beyond:
        problems.append(f"{sid}: lines never written stored: {beyond[:limit]}")
    # Within an epoch the line numbers ascend with the sequence.
    by_position = sorted(lines, key=lambda line: line[1])
    disorder = [(a, b) for (a, pa), (b, pb) in itertools.pairwise(by_position) if pa[0] == pb[0] and b <= a]
    if disorder:
        problems.append(
            f"{sid}: lines out of order with their sequences: {len(disorder)} times, first "
            f"line {disorder[0][1]} after line {disorder[0][0]}"
        )
    if not expect.complete:
        return problems
    where = dict(lines)
    missing = sorted(set(range(expect.lines)) - set(where))
    if expect.droppable is not None:
        low, high = expect.droppable
        outside = [n for n in missing if not low <= n < high]
        if outside:
            problems.append(
                f"{sid}: {len(outside)} lines missing outside the droppable {low}..{high - 1}, "
                f"first {outside[:limit]}"
            )
    # Each run of consecutive missing lines, explained only by gaps between its stored neighbours.
    runs: list[list[int]] = []
    for n in missing:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    unexplained: list[str] = []
    for run in runs:
        below = where.get(run[0] - 1, (-1, 0))
        above = where.get(run[-1] + 1, (len(epoch_index), 0))
        counted = sum(g.dropped for g in gaps if below < (g.epoch, g.first) and (g.epoch, g.last) < above)
        if counted < len(run):
            unexplained.append(f"{run[0]}..{run[-1]} ({len(run)} lines, {counted} counted between)")
    if unexplained:
        problems.append(
            f"{sid}: {sum(len(r) for r in runs)} lines missing, {len(unexplained)} runs not counted by "
            f"gap records where they were dropped: {unexplained[:limit]}"
        )
    return problems


def tail_problems(events: list[StoredEvent], sid: str, *, epoch: str, last_sequence: int) -> list[str]:
    """A lost tail: the supervisor's journal ``epoch`` ended at ``last_sequence`` (its state file once
    it exited), so the store must cover that epoch up to it (its highest stored sequence, or the end
    of a gap range stored, reaches it; holes below are check_sandbox's)."""
    mine = [e for e in events if e.epoch == epoch]
    if not mine:
        return [f"{sid}: nothing stored in the journal's last epoch {epoch} (it ended at {last_sequence})"]
    ends = [e.sequence for e in mine] + [
        int((e.data or {}).get("last_sequence", 0)) for e in mine if e.kind == "gap"
    ]
    reach = max(ends)
    if reach < last_sequence:
        return [
            f"{sid}: epoch {epoch}: the store ends at sequence {reach}, the supervisor's journal at "
            f"{last_sequence} ({last_sequence - reach} records of the tail lost)"
        ]
    if reach > last_sequence:
        return [f"{sid}: epoch {epoch}: sequence {reach} stored beyond the journal's last {last_sequence}"]
    return []


def resumed_after(events: list[StoredEvent], heal_unix_ms: int) -> float | None:
    """Seconds from the heal to the first RECONNECTED record journaled at or after it, or None when the
    store holds none (the supervisor never noticed the cut, or never came back)."""
    times = [e.timestamp_ms for e in _lifecycle(events, "reconnected") if e.timestamp_ms >= heal_unix_ms]
    return (min(times) - heal_unix_ms) / 1000 if times else None
