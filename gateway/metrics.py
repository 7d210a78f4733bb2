"""The gateway's Prometheus metrics, served at ``GET /metrics`` on the HTTP API's port.

A registry of its own (never prometheus-client's global one, so several gateways in one test
process do not collide), holding what a platform team alerts on in this milestone: live
sessions (read from the session registry at scrape time), sandboxes by derived state (counted from
the store at scrape time by :mod:`gateway.sandbox_state`, the API's rule), sessions accepted and
refused by reason, event batches stored and their store latency, events received, calls refused
for a malformed frame or a store failure, failed attempts of retried background writes, and the
process's own CPU, memory and file descriptors. The chart's ServiceMonitor scrapes it and its
PrometheusRule alerts on it (``helm/openshell/templates/monitoring.yaml``).
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.sandbox_state import Liveness, SandboxState, sandbox_state
from gateway.sessions import SessionRegistry
from gateway.store import SandboxStore, StoreError
from openshell_wire import __version__

log = logging.getLogger(__name__)

PREFIX = "openshell_gateway_"
# Store latency of one batch: a commit on SQLite or PostgreSQL, milliseconds to seconds.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _LiveCollector(Collector):
    def __init__(self, sessions: SessionRegistry) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "sessions", "Supervisor sessions open on this gateway now.", value=len(self._sessions)
        )
        yield InfoMetricFamily(PREFIX + "build", "The gateway's version.", value={"version": __version__})


class GatewayMetrics:
    def __init__(self, sessions: SessionRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_LiveCollector(sessions))
        self.sessions_accepted = Counter(
            PREFIX + "sessions_accepted", "Supervisor sessions accepted.", registry=self.registry
        )
        self.sessions_rejected = Counter(
            PREFIX + "sessions_rejected",
            "Supervisor streams refused, by reject code.",
            ["code"],
            registry=self.registry,
        )
        self.event_batches = Counter(
            PREFIX + "event_batches", "Event batches stored and acknowledged.", registry=self.registry
        )
        self.events_received = Counter(
            PREFIX + "events_received",
            "Events in stored batches (repeats of stored events included: those are acknowledged too).",
            registry=self.registry,
        )
        self.batch_store_seconds = Histogram(
            PREFIX + "event_batch_store_seconds",
            "Time to store one event batch, commit included.",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.sandboxes = Gauge(
            PREFIX + "sandboxes",
            "Sandboxes by derived state (the API's state), counted from the store at scrape time.",
            ["state"],
            registry=self.registry,
        )
        self.malformed_frames = Counter(
            PREFIX + "malformed_frames",
            "gRPC calls refused with INVALID_ARGUMENT because a frame was not a valid message, by method.",
            ["method"],
            registry=self.registry,
        )
        self.store_failures = Counter(
            PREFIX + "store_failures",
            "gRPC calls answered UNAVAILABLE because the store failed, by method.",
            ["method"],
            registry=self.registry,
        )
        self.background_write_failures = Counter(
            PREFIX + "background_write_failures",
            "Failed attempts of retried background writes (disconnections, heartbeat flushes), by write.",
            ["write"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)

    async def count_sandboxes(self, store: SandboxStore, *, now: datetime, liveness: Liveness) -> None:
        """Set the ``sandboxes`` gauge; a store failure leaves the last counts (the scrape goes on)."""
        try:
            rows = await store.list()
        except StoreError as exc:
            log.warning("cannot count sandboxes for /metrics: %s", exc)
            return
        counts = Tally(sandbox_state(row, now=now, liveness=liveness) for row in rows)
        for state in SandboxState:
            self.sandboxes.labels(state.value).set(counts[state])
