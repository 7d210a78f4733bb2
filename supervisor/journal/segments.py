"""Segment files: their index, the scan that validates them, and the rewrite that repairs or evicts.

The journal is a directory of ``seg-<first sequence, 20 digits>.log`` files, each holding frames
(``frames``) in ascending sequence order; the name sorts segments and tells where each starts
without opening it. Only the newest segment is appended to. Older ones change in two ways only:
they are deleted whole once acknowledged, or rewritten whole (temporary file + rename), to replace
damage by a CORRUPT gap record or unsent log lines by OVERFLOW gap records.

Memory stays small: the journal keeps one :class:`Segment` per file (first/last sequence, size,
counts), never the records. A segment's bytes are read whole only to scan it at open, to repair it,
or to evict from it; each is about ``segment_bytes``.

Scanning (:func:`scan`) walks the frames. Where a frame fails its checks, it resynchronises to the
next valid frame whose sequence is above everything accounted for so far, and reports the skipped
stretch as :class:`Damage` with the range of sequences that vanished with it. Sequences may
legitimately jump: a gap record written in place stands for ``first..last`` of what it replaced,
so the scan decodes gap frames (rare) to know where the next sequence should be. A stretch at the
very end of the newest segment is a torn write; nothing follows it to bound the loss, so it is
counted as the number of frame starts (magics) in it, at least one.

:func:`rewrite` turns a scan into a new file: good frames are copied byte for byte, each damage
becomes one CORRUPT gap record, and, when asked to evict, each run of consecutive log records above
the protected sequence becomes one OVERFLOW gap record whose own sequence is the first one it
replaces, so that order is kept and the count of dropped lines is exact. A run never holds a kept
record (lifecycle, gap, protected log line) nor a hole in the sequences (``advance_to``): either
closes it. So every OVERFLOW gap this module writes stands for exactly ``last - first + 1``
consecutive log records, and any part ``(n, last]`` of its range holds ``last - n`` of them, which
is what :func:`rewrite` relies on when it splits a gap (``split_after``) for a reader that resumes
inside one. CORRUPT gaps are consecutive by construction (``Damage.lost``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from openshell_wire.convert import WireError, decode_event, encode_event
from openshell_wire.records import Event, GapReason, GapRecord
from supervisor.journal.frames import MAGIC, Frame, Kind, encode_frame, find_next, parse_at
from supervisor.journal.fsio import atomic_write

log = logging.getLogger(__name__)

_NAME = re.compile(r"^seg-(\d{20})\.log$")


def segment_name(first_sequence: int) -> str:
    return f"seg-{first_sequence:020d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first sequence, path) of every segment file, oldest first; other files are ignored."""
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match is not None and path.is_file():
            found.append((int(match.group(1)), path))
    found.sort()
    return found


@dataclass(slots=True, eq=False)
class Segment:
    """Index entry for one segment file. Identity matters (the read cursor points at one)."""

    path: Path
    #: The sequence in the file name: every frame in it has a sequence >= base and below the
    #: next segment's base.
    base: int
    size: int = 0
    records: int = 0
    #: Sequence of the first and last frame (base - 1 for last while empty).
    first_sequence: int = 0
    last_sequence: int = 0
    #: Highest sequence of a log frame, 0 if none: eviction skips a segment whose log records are
    #: all protected without reading it.
    last_log_sequence: int = 0
    #: End of the range the segment's gap records stand for, 0 if none (set by scan and rewrite;
    #: appends, which never write ranges, leave it alone): see ``covered_through``.
    gap_through: int = 0
    #: Bumped whenever the file is replaced, so a cached reader position becomes invalid.
    generation: int = 0
    #: Frames starting below this offset were not written by this process (found at open, or
    #: in a file a read had to repair): a raw read decodes them once before passing them on.
    untrusted_below: int = 0
    alive: bool = True

    @property
    def covered_through(self) -> int:
        """The highest sequence this segment accounts for: its last frame, or further when a gap
        record near its end stands for a range (``first..last`` of what it replaced). The segment
        is only done with once that is acknowledged, since a reader resuming inside the range still
        needs the rest of the gap."""
        return max(self.last_sequence, self.gap_through)


class Damage(NamedTuple):
    """A skipped stretch ``[offset, end)`` and the sequences lost with it (empty if last < first)."""

    offset: int
    end: int
    first_missing: int
    last_missing: int

    @property
    def lost(self) -> int:
        return max(0, self.last_missing - self.first_missing + 1)


