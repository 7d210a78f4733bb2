"""Journal recovery: torn tails, flipped bits, and the framing and encoding underneath."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from openshell_wire.convert import encode_event
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from supervisor.journal.codec import PayloadEncoder
from supervisor.journal.frames import HEADER_SIZE, MAGIC, encode_frame, find_next, parse_at
from tests.support.journal import append as _append
from tests.support.journal import open_journal as _open
from tests.support.journal import read_all as _read_all


def _line(i: int) -> LogRecord:
    return LogRecord(LogStream.STDOUT, f"line {i:04d}")


def _frame_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        frame = parse_at(data, pos)
        assert frame is not None
        offsets.append(pos)
        pos = frame.end
    return offsets


def test_torn_tail_becomes_a_corrupt_gap_and_appends_continue(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    events = [_append(journal, _line(i)) for i in range(10)]
    journal.close()
    (segment,) = directory.glob("seg-*.log")
    last_frame = _frame_offsets(segment)[-1]
    with open(segment, "r+b") as f:
        f.truncate(last_frame + HEADER_SIZE + 3)  # the process died mid-write of record 10

    reopened = _open(directory)
    read = _read_all(reopened)
    assert read[:9] == events[:9]
    gap = read[9]
    assert gap.sequence == 10
    assert gap.payload == GapRecord(GapReason.CORRUPT, 1, HEADER_SIZE + 3, 10, 10)
    assert reopened.stats().corrupt_records_total == 1
    nxt = _append(reopened, _line(99))
    assert nxt.sequence == 11
    assert _read_all(reopened, 10) == [nxt]
    reopened.close()

    # The repair was written in place: a second open finds nothing more to fix.
    again = _open(directory)
    assert again.stats().corrupt_records_total == 0
    assert [e.sequence for e in _read_all(again)] == list(range(1, 12))


def test_torn_header_at_the_end_is_a_gap_too(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    for i in range(3):
        _append(journal, _line(i))
    journal.close()
    (segment,) = directory.glob("seg-*.log")
    with open(segment, "ab") as f:
        f.write(MAGIC[:2])
    reopened = _open(directory)
    read = _read_all(reopened)
    assert [e.sequence for e in read] == [1, 2, 3, 4]
    assert isinstance(read[-1].payload, GapRecord) and read[-1].payload.dropped_records == 1


@pytest.mark.parametrize("where", ["magic", "header", "payload", "crc"])
def test_flipped_bit_replaces_exactly_the_damaged_record(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    events = [_append(journal, _line(i)) for i in range(20)]
    lifecycle = _append(journal, LifecycleRecord(LifecycleKind.EXITED, pid=7, exit_code=3))
    journal.close()
    (segment,) = directory.glob("seg-*.log")
    offsets = _frame_offsets(segment)
    target = offsets[7]  # record 8
    bit = {"magic": 1, "header": 9, "payload": HEADER_SIZE + 5, "crc": 18}[where]
    data = bytearray(segment.read_bytes())
    data[target + bit] ^= 0x10
    segment.write_bytes(bytes(data))

    reopened = _open(directory)
    read = _read_all(reopened)
    assert read[:7] == events[:7]
    gap = read[7]
    assert gap.sequence == 8
    assert isinstance(gap.payload, GapRecord)
    assert gap.payload.reason is GapReason.CORRUPT
    assert (gap.payload.dropped_records, gap.payload.first_sequence, gap.payload.last_sequence) == (1, 8, 8)
    assert gap.payload.dropped_bytes == offsets[8] - offsets[7]
    assert read[8:] == [*events[8:], lifecycle]
    assert [e.sequence for e in read] == list(range(1, 22))
    assert reopened.stats().corrupt_records_total == 1
    assert _append(reopened, _line(50)).sequence == 22


def test_damage_spanning_several_records_is_one_gap_with_the_exact_count(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=10_000)
    events = [_append(journal, _line(i)) for i in range(30)]
    journal.close()
    (segment,) = directory.glob("seg-*.log")
    offsets = _frame_offsets(segment)
    data = bytearray(segment.read_bytes())
    for pos in range(offsets[10] + 2, offsets[14] + 4):  # records 11..15 smashed
        data[pos] = 0
    segment.write_bytes(bytes(data))

    read = _read_all(_open(directory, segment_bytes=10_000))
    gaps = [e for e in read if isinstance(e.payload, GapRecord)]
    assert len(gaps) == 1
    assert gaps[0].sequence == 11
    assert gaps[0].payload == GapRecord(GapReason.CORRUPT, 5, offsets[15] - offsets[10], 11, 15)
    assert [e for e in read if not isinstance(e.payload, GapRecord)] == events[:10] + events[15:]


def test_damage_in_an_older_segment_is_bounded_by_the_next_segment(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=300)
    events = [_append(journal, _line(i)) for i in range(40)]
    journal.close()
    first, second, *_ = sorted(directory.glob("seg-*.log"))
    n_first = len(_frame_offsets(first))
    offsets = _frame_offsets(first)
    with open(first, "r+b") as f:  # cut the older segment in its last two records
        f.truncate(offsets[-2] + 5)

    reopened = _open(directory, segment_bytes=300)
    read = _read_all(reopened)
    gap = read[n_first - 2]
    assert gap.payload == GapRecord(GapReason.CORRUPT, 2, 5, n_first - 1, n_first), (
        "the loss is counted up to the next segment's first sequence"
    )
    assert [e for e in read if not isinstance(e.payload, GapRecord)] == events[: n_first - 2] + events[
        n_first:
    ]
    assert int(second.name[4:24]) == n_first + 1


def test_garbage_file_and_leftover_temporaries_do_not_break_open(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    _append(journal, _line(0))
    journal.close()
    (directory / "seg-00000000000000000001.log.tmp").write_bytes(b"half a rewrite")
    (directory / "notes.txt").write_text("left alone")
    reopened = _open(directory)
    assert not list(directory.glob("*.tmp"))
    assert (directory / "notes.txt").exists()
    assert [e.sequence for e in _read_all(reopened)] == [1]


def test_damage_found_by_a_read_is_repaired(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    events = [_append(journal, _line(i)) for i in range(10)]
    (segment,) = (tmp_path / "j").glob("seg-*.log")
    offsets = _frame_offsets(segment)
    with open(segment, "r+b") as f:
        f.seek(offsets[4] + HEADER_SIZE + 2)
        f.write(b"\xff")
    read = _read_all(journal)
    assert [e.sequence for e in read] == list(range(1, 11))
    assert isinstance(read[4].payload, GapRecord)
    assert read[:4] + read[5:] == events[:4] + events[5:]
    assert _append(journal, _line(10)).sequence == 11
    assert journal.stats().corrupt_records_total == 1


# ---------------------------------------------------------------- frames and codec


def test_frame_round_trip_and_resync() -> None:
    a = encode_frame(5, 1, b"hello")
    b = encode_frame(6, 2, b"world!")
    buf = a + b"\x00garbage" + MAGIC + b"xx" + b
    first = parse_at(buf, 0)
    assert first is not None and (first.sequence, first.kind, first.length) == (5, 1, 5)
    assert buf[first.payload_offset : first.end] == b"hello"
    assert parse_at(buf, first.end) is None
    found = find_next(buf, first.end, min_sequence=6)
    assert found is not None and found.sequence == 6 and buf[found.payload_offset : found.end] == b"world!"
    assert find_next(buf, first.end, min_sequence=7) is None
    corrupted = bytearray(a)
    corrupted[-1] ^= 1
    assert parse_at(bytes(corrupted), 0) is None


def test_fast_log_encoding_matches_encode_event() -> None:
    encoder = PayloadEncoder()
    sequences = [1, 127, 128, 255, 16_383, 16_384, 2**21, 2**35, 2**64 - 1]
    timestamps = [0, 1, 127, 128, 1_760_000_000_000, -1]
    messages = ["", "a", "x" * 127, "x" * 128, "é" * 70, "y" * 20_000, "tab\tand\x00nul"]
    for seq, ts, msg, stream, continued in itertools.product(
        sequences, timestamps, messages, list(LogStream), [False, True]
    ):
        record = LogRecord(stream, msg, continued)
        assert encoder.encode_log(seq, ts, record) == encode_event(Event(seq, ts, record)), (seq, ts, msg[:8])
    # Interleaved, so the cached varints must follow changes in both directions.
    for seq in [300, 5, 70_000, 129, 300]:
        record = LogRecord(LogStream.STDERR, "z")
        assert encoder.encode_log(seq, 7, record) == encode_event(Event(seq, 7, record))
