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

Issue 23 adds what the supervisors' records say, counted as they are stored (``observe_records``,
told by :class:`gateway.store.events.EventStore` after each commit, for the records above the
session's acknowledged mark only, so a replayed batch is not counted twice): gaps by reason and
the records they lost, lifecycle records by kind, main-process restarts; the health of the
sandboxes whose sessions this replica holds (the newest health record of each one's current
session, counted at scrape time over the live sessions: no database read) with their OOM kills;
heartbeats answered, reconnections, the resume backlog, bytes of stored batches; every database
statement's latency and every database error (:func:`gateway.store.db.observe_statements`, one
hook for the whole process); and whether this replica leads (:func:`note_leader`). No label
names a sandbox: every label takes a handful of values. docs/metrics.md lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.ratelimit import RateLimitedLog
from gateway.sandbox_state import Liveness, ReplicaLeases, SandboxState, sandbox_state
from gateway.sessions import SessionRegistry
from gateway.store import SandboxStore, StoreError
from gateway.store.db import observe_statements
from openshell_wire import __version__
from openshell_wire.logsetup import vanished_peers
from openshell_wire.records import (
    GapRecord,
    HealthRecord,
    HealthState,
    LifecycleKind,
    LifecycleRecord,
    Payload,
)
from openshell_wire.v1 import openshell_pb2 as pb

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
# Records a supervisor held when it resumed: none to a day offline at thousands of lines/s.
BACKLOG_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
#: The statement label: the first keyword of the SQL, one of these (else "other").
STATEMENT_KINDS = frozenset({"select", "insert", "update", "delete", "begin", "commit", "rollback"})
#: The labels of the labelled counters, exported at 0 (see GatewayMetrics); kept equal to their
#: owners' values by tests/unit/test_metrics_labels.py (those modules import this one).
REJECT_CODES = tuple(v.name for v in pb.RejectCode.DESCRIPTOR.values if v.name != "REJECT_CODE_UNSPECIFIED")
#: The supervisor service's methods: each may be answered UNAVAILABLE when the store fails.
STORE_METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["OpenShell"].methods)
ADMISSION_REFUSALS = ("draining", "max_sessions", "rate", "concurrency", "over_share")  # admission.Refusal
HINT_REASONS = ("drain", "shutdown", "rebalance", "max_age")  # drain.DRAIN/SHUTDOWN, rebalance.REASON_*
#: The error classes gateway.store.db's statement hook reports most (SQLAlchemy's wrapper of each
#: PEP 249 exception class a driver raises; TimeoutError for a statement timed out), exported at 0.
DB_ERROR_CLASSES = (
    "OperationalError",
    "IntegrityError",
    "InterfaceError",
    "ProgrammingError",
    "DataError",
    "InternalError",
    "DatabaseError",
    "TimeoutError",
)
#: A health state before a session's first health record.
HEALTH_UNKNOWN = "unknown"
#: The prefix of the STARTED record's detail that the supervisor's restart policy writes
#: (``supervisor.agent``: "restart 2/5 after exit code 1").
RESTART_DETAIL = "restart "

# Process-wide, as the database hook they are fed by is (one gateway per process in production;
# several gateways in one test process share them). Registered in each GatewayMetrics' registry.
_DB_SECONDS = Histogram(
    PREFIX + "db_statement_seconds",
    "Time of each database statement (SQLAlchemy's cursor execution, in this process), by its first "
    "SQL keyword; the event inserts on SQLite's own connection are timed by event_batch_store_seconds.",
    ["statement"],
    buckets=STORE_BUCKETS,
    registry=None,
)
_DB_ERRORS = Counter(
    PREFIX + "db_errors",
    "Database statements that failed (in this process), by SQLAlchemy's error class (OperationalError, "
    "IntegrityError, ...; TimeoutError for a statement timed out).",
    ["error"],
    registry=None,
)
# At 0 from the start, as the labelled counters of GatewayMetrics: the first error of a replica's
# life would otherwise create its series and go unseen by rate().
for _error_class in DB_ERROR_CLASSES:
    _DB_ERRORS.labels(_error_class)
#: Replica id -> whether its leader elector (gateway.leader) leads now; absent: no elector runs.
_LEADING: dict[str, bool] = {}


def _statement_done(statement: str, seconds: float) -> None:
    keyword = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
    _DB_SECONDS.labels(keyword if keyword in STATEMENT_KINDS else "other").observe(seconds)


def _statement_failed(error: str) -> None:
    _DB_ERRORS.labels(error).inc()


def note_leader(replica: str, leading: bool | None) -> None:
    """What :class:`gateway.leader.LeaderElector` tells of its replica: True while it leads, False
    while it campaigns, None once it stopped (the ``leader`` series is then left out)."""
    if leading is None:
        _LEADING.pop(replica, None)
    else:
        _LEADING[replica] = leading


