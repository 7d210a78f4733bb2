"""Raw journal reads (forwarded without decoding), the batch built from them, and the directory lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from openshell_wire.convert import decode_event, encode_event, event_to_proto
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
    Payload,
)
from openshell_wire.v1 import openshell_pb2 as pb
from supervisor.journal import Journal, JournalError
from supervisor.journal.frames import HEADER_SIZE, Kind, encode_frame, parse_at
from supervisor.session import event_batch_message
from tests.support.journal import append as _append
from tests.support.journal import open_journal as _open

_PAYLOADS: list[Payload] = [
    LogRecord(LogStream.STDOUT, "plain"),
    LogRecord(LogStream.STDERR, ""),
    LogRecord(LogStream.SUPERVISOR, "é" * 100, continued=True),
    LogRecord(LogStream.STDOUT, "x" * 127),
    LogRecord(LogStream.STDOUT, "y" * 20_000),
    LifecycleRecord(LifecycleKind.SUPERVISOR_STARTED, pid=1, instance_id="i"),
    LifecycleRecord(LifecycleKind.STARTED, pid=42, argv=("sh", "-c", "echo hi")),
    LifecycleRecord(LifecycleKind.START_FAILED, detail="no such file"),
    LifecycleRecord(LifecycleKind.EXITED, pid=42, exit_code=137, signal=9),
    GapRecord(GapReason.OVERFLOW, 3, 300, 5000, 5002),
]


def _read_all_raw(journal: Journal, after: int = 0, **kw: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while batch := journal.read_raw_after(after, **kw):
        out.extend(batch)
        after = batch[-1][0]
    return out


def _fill(journal: Journal) -> list[Event]:
    events: list[Event] = []
    for timestamp in (0, 1, 1_760_000_000_000):
        for payload in _PAYLOADS:
            events.append(_append(journal, payload, timestamp_ms=timestamp))
    return events


def test_raw_read_returns_exactly_the_encoded_event_of_every_kind(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", segment_bytes=4096)  # several segments
    events = _fill(journal)
    raw = _read_all_raw(journal, max_records=4)
    assert [seq for seq, _ in raw] == [e.sequence for e in events]
    assert [data for _, data in raw] == [encode_event(e) for e in events]
    # The same records the decoding read gives, in the same batches.
    assert [decode_event(data) for _, data in raw] == events
    for after, size in [(0, 1), (5, 3), (7, 500)]:
        assert [s for s, _ in journal.read_raw_after(after, max_records=size)] == [
            e.sequence for e in journal.read_after(after, max_records=size)
        ]
    # The byte budget counts payload bytes the same way, and always returns at least one record.
    big = next(
        e.sequence for e in events if isinstance(e.payload, LogRecord) and len(e.payload.message) > 1000
    )
    assert len(journal.read_raw_after(big - 1, max_bytes=10)) == 1
    assert journal.read_raw_after(big - 1, max_bytes=10)[0][0] == big
    # Records found at open (written by an earlier run) are checked, and come back the same.
    journal.close()
    reopened = _open(tmp_path / "j", segment_bytes=4096)
    assert _read_all_raw(reopened, max_records=3) == raw
    reopened.close()


def test_a_record_that_does_not_decode_is_a_corrupt_gap_in_raw_reads_too(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    _append(journal, LogRecord(LogStream.STDOUT, "before"))
    journal.close()
    # A frame with a valid CRC whose payload is not an Event we know (a newer writer, or a bug),
    # and one whose payload names another sequence: written by "an earlier run".
    (segment,) = directory.glob("seg-*.log")
    newer = pb.Event(sequence=2).SerializeToString() + b"\xa2\x06\x00"  # field 100: unknown kind
    wrong = encode_event(Event(7, 1, LogRecord(LogStream.STDOUT, "says 7")))
    with open(segment, "ab") as f:
        f.write(encode_frame(2, Kind.LOG, newer))
        f.write(encode_frame(3, Kind.LOG, wrong))
    reopened = _open(directory)
    _append(reopened, LogRecord(LogStream.STDOUT, "after"))
    raw = _read_all_raw(reopened)
    assert [seq for seq, _ in raw] == [1, 2, 3, 4]
    decoded = [decode_event(data) for _, data in raw]
    for event, seq, length in [(decoded[1], 2, len(newer)), (decoded[2], 3, len(wrong))]:
        assert event.sequence == seq
        assert event.payload == GapRecord(GapReason.CORRUPT, 1, length, seq, seq)
    assert [e.payload for e in decoded[::3]] == [
        LogRecord(LogStream.STDOUT, "before"),
        LogRecord(LogStream.STDOUT, "after"),
    ]
    # The decoding read agrees on every record (the gaps' timestamps are when they were made).
    slow = reopened.read_after(0)
    assert [(e.sequence, e.payload) for e in slow] == [(e.sequence, e.payload) for e in decoded]
    reopened.close()


def test_damage_found_by_a_raw_read_is_repaired_into_a_gap(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    events = [_append(journal, LogRecord(LogStream.STDOUT, f"line {i}")) for i in range(10)]
    (segment,) = (tmp_path / "j").glob("seg-*.log")
    data = segment.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        frame = parse_at(data, pos)
        assert frame is not None
        offsets.append(pos)
        pos = frame.end
    with open(segment, "r+b") as f:
        f.seek(offsets[4] + HEADER_SIZE + 2)
        f.write(b"\xff")
    raw = _read_all_raw(journal, max_records=3)
    assert [seq for seq, _ in raw] == list(range(1, 11))
    gap = decode_event(raw[4][1])
    assert isinstance(gap.payload, GapRecord) and gap.payload.reason is GapReason.CORRUPT
    assert [data for _, data in raw[:4] + raw[5:]] == [encode_event(e) for e in events[:4] + events[5:]]
    assert journal.stats().corrupt_records_total == 1
    # Appends after the repair are passed on as they are.
    nxt = _append(journal, LogRecord(LogStream.STDOUT, "next"))
    assert journal.read_raw_after(10) == [(11, encode_event(nxt))]
    journal.close()


def test_event_batch_message_equals_the_message_built_from_records() -> None:
    events = [Event(i + 1, 1_760_000_000_000 + i, p) for i, p in enumerate(_PAYLOADS)]
    expected = pb.SupervisorMessage()
    expected.events.journal_epoch = "epoch-1"
    expected.events.events.extend(event_to_proto(e) for e in events)
    built = event_batch_message("epoch-1", [(e.sequence, encode_event(e)) for e in events])
    assert built == expected
    assert built.SerializeToString() == expected.SerializeToString()
    assert event_batch_message("", []) == pb.SupervisorMessage(events=pb.EventBatch())


def test_a_second_journal_over_the_same_directory_fails_fast(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    _append(journal, LogRecord(LogStream.STDOUT, "mine"))
    with pytest.raises(JournalError, match=r"in use by another process") as raised:
        _open(directory)
    assert str(directory) in str(raised.value)
    # Another process too (flock is per open file, so this holds across processes).
    probe = (
        "import sys; from pathlib import Path; "
        "from supervisor.journal import Journal, JournalOptions, JournalError\n"
        "try:\n    Journal.open(JournalOptions(directory=Path(sys.argv[1])))\n"
        "except JournalError as exc:\n    print(exc); sys.exit(3)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe, str(directory)], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "in use by another process" in done.stdout
    # The failed opens changed nothing; once closed, the directory can be opened again.
    assert [e.sequence for e in journal.read_after(0)] == [1]
    journal.close()
    reopened = _open(directory)
    assert [e.payload for e in reopened.read_after(0)] == [LogRecord(LogStream.STDOUT, "mine")]
    reopened.close()
