"""The journal's byte bound: unsent log lines give way to counted gaps, nothing else does."""

from __future__ import annotations

import random
from pathlib import Path

from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from supervisor.journal import Journal, JournalOptions
from tests.support.journal import append as _append

_SEGMENT = 4 * 1024
_MAX = 16 * 1024


def _open(directory: Path) -> Journal:
    return Journal.open(JournalOptions(directory=directory, segment_bytes=_SEGMENT, max_bytes=_MAX))


def _read_all(journal: Journal, after: int = 0) -> list[Event]:
    out: list[Event] = []
    while batch := journal.read_after(after, max_records=37):
        out.extend(batch)
        after = batch[-1].sequence
    return out


def _check_accounting(events: list[Event], lines_written: int) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), "events must be strictly ascending"
    delivered = [e for e in events if isinstance(e.payload, LogRecord)]
    gaps = [e.payload for e in events if isinstance(e.payload, GapRecord)]
    assert all(g.reason is GapReason.OVERFLOW for g in gaps)
    assert len(delivered) + sum(g.dropped_records for g in gaps) == lines_written


def test_overflow_counts_every_dropped_line_and_keeps_lifecycle(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    lifecycle: list[Event] = []
    lines = 0
    rng = random.Random(7)
    for i in range(3000):
        if i % 97 == 0:
            lifecycle.append(_append(journal, LifecycleRecord(LifecycleKind.STARTED, pid=i)))
        else:
            _append(journal, LogRecord(LogStream.STDOUT, f"line {i} " + "x" * rng.randrange(0, 150)))
            lines += 1
    stats = journal.stats()
    assert stats.dropped_records_total > 0
    # The bound holds up to what may never be dropped (lifecycle and gap records) plus one segment.
    assert stats.bytes_on_disk <= _MAX + _SEGMENT + 200 * (len(lifecycle) + stats.segments)

    events = _read_all(journal)
    _check_accounting(events, lines)
    assert [e for e in events if isinstance(e.payload, LifecycleRecord)] == lifecycle
    gaps = [e for e in events if isinstance(e.payload, GapRecord)]
    for gap in gaps:
        assert isinstance(gap.payload, GapRecord)
        assert gap.sequence == gap.payload.first_sequence
        assert gap.payload.dropped_bytes > 0
    assert sum(g.payload.dropped_records for g in gaps if isinstance(g.payload, GapRecord)) == (
        stats.dropped_records_total
    )
    # The newest lines are the ones kept.
    last = events[-1].payload
    assert isinstance(last, LogRecord) and last.message.startswith("line 2999 ")


def test_records_up_to_the_sent_mark_are_never_dropped(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    sent = [
        _append(journal, LogRecord(LogStream.STDERR, f"sent {i} " + "s" * 80)) for i in range(100)
    ]  # stays under the bound
    journal.mark_sent(sent[-1].sequence)
    lines = len(sent)
    for i in range(2000):
        _append(journal, LogRecord(LogStream.STDOUT, f"later {i} " + "y" * 80))
        lines += 1
    assert journal.stats().sent_through == sent[-1].sequence
    assert journal.stats().dropped_records_total > 0

    events = _read_all(journal)
    assert events[: len(sent)] == sent
    _check_accounting(events, lines)


def test_gap_counts_survive_reopen_and_later_eviction(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    lines = 0
    for i in range(1500):
        _append(journal, LogRecord(LogStream.STDOUT, f"first {i} " + "z" * 90))
        lines += 1
    journal.close()
    reopened = _open(directory)
    for i in range(1500):
        _append(reopened, LogRecord(LogStream.STDOUT, f"second {i} " + "z" * 90))
        lines += 1
    _check_accounting(_read_all(reopened), lines)


def test_partial_reads_then_overflow_keep_the_accounting(tmp_path: Path) -> None:
    # The session reads and marks sent as it goes while a burst overflows the bound.
    journal = _open(tmp_path / "j")
    delivered: list[Event] = []
    after = 0
    lines = 0
    for i in range(4000):
        _append(journal, LogRecord(LogStream.STDOUT, f"l{i} " + "q" * 100))
        lines += 1
        if i % 500 == 0:
            batch = journal.read_after(after, max_records=20)
            if batch:
                journal.mark_sent(batch[-1].sequence)
                delivered.extend(batch)
                after = batch[-1].sequence
    delivered.extend(_read_all(journal, after))
    _check_accounting(delivered, lines)


def test_ack_keeps_working_with_overflow(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    for i in range(2000):
        _append(journal, LogRecord(LogStream.STDOUT, f"a{i} " + "w" * 100))
    journal.ack(journal.last_sequence - 5)
    assert journal.stats().segments == 1
    assert [e.sequence for e in _read_all(journal, journal.acked_through)] == list(
        range(journal.last_sequence - 4, journal.last_sequence + 1)
    )
