"""What the supervisor's endpoints and exporters read: the view of a running supervisor.

The agent implements :class:`SupervisorView`; the HTTP endpoints (``http``), the Prometheus
collector (``metrics``) and the OTLP exporter (``telemetry``) read it. This module imports none
of their libraries, so a supervisor with those features off never loads them (each costs
megabytes of memory in a process that aims at a small footprint).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from supervisor.health import HealthMonitor
    from supervisor.journal import JournalStats
    from supervisor.session import SessionStatus

#: Session states the gauge ``openshell_supervisor_session_state`` reports, one series each, so a
#: dashboard can stack them and an alert can match one without a regular expression.
SESSION_STATES = ("connecting", "connected", "backoff", "stopped")

#: Health states the gauge ``openshell_supervisor_health_state`` reports, one series each.
HEALTH_STATES = ("healthy", "degraded", "unhealthy")


def health_of(view: object) -> HealthMonitor | None:
    """The view's health monitor, if it has one.

    ``health`` is an optional member of the view, outside :class:`SupervisorView`: None while
    health sampling is off, and absent from views that predate it (test stand-ins).
    """
    monitor: HealthMonitor | None = getattr(view, "health", None)
    return monitor


class SupervisorView(Protocol):
    """What the health, metrics and status endpoints read from the supervisor.

    Implemented by the agent (plain attributes satisfy it as well as properties). Every member must
    be cheap to read and must not block: handlers and the metrics collector read them on the event
    loop for every request.
    """

    @property
    def sandbox_id(self) -> str: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def main_pid(self) -> int | None:
        """Pid of the running main process; None before it started and after it exited."""
        ...

    @property
    def main_running(self) -> bool: ...

    @property
    def started_at(self) -> float | None:
        """Wall-clock time (``time.time()``) the current (or last) main process started."""
        ...

    @property
    def restarts(self) -> int:
        """Times the main process was started again after it exited (0 for the first start)."""
        ...

    @property
    def last_exit_code(self) -> int | None:
        """Exit code of the last main process that exited (128 + signal for a signal)."""
        ...

    @property
    def session_status(self) -> SessionStatus: ...

    @property
    def journal_stats(self) -> JournalStats: ...

    @property
    def loop_heartbeat(self) -> float:
        """``time.monotonic()`` of the supervisor loop's last tick; /healthz fails when it is stale."""
        ...


def monotonic_age(at: float | None) -> float | None:
    """Seconds since a ``time.monotonic()`` instant (None stays None)."""
    return None if at is None else max(time.monotonic() - at, 0.0)
