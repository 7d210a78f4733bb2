"""The admission gate (gateway/admission.py) on an injected clock: its bounds, their order, the
tickets, and the spread of the retry hints it hands out."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.admission import REDIRECT_RETRY_MS, Admission, Refusal, Ticket
from gateway.config import AdmissionSettings
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gate(
    clock: Clock, *, sessions: int = 0, metrics: GatewayMetrics | None = None, **settings: Any
) -> Admission:
    defaults: dict[str, Any] = {
        "hellos_per_s": 10.0,
        "hello_burst": 5,
        "max_concurrent_handshakes": 100,
        "retry_after_min_ms": 1000,
        "retry_after_max_ms": 30000,
    }
    return Admission(
        AdmissionSettings(**{**defaults, **settings}),
        sessions=lambda: sessions,
        metrics=metrics,
        clock=clock,
        rng=random.Random(7),
    )


def enter(admission: Admission) -> Ticket:
    ticket = admission.try_enter()
    assert isinstance(ticket, Ticket), ticket
    return ticket


def admitted_of(admission: Admission, n: int) -> int:
    """How many of ``n`` hellos at this moment are admitted (each answered at once)."""
    admitted = 0
    for _ in range(n):
        entered = admission.try_enter()
        if isinstance(entered, Ticket):
            entered.release()
            admitted += 1
    return admitted


def test_the_bucket_admits_a_burst_then_the_rate() -> None:
    clock = Clock()
    admission = gate(clock)
    for _ in range(5):
        enter(admission).release()
    assert admission.try_enter() is Refusal.RATE
    # Refused hellos take no token: 0.1 s later there is exactly one.
    clock.now += 0.1
    enter(admission).release()
    assert admission.try_enter() is Refusal.RATE
    # Over any long stretch: burst + rate x time, never more.
    admitted = 0
    for _ in range(1000):
        clock.now += 0.01
        admitted += admitted_of(admission, 1)
    assert admitted == pytest.approx(100, abs=1)
    # Idle for long: the bucket fills to the burst only.
    clock.now += 3600
    assert admitted_of(admission, 50) == 5


def test_the_concurrency_bound_counts_tickets_until_released() -> None:
    clock = Clock()
    metrics = GatewayMetrics(SessionRegistry())
    admission = gate(clock, hello_burst=100, max_concurrent_handshakes=3, metrics=metrics)
    held = [enter(admission) for _ in range(3)]
    assert admission.try_enter() is Refusal.CONCURRENCY
    assert metrics.registry.get_sample_value("openshell_gateway_handshakes_inflight") == 3
    held[0].release()
    held[0].release()  # idempotent: frees one slot, not two
    with held[1]:
        pass
    held[1].release()
    assert admission.inflight == 1
    assert metrics.registry.get_sample_value("openshell_gateway_handshakes_inflight") == 1
    a, b = enter(admission), enter(admission)
    assert admission.try_enter() is Refusal.CONCURRENCY
    clock.now += 0.25
    b.accepted()
    b.accepted()
    b.release()
    assert admission.inflight == 2
    # Only accepted hellos are timed, once each.
    assert metrics.registry.get_sample_value("openshell_gateway_handshake_seconds_count") == 1
    assert metrics.registry.get_sample_value("openshell_gateway_handshake_seconds_sum") == pytest.approx(0.25)
    for ticket in (a, held[2]):
        ticket.release()
    assert admission.inflight == 0
    refused = metrics.registry.get_sample_value(
        "openshell_gateway_admission_refusals_total", {"reason": "concurrency"}
    )
    assert refused == 2


def test_the_order_of_the_checks() -> None:
    clock = Clock()
    over = {"share": True}
    admission = gate(clock, sessions=10, max_sessions=10, hello_burst=1, max_concurrent_handshakes=1)
    admission.over_share = lambda: over["share"]
    admission.draining = True
    assert admission.try_enter() is Refusal.DRAINING
    admission.draining = False
    assert admission.try_enter() is Refusal.MAX_SESSIONS
    admission = gate(clock, sessions=8, max_sessions=10, hello_burst=1, max_concurrent_handshakes=1)
    admission.over_share = lambda: over["share"]
    assert admission.try_enter() is Refusal.OVER_SHARE
    # None of those took the one token.
    over["share"] = False
    held = enter(admission)
    assert admission.try_enter() is Refusal.RATE  # the rate is checked before the concurrency
    clock.now += 1
    assert admission.try_enter() is Refusal.CONCURRENCY
    held.release()
    # refuse_over_share off: the rebalancer's answer is not asked.
    admission = gate(clock, refuse_over_share=False)
    admission.over_share = lambda: True
    enter(admission).release()


def test_draining_refuses_everything_even_with_the_bounds_off() -> None:
    clock = Clock()
    admission = gate(clock, enabled=False, hello_burst=1, max_concurrent_handshakes=1, max_sessions=1)
    # Bounds off: no rate, no concurrency, no session count.
    held = [enter(admission) for _ in range(50)]
    assert admission.inflight == 50
    admission.draining = True
    for _ in range(20):
        assert admission.try_enter() is Refusal.DRAINING
        clock.now += 0.5
    for ticket in held:
        ticket.release()
    assert admission.inflight == 0
    retries = {admission.retry_after_ms(Refusal.DRAINING) for _ in range(200)}
    assert min(retries) >= REDIRECT_RETRY_MS[0] and max(retries) <= REDIRECT_RETRY_MS[1]
    assert len(retries) > 100


def test_retry_after_is_spread_within_bounds_and_sized_to_the_backlog() -> None:
    clock = Clock()
    admission = gate(
        clock, hellos_per_s=10.0, hello_burst=1, retry_after_min_ms=1000, retry_after_max_ms=30000
    )
    enter(admission).release()
    # A few refused: the window is [lo, 2 lo].
    first = []
    for _ in range(5):
        refusal = admission.try_enter()
        assert refusal is Refusal.RATE
        first.append(admission.retry_after_ms(refusal))
    assert all(1000 <= ms <= 2000 for ms in first)
    # 150 refused within the same second at 10 per second: 15 s of backlog, spread up to it.
    hints = []
    for _ in range(145):
        refusal = admission.try_enter()
        assert refusal is Refusal.RATE
        hints.append(admission.retry_after_ms(refusal))
    assert all(1000 <= ms <= 15000 for ms in hints)
    assert max(hints) > 10000
    assert len(set(hints)) > 130  # distinct: the cohort does not come back together
    # A storm far above what the bound can spread: capped at the maximum.
    for _ in range(5000):
        admission.try_enter()
    capped = [admission.retry_after_ms(Refusal.RATE) for _ in range(500)]
    assert all(1000 <= ms <= 30000 for ms in capped) and max(capped) > 25000
    # Seconds later the backlog is forgotten (the previous second counts for its share only).
    clock.now += 1.5
    assert admission.refused_last_s() == pytest.approx(0.5 * 5150, rel=0.01)
    clock.now += 1.0
    assert admission.refused_last_s() == 0
    assert all(1000 <= admission.retry_after_ms(Refusal.RATE) <= 2000 for _ in range(100))


def test_retry_after_with_equal_bounds() -> None:
    clock = Clock()
    admission = gate(clock, retry_after_min_ms=500, retry_after_max_ms=500, hello_burst=1)
    enter(admission)
    assert {admission.retry_after_ms(Refusal.RATE) for _ in range(20)} == {500}


def test_slow_handshakes_size_the_hint_to_what_the_concurrency_bound_takes() -> None:
    """When the store makes each handshake slow, the concurrency bound takes fewer hellos a second
    than the rate allows: the hint is sized to that, or the cohort comes back to be refused again."""
    clock = Clock()
    admission = gate(clock, hellos_per_s=100.0, hello_burst=100, max_concurrent_handshakes=4)
    # Fast handshakes (10 ms each): 4 places take 400 a second, so the rate (100) is the bound.
    for _ in range(40):
        ticket = enter(admission)
        clock.now += 0.01
        ticket.accepted()
    assert admission.capacity_per_s() == 100.0
    # Slow ones (2 s each, a struggling database): 4 places take 2 a second.
    for _ in range(200):
        held = [enter(admission) for _ in range(4)]
        clock.now += 2.0
        for ticket in held:
            ticket.release()
    assert admission.capacity_per_s() == pytest.approx(2.0, rel=0.05)
    held = [enter(admission) for _ in range(4)]
    for _ in range(20):
        assert admission.try_enter() is Refusal.CONCURRENCY
    # 20 refused at 2 a second: 10 s of backlog (at the rate it would have been 0.2 s, so 1-2 s).
    hints = [admission.retry_after_ms(Refusal.CONCURRENCY) for _ in range(200)]
    assert all(1000 <= ms <= 10000 for ms in hints) and max(hints) > 8000
    for ticket in held:
        ticket.release()
    # With the bounds off, the configured rate is all there is.
    assert gate(clock, enabled=False).capacity_per_s() == 10.0


def test_max_sessions_counts_the_handshakes_in_flight() -> None:
    """Every admitted hello becomes a session: with 8 sessions and 2 in their handshake, a bound
    of 10 is reached, not exceeded by up to max_concurrent_handshakes."""
    clock = Clock()
    admission = gate(clock, sessions=8, max_sessions=10, hello_burst=10, hellos_per_s=100.0)
    held = [enter(admission), enter(admission)]
    assert admission.try_enter() is Refusal.MAX_SESSIONS
    held[0].release()
    enter(admission).release()


def test_the_reconnect_window_is_the_time_to_take_the_sessions_back() -> None:
    clock = Clock()
    held = [0]
    admission = Admission(
        AdmissionSettings(hellos_per_s=500.0, reconnect_window_max_ms=30000),
        sessions=lambda: held[0],
        clock=clock,
    )
    assert admission.reconnect_window_ms() == 0  # nothing held: nothing to spread
    held[0] = 10_000
    assert admission.reconnect_window_ms() == 0  # read at most once a second (every heartbeat asks)
    clock.now += 1.0
    assert admission.reconnect_window_ms() == 20_000  # 10,000 sessions at 500 hellos/s
    held[0] = 100_000
    clock.now += 1.0
    assert admission.reconnect_window_ms() == 30_000  # capped
    off = Admission(AdmissionSettings(reconnect_window_max_ms=0), sessions=lambda: 5000, clock=clock)
    assert off.reconnect_window_ms() == 0
