"""Rebalancing of sessions between replicas (issue 22 point 2).

Every replica renews its lease row with the sessions it holds and whether it drains
(:mod:`gateway.replicas`), so each one can tell, from the rows it already reads (``LeaseView``, no
extra query), the fleet's sessions and how many replicas take sessions. The rule is here and
nowhere else (:func:`fleet_of`, :func:`fair_share`, :func:`excess`, :func:`moves`):

- ``receivers``: replicas whose lease is alive and that do not drain (this one included unless it
  drains); ``total``: the sessions of every alive row, draining ones included (their sessions are
  on their way to the receivers), with this replica's row replaced by its live count, plus the
  sessions this replica asked to move that may not have landed in another row yet (counted twice
  at worst, which only makes a replica shed less, the safe direction);
- ``fair share`` = total / receivers; a replica above fair x (1 + ``rebalance.tolerance``) has
  ``excess`` = its live count - ceil(fair): it sheds down to its fair share, never below, and only
  while at least two replicas take sessions and it does not drain itself (the drain moves all);
- per ``rebalance.interval_s`` it asks min(ceil(excess x DAMPING), max_moves_per_s x interval_s) of
  them to reconnect (a ReconnectHint then the end of the stream, ``SessionRegistry.hint``), one every
  1 / ``max_moves_per_s`` seconds. DAMPING (one half): the counts are up to a renewal old and a moved
  session comes back here with probability 1 / receivers through the Service; acting on half the
  excess each interval converges without overshoot.

Which sessions: those that speak ``reconnect`` (they come back without a backoff penalty), oldest
first; sessions without it (upstream's supervisor) only when none of those is left.

Arrivals: :meth:`Rebalancer.over_share` (set on ``Admission.over_share``) is True when this
replica's live count is above fair x (1 + tolerance) + 1 while another replica takes sessions: the
hello is refused OVERLOADED and redials through the Service, instead of being moved later. It is
never True with a snapshot older than ``rebalance.interval_s + ha.renew_interval_s`` (a failing
store): a replica that cannot see the others never refuses for share. Not every receiver can be
above the mean of the same snapshot, so arrivals cannot be refused everywhere.

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
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

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
REASON_REBALANCE = "rebalance"
REASON_MAX_AGE = "max_age"


@dataclass(frozen=True, slots=True)
class Fleet:
    """What one replica knows of the fleet (see the module docstring)."""

    #: Replicas whose lease is alive, this one included.
    alive: int
    #: Of those, the ones taking sessions (not draining).
    receivers: int
    #: Sessions of the alive replicas, this one's counted live, plus those in flight from it.
    total: int
    #: This replica's live count.
    mine: int
    #: This replica takes sessions (it does not drain).
    receiving: bool = True


def fleet_of(
    leases: ReplicaLeases,
    *,
    me: str,
    mine: int,
    draining: bool,
    now: datetime,
    in_flight: int = 0,
) -> Fleet:
    """The fleet as ``leases`` show it, with this replica (``me``) counted from its live state
    (``mine`` sessions, ``draining``) whatever its row says: the row is up to a renewal old, and a
    replica is alive to itself. ``in_flight``: sessions this replica asked to move recently."""
    alive, receivers, total = 1, 0 if draining else 1, mine + max(0, in_flight)
    for replica in leases.renewed_at:
        if replica == me or not leases.alive(replica, now=now):
            continue
        alive += 1
        total += max(0, leases.sessions.get(replica, 0))
        if not leases.draining.get(replica, False):
            receivers += 1
    return Fleet(alive=alive, receivers=receivers, total=total, mine=mine, receiving=not draining)


def fair_share(fleet: Fleet) -> float:
    """The fleet's sessions over the replicas taking sessions."""
    return fleet.total / max(fleet.receivers, 1)


def excess(fleet: Fleet, *, tolerance: float) -> int:
    """Sessions this replica holds above its fair share, once it is above fair x (1 + tolerance);
    0 while fewer than two replicas take sessions or this one drains."""
    if fleet.receivers < 2 or not fleet.receiving:
        return 0
    fair = fair_share(fleet)
    if fleet.mine <= fair * (1 + tolerance):
        return 0
    return max(0, fleet.mine - math.ceil(fair))


def over_share(fleet: Fleet, *, tolerance: float) -> bool:
    """A hello arriving now would put this replica further above its share: refuse it (the
    supervisor redials through the Service). One session of slack, so a replica at its share is
    never refused for the hello that would make it one above."""
    if fleet.receivers < 2 or not fleet.receiving:
        return False
    return fleet.mine > fair_share(fleet) * (1 + tolerance) + 1


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
        #: When each recent hint was sent (monotonic, oldest first): counted in flight until it
        #: can have landed and been renewed into another row. A deque: over_share reads it per hello.
        self._sent: deque[float] = deque()
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
        """Sessions this replica asked to move within ``settle_s``."""
        cutoff = self._monotonic() - self.settle_s
        while self._sent and self._sent[0] < cutoff:
            self._sent.popleft()
        return len(self._sent)

    def fleet(self) -> Fleet | None:
        """The fleet from the last snapshot and the live count; None without a fresh snapshot."""
        snapshot = self._snapshot
        if snapshot is None:
            return None
        read_at = snapshot.read_at
        if read_at is not None and self._monotonic() - read_at > self.stale_after_s:
            return None
        return fleet_of(
            snapshot,
            me=self._me,
            mine=len(self._registry),
            draining=self._draining(),
            now=self._clock(),
            in_flight=self.in_flight(),
        )

    def over_share(self) -> bool:
        """For ``Admission.over_share``: never awaits, never reads the store."""
        fleet = self.fleet()
        return fleet is not None and over_share(fleet, tolerance=self._tolerance)

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
        fair = fair_share(fleet)
        over = excess(fleet, tolerance=self._tolerance)
        if self._metrics is not None:
            self._metrics.fleet_sessions.set(fleet.total)
            self._metrics.fair_share.set(fair)
            self._metrics.rebalance_excess.set(over)
        if fleet.receivers < 2 or not fleet.receiving:
            return 0
        budget = move_budget(self._settings)
        wanted = moves(over, self._settings) if self._settings.enabled else 0
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
        return await self._send(plan, floor=floor)

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

    async def _send(self, plan: list[tuple[Session, str]], *, floor: int) -> int:
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
                self._sent.append(self._monotonic())
                if self._metrics is not None:
                    self._metrics.reconnect_hints.labels(reason).inc()
        return sent
