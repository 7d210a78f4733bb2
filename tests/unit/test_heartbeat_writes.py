"""Which heartbeat times a flush writes (``SessionRegistry.take_heartbeats``, the rule in
gateway/sessions.py's docstring), over long simulated runs on a virtual clock: a session's time is
written only once the one written last is older than W (``Liveness.heartbeat_write_after``), with
the flush's time while the session is within its own stale bound, so a session beating every 10 s
has a row write every 30 s, not one per beat; and every reader's verdict still holds: with flushes
that run late and some that fail (never two in a row), the row of every live session is never
older than ``fresh_for_s`` (the API shows it connected all along), a session allowed a longer
silence (widened interval) is kept fresh too, and one that went silent past its own bound (its
stale check not run yet) is not vouched for beyond it."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from gateway.config import SessionSettings
from gateway.sandbox_state import Liveness
from gateway.sessions import SessionRegistry
from openshell_wire.records import JournalEpoch, SandboxId

SETTINGS = SessionSettings(heartbeat_interval_s=10.0, grace_s=20.0, heartbeat_flush_interval_s=5.0)
LIVENESS = Liveness.from_settings(SETTINGS)
F = SETTINGS.heartbeat_flush_interval_s
#: The flush's deadline (grpc.batch_store_timeout_s's default).
D = 10.0
W = LIVENESS.heartbeat_write_after(F, flush_deadline_s=D)
WALL0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
MONO0 = 1000.0


def test_the_bounds_leave_two_flushes_and_two_deadlines_above_the_write_bound() -> None:
    assert LIVENESS.fresh_for_s == 40.0
    assert W == 10.0


def test_a_row_stays_fresh_when_flushes_take_their_whole_deadline() -> None:
    """The worst schedule: a flush starts just before the row is due and takes its whole deadline
    D, the flusher sleeps F, the next flush finds the row due and fails at once, the one after it
    (F later) takes D again and commits. The time it writes must reach the database before the
    one written first is fresh_for_s old (with W = fresh_for_s - 3F, 25 s, it came 15 s late: two
    flushes near their deadline showed a live sandbox disconnected, found in review)."""
    registry = SessionRegistry()
    session = registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
        opened_at=WALL0,
    )
    assert session is not None
    written = WALL0  # the claim's time
    t = W - 0.01
    session.touch(MONO0 + t)
    assert registry.take_heartbeats(renew_after_s=W, at=(WALL0 + timedelta(seconds=t), MONO0 + t)) == {}
    t += D + F  # that flush took its deadline; the flusher slept F
    failed = registry.take_heartbeats(renew_after_s=W, at=(WALL0 + timedelta(seconds=t), MONO0 + t))
    assert failed, "due by now"
    t += F  # it failed at once (nothing counted as written); the next one
    session.touch(MONO0 + t)
    again = registry.take_heartbeats(renew_after_s=W, at=(WALL0 + timedelta(seconds=t), MONO0 + t))
    assert again, "still due: the failed flush wrote nothing"
    committed_at = t + D
    assert committed_at - (written - WALL0).total_seconds() <= LIVENESS.fresh_for_s


def _simulate(
    *, sessions: int, widened: int, hours: float, seed: int
) -> tuple[dict[str, int], int, list[str]]:
    """Sessions beating every 10 s (+ up to 20 % jitter), ``widened`` of them every 50 s with a
    60 s stale bound; a flush every F plus up to F/2 late, one in eight failing (never two in a
    row). Returns the rows written per sandbox, the beats, and every moment a reader would have
    seen a live session's row older than fresh_for_s (or a time in the future)."""
    rng = random.Random(seed)
    registry = SessionRegistry()
    interval: dict[str, float] = {}
    next_beat: dict[str, float] = {}
    for i in range(sessions):
        sid = f"sb-{i:03d}"
        session = registry.open(
            sandbox_id=SandboxId(sid),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=frozenset(),
            opened_at=WALL0,
        )
        assert session is not None
        session.touch(MONO0)
        wide = i < widened
        session.stale_after_s = 60.0 if wide else LIVENESS.stale_after_s
        interval[sid] = 50.0 if wide else SETTINGS.heartbeat_interval_s
        next_beat[sid] = rng.uniform(0, interval[sid])
    stored = dict.fromkeys(interval, WALL0)
    writes = dict.fromkeys(interval, 0)
    beats = 0
    problems: list[str] = []
    t = 0.0
    next_flush = F
    failed = False
    end = hours * 3600
    step = 0.5
    while t < end:
        t += step
        wall = WALL0 + timedelta(seconds=t)
        for sid, due in next_beat.items():
            if due <= t:
                session = registry.get(sid)
                assert session is not None
                session.touch(MONO0 + due)
                beats += 1
                next_beat[sid] = due + interval[sid] * (1 + rng.uniform(0, 0.2))
        if t >= next_flush:
            taken = registry.take_heartbeats(renew_after_s=W, at=(wall, MONO0 + t))
            failed = not failed and rng.random() < 1 / 8
            if not failed:
                for sid, at in taken.items():
                    if at > wall:
                        problems.append(f"{t:.1f}s {sid}: wrote {at}, after the flush")
                    stored[sid] = max(stored[sid], at)
                    writes[sid] += 1
                registry.heartbeats_written(taken, sessions=registry.heartbeat_sessions(taken))
            # The next flush: one interval, and up to half one more when it runs late.
            next_flush = t + F + rng.uniform(0, F / 2)
        for sid, at in stored.items():
            age = (wall - at).total_seconds()
            if age > LIVENESS.fresh_for_s:
                problems.append(f"{t:.1f}s {sid}: row {age:.1f}s old, shown disconnected while live")
    return writes, beats, problems


