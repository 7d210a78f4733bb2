"""The chaos suite's invariants (chaos/invariants.py) on synthetic stored events: each one flags what it
must and stays quiet on a correct store, so a scenario's verdict means what it says."""

from __future__ import annotations

from typing import Any

from chaos.invariants import Expect, StoredEvent, check_sandbox, resumed_after, tail_problems

SID = "sb"


def _event(
    sequence: int,
    kind: str,
    *,
    epoch: str = "e1",
    t: int = 0,
    stream: str | None = None,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> StoredEvent:
    return StoredEvent(
        epoch=epoch,
        sequence=sequence,
        timestamp_ms=t or 1000 + sequence,
        kind=kind,
        stream=stream,
        message=message,
        data=data,
    )


def _line(sequence: int, n: int, **kw: Any) -> StoredEvent:
    return _event(sequence, "log", stream="stdout", message=f"line {n}", **kw)


def _lifecycle(sequence: int, what: str, *, t: int = 0, **data: Any) -> StoredEvent:
    return _event(sequence, "lifecycle", t=t, data={"kind": what, **data})


def _store(lines: int, *, exit_code: int = 0) -> list[StoredEvent]:
    """A correct store: started, ``lines`` lines, exited with ``exit_code``."""
    events = [_lifecycle(1, "started", pid=42)]
    events += [_line(2 + i, i) for i in range(lines)]
    events.append(_lifecycle(2 + lines, "exited", exit_code=exit_code))
    return events


def _gap(sequence: int, first: int, last: int, dropped: int, *, reason: str = "overflow") -> StoredEvent:
    return _event(
        sequence,
        "gap",
        data={"reason": reason, "first_sequence": first, "last_sequence": last, "dropped_records": dropped},
    )


def _dropped(lines: int, first: int, last: int, *, count: int | None = None) -> list[StoredEvent]:
    """A store whose sequences first..last (log lines) gave way to one OVERFLOW gap record, as the
    journal writes it: under the first sequence of its range, counting ``last - first + 1``."""
    events = [e for e in _store(lines) if not first <= e.sequence <= last]
    events.insert(first - 1, _gap(first, first, last, last - first + 1 if count is None else count))
    return events


#: A sandbox whose journal may drop, like the network scenarios' backlog.
DROPS = {"gap_reasons": frozenset({"overflow"}), "max_dropped": None}


def test_a_correct_store_has_no_violation() -> None:
    assert check_sandbox(_store(10, exit_code=3), Expect(SID, lines=10, exit_code=3)) == []


def test_a_hole_is_a_violation() -> None:
    events = [e for e in _store(10) if e.sequence != 5]
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, complete=False))
    assert any("1 events lost" in p and "[5]" in p for p in problems), problems


def test_a_hole_covered_by_a_gap_record_is_none_and_its_lines_are_counted() -> None:
    # Sequences 4..6 (lines 2..4) gave way to a gap record that counts them, where the journal may drop.
    assert check_sandbox(_dropped(10, 4, 6), Expect(SID, lines=10, exit_code=0, **DROPS)) == []


def test_missing_lines_the_gaps_do_not_count_are_a_violation() -> None:
    # The gap record covers the sequences but says only 1 record was dropped: 3 lines are missing.
    problems = check_sandbox(_dropped(10, 4, 6, count=1), Expect(SID, lines=10, exit_code=0, **DROPS))
    assert any("counts 1 records for 3 sequences" in p for p in problems), problems
    assert any("2..4 (3 lines, 1 counted between)" in p for p in problems), problems


def test_any_gap_on_a_journal_that_cannot_drop_is_a_violation() -> None:
    # The reviewer's `gapcover` mutant: a line replaced by a consistent OVERFLOW gap counting it. On a
    # sandbox with the default journal (no gap allowed) that is a loss, however well it is counted.
    problems = check_sandbox(_dropped(10, 5, 5), Expect(SID, lines=10, exit_code=0))
    assert any("reason not allowed here" in p for p in problems), problems
    assert any("count 1 dropped records, at most 0 allowed" in p for p in problems), problems
    # A reason the sandbox does not allow is one too.
    events = _dropped(10, 5, 5)
    events[4] = _gap(5, 5, 5, 1, reason="corrupt")
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, **DROPS))
    assert any("(corrupt, 5..5): reason not allowed" in p for p in problems), problems
    # And more dropped than the sandbox's bound.
    limited = {**DROPS, "max_dropped": 2}
    problems = check_sandbox(_dropped(10, 4, 6), Expect(SID, lines=10, exit_code=0, **limited))
    assert any("count 3 dropped records, at most 2 allowed" in p for p in problems), problems


def test_a_gap_elsewhere_does_not_explain_a_missing_line() -> None:
    # Line 1 (sequence 3) silently lost; a real gap for lines 5..6 (sequences 7..8) counts 2, enough
    # by count for 3 missing lines overall, but nothing lies between line 1's stored neighbours.
    events = [e for e in _dropped(10, 7, 8) if e.sequence != 3]
    events.insert(2, _gap(3, 3, 3, 1))
    assert check_sandbox(events, Expect(SID, lines=10, exit_code=0, **DROPS)) == []
    events = [e for e in _dropped(10, 7, 8) if e.sequence != 3]
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, **DROPS))
    assert any("1..1 (1 lines, 0 counted between)" in p for p in problems), problems


