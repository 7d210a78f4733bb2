"""The supervisor's Prometheus metrics, and the read-only view of the supervisor they are read from.

Design:

- **Our own registry.** Everything is registered on a :class:`prometheus_client.CollectorRegistry`
  owned by :class:`SupervisorMetrics`, never on prometheus-client's global ``REGISTRY``: a test (or
  a process) can build several supervisors' metrics side by side without "Duplicated timeseries"
  errors, and nothing a library registers globally leaks into our ``/metrics``.
- **Read at scrape time.** Almost every metric is a snapshot of state the supervisor keeps anyway
  (:class:`SupervisorView`): the session's :class:`~supervisor.session.SessionStatus`, the journal's
  :class:`~supervisor.journal.JournalStats`, the main process's pid and restart count. A custom
  collector turns that state into metric families when Prometheus scrapes, so there is no polling
  task, no second copy of any number that could drift from the first, and a scrape costs a handful
  of attribute reads. Counters among them (reconnects, drops, restarts) are monotonic because the
  state they are read from is.
- **Observed where it happens.** The one exception is the heartbeat round trip histogram: a
  distribution cannot be rebuilt from a snapshot, so the session reports each sample through
  :meth:`SupervisorMetrics.observe_rtt` (handed to it as a plain callback, so ``session`` does not
  need to import this module).
- **Two process collectors.** ``process_*`` describes the supervisor itself (the standard names
  that dashboards expect); ``openshell_supervisor_main_process_*`` describes the main process,
  read from ``/proc/<main pid>`` and simply absent while there is none (its
  ``..._start_time_seconds`` is the main process's start, so no gauge of ours repeats it).

This module must not import ``supervisor.agent``: the agent sits above it and implements
:class:`SupervisorView` structurally (properties or plain attributes with these names and types).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from openshell_wire import __version__
from supervisor.view import HEALTH_STATES, SESSION_STATES, SupervisorView, health_of

if TYPE_CHECKING:
    # Types only: at run time this module reads attributes and needs neither module loaded,
    # which keeps it free of any import cycle with the session that reports into it.
    from supervisor.health import HealthMonitor

PREFIX = "openshell_supervisor_"

#: Heartbeat round trips: sub-millisecond on a node-local gateway, up to seconds on a congested or
#: distant link (the design's target is p99 < 100 ms at 20,000 sessions per replica).
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StateCollector(Collector):
    """Turns one snapshot of the view into metric families, at scrape time."""

    def __init__(self, view: SupervisorView, ready: Callable[[], bool | None]) -> None:
        self._view = view
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        view = self._view
        status = view.session_status
        stats = view.journal_stats

        info = InfoMetricFamily(PREFIX[:-1], "This supervisor: its sandbox, boot id and version.")
        info.add_metric(
            [], {"sandbox_id": view.sandbox_id, "instance_id": view.instance_id, "version": __version__}
        )
        yield info

        yield GaugeMetricFamily(
            PREFIX + "main_process_up", "1 while the main process runs.", value=int(view.main_running)
        )
        yield CounterMetricFamily(
            PREFIX + "main_process_restarts",
            "Times the main process was started again after it exited.",
            value=view.restarts,
        )
        if view.last_exit_code is not None:
            yield GaugeMetricFamily(
                PREFIX + "main_process_last_exit_code",
                "Exit code of the last main process that exited (128 + signal number for a signal).",
                value=view.last_exit_code,
            )
        ready = self._ready()
        if ready is not None:
            yield GaugeMetricFamily(
                PREFIX + "ready",
                "1 while /readyz answers 200 (main process up, check passing).",
                value=int(ready),
            )

        yield GaugeMetricFamily(
            PREFIX + "session_connected",
            "1 while a session with the gateway is established.",
            value=int(status.state == "connected"),
        )
        state = GaugeMetricFamily(
            PREFIX + "session_state", "The session's state: 1 for the current one.", labels=["state"]
        )
        for name in SESSION_STATES:
            state.add_metric([name], int(status.state == name))
        yield state
        # ``sessions`` counts accepted sessions; every one after the first is a reconnect.
        yield CounterMetricFamily(
            PREFIX + "session_reconnects",
            "Sessions established again after the first one.",
            value=max(status.sessions - 1, 0),
        )
        yield CounterMetricFamily(
            PREFIX + "session_connect_attempts",
            "Connection attempts to the gateway, successful or not.",
            value=status.attempts,
        )
        refusals = CounterMetricFamily(
            PREFIX + "auth_refusals",
            "Gateway calls refused for our credential, by status code (UNAUTHENTICATED, PERMISSION_DENIED).",
            labels=["code"],
        )
        # Both codes always: a series that appears only with the first refusal defeats rate().
        codes = {"UNAUTHENTICATED": 0, "PERMISSION_DENIED": 0, **status.auth_refusal_codes}
        for code, count in sorted(codes.items()):
            refusals.add_metric([code], count)
        yield refusals
        yield CounterMetricFamily(
            PREFIX + "credential_renewals",
            "Gateway-minted sandbox tokens renewed over the session.",
            value=status.credential_renewals,
        )

        yield GaugeMetricFamily(
            PREFIX + "journal_bytes", "Bytes of journal segments on disk.", value=stats.bytes_on_disk
        )
        yield GaugeMetricFamily(
            PREFIX + "journal_records",
            "Records held in the journal, including acknowledged ones not yet trimmed.",
            value=stats.records,
        )
        # The backlog is what an alert wants: records the gateway has not acknowledged yet.
        yield GaugeMetricFamily(
            PREFIX + "journal_unacked_records",
            "Records not yet acknowledged by the gateway.",
            value=max(stats.last_sequence - stats.acked_through, 0),
        )
        yield GaugeMetricFamily(PREFIX + "journal_segments", "Journal segment files.", value=stats.segments)
        yield CounterMetricFamily(
            PREFIX + "journal_dropped_records",
            "Log records dropped past the journal's byte bound (each drop is counted by a gap record).",
            value=stats.dropped_records_total,
        )
        yield CounterMetricFamily(
            PREFIX + "journal_corrupt_records",
            "Records lost to corruption found in the journal, or to segment files missing or unreadable.",
            value=stats.corrupt_records_total,
        )
        yield CounterMetricFamily(
            PREFIX + "journal_write_failed_records",
            "Records the journal could not write (disk full, I/O error), each counted by a gap record.",
            value=stats.write_failed_records_total,
        )
        yield CounterMetricFamily(
            PREFIX + "journal_write_errors",
            "Journal appends that failed (a lifecycle record retried until written counts per attempt).",
            value=stats.write_errors_total,
        )
        yield from _health_metrics(health_of(view))


def _health_metrics(monitor: HealthMonitor | None) -> Iterator[Metric]:
    """The latest health sample (taken every ``health.check_interval_s``, not at the scrape)."""
    if monitor is None:
        return
    state = GaugeMetricFamily(
        PREFIX + "health_state",
        "The health verdict (supervisor.health): 1 for the current one.",
        labels=["state"],
    )
    for name in HEALTH_STATES:
        state.add_metric([name], int(monitor.state.value == name))
    yield state
    rec = monitor.last
    if rec is None:
        return
    tree = "of the main process tree (the main process and its descendants)"
    yield GaugeMetricFamily(
        PREFIX + "health_cpu_percent", f"CPU use {tree}, percent of one core.", value=rec.cpu_percent
    )
    yield GaugeMetricFamily(PREFIX + "health_rss_bytes", f"Resident memory {tree}.", value=rec.rss_bytes)
    yield GaugeMetricFamily(PREFIX + "health_threads", f"Threads {tree}.", value=rec.threads)
    yield GaugeMetricFamily(
        PREFIX + "health_open_files", f"Open file descriptors {tree}.", value=rec.open_files
    )
    yield GaugeMetricFamily(
        PREFIX + "health_processes", "Processes in the main process tree.", value=rec.processes
    )
    if monitor.last_cgroup_readable:
        yield GaugeMetricFamily(
            PREFIX + "cgroup_memory_current_bytes", "cgroup v2 memory.current.", value=rec.memory_current
        )
        if rec.memory_max:
            yield GaugeMetricFamily(
                PREFIX + "cgroup_memory_max_bytes",
                "cgroup v2 memory.max (absent when unlimited).",
                value=rec.memory_max,
            )
        yield CounterMetricFamily(
            PREFIX + "cgroup_oom_kills",
            "OOM kills in the cgroup (memory.events oom_kill).",
            value=rec.oom_kills,
        )
        yield CounterMetricFamily(
            PREFIX + "cgroup_cpu_throttled_seconds",
            "Time the cgroup was CPU-throttled (cpu.stat throttled_usec).",
            value=rec.cpu_throttled_usec / 1e6,
        )
        yield GaugeMetricFamily(
            PREFIX + "cgroup_pids_current", "cgroup v2 pids.current.", value=rec.pids_current
        )
        if rec.pids_max:
            yield GaugeMetricFamily(
                PREFIX + "cgroup_pids_max", "cgroup v2 pids.max (absent when unlimited).", value=rec.pids_max
            )
    if rec.disks:
        used = GaugeMetricFamily(
            PREFIX + "disk_used_bytes", "Used bytes of a watched file system.", labels=["path"]
        )
        total = GaugeMetricFamily(
            PREFIX + "disk_total_bytes", "Size of a watched file system.", labels=["path"]
        )
        for disk in rec.disks:
            used.add_metric([disk.path], disk.used_bytes)
            total.add_metric([disk.path], disk.total_bytes)
        yield used
        yield total


class SupervisorMetrics:
    """The supervisor's metrics: a registry of its own, read from ``view`` at scrape time.

    ``ready`` (optional) reports the readiness verdict for the ``openshell_supervisor_ready``
    gauge; it is left out of the exposition while ``ready`` is None or returns None.
    """

    def __init__(self, view: SupervisorView, *, ready: Callable[[], bool | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._ready = ready
        self.heartbeat_rtt = Histogram(
            PREFIX + "heartbeat_rtt_seconds",
            "Round trip of a heartbeat to the gateway and back.",
            buckets=RTT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(view, self._read_ready))
        ProcessCollector(registry=self.registry)

        def main_pid() -> int:
            # -1 has no /proc entry, so the collector yields nothing while there is no main process.
            pid = view.main_pid
            return pid if pid is not None else -1

        ProcessCollector(namespace=PREFIX + "main", pid=main_pid, registry=self.registry)

    def set_ready_source(self, ready: Callable[[], bool | None]) -> None:
        """Attach the readiness verdict after construction (the HTTP server owns the probe)."""
        self._ready = ready

    def _read_ready(self) -> bool | None:
        return self._ready() if self._ready is not None else None

    def observe_rtt(self, seconds: float) -> None:
        """Record one heartbeat round trip; the session calls this for every echoed heartbeat."""
        self.heartbeat_rtt.observe(max(seconds, 0.0))
