"""The gateway's Prometheus metrics, served at ``GET /metrics`` on the ops listener (``ops.listen``).

A registry of its own (never prometheus-client's global one, so several gateways in one test
process do not collide), holding what a platform team alerts on in this milestone: live
sessions (read from the session registry at scrape time), sandboxes by derived state (counted from
the store by :mod:`gateway.sandbox_state`, the API's rule, in an owned task at most once per
``SANDBOX_COUNT_TTL_S``, with the time of the last count), sessions accepted and
refused by reason, event batches stored and their store latency, events received, calls refused
for a malformed frame or a store failure, failed attempts of retried background writes, and the
process's own CPU, memory and file descriptors; with the replicas' leases (issue 20), the replicas
alive (counted with the sandboxes, from the ``replicas`` table) and this replica's id. The chart's
ServiceMonitor scrapes it and its PrometheusRule alerts on it (``helm/openshell/templates/monitoring.yaml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import Liveness, ReplicaLeases, SandboxState, sandbox_state
from gateway.sessions import SessionRegistry
from gateway.store import SandboxStore, StoreError
from openshell_wire import __version__
from openshell_wire.logsetup import vanished_peers

log = logging.getLogger(__name__)

PREFIX = "openshell_gateway_"
# Store latency of one batch: a commit on SQLite or PostgreSQL, milliseconds to seconds.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The sandboxes gauge is counted again when a scrape finds it older than this...
SANDBOX_COUNT_TTL_S = 5.0
#: ...the scrape waits this long for the count, then serves the last one...
SANDBOX_COUNT_WAIT_S = 2.0
#: ...and a count that takes longer than this is given up (the series dropped).
SANDBOX_COUNT_TIMEOUT_S = 10.0
#: On shutdown, how long a cancelled count is given to end (see ``close``).
COUNT_CANCEL_WAIT_S = 0.5


class _LiveCollector(Collector):
    def __init__(self, sessions: SessionRegistry) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "sessions", "Supervisor sessions open on this gateway now.", value=len(self._sessions)
        )
        yield InfoMetricFamily(PREFIX + "build", "The gateway's version.", value={"version": __version__})
        # Counted by the log filter (one per process, as gRPC's logger is): not an error of ours.
        yield CounterMetricFamily(
            PREFIX + "peer_vanished",
            "gRPC calls whose client went away while their reply was being sent (logged at debug).",
            value=vanished_peers(),
        )


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
            "Sandboxes by derived state (the API's state), counted from the store at most "
            f"{SANDBOX_COUNT_TTL_S:.0f}s before the scrape.",
            ["state"],
            registry=self.registry,
        )
        self.malformed_frames = Counter(
            PREFIX + "malformed_frames",
            "gRPC calls refused with INVALID_ARGUMENT because a frame was not a valid message, by method.",
            ["method"],
            registry=self.registry,
        )
        self.upstream_config_calls = Counter(
            PREFIX + "upstream_config_calls",
            "Configuration calls of upstream OpenShell supervisors answered (GetSandboxConfig, "
            "UpdateConfig, ReportPolicyStatus, GetSandboxProviderEnvironment, GetInferenceBundle: "
            "docs/upstream.md), by method; refused calls are not counted.",
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
        self.fenced_writes = Counter(
            PREFIX + "fenced_writes",
            "Writes of a session refused because a newer session claimed its sandbox (the owner "
            "epoch moved), by kind: events, heartbeats, command_result, delivery (a paused or cut-off "
            "owner writing after its session moved: worth an alert), and disconnect_superseded (an old "
            "session's disconnection after its supervisor reconnected elsewhere: routine in a rollout).",
            ["kind"],
            registry=self.registry,
        )
        self.supervisor_auth_refusals = Counter(
            PREFIX + "supervisor_auth_refusals",
            "Supervisor calls refused for their credential, by reason (gateway.auth.Refusal).",
            ["reason"],
            registry=self.registry,
        )
        self.sandbox_tokens_minted = Counter(
            PREFIX + "sandbox_tokens_minted",
            "Sandbox tokens minted over gRPC (RefreshSandboxToken renewals, IssueSandboxToken exchanges).",
            registry=self.registry,
        )
        self.api_auth_failures = Counter(
            PREFIX + "api_auth_failures",
            "HTTP API requests refused for their bearer token (401, or 503 when the issuer could not be "
            "asked), or for a token with no OpenShell role (403, no_role), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.api_denials = Counter(
            PREFIX + "api_denials",
            "HTTP API requests refused (403) because the caller's role is too low for the action, by role "
            "and action.",
            ["role", "action"],
            registry=self.registry,
        )
        self.replicas_alive = Gauge(
            PREFIX + "replicas_alive",
            "Gateway replicas whose lease (the replicas table) is alive, counted with the sandboxes "
            "gauge; NaN while that count fails.",
            registry=self.registry,
        )
        # Drain, admission, rebalancing and adaptive heartbeats (issue 22; docs/operations.md).
        self.draining = Gauge(
            PREFIX + "draining",
            "1 from SIGTERM on: this replica refuses hellos and moves its sessions away.",
            registry=self.registry,
        )
        self.reconnect_hints = Counter(
            PREFIX + "reconnect_hints",
            "Sessions asked to reconnect elsewhere, by reason: drain, shutdown (left at the drain's end), "
            "rebalance, max_age.",
            ["reason"],
            registry=self.registry,
        )
        self.admission_refusals = Counter(
            PREFIX + "admission_refusals",
            "Hellos refused by admission control (SessionRejected OVERLOADED with a retry hint) before any "
            "work, by reason: draining, max_sessions, rate, concurrency, over_share.",
            ["reason"],
            registry=self.registry,
        )
        self.handshakes_inflight = Gauge(
            PREFIX + "handshakes_inflight",
            "Hellos admitted and not yet answered (their database work in progress).",
            registry=self.registry,
        )
        self.handshake_seconds = Histogram(
            PREFIX + "handshake_seconds",
            "Time from an admitted hello to its SessionAccepted.",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.fleet_sessions = Gauge(
            PREFIX + "fleet_sessions",
            "Sessions held by all live replicas, from their lease rows (this replica's counted live).",
            registry=self.registry,
        )
        self.fair_share = Gauge(
            PREFIX + "fair_share",
            "The fleet's sessions over the replicas taking sessions (alive, not draining).",
            registry=self.registry,
        )
        self.rebalance_excess = Gauge(
            PREFIX + "rebalance_excess",
            "Sessions this replica holds above its fair share x (1 + rebalance.tolerance): being moved.",
            registry=self.registry,
        )
        self.heartbeat_interval = Gauge(
            PREFIX + "heartbeat_interval_seconds",
            "The heartbeat interval this replica hands out now (adaptive: sessions.max_heartbeats_per_s).",
            registry=self.registry,
        )
        self.session_updates = Counter(
            PREFIX + "session_updates",
            "SessionUpdate messages written to live sessions (a new heartbeat interval).",
            registry=self.registry,
        )
        self.heartbeat_rows_written = Counter(
            PREFIX + "heartbeat_rows_written",
            "Sandbox rows whose heartbeat time a committed flush wrote: only those whose written time "
            "would otherwise go stale for a reader, not one per heartbeat (gateway/sessions.py).",
            registry=self.registry,
        )
        self.replica = Info(
            PREFIX + "replica", "This gateway replica's id (ha.replica_id).", registry=self.registry
        )
        #: Reads the replicas' leases for the count (``use_leases``); None: no lease rule.
        self._leases: Callable[[], Awaitable[ReplicaLeases]] | None = None
        self.sandboxes_counted = Gauge(
            PREFIX + "sandboxes_counted_timestamp_seconds",
            "When the sandboxes gauge was last counted (Unix time); its series are left out while a "
            "count fails.",
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self._counting: asyncio.Task[None] | None = None
        self._counted_at: float | None = None
        self._count_errors = RateLimitedLog(log, concern="sandbox-count")

    def use_leases(self, replica_id: str, leases: Callable[[], Awaitable[ReplicaLeases]]) -> None:
        """Count sandboxes with the owners' leases (as the API shows them), and the replicas alive;
        name this replica."""
        self._leases = leases
        self.replica.info({"replica": replica_id})

    async def count_sandboxes(self, store: SandboxStore, *, now: datetime, liveness: Liveness) -> None:
        """Make the ``sandboxes`` gauge at most ``SANDBOX_COUNT_TTL_S`` old, called by each scrape.

        The count runs in a task this object owns (one at a time, whatever the scrape rate), reads
        only the columns the rule needs, and is bounded by ``SANDBOX_COUNT_TIMEOUT_S``; the scrape
        waits for it at most ``SANDBOX_COUNT_WAIT_S`` and otherwise serves the last counts. A
        count that fails drops the series (no stale counts shown as current); the
        ``sandboxes_counted`` timestamp says when they were last counted.

        Every replica counts the whole table; with HA (issue 20) only the leader should export it.
        """
        loop = asyncio.get_running_loop()
        fresh = self._counted_at is not None and loop.time() - self._counted_at < SANDBOX_COUNT_TTL_S
        if fresh:
            return
        if self._counting is None or self._counting.done():
            self._counting = asyncio.create_task(
                self._count(store, now=now, liveness=liveness), name="count-sandboxes"
            )
        # shield: a scrape that gives up (or whose client leaves) does not cancel the count.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._counting), SANDBOX_COUNT_WAIT_S)

    async def _count(self, store: SandboxStore, *, now: datetime, liveness: Liveness) -> None:
        try:
            async with asyncio.timeout(SANDBOX_COUNT_TIMEOUT_S):
                rows = await store.liveness()
                leases = await self._leases() if self._leases is not None else None
        except (StoreError, TimeoutError) as exc:
            self.sandboxes.clear()
            self.replicas_alive.set(float("nan"))
            self._count_errors.log(
                logging.WARNING,
                ("count-sandboxes",),
                f"cannot count sandboxes for /metrics (the series is left out until a count works): "
                f"{exc or 'timed out'}",
            )
            return
        counts = Tally(sandbox_state(row, now=now, liveness=liveness, leases=leases) for row in rows)
        if leases is not None:
            self.replicas_alive.set(leases.alive_count(now=now))
        for state in SandboxState:
            self.sandboxes.labels(state.value).set(counts[state])
        self._counted_at = asyncio.get_running_loop().time()
        self.sandboxes_counted.set_to_current_time()

    async def close(self) -> None:
        """Cancel a count still running (the gateway stops), waiting for it at most
        ``COUNT_CANCEL_WAIT_S``: a count stuck on a hung database may take its time to notice
        (SQLAlchemy finishes a connection's cleanup before it lets a cancellation through), and
        the shutdown has one deadline for all its phases."""
        if self._counting is not None:
            counting, self._counting = self._counting, None
            counting.cancel()
            await asyncio.wait({counting}, timeout=COUNT_CANCEL_WAIT_S)
            if counting.done() and not counting.cancelled():
                counting.exception()  # retrieved: the count logs its own failures
        self._count_errors.close()