@dataclass(slots=True)
class Scan:
    items: list[Frame | Damage]
    records: int = 0
    first_sequence: int = 0
    last_sequence: int = 0
    last_log_sequence: int = 0
    #: Highest sequence accounted for, counting the ranges that gap frames stand for.
    covered_through: int = 0

    @property
    def damages(self) -> list[Damage]:
        return [item for item in self.items if isinstance(item, Damage)]


def _covered_end(data: bytes, frame: Frame) -> int:
    if frame.kind != Kind.GAP:
        return frame.sequence
    try:
        event = decode_event(data[frame.payload_offset : frame.end])
    except WireError:
        return frame.sequence
    gap = event.payload
    if (
        isinstance(gap, GapRecord)
        and gap.first_sequence == frame.sequence
        and gap.last_sequence > frame.sequence
    ):
        return gap.last_sequence
    return frame.sequence


def scan(data: bytes, *, base: int, upper: int | None) -> Scan:
    """Validate a segment's bytes. ``upper`` is the next segment's base, None for the newest."""
    result = Scan(items=[], last_sequence=base - 1, covered_through=base - 1)
    pos = 0
    while pos < len(data):
        frame = parse_at(data, pos)
        if (
            frame is not None
            and frame.sequence > result.covered_through
            and (upper is None or frame.sequence < upper)
        ):
            _take(result, data, frame)
            pos = frame.end
            continue
        following = find_next(data, pos + 1, min_sequence=result.covered_through + 1, below=upper)
        first_missing = result.covered_through + 1
        if following is not None:
            result.items.append(Damage(pos, following.offset, first_missing, following.sequence - 1))
            pos = following.offset
            continue
        # Damage running to the end of the newest segment is a torn write: nothing after it says
        # how many records went, so count the frames that had started (at least one: never silent).
        started = max(1, data.count(MAGIC, pos))
        last_missing = upper - 1 if upper is not None else first_missing + started - 1
        result.items.append(Damage(pos, len(data), first_missing, last_missing))
        break
    return result


def _take(result: Scan, data: bytes, frame: Frame) -> None:
    result.items.append(frame)
    if result.records == 0:
        result.first_sequence = frame.sequence
    result.records += 1
    result.last_sequence = frame.sequence
    if frame.kind == Kind.LOG:
        result.last_log_sequence = frame.sequence
    result.covered_through = _covered_end(data, frame)


class Rewritten(NamedTuple):
    size: int
    records: int
    first_sequence: int
    last_sequence: int
    last_log_sequence: int
    dropped_records: int
    corrupt_records: int
    written: bool
    #: As :attr:`Segment.covered_through` for the new file (never less than ``last_sequence``).
    covered_through: int = 0


def gap_frame(
    reason: GapReason, *, first: int, last: int, count: int, nbytes: int, now_ms: int, detail: str = ""
) -> bytes:
    """The frame of a gap record standing for ``first..last`` (its own sequence is ``first``)."""
    gap = GapRecord(
        reason=reason,
        dropped_records=count,
        dropped_bytes=nbytes,
        first_sequence=first,
        last_sequence=last,
        detail=detail,
    )
    return encode_frame(first, Kind.GAP, encode_event(Event(first, now_ms, gap)))


def straddling_gap(payload: bytes, sequence: int, after: int) -> Event | None:
    """The gap record in ``payload`` (a GAP frame of ``sequence``) if its range runs across
    ``after``: it starts at or below it, its own sequence is strictly below, and it ends above.

    Such a gap is what a reader resuming at ``after`` would skip (its sequence is not above) while
    the gateway, which holds ``after`` itself, lacks the rest of what it counts. ``after`` equal to
    the gap's own sequence is not a straddle: then the gateway holds a record of that sequence and,
    records on the wire never being evicted, that record is the gap itself.
    """
    if sequence >= after:
        return None
    try:
        event = decode_event(payload)
    except WireError:
        return None
    gap = event.payload
    if (
        isinstance(gap, GapRecord)
        and event.sequence == sequence
        and gap.first_sequence == sequence
        and gap.last_sequence > after
    ):
        return event
    return None


