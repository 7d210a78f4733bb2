"""Admission control of hellos (issue 22 point 3).

``Admission.try_enter()`` never awaits and never touches the store: it answers a :class:`Ticket`
(held until the hello is answered) or a :class:`Refusal`, which the hello answers at once with
SessionRejected OVERLOADED and ``retry_after_ms(refusal)``. There is no queue: a queue in front of
the supervisors' 5 s connect timeout is how the gateway collapsed (it kept working on hellos whose
supervisors had already given up), so what cannot be taken now is told when to come back.

The checks, in order: ``draining`` (set by the drain on SIGTERM), then, when ``admission.enabled``,
``max_sessions``, the token bucket (``hellos_per_s``, burst ``hello_burst``) and the concurrent
handshakes (``max_concurrent_handshakes``), then the rebalancer's ``over_share``. A token is taken
only when every check passed, so a refused hello costs nothing of the rate.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from types import TracebackType

from gateway.config import AdmissionSettings
from gateway.metrics import GatewayMetrics

#: A draining or over-share replica's refusal: another replica takes the hello now, so come back
#: soon (through the Service, which picks again), spread over this window.
REDIRECT_RETRY_MS = (200, 1000)


class Refusal(enum.StrEnum):
    DRAINING = "draining"
    MAX_SESSIONS = "max_sessions"
    RATE = "rate"
    CONCURRENCY = "concurrency"
    OVER_SHARE = "over_share"


#: Weight of the latest handshake in the moving average of how long one takes.
HANDSHAKE_EWMA = 0.05

#: Refusals that mean "this replica is busy": their retry-after is sized to the backlog.
_BUSY = frozenset({Refusal.MAX_SESSIONS, Refusal.RATE, Refusal.CONCURRENCY})


class Ticket:
    """An admitted hello's place among the concurrent handshakes; released on exit."""

    def __init__(self, admission: Admission, *, started: float) -> None:
        self._admission = admission
        self._started = started
        self._released = False

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def accepted(self) -> None:
        """The hello's SessionAccepted was written: its handshake time is recorded, and the slot freed."""
        if not self._released:
            self._admission._observe_handshake(self._admission._clock() - self._started)
        self.release()

    def release(self) -> None:
        """Idempotent: the hello was answered (or failed)."""
        if self._released:
            return
        self._released = True
        self._admission._leave(self._admission._clock() - self._started)