class _LiveCollector(Collector):
    def __init__(self, sessions: SessionRegistry, owner: GatewayMetrics) -> None:
        self._sessions = sessions
        self._owner = owner

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
        yield from self._health()
        replica = self._owner.replica_id
        leading = _LEADING.get(replica) if replica is not None else None
        if leading is not None:
            yield GaugeMetricFamily(
                PREFIX + "leader",
                "1 while this replica holds the leader Lease and runs the cluster-wide work (the "
                "Kubernetes driver's pod watch), 0 while it campaigns; absent without an election.",
                value=float(leading),
            )

    def _health(self) -> Iterator[Metric]:
        """The live sessions here by their newest health record, and the OOM kills those count;
        entries of sessions that ended are dropped on the way."""
        states = Tally({state.value: 0 for state in HealthState})
        states[HEALTH_UNKNOWN] = 0
        oom_kills = 0
        reported = self._owner.health
        for session in self._sessions.sessions():
            seen = reported.get(session.sandbox_id)
            if seen is None or seen[0] != session.session_id:
                states[HEALTH_UNKNOWN] += 1
                continue
            states[seen[1]] += 1
            oom_kills += seen[2]
        for sandbox_id in [s for s, seen in reported.items() if not self._live(s, seen[0])]:
            del reported[sandbox_id]
        family = GaugeMetricFamily(
            PREFIX + "sandbox_health",
            "Sandboxes whose sessions this replica holds, by the state of their supervisor's newest "
            "health record in that session (unknown: none yet); sum over the replicas for the fleet.",
            labels=["state"],
        )
        for state, count in states.items():
            family.add_metric([state], count)
        yield family
        yield GaugeMetricFamily(
            PREFIX + "sandbox_oom_kills",
            "OOM kills in the sandboxes whose sessions this replica holds, as their newest health "
            "records count them (the cgroup's count since each sandbox started).",
            value=oom_kills,
        )

    def _live(self, sandbox_id: str, session_id: str) -> bool:
        session = self._sessions.get(sandbox_id)
        return session is not None and session.session_id == session_id


