"""Rebalancing of sessions between replicas (issue 22 point 2).

Every replica renews its lease row with the sessions it holds and whether it drains
(:mod:`gateway.replicas`), so each one can tell, from the rows it already reads (``LeaseView``, no
extra query), the fleet's sessions and how many replicas take sessions. The rule is here and
nowhere else (:func:`fleet_of`, :func:`fair_share`, :func:`excess`, :func:`moves`):

- ``receivers``: replicas that take sessions: this one unless it drains, and the others whose
  row says so (``draining`` false: a replica writes draining=true until it is ready, its first
  health verdict SERVING, see :mod:`gateway.replicas`) and was renewed within ``FRESH_RENEWALS``
  renewal intervals of the snapshot's read (a killed replica stops being a receiver within two
  renewals, long before its lease lapses for the API);
- ``total``: the sessions of every alive row, draining and silent ones included (their sessions
  are on their way to the receivers), plus the sessions this replica moved that no other row
  shows yet (``Rebalancer`` keeps them counted until they land);
- like with like: this replica is judged by its own ROW (as old as the others'), not its live
  count, so in a storm over several replicas growing together nobody looks above the others; and
  it acts only when its live count says the same (``Fleet.live``);
- ``fair share`` = total / receivers; a replica whose row is above fair x (1 +
  ``rebalance.tolerance``) has ``excess`` = min(row, live) - ceil(fair): it sheds down to its fair
  share, never below, and only while at least two replicas take sessions and it does not drain
  itself (the drain moves all);
- per ``rebalance.interval_s`` it asks min(ceil(excess x DAMPING), max_moves_per_s x interval_s) of
  them to reconnect (a ReconnectHint then the end of the stream, ``SessionRegistry.hint``), one every
  1 / ``max_moves_per_s`` seconds. DAMPING (one half): the counts are up to a renewal old and a moved
  session comes back here with probability 1 / receivers through the Service; acting on half the
  excess each interval converges without overshoot.

Which sessions: those that speak ``reconnect`` (they come back without a backoff penalty), oldest
first; sessions without it (upstream's supervisor) only when none of those is left.

The loop is closed (:class:`Rebalancer`): the row view must show this replica above its share
at two of its own renewals in a row (a difference of renewal phases during a common growth lasts
less than that), and once it moved sessions it moves no more until the other receivers' rows grew
by a quarter of what it moved (they landed); it refuses nothing for share meanwhile unless its
previous moves were seen landing. When they did not
within ``settle_s`` (a receiver nobody can reach: its row renews, no supervisor gets to it), it
holds for ``settle_s`` x 2^failures (at most ``MAX_HOLD_DOUBLINGS``) and then tries a smaller
batch: sessions moved into a void come back here, instead of being refused everywhere.

Arrivals: :meth:`Rebalancer.over_share` (set on ``Admission.over_share``) is True when the row
view is confirmed above fair x (1 + tolerance) + 1, the live count too, while another replica
takes sessions and no move of this replica is unlanded: the hello is refused OVERLOADED and
redials through the Service, instead of being moved later. It is never True with a snapshot older
than ``rebalance.interval_s + ha.renew_interval_s`` (a failing store): a replica that cannot see
the others never refuses for share. A hello can still be refused by every replica for a moment
when each one's two last rows were above the others' (a growth longer than a renewal interval,
uneven over the replicas); each refusal carries a retry hint.

Safety net for balancers that pin connections (one TCP connection to a virtual address that never
picks again): with ``rebalance.max_session_age_s`` a session older than that age x U(1 - jitter, 1)
(its own fixed draw) is asked to reconnect (reason ``max_age``), through the same rate bound, while
another replica takes sessions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.config import HaSettings, RebalanceSettings
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import ReplicaLeases
from gateway.sessions import Session, SessionRegistry
from gateway.store.db import StoreError
from openshell_wire.records import CAP_RECONNECT

log = logging.getLogger(__name__)

#: The part of the excess asked to move per interval (see the module docstring).
DAMPING = 0.5
#: Another replica's row renewed longer ago than this many renewal intervals (at the snapshot's
#: read) is not a receiver: a live one renews every interval.
FRESH_RENEWALS = 2.0
#: Moves have landed once the other receivers' rows grew by this part of them (a moved session
#: comes back here through the Service with probability 1 / receivers, at most one half).
LANDED_PART = 0.25
#: A hold after moves that did not land doubles at each failure in a row up to this many times.
MAX_HOLD_DOUBLINGS = 5
REASON_REBALANCE = "rebalance"
REASON_MAX_AGE = "max_age"


@dataclass(frozen=True, slots=True)
class Fleet:
    """What one replica knows of the fleet (see the module docstring)."""

    #: Replicas whose lease is alive, this one included.
    alive: int
    #: Of those, the ones taking sessions (see the module docstring).
    receivers: int
    #: Sessions of the alive rows (this one's row, or its live count without a row), plus those
    #: moved from it that no row shows yet.
    total: int
    #: This replica's count in the same view as the others': its row, or its live count when the
    #: snapshot has no row of it.
    mine: int
    #: This replica takes sessions (it does not drain).
    receiving: bool = True
    #: This replica's live count (None: the same as ``mine``).
    live: int | None = None
    #: The other receivers' sessions by their rows (what moved sessions land in).
    others: int = 0

    @property
    def held(self) -> int:
        """The count acted on: the row's and the live count's smaller (both must say so)."""
        return self.mine if self.live is None else min(self.mine, self.live)


def fleet_of(
    leases: ReplicaLeases,
    *,
    me: str,
    mine: int,
    draining: bool,
    now: datetime,
    in_flight: int = 0,
    fresh_s: float | None = None,
) -> Fleet:
    """The fleet as ``leases`` show it at ``now`` (the snapshot's read). This replica (``me``) is
    alive and, unless ``draining`` (its live state), a receiver to itself; its count is its row's
    (as old as the others', see the module docstring) and its live count ``mine`` is kept beside
    it. ``in_flight``: sessions it moved that no row shows yet. ``fresh_s``: another row renewed
    longer ago than that is not a receiver (None: any alive row is)."""
    row = leases.sessions.get(me) if leases.alive(me, now=now) else None
    counted = mine if row is None else max(0, row)
    alive, receivers, total, others = 1, 0 if draining else 1, counted + max(0, in_flight), 0
    db_now = now if leases.skew is None else now + leases.skew
    for replica, renewed in leases.renewed_at.items():
        if replica == me or not leases.alive(replica, now=now):
            continue
        alive += 1
        held = max(0, leases.sessions.get(replica, 0))
        total += held
        fresh = fresh_s is None or (db_now - renewed).total_seconds() <= fresh_s
        if fresh and not leases.draining.get(replica, False):
            receivers += 1
            others += held
    return Fleet(
        alive=alive,
        receivers=receivers,
        total=total,
        mine=counted,
        receiving=not draining,
        live=mine,
        others=others,
    )


def fair_share(fleet: Fleet) -> float:
    """The fleet's sessions over the replicas taking sessions."""
    return fleet.total / max(fleet.receivers, 1)


def excess(fleet: Fleet, *, tolerance: float) -> int:
    """Sessions this replica holds above its fair share, once it is above fair x (1 + tolerance);
    0 while fewer than two replicas take sessions or this one drains."""
    if fleet.receivers < 2 or not fleet.receiving:
        return 0
    fair = fair_share(fleet)
    if fleet.held <= fair * (1 + tolerance):
        return 0
    return max(0, fleet.held - math.ceil(fair))


def over_share(fleet: Fleet, *, tolerance: float) -> bool:
    """A hello arriving now would put this replica further above its share: refuse it (the
    supervisor redials through the Service). One session of slack, so a replica at its share is
    never refused for the hello that would make it one above."""
    if fleet.receivers < 2 or not fleet.receiving:
        return False
    return fleet.held > fair_share(fleet) * (1 + tolerance) + 1


def move_budget(settings: RebalanceSettings) -> int:
    """Sessions asked to move per interval at most (the rate bound), at least one."""
    return max(1, math.floor(settings.max_moves_per_s * settings.interval_s))


def moves(excess_now: int, settings: RebalanceSettings) -> int:
    """Sessions to ask to move this interval: the damped excess, within the rate bound."""
    if excess_now <= 0:
        return 0
    return min(math.ceil(excess_now * DAMPING), move_budget(settings))


def age_limit_s(session_id: str, settings: RebalanceSettings) -> float:
    """The age past which this session is asked to move (0: never): ``max_session_age_s`` less
    its own fixed random part (from its id, so the same at every look and spread over sessions)."""
    if settings.max_session_age_s <= 0:
        return 0.0
    draw = (zlib.crc32(session_id.encode()) & 0xFFFF) / 0xFFFF
    return settings.max_session_age_s * (1 - settings.max_session_age_jitter * draw)


def shed_order(sessions: Iterable[Session]) -> list[Session]:
    """Who moves first: not hinted yet, ``reconnect`` speakers before the others (which come back
    only after their own backoff), oldest first within each."""
    candidates = [s for s in sessions if s.hinted is None]
    return sorted(candidates, key=lambda s: (CAP_RECONNECT not in s.capabilities, s.opened_at))


class Rebalancer:
    """The loop that applies the rule every ``rebalance.interval_s`` (an owned task, see app.py),
    and the ``over_share`` answer for admission."""

    def __init__(
        self,
        settings: RebalanceSettings,
        *,
        ha: HaSettings,
        me: str,
        registry: SessionRegistry,
        leases: Callable[[], Awaitable[ReplicaLeases]],
        draining: Callable[[], bool],
        metrics: GatewayMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._ha = ha
        self._me = me
        self._registry = registry
        self._leases = leases
        self._draining = draining
        self._metrics = metrics
        self._tolerance = settings.tolerance
        self._monotonic = monotonic
        self._clock = clock
        #: The last snapshot read (None before the first read).
        self._snapshot: ReplicaLeases | None = None
        #: The closed loop (see the module docstring): sessions moved for share and not seen in
        #: another row yet, the other receivers' rows when the first of them was sent, and when.
        self._pending = 0
        self._pending_base = 0
        self._pending_since = 0.0
        #: No move and no refusal for share before this (monotonic) after moves that did not land;
        #: the failures in a row (the hold doubles, the next batch halves).
        self._hold_until = 0.0
        self._failures = 0
        #: The last moves checked landed: arrivals may be refused for share while the next ones
        #: are on their way (they would land back here); never before that is known.
        self._landing = False
        #: This replica's row's renewal at the first snapshot of the current run of snapshots
        #: showing its row above its share (None: the last one did not).
        self._over_since: datetime | None = None
        #: The row view is above share at two of this replica's renewals in a row.
        self._confirmed = False
        self._log = RateLimitedLog(log, concern="rebalance")

    @property
    def settle_s(self) -> float:
        """How long a moved session may be counted nowhere else: its reconnect's spread, a renewal
        of the row it lands in, and the reader's cache of half a renewal, with a renewal to spare."""
        return self._settings.hint_spread_s + 2.5 * self._ha.renew_interval_s

    @property
    def stale_after_s(self) -> float:
        """A snapshot older than this (since it was read) is not acted on."""
        return self._settings.interval_s + self._ha.renew_interval_s

    def in_flight(self) -> int:
        """Sessions this replica moved for share that no other row shows yet."""
        return self._pending

    def holding(self) -> bool:
        """Moves of this replica have not landed yet, or did not land: no move, no refusal."""
        return self._pending > 0 or self._monotonic() < self._hold_until

    def fleet(self) -> Fleet | None:
        """The fleet from the last snapshot and the live count; None without a fresh snapshot."""
        snapshot = self._snapshot
        if snapshot is None:
            return None
        now = self._clock()
        read_at = snapshot.read_at
        if read_at is not None:
            age_s = self._monotonic() - read_at
            if age_s > self.stale_after_s:
                return None
            # Freshness of the rows as at the read, not as the snapshot ages in the cache.
            now -= timedelta(seconds=max(0.0, age_s))
        return fleet_of(
            snapshot,
            me=self._me,
            mine=len(self._registry),
            draining=self._draining(),
            now=now,
            in_flight=self._pending,
            fresh_s=FRESH_RENEWALS * self._ha.renew_interval_s,
        )

    def over_share(self) -> bool:
        """For ``Admission.over_share``: never awaits, never reads the store."""
        if not self._confirmed or self._monotonic() < self._hold_until:
            return False
        if self._pending and not self._landing:
            return False  # moves on their way, and none seen landing yet: maybe into a void
        fleet = self.fleet()
        return fleet is not None and over_share(fleet, tolerance=self._tolerance)

    def _follow(self, snapshot: ReplicaLeases, fleet: Fleet) -> None:
        """Close the loop on a new snapshot: have earlier moves landed, and is the row view above
        share at two of this replica's renewals in a row (see the module docstring)."""
        now = self._monotonic()
        if self._pending:
            landed = fleet.others - self._pending_base
            if landed >= max(1, math.ceil(self._pending * LANDED_PART)):
                self._pending, self._failures, self._landing = 0, 0, True
            elif now - self._pending_since > self.settle_s:
                self._failures += 1
                hold_s = self.settle_s * 2 ** min(self._failures, MAX_HOLD_DOUBLINGS)
                self._log.log(
                    logging.WARNING,
                    ("unlanded",),
                    f"{self._pending} sessions moved for share did not show up on another replica "
                    f"within {self.settle_s:g}s (the other receivers' rows grew by {landed}); not "
                    f"moving nor refusing for share for {hold_s:g}s: is another replica unreachable?",
                )
                self._pending, self._hold_until, self._landing = 0, now + hold_s, False
        row_over = fleet.mine > fair_share(fleet) * (1 + self._tolerance) and fleet.receivers >= 2
        renewed = snapshot.renewed_at.get(self._me)
        if not row_over or renewed is None:
            self._over_since, self._confirmed = None, False
        elif self._over_since is None:
            self._over_since = renewed
        else:
            self._confirmed = self._confirmed or renewed > self._over_since

    async def run(self) -> None:
        """Every interval: read the leases, then move what the rule says, paced."""
        while True:
            started = self._monotonic()
            await self.tick()
            await asyncio.sleep(max(0.0, self._settings.interval_s - (self._monotonic() - started)))

    async def tick(self) -> int:
        """One round: the sessions asked to move (both reasons)."""
        try:
            leases = await self._leases()
        except StoreError as exc:
            self._log.log(
                logging.WARNING, ("leases",), f"cannot read the replicas' leases; not rebalancing now: {exc}"
            )
            return 0
        self._snapshot = leases
        fleet = self.fleet()
        if fleet is None:
            return 0
        self._follow(leases, fleet)
        # Again, with the moves seen landed no longer counted in flight.
        fleet = self.fleet() or fleet
        fair = fair_share(fleet)
        over = excess(fleet, tolerance=self._tolerance)
        if self._metrics is not None:
            self._metrics.fleet_sessions.set(fleet.total)
            self._metrics.fair_share.set(fair)
            self._metrics.rebalance_excess.set(over)
        if fleet.receivers < 2 or not fleet.receiving:
            return 0
        budget = move_budget(self._settings)
        wanted = 0
        if self._settings.enabled and self._confirmed and not self.holding():
            # After moves that did not land, a smaller batch first (halved per failure in a row).
            wanted = math.ceil(moves(over, self._settings) / 2**self._failures)
        floor = math.ceil(fair)
        plan: list[tuple[Session, str]] = []
        if wanted:
            plan = [(s, REASON_REBALANCE) for s in shed_order(self._live())[:wanted]]
        if self._settings.max_session_age_s > 0 and len(plan) < budget:
            chosen = {id(s) for s, _ in plan}
            aged = [s for s in self._aged() if id(s) not in chosen]
            plan.extend((s, REASON_MAX_AGE) for s in aged[: budget - len(plan)])
        if not plan:
            return 0
        log.info(
            "rebalancing: asking sessions to move",
            extra={
                "fleet_sessions": fleet.total,
                "receivers": fleet.receivers,
                "fair_share": round(fair, 1),
                "mine": fleet.mine,
                "excess": over,
                "moving": len(plan),
            },
        )
        return await self._send(plan, floor=floor, others=fleet.others)

    def _live(self) -> list[Session]:
        return [s for sid in self._registry.sandbox_ids() if (s := self._registry.get(sid)) is not None]

    def _aged(self) -> list[Session]:
        """Live sessions past their age limit, in shedding order."""
        now = self._clock()
        return shed_order(
            s
            for s in self._live()
            if (limit := age_limit_s(s.session_id, self._settings)) > 0
            and (now - s.opened_at).total_seconds() >= limit
        )

    async def _send(self, plan: list[tuple[Session, str]], *, floor: int, others: int) -> int:
        """Hint ``plan`` one every 1 / max_moves_per_s seconds; a rebalancing move only while this
        replica stays above ``floor`` (sessions may leave on their own meanwhile); nothing once
        this replica drains (the drain moves everything)."""
        pause_s = 1.0 / self._settings.max_moves_per_s
        sent = 0
        hinted: list[Session] = []
        for session, reason in plan:
            if sent:
                await asyncio.sleep(pause_s)
            if self._draining():
                break
            if reason == REASON_REBALANCE:
                leaving = sum(1 for s in hinted if self._registry.is_current(s))
                if len(self._registry) - leaving <= floor:
                    continue
            if self._registry.hint(session, reason=reason, spread_s=self._settings.hint_spread_s):
                sent += 1
                hinted.append(session)
                if reason == REASON_REBALANCE:
                    if not self._pending:
                        self._pending_base, self._pending_since = others, self._monotonic()
                    self._pending += 1
                if self._metrics is not None:
                    self._metrics.reconnect_hints.labels(reason).inc()
        return sent
