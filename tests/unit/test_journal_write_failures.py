"""The journal never loses silently: failed appends on a real full disk, segment files that went
missing or unreadable, and the health change that says the journal cannot write.

The full disk is a real one (a small tmpfs, as root); the unreadable segment is a real ``read``
failing with EIO (strace injects it into a process that opens the journal). The I/O error on
append, with a real supervisor and gateway, is in tests/integration/test_journal_faults.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from openshell_wire.convert import decode_event, encode_event
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    HealthRecord,
    HealthState,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
    Payload,
)
from openshell_wire.v1 import openshell_pb2 as pb
from supervisor.health import HealthMonitor, HealthSettings
from supervisor.journal import FsyncPolicy, Journal, JournalError
from supervisor.journal import journal as journal_module
from tests.support.journal import crash
from tests.support.journal import open_journal as _open
from tests.support.journal import read_all as _read_all
from tests.support.procs import PYTHON, REPO, child_env

LINE = "x" * 100
JOURNAL_REASON = "journal cannot write: "


def _line(i: int) -> LogRecord:
    return LogRecord(LogStream.STDOUT, f"line {i:05d} {LINE}")


def _walk(events: list[Event], written: list[str]) -> list[GapRecord]:
    """Check that ``events`` deliver ``written`` in order, each line once or counted by a gap in
    its place (``delivered + sum(dropped) == written``); the gaps met, in order."""
    position = 0
    gaps: list[GapRecord] = []
    for event in events:
        payload = event.payload
        if isinstance(payload, LogRecord):
            assert payload.message == written[position], (event, position)
            position += 1
        elif isinstance(payload, GapRecord):
            assert payload.first_sequence == event.sequence
            assert payload.last_sequence - payload.first_sequence + 1 == payload.dropped_records
            position += payload.dropped_records
            gaps.append(payload)
    assert position == len(written), (position, len(written))
    return gaps


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_loses_no_line_silently_and_lifecycle_records_still_get_written(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No waiting between tries to allocate the reserve again.
    monkeypatch.setattr(journal_module, "_RESERVE_RETRY_S", 0.0)
    journal = _open(small_disk / "j")
    written: list[str] = []

    def line() -> bool:
        record = _line(len(written))
        written.append(record.message)
        try:
            journal.append(record)
        except JournalError as exc:
            assert "counted" in str(exc)
            return False
        return True

    for _ in range(100):
        assert line()
    filler = _fill(small_disk)
    failed = sum(not line() for _ in range(2000))
    assert failed > 1000, "the disk was full"
    stats = journal.stats()
    assert stats.write_problem == "No space left on device"
    assert stats.write_failed_records_total == failed
    # A lifecycle record is still written, from the freed reserve, after the gap counting the lines.
    exited = journal.append(LifecycleRecord(LifecycleKind.EXITED, exit_code=3))
    assert journal.stats().write_failed_pending == 0
    # Still full: lines go on being counted (the reserve is not for them).
    failed_after = sum(not line() for _ in range(50))
    assert failed_after == 50
    filler.unlink()
    journal.maintain()  # the disk has room: the reserve is allocated again, the gap written
    assert journal.stats().write_problem is None
    for _ in range(100):
        assert line()

    events = _read_all(journal)
    gaps = _walk(events, written)
    assert {g.reason for g in gaps} == {GapReason.WRITE_FAILED}
    assert {g.detail for g in gaps} == {"No space left on device"}
    assert sum(g.dropped_records for g in gaps) == failed + failed_after
    by_sequence = {e.sequence: e for e in events}
    assert isinstance(by_sequence[exited].payload, LifecycleRecord)
    first_gap = next(e for e in events if isinstance(e.payload, GapRecord))
    assert first_gap.sequence < exited, "the gap comes before any newer record"
    stats = journal.stats()
    assert stats.write_failed_records_total == failed + failed_after
    assert stats.write_errors_total >= 1
    journal.close()
    # What was written stays readable after a restart, counted the same way.
    reopened = _open(small_disk / "j")
    assert _walk(_read_all(reopened), written) == gaps
    assert reopened.stats().corrupt_records_total == 0
    reopened.close()


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.log"))


def _base(path: Path) -> int:
    return int(path.name[4:24])


def _fill_segments(directory: Path, n: int) -> tuple[Journal, list[str]]:
    journal = _open(directory, segment_bytes=4096)
    written = []
    for i in range(n):
        written.append(_line(i).message)
        journal.append(_line(i))
    assert len(_segments(directory)) >= 5
    return journal, written


@pytest.mark.parametrize("which", ["first", "middle", "newest"])
def test_a_segment_file_missing_at_open_becomes_a_corrupt_gap_counting_its_sequences(
    tmp_path: Path, which: str
) -> None:
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    journal.close()
    segments = _segments(directory)
    gone = {"first": segments[0], "middle": segments[2], "newest": segments[-1]}[which]
    # The newest file's end is known from the state file (``written_through``) only.
    last = _base(segments[segments.index(gone) + 1]) - 1 if gone is not segments[-1] else 300
    gone.unlink()

    reopened = _open(directory, segment_bytes=4096)
    events = _read_all(reopened)
    (gap,) = _walk(events, written)
    assert gap.reason is GapReason.CORRUPT and gap.detail == "segment file missing"
    assert (gap.first_sequence, gap.last_sequence) == (_base(gone), last)
    assert reopened.stats().corrupt_records_total == gap.dropped_records
    # The rest still delivers, and appends go on after it.
    nxt = reopened.append(_line(300))
    assert nxt == 301 and _read_all(reopened, 300)[-1].sequence == nxt
    reopened.close()
    # Counted once: a second open finds the gap on disk and nothing more missing.
    again = _open(directory, segment_bytes=4096)
    assert _walk(_read_all(again), [*written, _line(300).message]) == [gap]
    assert again.stats().corrupt_records_total == 0
    again.close()


def test_a_segment_file_missing_at_read_time_becomes_a_corrupt_gap(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    segments = _segments(directory)
    gone, following = segments[1], segments[2]
    gone.unlink()

    events = _read_all(journal)
    (gap,) = _walk(events, written)
    assert gap.reason is GapReason.CORRUPT and gap.detail == "segment file missing"
    assert (gap.first_sequence, gap.last_sequence) == (_base(gone), _base(following) - 1)
    assert journal.stats().corrupt_records_total == gap.dropped_records
    # The active segment deleted under the writer: what it held is counted, appends go on.
    active = _segments(directory)[-1]
    active.unlink()
    journal.append(_line(300))
    written.append(_line(300).message)
    events = _read_all(journal)
    gaps = _walk(events, written)
    assert gaps[0] == gap and gaps[1].first_sequence == _base(active) and len(gaps) == 2
    journal.close()


_DUMP = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from supervisor.journal import Journal, JournalOptions
    from openshell_wire.records import GapRecord, LogRecord
    journal = Journal.open(JournalOptions(directory=Path(sys.argv[1]), segment_bytes=4096))
    out, after = [], 0
    while batch := journal.read_after(after):
        for e in batch:
            p = e.payload
            if isinstance(p, GapRecord):
                g = [p.reason.value, p.first_sequence, p.last_sequence, p.dropped_records, p.detail]
                out.append(["gap", *g])
            elif isinstance(p, LogRecord):
                out.append(["log", p.message])
        after = batch[-1].sequence
    journal.close()
    print(json.dumps(out))
    """
)