class GatewayMetrics:
    def __init__(self, sessions: SessionRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        #: This replica's id (``use_leases``); None until then.
        self.replica_id: str | None = None
        #: Sandbox id -> (session id, health state, OOM kills) of the newest health record stored
        #: for a session of this replica's (``observe_records``); pruned at each scrape.
        self.health: dict[str, tuple[str, str, int]] = {}
        self._sessions = sessions
        self.registry.register(_LiveCollector(sessions, self))
        self.registry.register(_DB_SECONDS)
        self.registry.register(_DB_ERRORS)
        observe_statements(done=_statement_done, failed=_statement_failed)
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
        self.sandboxes_not_exited = Gauge(
            PREFIX + "sandboxes_not_exited",
            "Sandboxes in any state but exited (the sandboxes gauge's sum without them), counted with it: "
            "those whose supervisors should hold sessions (the page alert OpenShellNoSupervisorSessions "
            "reads it). NaN before the first count and while a count fails.",
            registry=self.registry,
        )
        self.sandboxes_not_exited.set(float("nan"))
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
        # What the supervisors report (issue 23): counted as stored, see observe_records.
        self.heartbeats = Counter(
            PREFIX + "heartbeats",
            "Supervisor heartbeats answered (each one's round trip is measured by its supervisor: "
            "openshell_supervisor_heartbeat_rtt_seconds).",
            registry=self.registry,
        )
        self.reconnects = Counter(
            PREFIX + "session_reconnects",
            "Sessions accepted for a sandbox an earlier session had claimed (owner epoch above 1), on "
            "any replica: reconnections after a cut, a drain, a rebalance or a supervisor restart.",
            registry=self.registry,
        )
        self.resume_backlog = Histogram(
            PREFIX + "resume_backlog_records",
            "At each hello of a supervisor with a journal: the records it held that the gateway had not "
            "acknowledged (its journal's last sequence minus the stored high-water mark).",
            buckets=BACKLOG_BUCKETS,
            registry=self.registry,
        )
        self.event_bytes = Counter(
            PREFIX + "event_bytes_received",
            "Bytes (protobuf encoding) of the event batches stored and acknowledged, repeats included.",
            registry=self.registry,
        )
        self.gaps = Counter(
            PREFIX + "supervisor_gaps",
            "Gap records stored (records a supervisor lost and counted), by reason: overflow (its "
            "journal's byte bound), corrupt (a damaged journal segment), write_failed (disk full, I/O "
            "error), unspecified.",
            ["reason"],
            registry=self.registry,
        )
        self.gap_records = Counter(
            PREFIX + "supervisor_gap_dropped_records",
            "Records lost, as the stored gap records count them, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.lifecycle = Counter(
            PREFIX + "supervisor_lifecycle_records",
            "Lifecycle records stored, by kind: started, exited, start_failed, supervisor_started (a "
            "container's start or restart), offline_policy, reconnected.",
            ["kind"],
            registry=self.registry,
        )
        self.restarts = Counter(
            PREFIX + "main_process_restarts",
            "Main processes restarted by their supervisor's restart policy (STARTED records of a restart).",
            registry=self.registry,
        )
        self.health_changes = Counter(
            PREFIX + "supervisor_health_changes",
            "Health records of a change (a new state or a new OOM kill) stored, by the new state.",
            ["state"],
            registry=self.registry,
        )
        for reason in ("overflow", "corrupt", "write_failed"):
            self.gaps.labels(reason)
            self.gap_records.labels(reason)
        # Every known label of the labelled counters exported at 0 from the start: a series that
        # appears only with its first increment hides that increment from rate() and increase(),
        # so the first refusal, hint or restart of a replica's life would never show on a panel.
        for code in REJECT_CODES:
            self.sessions_rejected.labels(code)
        for method in STORE_METHODS:
            self.store_failures.labels(method)
        for reason in ADMISSION_REFUSALS:
            self.admission_refusals.labels(reason)
        for reason in HINT_REASONS:
            self.reconnect_hints.labels(reason)
        for lifecycle_kind in LifecycleKind:
            self.lifecycle.labels(lifecycle_kind.value)
        for state in HealthState:
            self.health_changes.labels(state.value)
        #: Reads the replicas' leases for the count (``use_leases``); None: no lease rule.
        self._leases: Callable[[], Awaitable[ReplicaLeases]] | None = None
        self.sandboxes_counted = Gauge(
            PREFIX + "sandboxes_counted_timestamp_seconds",
            "When the sandboxes gauge was last counted (Unix time); its series are left out while a "
            "count fails.",
            registry=self.registry,
        )
        # Log retention and OTLP log export (issue 23 point 3: gateway.retention, gateway.otlp_logs).
        self.retention_deleted = Counter(
            PREFIX + "retention_deleted_events",
            "Events deleted by retention on this replica, by kind (log, health, lifecycle, gap).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("log", "health", "lifecycle", "gap"):
            self.retention_deleted.labels(kind)
        self.retention_batch_seconds = Histogram(
            PREFIX + "retention_batch_seconds",
            "How long one retention batch's delete held the database (its transaction).",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.retention_run_seconds = Gauge(
            PREFIX + "retention_last_run_duration_seconds",
            "How long this replica's last retention run took, pauses included.",
            registry=self.registry,
        )
        self.retention_last_run = Gauge(
            PREFIX + "retention_last_run_timestamp_seconds",
            "When this replica's last retention run ended (Unix time).",
            registry=self.registry,
        )
        self.retained_events = Gauge(
            PREFIX + "retained_events",
            "Events in the table after the last retention run (all kinds): counted on SQLite and with "
            "retention.max_bytes set; otherwise PostgreSQL's planner estimate of the rows at the run's "
            "start (pg_class.reltuples scaled to the table's pages), less those the run deleted.",
            registry=self.registry,
        )
        self.retained_bytes = Gauge(
            PREFIX + "retained_log_bytes",
            "Size of the stored log and health rows as retention.max_bytes counts it, measured at the "
            "start of the last retention run (only with retention.max_bytes set).",
            registry=self.registry,
        )
        self.otlp_exported = Counter(
            PREFIX + "otlp_log_records_exported",
            "Stored events exported as OTLP log records (accepted by the receiver), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.otlp_failures = Counter(
            PREFIX + "otlp_log_export_failures",
            "Failed OTLP log export requests (each retried, with backoff, from the same cursor).",
            registry=self.registry,
        )
        self.otlp_lag = Gauge(
            PREFIX + "otlp_log_export_lag_events",
            "Events stored but not yet exported (newest event id minus the export cursor), on the "
            "exporting replica; 0 elsewhere.",
            registry=self.registry,
        )
        self.otlp_exporting = Gauge(
            PREFIX + "otlp_log_exporter",
            "1 while this replica holds the OTLP log export (one replica at a time), else 0.",
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
        self.replica_id = replica_id
        self.replica.info({"replica": replica_id})

    def session_accepted(self, *, owner_epoch: int, journal_last: int, resume_after: int) -> None:
        """A hello answered SessionAccepted: a reconnection when its sandbox was claimed before;
        the backlog when the supervisor has a journal (an upstream supervisor sends no sequence)."""
        self.sessions_accepted.inc()
        if owner_epoch > 1:
            self.reconnects.inc()
        if journal_last > 0:
            self.resume_backlog.observe(max(0, journal_last - resume_after))

    def observe_records(self, sandbox_id: str, records: Sequence[Payload]) -> None:
        """The gap, lifecycle and health records of one batch, newly stored (above the session's
        mark), told by the event store after the commit."""
        for record in records:
            if isinstance(record, GapRecord):
                self.gaps.labels(record.reason.value).inc()
                self.gap_records.labels(record.reason.value).inc(record.dropped_records)
            elif isinstance(record, LifecycleRecord):
                self.lifecycle.labels(record.kind.value).inc()
                if record.kind is LifecycleKind.STARTED and record.detail.startswith(RESTART_DETAIL):
                    self.restarts.inc()
            elif isinstance(record, HealthRecord):
                if record.change:
                    self.health_changes.labels(record.state.value).inc()
                session = self._sessions.get(sandbox_id)
                if session is not None:
                    self.health[sandbox_id] = (session.session_id, record.state.value, record.oom_kills)

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
            self.sandboxes_not_exited.set(float("nan"))
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
        self.sandboxes_not_exited.set(sum(counts.values()) - counts[SandboxState.EXITED])
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
