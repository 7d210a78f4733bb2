"""The drain on SIGTERM (issue 22 point 1): this replica's sessions are moved away at a paced rate.

By the time :meth:`Drainer.run` starts, the replica refuses hellos (admission's ``draining``), says
not ready and NOT_SERVING, and its lease row says draining (``Gateway.begin_drain``). The drainer
waits ``drain.settle_s`` (endpoints and balancers stop sending here: a hint sent earlier could bring
the supervisor straight back), then asks the sessions, in random order, to reconnect elsewhere:
``SessionRegistry.hint`` (a ReconnectHint with ``drain.hint_spread_s`` for a supervisor that speaks
``reconnect``, then the end of the stream). The pace is ``pace(n, ...)`` hints a second, so the
replicas that receive the moved supervisors see a bounded hello rate, not the whole fleet at once.
It returns when the registry is empty or at its deadline; the stop then hints what is left
(``final_spread_s``).

A hinted supervisor closes its stream at once, so this replica's conditional disconnection write
would usually land before the new replica's claim and the API would show a moment of
"disconnected": :func:`disconnect_delay_s` is how long that write waits for a moved session
(the write is conditional on the session and its claim, so a late one is a fenced no-op).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from gateway.config import DrainSettings, GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry

log = logging.getLogger(__name__)

DRAIN = "drain"
#: The reason of the hints given to the sessions still here when the stop begins.
SHUTDOWN = "shutdown"
#: How often the drainer looks again for sessions it has not hinted yet (a hello admitted just
#: before the drain began) while hinted ones are still ending.
RECHECK_S = 0.1
#: At most this many hints back to back when the drainer is late (its loop stalled: a GC, a slow
#: callback): the pace is a token bucket of this depth, so a stall of any length is not caught up
#: in a burst onto the receivers. In any second at most ``rate + HINT_BURST`` hints are sent.
HINT_BURST = 5
#: The hints are spread over this share of the window left after the settle, so the last hinted
#: sessions have time to leave before its end (they would get a second, shorter spread otherwise).
WINDOW_SHARE = 0.9


def pace(n: int, *, window_s: float, min_rate: float, max_rate: float) -> float:
    """Hints a second for ``n`` sessions: spread over the window, never slower than ``min_rate``
    (a few sessions leave at once), never faster than ``max_rate`` (the receivers' hello load)."""
    return min(max(n / window_s, min_rate), max_rate)


def disconnect_delay_s(reason: str | None, config: GatewayConfig) -> float:
    """How long the disconnection write of a session hinted for ``reason`` waits: the supervisor's
    spread plus the new replica's hello deadline, so its claim usually wins. None (not hinted) and
    the shutdown's hints: no wait (the stop's deadline comes first; the write is conditional)."""
    if reason == DRAIN:
        spread = config.drain.hint_spread_s
    elif reason is not None and reason != SHUTDOWN:
        spread = config.rebalance.hint_spread_s  # rebalance, max_age
    else:
        return 0.0
    return spread + config.grpc.store_timeout_s


class Drainer:
    """Paced reconnect hints to every session of the registry (see the module docstring)."""

    def __init__(
        self,
        registry: SessionRegistry,
        settings: DrainSettings,
        *,
        metrics: GatewayMetrics | None = None,
        handshakes: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        #: Hellos admitted before the drain and still in their handshake (admission's in-flight
        #: count): each becomes a session to hint, so the drain is not over while there are any.
        self._handshakes = handshakes
        self._clock = clock
        #: Sessions asked to reconnect by this drain.
        self.hinted = 0

    async def run(self, *, deadline: float) -> None:
        """Settle, then hint every session at the paced rate; return once the registry is empty
        and no hello admitted before the drain is still in its handshake, or at ``deadline`` (on
        ``clock``), whichever comes first."""
        s = self._settings
        if self._left() and s.settle_s > 0:
            await self._sleep_until(min(self._clock() + s.settle_s, deadline))
        sessions = self._registry.sessions()
        random.shuffle(sessions)
        # The window left: the settle and the lease mark came out of it.
        window_s = max(deadline - self._clock(), 0.001) * WINDOW_SHARE
        rate = pace(len(sessions), window_s=window_s, min_rate=s.min_hints_per_s, max_rate=s.max_hints_per_s)
        log.info(
            "drain: asking %d sessions to reconnect elsewhere, %.0f a second",
            len(sessions),
            rate,
            extra={"sessions": len(sessions), "hints_per_s": rate},
        )
        # The token bucket: the next hint may go at ``ready_at``; a late drainer (a stalled loop)
        # banks at most HINT_BURST - 1 of the slots it missed.
        ready_at = self._clock()
        while self._clock() < deadline and self._left():
            if not sessions:
                # Hinted sessions are still ending (a batch being stored); a session admitted
                # just before the drain began (its hello still in its claim then) is hinted too.
                sessions = [x for x in self._registry.sessions() if x.hinted is None]
                if not sessions:
                    await self._sleep_until(min(self._clock() + RECHECK_S, deadline))
                    continue
            session = sessions.pop()
            now = self._clock()
            if not self._registry.hint(session, reason=DRAIN, spread_s=s.hint_spread_s):
                continue  # ended or replaced meanwhile: no slot spent on it
            self.hinted += 1
            log.debug(
                "drain: session asked to reconnect",
                extra={"sandbox_id": session.sandbox_id, "session_id": session.session_id},
            )
            if self._metrics is not None:
                self._metrics.reconnect_hints.labels(DRAIN).inc()
            # Slots follow each other at 1 / rate whatever each wake-up takes, but the debt of a
            # late drainer is capped at HINT_BURST slots (a token bucket), and it always yields.
            ready_at = max(ready_at, now - (HINT_BURST - 1) / rate) + 1 / rate
            await self._sleep_until(min(ready_at, deadline))
        left, handshakes = len(self._registry), self._handshakes()
        log.info(
            "drain: %s after %d hints",
            "every session left"
            if not left and not handshakes
            else f"{left} sessions and {handshakes} handshakes still here at the deadline",
            self.hinted,
            extra={"hinted": self.hinted, "left": left, "handshakes": handshakes},
        )

    def _left(self) -> bool:
        """Sessions here, or hellos that will open one (a session opens before its ticket goes)."""
        return bool(len(self._registry) or self._handshakes())

    async def _sleep_until(self, when: float) -> None:
        # Always a yield, even when late: the loop's other work (the hinted streams' ends) runs.
        await asyncio.sleep(max(when - self._clock(), 0))
