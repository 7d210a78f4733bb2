"""A resume point inside a gap's range: the rest of the gap is delivered, counted exactly, once.

The scenario (found by review): the gateway stored records the supervisor sent, the acknowledgement
was lost, the supervisor restarted (forgetting what it had sent) and, with the gateway unreachable,
evicted those records together with later ones into one OVERFLOW gap whose own sequence is the first
it replaced. The gateway then resumes after a sequence inside that range.

A journal now writes ``sent_through`` into its state file before it sends, so after a restart it
no longer evicts what may be at the gateway, and this cannot arise from its own files (the last
test shows it, at the very edge the split cannot help with). A journal written before that field
existed still can: these tests make one by removing the field, as an older supervisor wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openshell_wire.convert import decode_event
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
from supervisor.journal.frames import HEADER_SIZE, parse_at
from supervisor.journal.state import STATE_FILE
from tests.support.journal import crash

_SEGMENT = 2048
_LINES = 200


def _open(directory: Path, max_bytes: int = 1 << 30) -> Journal:
    return Journal.open(JournalOptions(directory=directory, segment_bytes=_SEGMENT, max_bytes=max_bytes))


def _line(i: int) -> LogRecord:
    return LogRecord(LogStream.STDOUT, f"line {i:04d} " + "x" * 40)


def _read(journal: Journal, after: int, *, raw: bool) -> list[Event]:
    out: list[Event] = []
    while True:
        if raw:
            batch = [decode_event(data) for _seq, data in journal.read_raw_after(after, max_records=7)]
        else:
            batch = journal.read_after(after, max_records=7)
        if not batch:
            return out
        out.extend(batch)
        after = batch[-1].sequence


def _gaps(events: list[Event]) -> list[GapRecord]:
    return [e.payload for e in events if isinstance(e.payload, GapRecord)]


def _lines(events: list[Event]) -> int:
    return sum(isinstance(e.payload, LogRecord) for e in events)


def _forget_sent_mark(directory: Path) -> None:
    """Make the state file one an older supervisor wrote: without ``sent_through``."""
    path = directory / STATE_FILE
    state = json.loads(path.read_text())
    del state["sent_through"]
    path.write_text(json.dumps(state))


def _restarted_after_lost_ack(directory: Path, *, stored_through: int) -> Journal:
    """Write ``_LINES`` lines; the gateway acknowledged 100 and stored through ``stored_through``
    (sent, acknowledgement lost); restart while it is unreachable, with a bound that evicts, from
    state an older supervisor wrote (no sent mark)."""
    journal = _open(directory)
    for i in range(1, _LINES + 1):
        assert journal.append(_line(i)) == i
    journal.ack(100)
    journal.mark_sent(stored_through)
    journal.sync()
    crash(journal)
    _forget_sent_mark(directory)
    reopened = _open(directory, max_bytes=3 * _SEGMENT)
    assert reopened.acked_through == 100
    assert reopened.stats().dropped_records_total > 0
    return reopened


def _straddling(journal: Journal, resume: int) -> GapRecord:
    """The on-disk gap whose range runs across ``resume`` (before any read splits it)."""
    events = _read(journal, 100, raw=False)
    (gap,) = [g for g in _gaps(events) if g.first_sequence < resume < g.last_sequence]
    return gap


@pytest.mark.parametrize("raw", [False, True])
def test_resume_inside_an_overflow_gap_delivers_the_rest_of_it(tmp_path: Path, raw: bool) -> None:
    directory = tmp_path / "j"
    journal = _restarted_after_lost_ack(directory, stored_through=110)
    original = _straddling(journal, 110)
    assert original.reason is GapReason.OVERFLOW and original.first_sequence == 101

    # The gateway holds 1..110: it resumes after 110 (the session first trims to it).
    journal.ack(110)
    events = _read(journal, 110, raw=raw)
    first = events[0]
    assert first.sequence == 111
    assert first.payload == GapRecord(
        GapReason.OVERFLOW,
        dropped_records=original.last_sequence - 110,
        dropped_bytes=first.payload.dropped_bytes if isinstance(first.payload, GapRecord) else -1,
        first_sequence=111,
        last_sequence=original.last_sequence,
    )
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    # What the gateway ends up with accounts for every line written, exactly.
    assert 110 + _lines(events) + sum(g.dropped_records for g in _gaps(events)) == _LINES


def test_the_split_survives_reconnects_and_restarts_without_counting_twice(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _restarted_after_lost_ack(directory, stored_through=110)
    journal.ack(110)
    (split, *_rest) = journal.read_raw_after(110, max_records=1)
    assert split[0] == 111
    # The gateway stored only that gap (its high-water mark is now 111), then the stream broke,
    # and later the supervisor restarted too: whatever resumes at 111 must not see the range again.
    tail = _read(journal, 111, raw=True)
    crash(journal)
    reopened = _open(directory, max_bytes=3 * _SEGMENT)
    for events in (tail, _read(reopened, 111, raw=True), _read(reopened, 111, raw=False)):
        assert all(e.sequence > 111 for e in events)
        gap = decode_event(split[1]).payload
        assert isinstance(gap, GapRecord)
        total = 110 + gap.dropped_records + _lines(events) + sum(g.dropped_records for g in _gaps(events))
        assert total == _LINES


def test_resume_at_the_gaps_own_sequence_skips_it(tmp_path: Path) -> None:
    # The gateway holding the gap's own sequence holds the gap itself (what was on the wire is
    # never evicted afterwards in the same run): nothing of it may be delivered again.
    directory = tmp_path / "j"
    journal = _restarted_after_lost_ack(directory, stored_through=100)
    before = _read(journal, 100, raw=False)
    gap_event = next(e for e in before if isinstance(e.payload, GapRecord))
    journal.ack(gap_event.sequence)
    after = _read(journal, gap_event.sequence, raw=True)
    assert after == [e for e in before if e.sequence > gap_event.sequence]


def test_gap_at_the_end_of_a_segment_outlives_an_ack_inside_its_range(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _restarted_after_lost_ack(directory, stored_through=110)
    original = _straddling(journal, 110)
    segments = journal.stats().segments
    journal.ack(110)
    journal.close()
    # Neither the acknowledgement nor a reopen drops the segment: its gap still counts 111..last.
    reopened = _open(directory, max_bytes=3 * _SEGMENT)
    assert reopened.stats().segments == segments
    events = _read(reopened, 110, raw=False)
    assert events[0].payload == GapRecord(
        GapReason.OVERFLOW,
        original.last_sequence - 110,
        events[0].payload.dropped_bytes if isinstance(events[0].payload, GapRecord) else -1,
        111,
        original.last_sequence,
    )


def test_resume_inside_a_corrupt_gap_delivers_the_rest_of_it(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    for i in range(1, 21):
        journal.append(_line(i))
    journal.append(LifecycleRecord(LifecycleKind.STARTED, pid=7))
    journal.close()
    (segment,) = directory.glob("seg-*.log")
    data = bytearray(segment.read_bytes())
    offsets, pos = [], 0
    while pos < len(data):
        frame = parse_at(bytes(data), pos)
        assert frame is not None
        offsets.append(pos)
        pos = frame.end
    # Damage records 5..12 (one flipped byte in each): one CORRUPT gap 5..12.
    for offset in offsets[4:12]:
        data[offset + HEADER_SIZE] ^= 0xFF
    segment.write_bytes(bytes(data))

    reopened = _open(directory)
    reopened.ack(8)  # the gateway had stored 1..8 before the damage
    for raw in (True, False):
        events = _read(reopened, 8, raw=raw)
        assert events[0] == Event(
            9,
            events[0].timestamp_ms,
            GapRecord(
                GapReason.CORRUPT,
                4,
                events[0].payload.dropped_bytes if isinstance(events[0].payload, GapRecord) else -1,
                9,
                12,
            ),
        )
        assert [e.sequence for e in events[1:]] == list(range(13, 22))
        assert 8 + _lines(events) + sum(g.dropped_records for g in _gaps(events)) == 20


def test_an_eviction_run_never_spans_a_hole_in_the_sequences(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, max_bytes=1 << 30)
    for i in range(5):
        journal.append(_line(i))
    journal.advance_to(50)
    for i in range(5):
        journal.append(_line(i))
    journal.close()
    reopened = _open(directory, max_bytes=1)
    reopened.append(_line(99))  # sequence 56: the old segment is closed and evicted
    gaps = _gaps(_read(reopened, 0, raw=False))
    assert all(g.dropped_records == g.last_sequence - g.first_sequence + 1 for g in gaps)
    assert [(g.first_sequence, g.last_sequence) for g in gaps][:2] == [(1, 5), (51, 55)]


@pytest.mark.parametrize("stored_through", [101, 110, 150])
def test_the_sent_mark_keeps_what_the_gateway_may_hold_through_a_restart(
    tmp_path: Path, stored_through: int
) -> None:
    """The gateway stored through ``stored_through`` (101: exactly the first record an eviction
    from the acknowledged point would replace, the case no split can repair); the acknowledgement
    was lost; the supervisor restarts and must evict. Resuming where the gateway is accounts for
    every line exactly, and nothing at or below what was sent became part of a gap."""
    directory = tmp_path / "j"
    options = JournalOptions(directory=directory, segment_bytes=_SEGMENT, sent_reserve=8)
    journal = Journal.open(options)
    for i in range(1, _LINES + 1):
        journal.append(_line(i))
    journal.ack(100)
    journal.mark_sent(stored_through)
    journal.sync()
    crash(journal)
    state = json.loads((directory / STATE_FILE).read_text())
    assert state["sent_through"] >= stored_through, "written before the send"
    reopened = Journal.open(
        JournalOptions(directory=directory, segment_bytes=_SEGMENT, max_bytes=3 * _SEGMENT, sent_reserve=8)
    )
    assert reopened.stats().dropped_records_total > 0, "the bound did evict"
    for raw in (False, True):
        events = _read(reopened, stored_through, raw=raw)
        assert all(g.first_sequence > stored_through for g in _gaps(events))
        assert stored_through + _lines(events) + sum(g.dropped_records for g in _gaps(events)) == _LINES


def test_without_the_sent_mark_the_edge_case_loses_lines(tmp_path: Path) -> None:
    """The same at 101 from an older supervisor's state: the gap starts at the very record the
    gateway holds, so resuming after it skips the gap and the rest of its count is lost. This is
    what the sent mark prevents (and why the test above can fail)."""
    directory = tmp_path / "j"
    journal = _restarted_after_lost_ack(directory, stored_through=101)
    events = _read(journal, 101, raw=False)
    accounted = 101 + _lines(events) + sum(g.dropped_records for g in _gaps(events))
    assert accounted < _LINES
