"""The chaos suite's invariants (chaos/invariants.py) on synthetic stored events: each one flags what it
must and stays quiet on a correct store, so a scenario's verdict means what it says."""

from __future__ import annotations

from typing import Any

from chaos.invariants import Expect, StoredEvent, check_sandbox, resumed_after

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


def _gap(sequence: int, first: int, last: int, dropped: int) -> StoredEvent:
    return _event(
        sequence, "gap", data={"first_sequence": first, "last_sequence": last, "dropped_records": dropped}
    )


def test_a_correct_store_has_no_violation() -> None:
    assert check_sandbox(_store(10, exit_code=3), Expect(SID, lines=10, exit_code=3)) == []


def test_a_hole_is_a_violation() -> None:
    events = [e for e in _store(10) if e.sequence != 5]
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0, complete=False))
    assert any("1 events lost" in p and "[5]" in p for p in problems), problems


def test_a_hole_covered_by_a_gap_record_is_none_and_its_lines_are_counted() -> None:
    # Sequences 4..6 (lines 2..4) gave way to a gap record that counts them, stored as sequence 13.
    events = [e for e in _store(10) if not 4 <= e.sequence <= 6]
    events.append(_gap(13, 4, 6, 3))
    assert check_sandbox(events, Expect(SID, lines=10, exit_code=0)) == []


def test_missing_lines_the_gaps_do_not_count_are_a_violation() -> None:
    # The gap record covers the sequences but says only 1 record was dropped: 3 lines are missing.
    events = [e for e in _store(10) if not 4 <= e.sequence <= 6]
    events.append(_gap(13, 4, 6, 1))
    problems = check_sandbox(events, Expect(SID, lines=10, exit_code=0))
    assert any("3 lines missing but gap records count 1" in p for p in problems), problems


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