def test_a_row_is_written_once_its_time_would_go_stale_not_per_beat() -> None:
    hours = 1.0
    writes, beats, problems = _simulate(sessions=40, widened=0, hours=hours, seed=1)
    assert not problems, problems[:5]
    # One row per beat before: 300-360 beats per session-hour at 10-12 s. Now a write each time
    # the written one (the flush's time) passes W: at most one per W.
    per_session = [n / hours for n in writes.values()]
    assert beats / 40 / hours > 290
    assert max(per_session) <= 3600 / W + 1, per_session
    assert min(per_session) >= 3600 / LIVENESS.fresh_for_s, per_session


def test_widened_sessions_are_renewed_and_failed_flushes_are_made_up() -> None:
    """The harder mix: sessions silent for 50-60 s between beats (a command or the adaptive
    interval widened them) beside usual ones, over three simulated hours with late and failed
    flushes: every live row stays fresh for the readers."""
    writes, _, problems = _simulate(sessions=30, widened=10, hours=3.0, seed=7)
    assert not problems, problems[:5]
    assert all(n > 0 for n in writes.values())


def test_a_session_not_due_is_left_alone_and_a_replaced_one_keeps_its_claims_time() -> None:
    registry = SessionRegistry()
    first = registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
        owner_epoch=1,
        opened_at=WALL0,
    )
    assert first is not None
    first.touch(MONO0 + W + 1)
    due = registry.take_heartbeats(renew_after_s=W, at=(WALL0 + timedelta(seconds=W + 2), MONO0 + W + 2))
    assert due == {"sb": WALL0 + timedelta(seconds=W + 2)}, "the flush's time: it is within its bound"
    sessions = registry.heartbeat_sessions(due)
    # Replaced while that flush was in flight: the new session's row time is its claim's.
    opened = WALL0 + timedelta(seconds=W + 1.5)
    second = registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
        owner_epoch=2,
        opened_at=opened,
    )
    assert second is not None
    registry.heartbeats_written(due, sessions=sessions)
    assert second.last_flushed_wall == opened
    # Beating, but its claim's time is not W old yet: nothing to write.
    second.touch(MONO0 + W + 10)
    assert registry.take_heartbeats(renew_after_s=W, at=(opened + timedelta(seconds=W), MONO0 + W + 11)) == {}


def test_a_session_silent_past_its_own_bound_is_not_vouched_for() -> None:
    """Its beats stop and its stale check has not ended it (a frozen handler, say): the flush
    writes its last beat at most, never a time past its own bound, so readers show it stale within
    ``fresh_for_s`` of that bound, as they would have from the beat itself."""
    registry = SessionRegistry()
    session = registry.open(
        sandbox_id=SandboxId("sb"),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
        opened_at=WALL0,
    )
    assert session is not None
    session.stale_after_s = LIVENESS.stale_after_s
    last_beat = 12.0
    session.touch(MONO0 + last_beat)
    stored = WALL0
    t = 0.0
    while t < 300:
        t += F
        wall = WALL0 + timedelta(seconds=t)
        taken = registry.take_heartbeats(renew_after_s=W, at=(wall, MONO0 + t))
        registry.heartbeats_written(taken)
        stored = max([stored, *taken.values()])
    assert stored <= WALL0 + timedelta(seconds=last_beat + session.stale_after_s), stored
    assert stored >= WALL0 + timedelta(seconds=last_beat), "its last beat is written"
