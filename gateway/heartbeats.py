"""Adaptive heartbeats: the interval a replica hands out grows with the sessions it holds.

Nomad's rule, per replica (a heartbeat costs the CPU of the replica that answers it):
``interval = clamp(sessions / sessions.max_heartbeats_per_s, heartbeat_interval_s,
max_heartbeat_interval_s)``, so the heartbeats one replica answers per second stay near
``max_heartbeats_per_s`` however many sessions it holds. ``max_heartbeats_per_s = 0`` keeps the fixed
``heartbeat_interval_s``.

The value is computed again every ``interval_update_s`` with hysteresis (:class:`IntervalRule`): it
changes only when the new one differs by more than 25 %, rises at once (the load is here now) and
falls by at most half the gap per update (sessions that just moved away may come back). New hellos
get the current value (``OpenShellService._accept``); live sessions of supervisors that speak the
``interval`` capability get a :class:`SessionUpdateOut` in their inbox, paced at
``max_heartbeats_per_s`` messages per second (an update costs what a heartbeat answer costs).

A live session's stale bound is never narrowed: on a rise the session's handler widens it when it
WRITES the update (a supervisor that never got it keeps beating at the old pace); on a fall the
live bound stays (the supervisor's sleep in progress may follow the old interval) and only new hellos
get the tight one. An operator's HeartbeatCommand wins over the adaptive value: the supervisor
applies a SessionUpdate's interval only while no command set one (``supervisor/session.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import SessionSettings
from gateway.metrics import GatewayMetrics
from gateway.sandbox_state import Liveness
from gateway.sessions import Outbound, Session, SessionRegistry
from openshell_wire.records import CAP_INTERVAL
from openshell_wire.v1 import openshell_pb2 as pb

log = logging.getLogger(__name__)

#: A new value within this fraction of the current one is no change (no oscillation at a threshold).
HYSTERESIS = 0.25
#: How much later than its interval our supervisor may beat (its ``session.heartbeat_jitter``
#: default, 0.2).
BEAT_JITTER = 0.2
#: The pacing loop's step while updates are queued.
PACE_TICK_S = 0.05


@dataclass(frozen=True, slots=True)
class SessionUpdateOut(Outbound):
    """A SessionUpdate for one live session: its handler widens the session's stale bound to
    ``stale_after_s`` (never narrows it) as it writes the message."""

    interval_s: float
    stale_after_s: float


class IntervalRule:
    """The rule and its hysteresis, without a clock: ``next`` is one update."""

    def __init__(self, settings: SessionSettings) -> None:
        self._min = settings.heartbeat_interval_s
        self._max = max(settings.max_heartbeat_interval_s, self._min)
        self._rate = settings.max_heartbeats_per_s

    @property
    def minimum(self) -> float:
        return self._min

    def target(self, sessions: int) -> float:
        """The interval that keeps ``sessions`` heartbeats under the rate (clamped)."""
        if self._rate <= 0:
            return self._min
        return min(max(sessions / self._rate, self._min), self._max)

    def next(self, current: float, sessions: int) -> float:
        """The value after one update from ``current`` with ``sessions`` live."""
        target = self.target(sessions)
        if abs(target - current) <= HYSTERESIS * current:
            return current
        if target > current:
            return target
        return max(current - (current - target) / 2, self._min)


class HeartbeatGovernor:
    """This replica's current interval, and the loop that recomputes it and tells live sessions."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        registry: SessionRegistry,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._rule = IntervalRule(settings)
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._interval_s = settings.heartbeat_interval_s
        self._computed_at: float | None = None
        self._queue: collections.deque[Session] = collections.deque()
        if metrics is not None:
            metrics.heartbeat_interval.set(self._interval_s)

    @property
    def interval_s(self) -> float:
        """The interval handed out now."""
        return self._interval_s

    def stale_after_s(self, interval_s: float | None = None, *, upstream: bool = False) -> float:
        """The silence allowed a session beating every ``interval_s`` (default: the current one):
        the fixed interval's formula (``Liveness.stale_after_for``; exactly today's bound at
        ``heartbeat_interval_s``), plus the supervisor's jitter on what the interval adds above
        that: ``grace_s`` covers the jitter of the fixed interval, not of one ten times longer."""
        interval = self._interval_s if interval_s is None else interval_s
        grace = self._settings.grace_s + BEAT_JITTER * max(0.0, interval - self._rule.minimum)
        bound = Liveness.stale_after_for(interval, grace_s=grace)
        if upstream:
            bound = max(bound, Liveness.stale_after_for(interval, grace_s=grace, upstream=True))
        return bound

    def recompute(self) -> bool:
        """Apply the rule once if ``interval_update_s`` passed since the last time (at once the
        first time); True when the interval changed."""
        now = self._clock()
        if self._computed_at is not None and now - self._computed_at < self._settings.interval_update_s:
            return False
        self._computed_at = now
        before = self._interval_s
        self._interval_s = self._rule.next(before, len(self._registry))
        if self._interval_s == before:
            return False
        log.info(
            "heartbeat interval changed from %.2fs to %.2fs",
            before,
            self._interval_s,
            extra={"sessions": len(self._registry), "interval_s": self._interval_s, "was_s": before},
        )
        if self._metrics is not None:
            self._metrics.heartbeat_interval.set(self._interval_s)
        return True

    def _due(self, session: Session) -> bool:
        return (
            CAP_INTERVAL in session.capabilities
            and self._registry.is_current(session)
            and session.hinted is None
            and session.heartbeat_interval_s != self._interval_s
        )

    def push_one(self, session: Session) -> bool:
        """Queue a SessionUpdate of the current interval for ``session`` if it needs one."""
        if not self._due(session):
            return False
        interval = self._interval_s
        message = pb.GatewayMessage()
        message.session_update.heartbeat_interval_ms = round(interval * 1000)
        message.session_update.stale_after_ms = round(self.stale_after_s(interval) * 1000)
        # What it was told, so the next round does not queue it again; the stale bound follows
        # only once the handler writes the message.
        session.heartbeat_interval_s = interval
        session.inbox.put_nowait(
            SessionUpdateOut(message, interval_s=interval, stale_after_s=self.stale_after_s(interval))
        )
        return True

    async def run(self) -> None:
        """Recompute every ``interval_update_s``; while sessions wait for the new value, tell them at
        ``max_heartbeats_per_s`` per second at most."""
        if self._settings.max_heartbeats_per_s <= 0:
            return  # fixed interval: nothing ever changes
        rate = self._settings.max_heartbeats_per_s
        budget = 0.0
        while True:
            if self.recompute() or (self._computed_at is not None and not self._queue):
                # Every round looks at every session: one that a hello put in since (it got the
                # value then) is not due, one whose update was lost with its stream is gone.
                self._queue = collections.deque(s for s in self._live() if self._due(s))
            if not self._queue:
                budget = 0.0
                assert self._computed_at is not None
                wait = self._computed_at + self._settings.interval_update_s - self._clock()
                await asyncio.sleep(max(wait, PACE_TICK_S))
                continue
            budget = min(budget + rate * PACE_TICK_S, max(rate * PACE_TICK_S, 1.0))
            while self._queue and budget >= 1.0:
                if self.push_one(self._queue.popleft()):
                    budget -= 1.0
            await asyncio.sleep(PACE_TICK_S)

    def _live(self) -> list[Session]:
        sessions = []
        for sandbox_id in self._registry.sandbox_ids():
            session = self._registry.get(sandbox_id)
            if session is not None:
                sessions.append(session)
        return sessions