def _split_frames(event: Event, after: int) -> list[bytes]:
    """``event`` (a gap straddling ``after``) as two gaps: ``first..after`` and ``after+1..last``.

    The upper one counts the records in ``(after, last]``: ``last - after`` of them, as every gap
    written here stands for consecutive sequences (see the module docstring); capped by the gap's
    own count for a gap written by an older version whose run might have had holes. The bytes are
    not known per record, so ``dropped_bytes`` is shared in proportion to the counts (an estimate;
    the two parts still add up to the original).
    """
    gap = event.payload
    assert isinstance(gap, GapRecord)
    upper = max(0, min(gap.last_sequence - after, gap.dropped_records))
    upper_bytes = gap.dropped_bytes * upper // gap.dropped_records if gap.dropped_records else 0
    first = event.sequence
    return [
        gap_frame(
            gap.reason,
            first=first,
            last=after,
            count=gap.dropped_records - upper,
            nbytes=gap.dropped_bytes - upper_bytes,
            now_ms=event.timestamp_ms,
            detail=gap.detail,
        ),
        gap_frame(
            gap.reason,
            first=after + 1,
            last=gap.last_sequence,
            count=upper,
            nbytes=upper_bytes,
            now_ms=event.timestamp_ms,
            detail=gap.detail,
        ),
    ]


def rewrite(
    path: Path,
    data: bytes,
    found: Scan,
    *,
    evict_above: int | None,
    now_ms: int,
    split_after: int | None = None,
) -> Rewritten:
    """Write the repaired (and, with ``evict_above``, evicted) segment over ``path``.

    Log frames with a sequence above ``evict_above`` are dropped in favour of OVERFLOW gaps; None
    means repair only. With ``split_after``, a gap whose range straddles it (:func:`straddling_gap`)
    is replaced by two gaps that meet there (:func:`_split_frames`). If nothing would change, the
    file is left alone (``written`` is False). Raises OSError.
    """
    chunks: list[bytes] = []
    records = first = last = last_log = 0
    dropped = corrupt = 0
    run_first = run_last = run_count = run_bytes = 0
    changed = False

    def emit(chunk: bytes, sequence: int, kind: int) -> None:
        nonlocal records, first, last, last_log
        chunks.append(chunk)
        if records == 0:
            first = sequence
        records += 1
        last = sequence
        if kind == Kind.LOG:
            last_log = sequence

    def flush_run() -> None:
        nonlocal run_count, run_bytes
        if run_count:
            emit(
                gap_frame(
                    GapReason.OVERFLOW,
                    first=run_first,
                    last=run_last,
                    count=run_count,
                    nbytes=run_bytes,
                    now_ms=now_ms,
                ),
                run_first,
                Kind.GAP,
            )
            run_count = run_bytes = 0

    covered = found.covered_through
    for item in found.items:
        if isinstance(item, Damage):
            covered = max(covered, item.last_missing)
            changed = True
            flush_run()
            if item.lost:
                corrupt += item.lost
                emit(
                    gap_frame(
                        GapReason.CORRUPT,
                        first=item.first_missing,
                        last=item.last_missing,
                        count=item.lost,
                        nbytes=item.end - item.offset,
                        now_ms=now_ms,
                    ),
                    item.first_missing,
                    Kind.GAP,
                )
            continue
        if item.kind == Kind.LOG and evict_above is not None and item.sequence > evict_above:
            changed = True
            if run_count and item.sequence != run_last + 1:
                # A hole in the sequences (``advance_to``): keep each gap's range consecutive.
                flush_run()
            if run_count == 0:
                run_first = item.sequence
            run_last = item.sequence
            run_count += 1
            run_bytes += item.length
            dropped += 1
            continue
        flush_run()
        if split_after is not None and item.kind == Kind.GAP:
            event = straddling_gap(data[item.payload_offset : item.end], item.sequence, split_after)
            if event is not None:
                changed = True
                lower, upper = _split_frames(event, split_after)
                emit(lower, item.sequence, Kind.GAP)
                emit(upper, split_after + 1, Kind.GAP)
                continue
        emit(data[item.offset : item.end], item.sequence, item.kind)
    flush_run()
    covered = max(covered, last)
    if not changed:
        return Rewritten(
            len(data), records, first, last, last_log, 0, 0, written=False, covered_through=covered
        )
    size = atomic_write(path, chunks)
    return Rewritten(
        size, records, first, last, last_log, dropped, corrupt, written=True, covered_through=covered
    )


def describe_damage(path: Path, damage: Damage) -> str:
    lost = (
        f"sequences {damage.first_missing}..{damage.last_missing} ({damage.lost} records) replaced by a gap"
        if damage.lost
        else "no sequence lost"
    )
    return f"journal: damaged bytes {damage.offset}..{damage.end} in {path}: {lost}"
