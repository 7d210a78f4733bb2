"""Journal basics: ordering, reads, trimming, sequences across restarts, waiting, fsync, errors."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import pytest

from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from supervisor.journal import FsyncPolicy, Journal, JournalError, JournalOptions
from tests.support.journal import append as _append
from tests.support.journal import crash as _crash
from tests.support.journal import open_journal as _open
from tests.support.journal import read_all


def _line(i: int) -> LogRecord:
    return LogRecord(LogStream.STDOUT, f"line {i}")


def _read_all(journal: Journal, after: int = 0) -> list[Event]:
    return read_all(journal, after, max_records=7)


def test_append_assigns_sequences_and_reads_back_in_order(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    events = [_append(journal, _line(i), timestamp_ms=1000 + i) for i in range(20)]
    _append(journal, LifecycleRecord(LifecycleKind.STARTED, pid=42, argv=("sleep", "1")), timestamp_ms=5)

    assert [e.sequence for e in events] == list(range(1, 21))
    read = _read_all(journal)
    assert read[:20] == events
    assert read[20] == Event(21, 5, LifecycleRecord(LifecycleKind.STARTED, pid=42, argv=("sleep", "1")))
    assert journal.read_after(10, max_records=3) == events[10:13]
    assert journal.read_after(21) == []
    stats = journal.stats()
    assert (stats.records, stats.first_sequence, stats.last_sequence) == (21, 1, 21)
    journal.close()


def test_read_after_respects_max_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    big = _append(journal, LogRecord(LogStream.STDERR, "x" * 5000))
    small = [_append(journal, _line(i)) for i in range(3)]
    assert journal.read_after(0, max_bytes=10) == [big]
    assert journal.read_after(big.sequence, max_bytes=10) == small[:1]
    assert journal.read_after(big.sequence) == small


def test_read_after_spans_segments_and_can_jump_backwards(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", segment_bytes=300)
    events = [_append(journal, _line(i)) for i in range(100)]
    assert journal.stats().segments > 5
    assert _read_all(journal) == events
    # A reconnect resumes from an earlier point: the cursor must not be trusted.
    assert journal.read_after(37, max_records=5) == events[37:42]
    assert journal.read_after(3, max_records=2) == events[3:5]
    assert journal.read_after(5, max_records=200) == events[5:]


def test_ack_trims_whole_segments_and_sequences_survive_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=200)
    events = [_append(journal, _line(i)) for i in range(50)]
    segments_before = journal.stats().segments
    journal.ack(30)
    stats = journal.stats()
    assert stats.segments < segments_before
    assert stats.acked_through == 30
    assert 1 < journal.first_sequence <= 31
    assert _read_all(journal, 30) == events[30:]

    journal.ack(10_000)  # clamped to what exists
    assert journal.acked_through == 50
    assert journal.stats().records == 0
    assert not list(directory.glob("seg-*.log"))
    epoch = journal.epoch
    journal.close()

    reopened = _open(directory, segment_bytes=200)
    assert reopened.epoch == epoch
    assert (reopened.last_sequence, reopened.acked_through, reopened.first_sequence) == (50, 50, 0)
    assert _append(reopened, _line(99)).sequence == 51
    reopened.close()


def test_ack_is_monotonic(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    for i in range(5):
        _append(journal, _line(i))
    journal.ack(4)
    journal.ack(2)
    assert journal.acked_through == 4


def test_advance_to_skips_sequences_even_after_restart(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    _append(journal, _line(0))
    journal.advance_to(100)
    journal.advance_to(50)  # never backwards
    assert _append(journal, _line(1)).sequence == 101
    journal.advance_to(200)
    _crash(journal)  # a crash: no close

    reopened = _open(directory)
    assert reopened.last_sequence == 200
    assert _append(reopened, _line(2)).sequence == 201
    assert [e.sequence for e in _read_all(reopened)] == [1, 101, 201]


def test_reopen_recovers_epoch_records_and_acked(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=250)
    events = [_append(journal, _line(i), timestamp_ms=i) for i in range(30)]
    journal.ack(3)
    epoch = journal.epoch
    assert len(epoch) == 32
    journal.close()
    journal.close()  # idempotent

    reopened = _open(directory, segment_bytes=250)
    assert reopened.epoch == epoch
    assert reopened.last_sequence == 30
    assert reopened.acked_through == 3
    assert _read_all(reopened, 3) == events[3:]
    assert reopened.stats().corrupt_records_total == 0
    assert _append(reopened, _line(30)).sequence == 31


def test_fresh_directories_get_distinct_epochs(tmp_path: Path) -> None:
    assert _open(tmp_path / "a").epoch != _open(tmp_path / "b").epoch


def test_corrupt_state_file_is_rebuilt_from_segments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    events = [_append(journal, _line(i)) for i in range(5)]
    old_epoch = journal.epoch
    journal.close()
    (directory / "state.json").write_text("{not json")

    reopened = _open(directory)
    assert "state.json" in caplog.text
    assert reopened.epoch != old_epoch
    assert reopened.last_sequence == 5
    assert _read_all(reopened) == events
    assert json.loads((directory / "state.json").read_text())["epoch"] == reopened.epoch


def test_state_file_with_wrong_types_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "j"
    _open(directory).close()
    (directory / "state.json").write_text(
        json.dumps({"format": 1, "epoch": "e", "acked_through": 0, "last_sequence": "x"})
    )
    reopened = _open(directory)
    assert "last_sequence" in caplog.text
    assert _append(reopened, _line(0)).sequence == 1


async def test_wait_for_append_wakes_on_append(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    _append(journal, _line(0))
    await asyncio.wait_for(journal.wait_for_append(0), 1)  # already satisfied

    waiter = asyncio.create_task(journal.wait_for_append(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    _append(journal, _line(1))
    await asyncio.wait_for(waiter, 1)


async def test_wait_for_append_is_cancellable(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    waiter = asyncio.create_task(journal.wait_for_append(0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    _append(journal, _line(0))  # no stale waiter trips over the cancelled future


async def test_close_releases_waiters(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    waiter = asyncio.create_task(journal.wait_for_append(0))
    await asyncio.sleep(0.01)
    journal.close()
    with pytest.raises(JournalError):
        await asyncio.wait_for(waiter, 1)


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_fsync_always_syncs_every_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _open(tmp_path / "j", fsync=FsyncPolicy.ALWAYS)
    _append(journal, _line(0))  # creates the segment (and fsyncs the directory)
    calls = _count_fsyncs(monkeypatch)
    for i in range(5):
        _append(journal, _line(i))
    assert len(calls) == 5


def test_fsync_never_does_not_sync_on_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_fsyncs(monkeypatch)
    journal = _open(tmp_path / "j", fsync=FsyncPolicy.NEVER)
    calls.clear()
    for i in range(50):
        _append(journal, _line(i))
    assert calls == []
    journal.sync()
    assert len(calls) == 1


async def test_fsync_interval_loop_syncs_dirty_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _open(tmp_path / "j", fsync=FsyncPolicy.INTERVAL, fsync_interval_s=0.01)
    _append(journal, _line(0))
    calls = _count_fsyncs(monkeypatch)
    _append(journal, _line(1))
    assert calls == []
    loop = asyncio.create_task(journal.run_fsync_loop())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if calls:
                break
        assert calls, "the interval loop never fsynced"
        synced = len(calls)
        await asyncio.sleep(0.05)
        state_writes = len(calls) - synced
        assert state_writes == 0, "a clean journal must not be fsynced again"
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


@pytest.mark.parametrize(
    "options",
    [
        {"fsync": FsyncPolicy.ALWAYS},
        {"fsync": FsyncPolicy.NEVER},
        # An fsync period longer than the upkeep's: the upkeep still runs every second.
        {"fsync": FsyncPolicy.INTERVAL, "fsync_interval_s": 30.0},
    ],
    ids=["always", "never", "interval-30s"],
)
async def test_the_upkeep_runs_under_every_policy_and_writes_a_pending_gap_without_another_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, object]
) -> None:
    journal = _open(tmp_path / "j", reserve_bytes=0, **options)
    _append(journal, _line(0))
    real_write = os.write

    def eio(*_args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", eio)
    with pytest.raises(JournalError, match="counted"):
        _append(journal, _line(1))
    monkeypatch.setattr(os, "write", real_write)
    assert journal.stats().write_failed_pending == 1
    loop = asyncio.create_task(journal.run_fsync_loop())
    try:
        for _ in range(30):  # the upkeep runs every second
            await asyncio.sleep(0.1)
            if journal.stats().write_failed_pending == 0:
                break
        assert journal.stats().write_failed_pending == 0, "the gap waited for another append"
        assert not loop.done()
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    (_, gap) = _read_all(journal)
    assert gap.sequence == 2 and gap.payload == GapRecord(
        GapReason.WRITE_FAILED,
        1,
        gap.payload.dropped_bytes,
        2,
        2,
        "Input/output error",  # type: ignore[union-attr]
    )
    assert journal.stats().write_problem is None
    journal.close()


def test_enospc_on_append_is_counted_by_a_gap_written_before_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a reserve: the next append writes the gap first. (A real full disk, with the
    # reserve, is in test_journal_write_failures.py.)
    journal = _open(tmp_path / "j", reserve_bytes=0)
    first = _append(journal, _line(0))
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            # Like a real full disk: part of the frame lands, then the next write fails.
            return real_write(fd, bytes(data)[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(JournalError) as info:
        _append(journal, _line(1))
    message = str(info.value)
    assert "ENOSPC" in message and "seg-" in message and "full" in message and "counted" in message
    assert journal.stats().write_failed_pending == 1
    assert journal.stats().write_problem == "No space left on device"
    monkeypatch.setattr(os, "write", real_write)

    second = _append(journal, _line(2))
    assert second.sequence == 3  # the gap took sequence 2, the one of the line it counts
    got = _read_all(journal)
    assert got[0] == first and got[2] == second
    assert isinstance(got[1].payload, GapRecord) and got[1].sequence == 2
    assert got[1].payload == GapRecord(
        GapReason.WRITE_FAILED, 1, got[1].payload.dropped_bytes, 2, 2, "No space left on device"
    )
    stats = journal.stats()
    assert (stats.write_failed_records_total, stats.write_errors_total) == (1, 1)
    assert (stats.write_failed_pending, stats.write_problem) == (0, None)
    journal.close()
    reopened = _open(tmp_path / "j")
    assert [e.sequence for e in _read_all(reopened)] == [1, 2, 3]
    assert reopened.stats().corrupt_records_total == 0  # the torn half frame was cut back


def test_unwritable_directory_gives_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError) as info:
        _open(blocker / "journal")
    assert str(blocker) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_gives_journal_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with pytest.raises(JournalError, match="EACCES"):
            _open(directory)
    finally:
        directory.chmod(0o700)


def test_append_after_close_is_a_journal_error(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    journal.close()
    with pytest.raises(JournalError):
        _append(journal, _line(0))


def test_invalid_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        JournalOptions(directory=tmp_path, segment_bytes=0)