def test_an_unreadable_segment_at_open_becomes_a_corrupt_gap(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it injects the read error)")
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    journal.close()
    segments = _segments(directory)
    bad, following = segments[1], segments[2]
    # Every read(2) of that one file fails with EIO, as on a bad sector; nothing else is touched.
    argv = [
        strace, "-f", "-qq", "-o", "/dev/null", "-P", str(bad.resolve()),
        "-e", "trace=read", "-e", "inject=read:error=EIO",
        PYTHON, "-c", _DUMP, str(directory),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    items = json.loads(done.stdout)
    gaps = [i for i in items if i[0] == "gap"]
    assert gaps == [
        ["gap", "corrupt", _base(bad), _base(following) - 1, _base(following) - _base(bad),
         "segment unreadable: Input/output error"]
    ]  # fmt: skip
    lines = [i[1] for i in items if i[0] == "log"]
    assert len(lines) + gaps[0][4] == len(written)
    assert set(lines) <= set(written) and lines == sorted(lines)


def test_journal_write_failures_are_a_health_change_even_when_already_unhealthy(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    recorded: list[HealthRecord] = []
    problem: dict[str, object] = {}

    def record(payload: Payload) -> bool:
        assert isinstance(payload, HealthRecord)
        recorded.append(payload)
        return True

    def stats() -> object:
        real = journal.stats()
        return type(real)(**{**{f: getattr(real, f) for f in real.__slots__}, **problem})

    monitor = HealthMonitor(
        HealthSettings(
            interval_s=3600, check_interval_s=1, disk_unhealthy_ratio=0.000001, disk_degraded_ratio=0.000001
        ),
        main_pid=lambda: None,
        record=record,
        extra_disk_paths=[tmp_path],
        journal_stats=stats,  # type: ignore[arg-type]
    )
    monitor.check()
    assert [r.state for r in recorded] == [HealthState.UNHEALTHY]  # the disk ratio
    assert not any(r.startswith(JOURNAL_REASON) for r in recorded[0].reasons)
    problem.update(write_errors_total=1, write_problem="No space left on device")
    monitor.check()
    assert len(recorded) == 2 and recorded[1].change
    assert JOURNAL_REASON + "No space left on device" in recorded[1].reasons
    monitor.check()
    assert len(recorded) == 2  # no news
    # A one-off error that is over by the next sample is still reported, for that sample.
    problem.update(write_errors_total=2, write_problem=None, last_write_error=os.strerror(errno.EIO))
    monitor.check()
    assert len(recorded) == 2  # still failing as far as the last record said; the cause is in it
    monitor.check()
    assert len(recorded) == 3 and not any(r.startswith(JOURNAL_REASON) for r in recorded[2].reasons)
    problem.update(write_errors_total=3)
    monitor.check()
    assert len(recorded) == 4 and JOURNAL_REASON + "Input/output error" in recorded[3].reasons
    journal.close()


def test_a_gap_reason_this_side_does_not_know_keeps_the_gap_and_its_count() -> None:
    # A newer peer's reason must not make the whole batch refused (the stream would stall on it).
    msg = pb.Event(sequence=7, timestamp_ms=1)
    msg.gap.reason = 99  # type: ignore[assignment]
    msg.gap.dropped_records = 3
    msg.gap.first_sequence, msg.gap.last_sequence = 7, 9
    msg.gap.detail = "a newer reason"
    event = decode_event(msg.SerializeToString())
    assert event.payload == GapRecord(GapReason.UNSPECIFIED, 3, 0, 7, 9, "a newer reason")
    written = GapRecord(GapReason.WRITE_FAILED, 2, 10, 3, 4, "No space left on device")
    assert decode_event(encode_event(Event(3, 1, written))).payload == written


def _no_gaps(journal: Journal, written: list[str]) -> list[Event]:
    """Everything ``journal`` delivers: exactly the tail of ``written``, in order, without a gap."""
    events = _read_all(journal)
    assert not [e for e in events if isinstance(e.payload, GapRecord)], events
    messages = [e.payload.message for e in events if isinstance(e.payload, LogRecord)]
    assert messages == written[len(written) - len(messages) :]
    return events


def _trimmed(directory: Path) -> tuple[list[str], int]:
    """A journal of 300 lines whose first segments the gateway acknowledged and which were
    deleted: the lines, and the name of its first segment left (above 1)."""
    journal, written = _fill_segments(directory, 300)
    journal.ack(150)
    journal.close()
    first = _base(_segments(directory)[0])
    assert first > 1
    return written, first


@pytest.mark.parametrize("state", ["missing", "unreadable"])
def test_a_journal_rebuilt_without_its_state_file_has_no_false_gap_at_the_next_open(
    tmp_path: Path, state: str
) -> None:
    directory = tmp_path / "j"
    written, first = _trimmed(directory)
    state_file = directory / "state.json"
    if state == "missing":
        state_file.unlink()
    else:
        state_file.write_text("{not json")
    rebuilt = _open(directory, segment_bytes=4096)
    assert _no_gaps(rebuilt, written)[0].sequence == first
    rebuilt.close()
    # The rebuilt state says nothing below the first segment is in this (new) epoch: no
    # sequence below its name is taken for a missing file.
    for _ in range(2):
        again = _open(directory, segment_bytes=4096)
        assert _no_gaps(again, written)[0].sequence == first
        assert again.stats().corrupt_records_total == 0
        again.close()


def test_a_directory_written_by_the_previous_version_opens_without_a_false_gap(tmp_path: Path) -> None:
    # What the version before chained segment names left: a state file without written_through
    # and with acked_through 0 (its rebuild saved that; its acknowledgement could also trim
    # segments without saving the state), segments from 85 or so up.
    directory = tmp_path / "j"
    written, first = _trimmed(directory)
    state_file = directory / "state.json"
    state = json.loads(state_file.read_text())
    del state["written_through"]
    state.update(acked_through=0, sent_through=0)
    state_file.write_text(json.dumps(state))
    for _ in range(2):
        journal = _open(directory, segment_bytes=4096)
        assert _no_gaps(journal, written)[0].sequence == first
        assert journal.stats().corrupt_records_total == 0
        journal.append(_line(len(written)))
        written.append(_line(len(written)).message)
        journal.close()


@pytest.mark.parametrize("reserve", [0, 256 * 1024])
def test_acknowledged_segments_are_deleted_only_once_the_state_file_says_so(
    small_disk: Path, reserve: int
) -> None:
    directory = small_disk / "j"
    journal, written = _fill_segments(directory, 300)
    journal.close()
    journal = _open(directory, segment_bytes=4096, reserve_bytes=reserve)
    before = _segments(directory)
    filler = _fill(small_disk)
    journal.ack(150)  # the state file cannot be written but from the reserve, if there is one
    if reserve:
        assert len(_segments(directory)) < len(before), "the reserve gave the state file its room"
    else:
        assert _segments(directory) == before, "kept until the state file says they are acknowledged"
        filler.unlink()
        journal.maintain()  # the disk has room: the state is saved, the segments deleted
        assert len(_segments(directory)) < len(before)
    crash(journal)  # what is on disk now is what the next open finds
    filler.unlink(missing_ok=True)
    reopened = _open(directory, segment_bytes=4096)
    assert reopened.acked_through == 150
    events = _no_gaps(reopened, written)
    assert events[0].sequence <= 151
    assert reopened.stats().corrupt_records_total == 0
    reopened.close()


def test_a_newest_segment_lost_in_a_crash_under_fsync_always_is_a_gap_and_its_sequences_not_reused(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=4096, fsync=FsyncPolicy.ALWAYS)
    written: list[str] = []
    # Appended until a segment has just been closed (no gateway: nothing acknowledged, no state
    # file written for it), then the process dies and the newest file is lost with it.
    while len(_segments(directory)) < 4 or _segments(directory)[-1].stat().st_size < 4096:
        written.append(_line(len(written)).message)
        journal.append(_line(len(written) - 1))
    crash(journal)
    newest = _segments(directory)[-1]
    newest.unlink()

    reopened = _open(directory, segment_bytes=4096, fsync=FsyncPolicy.ALWAYS)
    (gap,) = _walk(_read_all(reopened), written)
    assert (gap.reason, gap.detail) == (GapReason.CORRUPT, "segment file missing")
    assert (gap.first_sequence, gap.last_sequence) == (_base(newest), len(written))
    assert reopened.append(_line(len(written))) == len(written) + 1, "no sequence is used twice"
    reopened.close()


def test_a_cut_back_that_fails_leaves_the_torn_frame_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _open(tmp_path / "j", reserve_bytes=0)
    journal.append(_line(0))
    real_write, real_ftruncate = os.write, os.ftruncate

    def torn(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", eio)
        return real_write(fd, bytes(data)[:9])  # half a frame lands, the rest fails

    def eio(*_args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", torn)
    monkeypatch.setattr(os, "ftruncate", eio)
    with pytest.raises(JournalError, match="counted"):
        journal.append(_line(1))
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    assert len(_segments(tmp_path / "j")) == 1
    journal.append(_line(2))  # the gap first, in a new segment past the torn frame
    written = [_line(i).message for i in range(3)]
    (gap,) = _walk(_read_all(journal), written)
    assert (gap.reason, gap.first_sequence, gap.detail) == (GapReason.WRITE_FAILED, 2, "Input/output error")
    journal.close()
    reopened = _open(tmp_path / "j")
    assert _walk(_read_all(reopened), written) == [gap]
    assert reopened.stats().corrupt_records_total == 0, "the torn frame is counted once, by the gap"
    reopened.close()


def test_a_failure_nothing_was_written_since_stays_the_journals_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _open(tmp_path / "j", reserve_bytes=0)
    real_write = os.write

    def eio(*_args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", eio)
    with pytest.raises(JournalError):
        journal.append(LifecycleRecord(LifecycleKind.EXITED, exit_code=0))  # its caller retries
    monkeypatch.setattr(os, "write", real_write)
    journal.maintain()  # nothing written: still failing as far as anyone knows
    assert journal.stats().write_problem == "Input/output error"
    journal.append(LifecycleRecord(LifecycleKind.EXITED, exit_code=0))
    assert journal.stats().write_problem is None
    journal.close()


def test_a_segment_missing_on_a_full_disk_still_becomes_a_gap_from_the_reserve(small_disk: Path) -> None:
    directory = small_disk / "j"
    journal, written = _fill_segments(directory, 300)
    segments = _segments(directory)
    gone, following = segments[1], segments[2]
    gone.unlink()
    filler = _fill(small_disk)
    (gap,) = _walk(_read_all(journal), written)
    assert (gap.first_sequence, gap.last_sequence) == (_base(gone), _base(following) - 1)
    filler.unlink()
    journal.close()


def test_an_unreadable_segment_is_set_aside_not_overwritten(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it injects the read error)")
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    journal.close()
    bad = _segments(directory)[1]
    content = bad.read_bytes()
    argv = [
        strace, "-f", "-qq", "-o", "/dev/null", "-P", str(bad.resolve()),
        "-e", "trace=read", "-e", "inject=read:error=EIO",
        PYTHON, "-c", _DUMP, str(directory),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    # The EIO may have been transient: the records stay on disk, beside the gap that replaced them.
    aside = bad.with_name(bad.name + ".bad")
    assert aside.read_bytes() == content
    reopened = _open(directory, segment_bytes=4096)
    (gap,) = _walk(_read_all(reopened), written)
    assert gap.first_sequence == _base(bad) and reopened.stats().corrupt_records_total == 0
    reopened.close()


def test_the_reserve_comes_back_only_with_room_to_spare_and_after_the_pending_gap(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_RESERVE_RETRY_S", 0.0)
    reserve = 256 * 1024
    journal = _open(small_disk / "j", reserve_bytes=reserve)
    filler = _fill(small_disk)
    written: list[str] = []
    while not journal.stats().write_failed_pending:  # the segment's last page fills first
        written.append(_line(len(written)).message)
        with contextlib.suppress(JournalError):
            journal.append(_line(len(written) - 1))
    reserve_file = small_disk / "j" / "reserve"
    assert reserve_file.stat().st_blocks == 0, "freed on the full disk"
    # Room for the reserve (its own freed room and a little), but not for it and as much again:
    # allocated, it would fill the disk again and the next line would free it again.
    os.truncate(filler, filler.stat().st_size - 64 * 1024)
    journal.maintain()
    assert journal.stats().write_failed_pending == 0, "the gap is written first"
    assert reserve_file.stat().st_blocks == 0
    assert journal.stats().write_problem == "No space left on device"
    filler.unlink()
    journal.maintain()
    assert reserve_file.stat().st_blocks * 512 >= reserve
    assert journal.stats().write_problem is None
    written.append(_line(len(written)).message)
    journal.append(_line(len(written) - 1))
    _walk(_read_all(journal), written)
    journal.close()


def test_a_lost_segment_already_sent_is_in_the_gap_but_not_counted_as_lost(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    segments = _segments(directory)
    gone, following = segments[1], segments[2]
    journal.mark_sent(_base(following))  # on the wire, not acknowledged yet
    gone.unlink()
    # A reader resuming below it (the stream broke) gets the gap for every unacknowledged sequence.
    (gap,) = _walk(_read_all(journal), written)
    assert (gap.first_sequence, gap.last_sequence) == (_base(gone), _base(following) - 1)
    assert journal.stats().corrupt_records_total == 0, "sent: most likely at the gateway"
    journal.close()


def test_an_unreadable_segment_already_acknowledged_is_no_gap(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it injects the read error)")
    directory = tmp_path / "j"
    journal, written = _fill_segments(directory, 300)
    journal.close()
    segments = _segments(directory)
    bad, following = segments[1], segments[2]
    # A crash between saving the acknowledgement and deleting the segments it covers.
    state_file = directory / "state.json"
    state = json.loads(state_file.read_text())
    state["acked_through"] = _base(following) - 1
    state_file.write_text(json.dumps(state))
    script = _DUMP.replace("journal.close()", "print(journal.stats().corrupt_records_total)\njournal.close()")
    argv = [
        strace, "-f", "-qq", "-o", "/dev/null", "-P", str(bad.resolve()),
        "-e", "trace=read", "-e", "inject=read:error=EIO",
        PYTHON, "-c", script, str(directory),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    corrupt, items = done.stdout.splitlines()
    assert int(corrupt) == 0, done.stderr[-3000:]
    assert [i for i in json.loads(items) if i[0] == "gap"] == []
    assert [i[1] for i in json.loads(items)] == written[_base(following) - 1 :]
