"""Admission control of hellos (issue 22 point 3): SEAM, implemented by the admission work.

The interface the rest of the gateway uses: ``Admission.try_enter()`` never awaits and never
touches the store; it answers a :class:`Ticket` (held until the hello is answered) or a
:class:`Refusal`, which the hello answers at once with SessionRejected OVERLOADED and
``retry_after_ms(refusal)``. ``draining`` is set by the drain.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from types import TracebackType

from gateway.config import AdmissionSettings
from gateway.metrics import GatewayMetrics


class Refusal(enum.StrEnum):
    DRAINING = "draining"
    MAX_SESSIONS = "max_sessions"
    RATE = "rate"
    CONCURRENCY = "concurrency"
    OVER_SHARE = "over_share"


class Ticket:
    """An admitted hello's place among the concurrent handshakes; released on exit."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        """Idempotent: the hello was answered (or failed)."""


class Admission:
    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        sessions: Callable[[], int],
        metrics: GatewayMetrics | None = None,
        over_share: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._metrics = metrics
        #: Set by the rebalancer once it exists (see gateway.rebalance).
        self.over_share = over_share
        #: Set by the drain on SIGTERM: every hello is refused from then on.
        self.draining = False

    def try_enter(self) -> Ticket | Refusal:
        if self.draining:
            return Refusal.DRAINING
        return Ticket(self)

    def retry_after_ms(self, refusal: Refusal) -> int:
        return self._settings.retry_after_min_ms
