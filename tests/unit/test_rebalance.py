"""The rebalancing rule (issue 22 point 2): the fleet as one replica sees it from the lease rows,
fair share, excess and the over-share answer on their edge cases, the damping and rate arithmetic,
and the Rebalancer's rounds over a real registry (hints sent, how many, in which order, never
below fair share, nothing while draining or with a stale snapshot, the maximum session age)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from gateway.config import HaSettings, RebalanceSettings
from gateway.rebalance import (
    REASON_MAX_AGE,
    REASON_REBALANCE,
    Fleet,
    Rebalancer,
    age_limit_s,
    excess,
    fair_share,
    fleet_of,
    moves,
    over_share,
    shed_order,
)
from gateway.sandbox_state import ReplicaLeases
from gateway.sessions import Close, Outbound, SessionRegistry
from gateway.store import StoreError
from openshell_wire.records import CAP_EVENTS, CAP_RECONNECT, CAP_RESUME, JournalEpoch, SandboxId

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HA = HaSettings(lease_s=15.0, renew_interval_s=5.0)
OURS = frozenset({CAP_RESUME, CAP_EVENTS, CAP_RECONNECT})
UPSTREAM = frozenset[str]()


def _leases(
    rows: dict[str, tuple[int, bool, float]], *, read_at: float | None = None, skew: timedelta | None = None
) -> ReplicaLeases:
    """rows: id -> (sessions, draining, seconds since its renewal at T0)."""
    return ReplicaLeases(
        lease_s=HA.lease_s,
        renewed_at={rid: T0 - timedelta(seconds=age) for rid, (_, _, age) in rows.items()},
        sessions={rid: n for rid, (n, _, _) in rows.items()},
        draining={rid: d for rid, (_, d, _) in rows.items()},
        read_at=read_at,
        skew=skew,
    )


def test_one_replica_alone_has_no_excess_and_never_refuses() -> None:
    fleet = fleet_of(_leases({"a": (900, False, 1)}), me="a", mine=1000, draining=False, now=T0)
    assert fleet == Fleet(alive=1, receivers=1, total=900, mine=900, live=1000)
    assert fair_share(fleet) == 900
    assert excess(fleet, tolerance=0.1) == 0
    assert not over_share(fleet, tolerance=0.1)


def test_this_replica_counted_by_its_row_like_the_others_and_acting_only_if_live_agrees() -> None:
    # A new replica whose row the snapshot does not have yet: its live count.
    fleet = fleet_of(_leases({"b": (100, False, 1)}), me="a", mine=300, draining=False, now=T0)
    assert (fleet.alive, fleet.receivers, fleet.total, fleet.mine) == (2, 2, 400, 300)
    # Its row, as old as the others' (review finding 1: its live count against their older rows
    # made every replica of a storm look above the others).
    fleet = fleet_of(
        _leases({"a": (100, False, 1), "b": (100, False, 1), "c": (100, False, 1)}),
        me="a",
        mine=300,
        draining=False,
        now=T0,
    )
    assert (fleet.total, fleet.mine, fleet.live) == (300, 100, 300)
    assert excess(fleet, tolerance=0.0) == 0 and not over_share(fleet, tolerance=0.0)
    # The row above, the live count not (sessions left since): nothing either; both above: the
    # smaller excess.
    rows = {"a": (300, False, 1), "b": (0, False, 1), "c": (0, False, 1)}
    fleet = fleet_of(_leases(rows), me="a", mine=90, draining=False, now=T0)
    assert excess(fleet, tolerance=0.0) == 0 and not over_share(fleet, tolerance=0.0)
    fleet = fleet_of(_leases(rows), me="a", mine=150, draining=False, now=T0)
    assert excess(fleet, tolerance=0.0) == 50 and over_share(fleet, tolerance=0.0)


def test_a_replica_that_stopped_renewing_is_no_receiver_before_its_lease_lapses() -> None:
    # Review finding 3: a killed replica's row, alive for ha.lease_s, counted as a receiver with
    # room, so the survivors refused its supervisors for share.
    rows = {"a": (150, False, 0), "b": (150, False, 0), "dead": (150, False, 2.5 * HA.renew_interval_s)}
    fleet = fleet_of(_leases(rows), me="a", mine=225, draining=False, now=T0, fresh_s=2 * HA.renew_interval_s)
    assert (fleet.alive, fleet.receivers, fleet.total, fleet.others) == (3, 2, 450, 150)
    assert fair_share(fleet) == 225, "its sessions are on their way to the two that renew"
    # Without the freshness bound (the API's liveness alone) it was one of three receivers.
    assert fleet_of(_leases(rows), me="a", mine=225, draining=False, now=T0).receivers == 3


def test_a_draining_replica_counts_in_the_total_but_takes_nothing() -> None:
    rows = {"a": (300, False, 1), "b": (0, False, 1), "c": (600, True, 1)}
    fleet = fleet_of(_leases(rows), me="a", mine=300, draining=False, now=T0)
    assert (fleet.alive, fleet.receivers, fleet.total) == (3, 2, 900)
    assert fair_share(fleet) == 450
    assert excess(fleet, tolerance=0.1) == 0, "below fair share: its sessions are on their way here"
    # This replica draining itself: no excess (the drain moves everything), never over share.
    fleet = fleet_of(_leases(rows), me="a", mine=300, draining=True, now=T0)
    assert fleet.receivers == 1 and not fleet.receiving
    assert excess(fleet, tolerance=0.0) == 0
    assert not over_share(fleet, tolerance=0.0)


def test_a_lapsed_row_is_not_counted() -> None:
    rows = {"a": (300, False, 1), "b": (0, False, 1), "dead": (500, False, HA.lease_s + 1)}
    fleet = fleet_of(_leases(rows), me="a", mine=300, draining=False, now=T0)
    assert (fleet.alive, fleet.receivers, fleet.total) == (2, 2, 300)
    assert excess(fleet, tolerance=0.1) == 150
    # On the database's clock: a row the local clock finds lapsed is alive with the skew.
    skewed = _leases({"b": (0, False, HA.lease_s + 10)}, skew=timedelta(seconds=-20))
    assert fleet_of(skewed, me="a", mine=10, draining=False, now=T0).receivers == 2


def test_excess_stops_at_fair_share_and_tolerance() -> None:
    def fleet(mine: int, others: list[int]) -> Fleet:
        rows = {f"r{i}": (n, False, 1.0) for i, n in enumerate(others)}
        return fleet_of(_leases(rows), me="a", mine=mine, draining=False, now=T0)

    # 300 of 300 on three replicas: shed 200, down to 100 and never below.
    assert excess(fleet(300, [0, 0]), tolerance=0.1) == 200
    # Within the tolerance: 110 of 300 (fair 100) stays.
    assert excess(fleet(110, [95, 95]), tolerance=0.1) == 0
    # Just above it: down to ceil(fair), not to fair x (1 + tolerance).
    f = fleet(112, [95, 95])
    assert fair_share(f) == pytest.approx(100.67, abs=0.01)
    assert excess(f, tolerance=0.1) == 112 - 101
    # A fractional fair share rounds up: shedding never leaves this replica below it.
    f = fleet(10, [0, 0])
    assert excess(f, tolerance=0.0) == 10 - 4
    # Sessions in flight from here count in the total: a smaller excess (the safe direction).
    moving = fleet_of(
        _leases({"b": (0, False, 1), "c": (0, False, 1)}),
        me="a",
        mine=200,
        draining=False,
        now=T0,
        in_flight=100,
    )
    assert (moving.total, excess(moving, tolerance=0.1)) == (300, 100)


def test_over_share_has_one_session_of_slack() -> None:
    rows = {"b": (100, False, 1), "c": (100, False, 1)}
    # fair = (mine + 200) / 3; refused once mine > fair x 1.1 + 1.
    refused = [
        m
        for m in range(90, 140)
        if over_share(fleet_of(_leases(rows), me="a", mine=m, draining=False, now=T0), tolerance=0.1)
    ]
    assert refused and refused == list(range(refused[0], 140))
    first = refused[0]
    fair = (first + 200) / 3
    assert first > fair * 1.1 + 1 and first - 1 <= ((first - 1 + 200) / 3) * 1.1 + 1
    # Not every receiver can be over the mean of the same snapshot: 3 replicas at 100 each refuse nothing.
    assert not over_share(fleet_of(_leases(rows), me="a", mine=100, draining=False, now=T0), tolerance=0.0)


def test_damping_and_rate_bound() -> None:
    s = RebalanceSettings(interval_s=5.0, max_moves_per_s=50.0)
    assert moves(0, s) == 0
    assert moves(1, s) == 1, "an excess of one still moves"
    assert moves(9, s) == 5
    assert moves(200, s) == 100
    assert moves(2000, s) == 250, "the rate bound: 50/s x 5 s"
    slow = RebalanceSettings(interval_s=1.0, max_moves_per_s=0.1)
    assert moves(2000, slow) == 1, "at least one per interval"


def test_age_limit_is_fixed_per_session_and_within_the_jitter() -> None:
    s = RebalanceSettings(max_session_age_s=100.0, max_session_age_jitter=0.2)
    limits = [age_limit_s(f"session-{i}", s) for i in range(500)]
    assert all(80.0 <= x <= 100.0 for x in limits)
    assert max(limits) - min(limits) > 15, "spread over the jitter"
    assert age_limit_s("session-1", s) == limits[1]
    assert age_limit_s("x", RebalanceSettings()) == 0.0


def _registry(n: int, *, upstream: int = 0) -> SessionRegistry:
    registry = SessionRegistry()
    for i in range(n + upstream):
        registry.open(
            sandbox_id=SandboxId(f"sb-{i:04d}"),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=UPSTREAM if i >= n else OURS,
            owner_epoch=1,
            # The higher the index, the older.
            opened_at=T0 - timedelta(seconds=i),
        )
    return registry


def _hinted(registry: SessionRegistry) -> list[tuple[str, str]]:
    out = []
    for sid in registry.sandbox_ids():
        session = registry.get(sid)
        assert session is not None
        if session.hinted is not None:
            out.append((str(sid), session.hinted))
    return out


def test_shed_order_prefers_reconnect_speakers_oldest_first() -> None:
    registry = _registry(3, upstream=2)
    order = shed_order(s for sid in registry.sandbox_ids() if (s := registry.get(sid)) is not None)
    assert [str(s.sandbox_id) for s in order] == ["sb-0002", "sb-0001", "sb-0000", "sb-0004", "sb-0003"]


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _rebalancer(
    registry: SessionRegistry,
    leases: ReplicaLeases | Exception | list[ReplicaLeases],
    *,
    settings: RebalanceSettings | None = None,
    draining: list[bool] | None = None,
    clock: _Clock | None = None,
) -> Rebalancer:
    """``leases``: one snapshot for every read, or a list read in turn (the last one repeated)."""

    async def read() -> ReplicaLeases:
        if isinstance(leases, Exception):
            raise leases
        if isinstance(leases, list):
            return leases.pop(0) if len(leases) > 1 else leases[0]
        return leases

    flag = draining if draining is not None else [False]
    return Rebalancer(
        settings or RebalanceSettings(interval_s=1.0, max_moves_per_s=1000.0, hint_spread_s=0.5),
        ha=HaSettings(lease_s=3.0, renew_interval_s=1.0),
        me="a",
        registry=registry,
        leases=read,
        draining=lambda: flag[0],
        monotonic=clock or _Clock(),
        clock=lambda: T0,
    )


def _renewals(
    mine: int, others: dict[str, tuple[int, bool, float]], *, read_at: float
) -> list[ReplicaLeases]:
    """Two snapshots with this replica's ("a") row at ``mine``, renewed between them: the row view
    above share at two of its renewals in a row is what confirms it."""
    return [
        _leases({"a": (mine, False, 1.0), **others}, read_at=read_at),
        _leases({"a": (mine, False, 0.0), **others}, read_at=read_at),
    ]


async def _confirmed(rebalancer: Rebalancer) -> int:
    """The first two rounds: the first one only sees the row above share (no move, no refusal)."""
    assert await rebalancer.tick() == 0
    assert rebalancer.over_share() is False, "one snapshot above share is not confirmed"
    return await rebalancer.tick()


async def test_a_round_moves_half_the_excess_oldest_first_and_counts_them_in_flight() -> None:
    registry = _registry(300)
    clock = _Clock()
    rebalancer = _rebalancer(
        registry, _renewals(300, {"b": (0, False, 0), "c": (0, False, 0)}, read_at=clock.t), clock=clock
    )
    assert rebalancer.over_share() is False, "no snapshot yet: never refuses"
    assert await _confirmed(rebalancer) == 100  # excess 200, damped by half
    hinted = _hinted(registry)
    assert len(hinted) == 100 and {r for _, r in hinted} == {REASON_REBALANCE}
    assert {sid for sid, _ in hinted} == {f"sb-{i:04d}" for i in range(200, 300)}, "the oldest"
    session = registry.get("sb-0299")
    assert session is not None
    items = [session.inbox.get_nowait() for _ in range(2)]
    assert isinstance(items[0], Outbound) and items[0].message.reconnect.reason == REASON_REBALANCE
    assert items[0].message.reconnect.delay_window_ms == 500
    assert isinstance(items[1], Close)
    # Their streams end: the registry forgets them, and the total still counts them (in flight)
    # until another row shows them.
    for sid, _ in hinted:
        s = registry.get(sid)
        assert s is not None
        registry.close(s)
    fleet = rebalancer.fleet()
    assert fleet is not None and (fleet.mine, fleet.live, fleet.total) == (300, 200, 400)
    assert rebalancer.in_flight() == 100
    # Closed loop: until they land, no more moves and no refusal for share.
    assert rebalancer.over_share() is False
    assert await rebalancer.tick() == 0
    # They land (b and c grew by 60 of them, the rest came back here); this row renewed at 240.
    clock.t += 1
    rebalancer._leases = _snapshots([_leases(
        {"a": (240, False, 0), "b": (30, False, 0), "c": (30, False, 0)}, read_at=clock.t
    )])  # fmt: skip
    # Fair 100; the row says 240, the live count 200: excess 100 (the smaller), half of it.
    assert await rebalancer.tick() == 50
    assert rebalancer.in_flight() == 50
    assert rebalancer.over_share() is True, "the last moves landed: arrivals go elsewhere meanwhile"
    # Once settled, the rows say where they landed; within tolerance at 105, nothing moves.
    clock.t += rebalancer.settle_s + 1
    settled = _registry(105)
    rebalancer = _rebalancer(
        settled, _renewals(105, {"b": (97, False, 0), "c": (98, False, 0)}, read_at=clock.t), clock=clock
    )
    assert await _confirmed(rebalancer) == 0
    assert rebalancer.over_share() is False


def _snapshots(leases: list[ReplicaLeases]) -> Callable[[], Awaitable[ReplicaLeases]]:
    async def read() -> ReplicaLeases:
        return leases.pop(0) if len(leases) > 1 else leases[0]

    return read


async def test_moves_that_do_not_land_stop_the_moves_and_the_refusals() -> None:
    # Review finding 2: b's row renews, but no supervisor reaches b (a pod not routed to yet,
    # a NetworkPolicy): the moved sessions came back and were refused everywhere, and a shrank.
    registry = _registry(300)
    clock = _Clock()
    rebalancer = _rebalancer(registry, _renewals(300, {"b": (0, False, 0)}, read_at=clock.t), clock=clock)
    assert await _confirmed(rebalancer) == 75  # fair 150, excess 150, half of it
    # They all come back here (b takes none): a's row still 300, b's still 0.
    for sid, _ in _hinted(registry):
        s = registry.get(sid)
        assert s is not None
        registry.close(s)
        registry.open(
            sandbox_id=SandboxId(sid),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=OURS,
            owner_epoch=2,
            opened_at=T0,
        )
    assert len(registry) == 300 and _hinted(registry) == []
    assert rebalancer.over_share() is False, "never refuses while its moves have not landed"
    waited = 0.0
    while waited <= rebalancer.settle_s + 1:
        clock.t += 1.0
        waited += 1.0
        rebalancer._leases = _snapshots(
            [_leases({"a": (300, False, 0), "b": (0, False, 0)}, read_at=clock.t)]
        )
        assert await rebalancer.tick() == 0, "no more moves into the void"
        assert rebalancer.over_share() is False
    assert rebalancer.holding() and rebalancer.in_flight() == 0
    # After the hold (settle_s x 2), a smaller batch tries again.
    clock.t += 2 * rebalancer.settle_s
    rebalancer._leases = _snapshots([_leases({"a": (300, False, 0), "b": (0, False, 0)}, read_at=clock.t)])
    assert 0 < await rebalancer.tick() <= 38


async def test_never_below_fair_share_when_sessions_leave_during_a_round() -> None:
    registry = _registry(40)
    rebalancer = _rebalancer(
        registry,
        _renewals(40, {"b": (0, False, 0), "c": (0, False, 0), "d": (0, False, 0)}, read_at=1000.0),
        settings=RebalanceSettings(interval_s=1.0, max_moves_per_s=100.0, hint_spread_s=0.1),
    )
    assert await rebalancer.tick() == 0
    # fair 10, excess 30, 15 to move; meanwhile 20 sessions end on their own (the youngest).
    task = asyncio.create_task(rebalancer.tick())
    await asyncio.sleep(0.035)
    for i in range(20):
        s = registry.get(f"sb-{i:04d}")
        assert s is not None
        registry.close(s)
    sent = await task
    leaving = len(_hinted(registry))
    assert len(registry) - leaving >= 10, "down to fair share, never below"
    assert 0 < sent < 15


async def test_no_moves_while_draining_alone_with_a_stale_snapshot_or_a_failed_read() -> None:
    registry = _registry(300)
    clock = _Clock()
    two = {"b": (0, False, 0), "c": (0, False, 0)}
    assert (
        await _rebalancer(registry, _leases(two, read_at=clock.t), draining=[True], clock=clock).tick() == 0
    )
    assert await _rebalancer(registry, _leases({"b": (0, True, 0)}, read_at=clock.t), clock=clock).tick() == 0
    assert (
        await _rebalancer(registry, _leases({"b": (0, False, 99)}, read_at=clock.t), clock=clock).tick() == 0
    )
    stale = _rebalancer(registry, _leases(two, read_at=clock.t - 10), clock=clock)
    assert await stale.tick() == 0
    assert stale.over_share() is False, "a stale snapshot never refuses for share"
    failing = _rebalancer(registry, StoreError("down"), clock=clock)
    assert await failing.tick() == 0 and failing.over_share() is False
    assert _hinted(registry) == []
    off = _rebalancer(
        registry, _renewals(300, two, read_at=clock.t), settings=RebalanceSettings(enabled=False), clock=clock
    )
    assert await _confirmed(off) == 0
    assert off.over_share() is True, "arrivals are still refused over share"


async def test_a_drain_beginning_mid_round_stops_the_moves() -> None:
    registry = _registry(300)
    draining = [False]
    rebalancer = _rebalancer(
        registry,
        _renewals(300, {"b": (0, False, 0), "c": (0, False, 0)}, read_at=1000.0),
        settings=RebalanceSettings(interval_s=1.0, max_moves_per_s=200.0),
        draining=draining,
    )
    assert await rebalancer.tick() == 0
    task = asyncio.create_task(rebalancer.tick())
    await asyncio.sleep(0.05)
    draining[0] = True
    sent = await task
    assert 0 < sent < 100 and len(_hinted(registry)) == sent


async def test_max_session_age_moves_old_sessions_through_the_same_bound() -> None:
    registry = _registry(50, upstream=10)  # sb-0000 opened at T0, sb-0059 59 s before
    settings = RebalanceSettings(
        enabled=False,
        interval_s=1.0,
        max_moves_per_s=20.0,
        max_session_age_s=40.0,
        max_session_age_jitter=0.0,
    )
    two = {"b": (50, False, 0), "c": (60, False, 0)}
    rebalancer = _rebalancer(registry, _leases(two, read_at=1000.0), settings=settings)
    assert await rebalancer.tick() == 20, "the rate bound: 20/s x 1 s"
    hinted = _hinted(registry)
    assert {r for _, r in hinted} == {REASON_MAX_AGE}
    # Reconnect speakers first (sb-0040..0049 are 40-49 s old), then upstream-only ones, oldest first.
    assert sorted(sid for sid, _ in hinted) == [f"sb-{i:04d}" for i in range(40, 60)]
    # Alone, nothing is moved for age.
    alone = _rebalancer(_registry(50), _leases({}, read_at=1000.0), settings=settings)
    assert await alone.tick() == 0
