"""The adaptive heartbeat rule (gateway/heartbeats.py) with a fake clock: Nomad's clamp, rising at
once, falling by halves, a dead band of 25 %, the fixed interval when switched off, and the
governor's updates (only to sessions that speak ``interval``, never twice, the stale bound widened
only when written)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from gateway.config import SessionSettings
from gateway.heartbeats import HeartbeatGovernor, IntervalRule, SessionUpdateOut
from gateway.sandbox_state import Liveness
from gateway.sessions import SessionRegistry
from openshell_wire.records import CAP_EVENTS, CAP_INTERVAL, JournalEpoch, SandboxId


def _settings(**kw: float) -> SessionSettings:
    base: dict[str, float] = {
        "heartbeat_interval_s": 1.0,
        "max_heartbeat_interval_s": 30.0,
        "max_heartbeats_per_s": 100.0,
        "interval_update_s": 10.0,
    }
    return SessionSettings.model_validate({**base, **kw})


def test_the_rule_is_a_clamp_of_sessions_over_the_rate() -> None:
    rule = IntervalRule(_settings())
    assert rule.target(0) == 1.0
    assert rule.target(50) == 1.0  # never below the minimum
    assert rule.target(500) == 5.0
    assert rule.target(1_000_000) == 30.0  # never above the maximum


def test_it_rises_at_once_and_falls_by_at_most_half_the_gap() -> None:
    rule = IntervalRule(_settings())
    assert rule.next(1.0, 500) == 5.0
    assert rule.next(5.0, 2_900) == 29.0
    seen = [29.0]
    for _ in range(20):
        seen.append(rule.next(seen[-1], 0))
    assert seen[1] == 15.0  # half the gap to 1.0
    steps = list(itertools.pairwise(seen))
    assert all(after >= before - (before - 1.0) / 2 for before, after in steps)
    assert all(after >= 1.0 for after in seen)
    # It stops within 25 % of the target: heartbeats per second stay under the bound meanwhile.
    assert seen[-1] <= 1.25 and seen[-1] == seen[-2]


def test_no_change_within_25_percent() -> None:
    rule = IntervalRule(_settings())
    assert rule.next(4.0, 480) == 4.0  # target 4.8: +20 %
    assert rule.next(4.0, 320) == 4.0  # target 3.2: -20 %
    assert rule.next(4.0, 510) == 5.1  # +27.5 %: at once


def test_max_heartbeats_per_s_zero_keeps_the_fixed_interval() -> None:
    rule = IntervalRule(
        _settings(max_heartbeats_per_s=0, heartbeat_interval_s=10, max_heartbeat_interval_s=5)
    )
    assert rule.target(1_000_000) == 10.0
    assert rule.next(10.0, 1_000_000) == 10.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _open(registry: SessionRegistry, n: int, *capabilities: str) -> None:
    start = len(registry)
    for i in range(start, start + n):
        session = registry.open(
            sandbox_id=SandboxId(f"sb-{i}"),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=frozenset(capabilities),
        )
        assert session is not None
        session.heartbeat_interval_s = 1.0


def test_the_governor_recomputes_once_per_period_and_updates_capable_sessions_once() -> None:
    registry = SessionRegistry()
    clock = _Clock()
    governor = HeartbeatGovernor(_settings(grace_s=20), registry=registry, clock=clock)
    _open(registry, 300, CAP_EVENTS, CAP_INTERVAL)
    _open(registry, 200, CAP_EVENTS)  # an older supervisor: never sent an update
    assert governor.recompute() and governor.interval_s == 5.0
    _open(registry, 500, CAP_EVENTS, CAP_INTERVAL)
    clock.now += 9.9
    assert not governor.recompute() and governor.interval_s == 5.0  # not yet a period
    pushed = [s for sid in registry.sandbox_ids() if (s := registry.get(sid)) and governor.push_one(s)]
    assert len(pushed) == 800 and all(CAP_INTERVAL in s.capabilities for s in pushed)
    assert not any(governor.push_one(s) for s in pushed)  # told already: not again
    session = pushed[0]
    item = session.inbox.get_nowait()
    assert isinstance(item, SessionUpdateOut)
    assert item.message.session_update.heartbeat_interval_ms == 5000
    # 5 + grace 20 + the jitter of the 4 s above the minimum.
    assert item.message.session_update.stale_after_ms == 25_800
    assert governor.stale_after_s(1.0) == 21.0  # at the minimum: the fixed interval's bound
    # Widened by the handler when it writes the update, not when it is queued.
    assert session.stale_after_s == 30.0
    clock.now += 0.1
    assert governor.recompute() and governor.interval_s == 10.0  # 1,000 sessions: at once


def test_the_flush_renews_a_session_given_a_longer_adaptive_bound() -> None:
    """The API shows a sandbox connected while its heartbeat is fresher than the fixed interval's
    bound (+ 2 flushes): a session given a longer adaptive interval, silent longer than that, is
    renewed by the flush (SessionRegistry.take_heartbeats' rule for widened sessions)."""
    settings = _settings(grace_s=2)
    registry = SessionRegistry()
    governor = HeartbeatGovernor(settings, registry=registry)
    _open(registry, 1, CAP_EVENTS, CAP_INTERVAL)
    session = registry.get("sb-0")
    assert session is not None
    fixed = Liveness.from_settings(settings).stale_after_s
    session.stale_after_s = governor.stale_after_s(20.0)
    assert session.stale_after_s > fixed
    session.last_flushed_wall = datetime.now(UTC) - timedelta(seconds=fixed + 1)
    registry.take_heartbeats(renew_after_s=fixed)  # the open's own touch, if any
    session.last_flushed_wall = datetime.now(UTC) - timedelta(seconds=fixed + 1)
    assert "sb-0" in registry.take_heartbeats(renew_after_s=fixed)