def test_a_gap_counted_twice_or_over_stored_records_is_a_violation() -> None:
    # The same drop counted twice under two sequences would inflate the count and hide a loss.
    events = _dropped(10, 4, 6)
    events.append(_gap(13, 4, 6, 3))
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, **DROPS))
    assert any("stored as sequence 13, not the first of its range" in p for p in problems), problems
    assert any("overlap (one drop counted twice)" in p for p in problems), problems
    # A gap whose range holds records that were stored.
    events = _store(10)
    events[3] = _gap(4, 4, 6, 3)
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, **DROPS))
    assert any("covers stored sequences [5, 6]" in p for p in problems), problems


def test_lines_missing_outside_the_droppable_ones_are_a_violation() -> None:
    # The backlog writer's journal overflows only with lines written after the fault (>= 3 here).
    expect = Expect(SID, lines=10, exit_code=0, droppable=(3, 10), **DROPS)
    assert check_sandbox(_dropped(10, 6, 8), expect) == []
    problems = check_sandbox(_dropped(10, 4, 6), expect)
    assert any("1 lines missing outside the droppable 3..9, first [2]" in p for p in problems), problems


def test_lines_out_of_order_with_their_sequences_are_a_violation() -> None:
    # A replay that stored lines under the wrong sequences: no hole, no duplicate, but out of order.
    events = _store(5)
    events[2], events[3] = _line(3, 2), _line(4, 1)
    problems = check_sandbox(events, Expect(SID, lines=5, exit_code=0))
    assert any(
        "lines out of order with their sequences: 1 times, first line 1 after line 2" in p for p in problems
    )


def test_a_lost_tail_is_a_violation() -> None:
    # The last records (here the exit) never stored: no hole below the highest stored sequence.
    events = _store(5)
    assert tail_problems(events, SID, epoch="e1", last_sequence=7) == []
    problems = tail_problems(events[:-1], SID, epoch="e1", last_sequence=7)
    assert problems == [
        f"{SID}: epoch e1: the store ends at sequence 6, the supervisor's journal at 7 "
        "(1 records of the tail lost)"
    ]
    # A tail dropped into a gap record is covered by the gap's range.
    assert tail_problems([*events[:-2], _gap(6, 6, 7, 2)], SID, epoch="e1", last_sequence=7) == []
    assert "nothing stored" in tail_problems(events, SID, epoch="e2", last_sequence=3)[0]


def test_a_duplicate_sequence_is_a_violation() -> None:
    events = _store(5)
    events.append(_line(3, 1))
    problems = check_sandbox(events, Expect(SID, lines=5, exit_code=0))
    assert any("sequences stored twice: [3]" in p for p in problems), problems


def test_a_line_stored_twice_under_a_new_sequence_is_a_violation() -> None:
    # A replay that slipped past deduplication: the same line under another sequence (no hole).
    events = _store(5)
    events.insert(-1, _line(7, 2))
    events[-1] = _lifecycle(8, "exited", exit_code=0)
    problems = check_sandbox(events, Expect(SID, lines=5, exit_code=0))
    assert any("1 lines stored twice, first [2]" in p for p in problems), problems


def test_a_new_epoch_is_checked_on_its_own() -> None:
    # A journal restarted on a new epoch begins at 1 again: not a duplicate, not a hole.
    events = [*_store(3), _line(1, 3, epoch="e2")]
    assert check_sandbox(events, Expect(SID, lines=4, exit_code=0)) == []


def test_a_restart_of_the_main_process_is_a_violation() -> None:
    events = _store(3)
    events.append(_lifecycle(len(events) + 1, "started", pid=43))
    problems = check_sandbox(events, Expect(SID, lines=3, exit_code=0))
    assert any("started 2 times, expected 1" in p for p in problems), problems
    # ... unless the scenario restarted it on purpose.
    assert not any("started" in p for p in check_sandbox(events, Expect(SID, lines=3, exit_code=0, starts=2)))


def test_an_exit_code_mismatch_is_a_violation() -> None:
    problems = check_sandbox(_store(3, exit_code=1), Expect(SID, lines=3, exit_code=0))
    assert any("exit code 1 stored, expected 0" in p for p in problems), problems


def test_no_exit_stored_is_a_violation_and_an_exit_not_expected_too() -> None:
    running = _store(3)[:-1]
    assert any("no exit stored" in p for p in check_sandbox(running, Expect(SID, lines=3, exit_code=0)))
    problems = check_sandbox(_store(3), Expect(SID, lines=3, complete=False, exit_code=None))
    assert any("should still run" in p for p in problems), problems


def test_nothing_stored_is_a_violation() -> None:
    assert check_sandbox([], Expect(SID)) == [f"{SID}: nothing stored"]


def test_resumed_after_is_the_first_reconnected_record_after_the_heal() -> None:
    events = [
        _lifecycle(1, "started"),
        _lifecycle(2, "reconnected", t=5_000),  # an earlier outage, before the heal
        _lifecycle(3, "reconnected", t=12_500),
        _lifecycle(4, "reconnected", t=20_000),
    ]
    assert resumed_after(events, 10_000) == 2.5
    assert resumed_after(events, 30_000) is None


def test_a_check_before_the_writer_ended_reports_holes_but_not_the_missing_exit() -> None:
    # What a scenario that failed midway checks (chaos/common.py check_after_error): the lost
    # line shows, the exit and the lines not written yet do not.
    events = [e for e in _store(10)[:-1] if e.sequence != 5]
    problems = check_sandbox(events, Expect(SID, lines=20, exit_code=0, complete=False), settled=False)
    assert problems == [f"{SID}: epoch e1: 1 events lost (no gap record covers them), first [5]"]