class Admission:
    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        sessions: Callable[[], int],
        metrics: GatewayMetrics | None = None,
        over_share: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._metrics = metrics
        self._clock = clock
        self._random = rng if rng is not None else random.Random()
        #: Set by the rebalancer once it exists (see gateway.rebalance); None: never over share.
        self.over_share = over_share
        #: Set by the drain on SIGTERM: every hello is refused from then on, whether or not
        #: ``admission.enabled`` (which switches off the bounds only).
        self.draining = False
        # Token bucket: full at start (a replica that just started takes one burst at once).
        self._tokens = float(settings.hello_burst)
        self._refilled = clock()
        self.inflight = 0
        # Busy refusals of the current and the previous whole second (a sliding estimate of the
        # last second's refusals, in constant memory whatever the storm).
        self._second = int(clock())
        self._refused_now = 0
        self._refused_before = 0
        #: How long a handshake holds its place (moving average of every release; None: none yet).
        self._handshake_s: float | None = None
        self._window_ms = 0
        self._window_at = float("-inf")

    # -- the gate ----------------------------------------------------------------------------

    def try_enter(self) -> Ticket | Refusal:
        refusal = self._check()
        if refusal is not None:
            if refusal in _BUSY:
                self._count_busy()
            if self._metrics is not None:
                self._metrics.admission_refusals.labels(refusal.value).inc()
            return refusal
        if self._settings.enabled:
            self._tokens -= 1.0
        self.inflight += 1
        if self._metrics is not None:
            self._metrics.handshakes_inflight.set(self.inflight)
        return Ticket(self, started=self._clock())

    def _check(self) -> Refusal | None:
        if self.draining:
            return Refusal.DRAINING
        settings = self._settings
        if settings.enabled:
            # The hellos in their handshake become sessions too: counting them keeps the bound a
            # bound (the setting is sized under the file descriptor limit).
            if settings.max_sessions and self._sessions() + self.inflight >= settings.max_sessions:
                return Refusal.MAX_SESSIONS
            self._refill()
            if self._tokens < 1.0:
                return Refusal.RATE
            if self.inflight >= settings.max_concurrent_handshakes:
                return Refusal.CONCURRENCY
        if settings.refuse_over_share and self.over_share is not None and self.over_share():
            return Refusal.OVER_SHARE
        return None

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._refilled)
        self._refilled = now
        self._tokens = min(
            float(self._settings.hello_burst), self._tokens + elapsed * self._settings.hellos_per_s
        )

    def _leave(self, held_s: float) -> None:
        self.inflight -= 1
        held_s = max(0.0, held_s)
        previous = self._handshake_s
        self._handshake_s = held_s if previous is None else previous + HANDSHAKE_EWMA * (held_s - previous)
        if self._metrics is not None:
            self._metrics.handshakes_inflight.set(self.inflight)

    def _observe_handshake(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.handshake_seconds.observe(seconds)

    # -- the reconnect window -----------------------------------------------------------------

    def reconnect_window_ms(self) -> int:
        """Over how long this replica's supervisors spread their reconnects if they lose it at once
        (``SessionAccepted.reconnect_window_ms``): the sessions it holds over ``hellos_per_s``,
        the time it needs to take them all back, capped at ``reconnect_window_max_ms``. Without
        it, a killed replica's whole fleet redials within the supervisors' first backoff steps
        (0.5, 1, 2 s): far more hellos than one process answers before their 5 s connect timeout
        (issue 22's storm). Recomputed at most once a second: it is read for every heartbeat."""
        now = self._clock()
        if now - self._window_at >= 1.0:
            self._window_at = now
            window = self._sessions() / self._settings.hellos_per_s * 1000.0
            self._window_ms = round(min(window, float(self._settings.reconnect_window_max_ms)))
        return self._window_ms

    # -- the retry hint ----------------------------------------------------------------------

    def _roll(self) -> float:
        """Move the per-second refusal counts on to the current second; the current one's fraction."""
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._refused_before = self._refused_now if second == self._second + 1 else 0
            self._refused_now = 0
            self._second = second
        return now - second

    def _count_busy(self) -> None:
        self._roll()
        self._refused_now += 1

    def refused_last_s(self) -> float:
        """Busy refusals over the last second (the previous second's share still inside it)."""
        fraction = self._roll()
        return self._refused_now + self._refused_before * (1.0 - fraction)

    def capacity_per_s(self) -> float:
        """Hellos this replica can take per second now: ``hellos_per_s``, or fewer when slow
        handshakes hold the concurrency bound (Little's law: places / time each is held)."""
        rate = self._settings.hellos_per_s
        if not self._settings.enabled or self._handshake_s is None or self._handshake_s <= 0:
            return rate
        return min(rate, self._settings.max_concurrent_handshakes / self._handshake_s)

    def retry_after_ms(self, refusal: Refusal) -> int:
        """A jittered retry hint: a refused cohort comes back spread, not as one burst.

        Busy refusals: ``U(lo, hi)`` with ``lo = retry_after_min_ms`` and ``hi`` the time the last
        second's refused hellos need at :meth:`capacity_per_s`, clamped to
        ``[2 lo, retry_after_max_ms]``: when the store makes each handshake slow, the concurrency
        bound, not the rate, is what takes them, and a hint sized to the rate would bring them
        back to be refused again. Draining and over-share: ``U(200, 1000)`` ms (another replica
        takes it now)."""
        if refusal not in _BUSY:
            return self._random.randint(*REDIRECT_RETRY_MS)
        lo = self._settings.retry_after_min_ms
        backlog_ms = self.refused_last_s() / self.capacity_per_s() * 1000.0
        hi = min(max(backlog_ms, 2.0 * lo), float(self._settings.retry_after_max_ms))
        return round(self._random.uniform(lo, max(lo, hi)))
