"""The gateway's one typed configuration model (the unified gateway config file).

Loaded flags > environment (``OPENSHELL_GATEWAY_<SECTION>__<KEY>``) > YAML file > defaults by
:func:`openshell_wire.configfile.load_settings` and validated at start; ``openshell-gateway
config check FILE`` reports every problem with its key path and ``config schema`` prints the
JSON Schema. Later sections (HA, auth, Kubernetes driver) join this same model.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from openshell_wire.configfile import LayeredSettings
from openshell_wire.hostport import listen_address_problem


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _listen_address(address: str, *, host_required: bool = False) -> str:
    problem = listen_address_problem(address, host_required=host_required)
    if problem is not None:
        raise ValueError(problem)
    return address


class TlsSettings(_Section):
    """TLS of one listener (gRPC or HTTP). The files are read again when they change on disk (a
    renewed certificate is served to new connections without a restart)."""

    cert_file: Path | None = Field(
        None,
        description="PEM certificate chain the endpoint presents. Set with key_file to serve TLS; "
        "unset: plaintext.",
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle for client certificates. Set: every client must present a "
        "certificate signed by it (mTLS). A certificate proves only that the client holds one of the "
        "CA's certificates, never which sandbox or person it is: identity comes from the bearer token.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both (TLS) or neither (plaintext)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mTLS) needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class GrpcSettings(_Section):
    listen: str = Field("127.0.0.1:7070", description="host:port of the supervisor-facing gRPC endpoint.")
    max_receive_message_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, description="Larger messages are refused with RESOURCE_EXHAUSTED."
    )
    max_pending_requests: int = Field(
        100_000,
        ge=1,
        description="gRPC core's queue of calls not yet picked up (grpc.server.max_pending_requests). The "
        "default of 1,000 refuses streams at random during a reconnect storm.",
    )
    max_pending_requests_hard_limit: int = Field(
        100_000, ge=1, description="Above this many queued calls every new call is refused."
    )
    max_unrequested_time_s: float = Field(
        5.0,
        gt=0,
        description="How long a call may wait in that queue before gRPC core cancels it. A hello older than "
        "supervisors' gateway.connect_timeout_s (5 s) belongs to a supervisor that gave up: working on it "
        "is how a reconnect storm collapsed.",
    )
    hello_timeout_s: float = Field(10.0, gt=0, description="A stream must say hello within this time.")
    store_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Deadline of the database work a session waits on: its hello's reads and writes "
        "together, each event batch, each command result. Past it the supervisor is told "
        "SessionRejected OVERLOADED with a retry hint (an answer, so it does not count as offline); "
        "keep it well under supervisors' gateway.connect_timeout_s (5 s by default) and their stale "
        "bound (3 heartbeat intervals: heartbeats are answered after a batch's store ends). Event "
        "batches have their own deadline, batch_store_timeout_s.",
    )
    batch_store_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Deadline of storing one event batch; past it the session ends with SessionRejected "
        "OVERLOADED and a retry hint, and nothing of the batch is acknowledged. Longer than store_timeout_s "
        "so that a slow moment of a healthy database (a checkpoint, a vacuum) does not end every session "
        "that is sending. The session answers heartbeats while a batch is being stored, so it may exceed "
        "supervisors' stale bound (session.stale_after_intervals x sessions.heartbeat_interval_s, 30 s by "
        "default); a command result is still stored within store_timeout_s.",
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Time given to open calls on shutdown.")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        # gRPC core refuses an empty host (HTTP's listeners read it as every interface).
        return _listen_address(value, host_required=True)


#: The name the gRPC listener's TLS section had first.
GrpcTlsSettings = TlsSettings


class HttpSettings(_Section):
    listen: str = Field("127.0.0.1:7080", description="host:port of the HTTP JSON API.")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body the HTTP API reads; a larger one is refused with 413.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        return _listen_address(value)


class OpsSettings(_Section):
    listen: str = Field(
        "127.0.0.1:7090",
        description="host:port of the operations listener: /healthz, /readyz and /metrics, without "
        "authentication (probes and Prometheus), apart from the API so that auth covers the whole API.",
    )

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        return _listen_address(value)


#: The database each URL scheme names, and the one async driver the gateway speaks it through
#: (PostgreSQL's notifications and connection handling are asyncpg's: gateway.notify, gateway.store).
DATABASE_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def database_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as the gateway's database URL, or None: what the store would
    refuse when it opens the database, said before anything starts. Never shows the password."""
    example = "e.g. sqlite:///var/openshell/gateway.db or postgresql://user@host/db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        return (
            f"not a database URL ({example}; a SQLite path after sqlite:/// is relative, after "
            "sqlite://// absolute)"
        )
    shown = parsed.render_as_string(hide_password=True)
    dialect, _, driver = parsed.drivername.partition("+")
    if dialect == "postgres" and not driver:  # the old name, which the store reads as postgresql
        return None
    expected = DATABASE_DRIVERS.get(dialect)
    if expected is None:
        return f"{shown}: unsupported database {dialect!r}: expected sqlite or postgresql ({example})"
    if driver and driver != expected:
        return (
            f"{shown}: the gateway speaks to {dialect} through {expected} only, not {driver}: start "
            f"the URL with {dialect}:// (or {dialect}+{expected}://)"
        )
    return None


class DatabaseSettings(_Section):
    url: str = Field(
        "sqlite+aiosqlite:///var/openshell/gateway.db",
        description="SQLAlchemy async URL: sqlite or postgresql, with their async driver (aiosqlite, "
        "asyncpg) or none (it is added). The embedded default is SQLite; PostgreSQL: "
        "postgresql://user:pass@host/db.",
    )
    migrate_on_start: bool = Field(True, description="Run the schema migrations when the gateway starts.")
    pool_size: int = Field(
        10, ge=1, description="PostgreSQL: connections the pool keeps open (SQLite: one file, ignored)."
    )
    max_overflow: int = Field(
        10, ge=0, description="PostgreSQL: connections opened beyond pool_size under load, closed after."
    )
    pool_timeout_s: float = Field(
        10.0,
        gt=0,
        description="PostgreSQL: how long a query waits for a free connection of the pool, and how long a "
        "new connection is tried again (with backoff) while the server is unreachable (restart, failover).",
    )
    pool_recycle_s: float = Field(
        300.0,
        gt=0,
        description="PostgreSQL: a pooled connection older than this is replaced (after a failover, "
        "connections to the old primary do not linger).",
    )
    idle_in_transaction_timeout_s: float = Field(
        10.0,
        ge=0,
        description="PostgreSQL: the server ends a gateway transaction left idle this long (a replica "
        "frozen or cut off mid-transaction), releasing the sandbox rows it held: without it another "
        "replica could not claim or write those sandboxes until the frozen one woke. The gateway's own "
        "transactions are never idle for more than a moment. Set with SET on each new connection (a "
        "session-mode pooler passes it on); 0 sets nothing: then set it on the role instead (ALTER ROLE "
        "... SET idle_in_transaction_session_timeout), as behind a transaction-mode pooler.",
    )
    connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="PostgreSQL: the time to open one connection, given to each host of a multi-host URL "
        "in turn (?host=a:5432&host=b:5432&target_session_attrs=read-write): a host that does not answer "
        "costs this long before the next is tried.",
    )
    statement_timeout_s: float = Field(
        15.0,
        gt=0,
        description="PostgreSQL: the longest the gateway waits for the server's answer to one statement "
        "(its pool's ping included); past it the connection is dropped, not reused. A primary that froze "
        "or was cut off (its replica promoted) would otherwise hold each pooled connection, and the "
        "calls waiting on it, forever. Above grpc.batch_store_timeout_s. Migrations are not bounded.",
    )

    @field_validator("url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        problem = database_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class SessionSettings(_Section):
    heartbeat_interval_s: float = Field(10.0, ge=0.1, description="Heartbeat interval handed to supervisors.")
    grace_s: float = Field(
        20.0, gt=0, description="A session is stale after heartbeat_interval_s + grace_s without a message."
    )
    lost_after_s: float = Field(
        300.0, gt=0, description="A sandbox disconnected longer than this is shown as lost."
    )
    register_unknown: bool = Field(
        False,
        description="Accept supervisors of sandboxes this gateway did not create (and register them). Off "
        "by default: with it on, any holder of a valid credential for an unknown id creates a sandbox.",
    )
    heartbeat_flush_interval_s: float = Field(
        5.0, gt=0, description="Last-heartbeat times are written to the database in batches this often."
    )
    max_heartbeats_per_s: float = Field(
        1000.0,
        ge=0,
        description="Adaptive heartbeats (Nomad's rule): each replica hands out the interval "
        "clamp(its sessions / max_heartbeats_per_s, heartbeat_interval_s, max_heartbeat_interval_s), to new "
        "sessions and, through SessionUpdate, to live ones that speak the 'interval' capability, so the "
        "heartbeats one replica answers per second stay bounded as its fleet grows. 0: always "
        "heartbeat_interval_s.",
    )
    max_heartbeat_interval_s: float = Field(
        60.0,
        gt=0,
        description="The longest adaptive interval: it bounds how long a dead supervisor goes unnoticed "
        "(its stale bound, about 1.2 x this + grace_s: docs/capacity.md).",
    )
    interval_update_s: float = Field(
        10.0, gt=0, description="How often the adaptive interval is computed again (with hysteresis)."
    )

    @model_validator(mode="after")
    def _interval_bounds(self) -> SessionSettings:
        if self.max_heartbeats_per_s and self.max_heartbeat_interval_s < self.heartbeat_interval_s:
            raise ValueError(
                f"max_heartbeat_interval_s ({self.max_heartbeat_interval_s}) must be at least "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) while max_heartbeats_per_s is set"
            )
        return self


class AdmissionSettings(_Section):
    enabled: bool = Field(
        True,
        description="Bound the hellos a replica works on (off only to show the collapse in benchmarks). "
        "A hello over a bound is answered at once with SessionRejected OVERLOADED and a jittered "
        "retry_after_ms, before any signature check or database work: no queue forms in front of "
        "supervisors' 5 s connect timeout.",
    )
    max_concurrent_handshakes: int = Field(
        64, ge=1, description="Hellos doing database work at once on this replica."
    )
    hellos_per_s: float = Field(1000.0, gt=0, description="Hellos admitted per second on this replica.")
    hello_burst: int = Field(
        2000,
        ge=1,
        description="Hellos admitted at once above that rate (token bucket): two seconds' worth at the "
        "default rate, so that a burst a replica takes faster than hellos_per_s is not refused for the "
        "bucket's sake; lower it with the rate.",
    )
    max_sessions: int = Field(
        0,
        ge=0,
        description="Live sessions this replica holds at most (0: no bound). Size it under the process's "
        "file descriptor limit (one per session, plus the database's and the listeners').",
    )
    retry_after_min_ms: int = Field(1000, ge=0, description="Shortest retry_after_ms a refused hello gets.")
    retry_after_max_ms: int = Field(
        30000,
        ge=1,
        description="Longest retry_after_ms: refused hellos are spread up to the time the backlog needs "
        "at hellos_per_s, within these bounds.",
    )
    reconnect_window_max_ms: int = Field(
        30000,
        ge=0,
        description="Longest reconnect window handed to supervisors (SessionAccepted and each heartbeat "
        "answer's reconnect_window_ms: sessions held / hellos_per_s): a fleet that loses this replica at "
        "once spreads its reconnects over the time the replica needs to take them back. 0: none handed out.",
    )
    refuse_over_share: bool = Field(
        True,
        description="Refuse (OVERLOADED, retry within a second) a hello on a replica above its fair share "
        "while another replica takes sessions: it redials through the Service and lands elsewhere, "
        "instead of being moved later.",
    )

    @model_validator(mode="after")
    def _retry_bounds(self) -> AdmissionSettings:
        if self.retry_after_min_ms > self.retry_after_max_ms:
            raise ValueError(
                f"retry_after_min_ms ({self.retry_after_min_ms}) must be at most retry_after_max_ms "
                f"({self.retry_after_max_ms})"
            )
        return self


class DrainSettings(_Section):
    settle_s: float = Field(
        2.0,
        ge=0,
        description="After SIGTERM, how long the replica waits (unready, refusing hellos) before the first "
        "reconnect hint, so endpoints and balancers stop sending here: a hint sent earlier could bring "
        "the supervisor straight back.",
    )
    window_s: float = Field(
        30.0,
        ge=1,
        description="Reconnect hints are spread over this window; sessions left at its end get one "
        "spread over final_spread_s. Keep it >= sessions per replica / max_hints_per_s.",
    )
    max_hints_per_s: float = Field(
        200.0, gt=0, description="At most this many sessions are asked to reconnect per second."
    )
    min_hints_per_s: float = Field(
        20.0, gt=0, description="At least this many per second (few sessions leave quickly)."
    )
    hint_spread_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="A hinted supervisor reconnects within a random delay up to this (the hint's "
        "delay_window_ms); the gateway's pacing spreads the load, so it is short. At most 60 s: the "
        "supervisor caps the window there (and at its session.reconnect_max_s).",
    )
    final_spread_s: float = Field(
        5.0,
        ge=0,
        le=60,
        description="The spread given to sessions still here at the end of the window (at most 60 s, "
        "as hint_spread_s).",
    )

    @model_validator(mode="after")
    def _rates(self) -> DrainSettings:
        if self.min_hints_per_s > self.max_hints_per_s:
            raise ValueError(
                f"min_hints_per_s ({self.min_hints_per_s}) must be at most max_hints_per_s "
                f"({self.max_hints_per_s})"
            )
        return self


class RebalanceSettings(_Section):
    enabled: bool = Field(
        True,
        description="A replica holding more than its fair share (the fleet's sessions over the replicas "
        "taking sessions, from the lease rows) x (1 + tolerance) asks the excess to reconnect, at a "
        "bounded rate, never below fair share.",
    )
    interval_s: float = Field(
        5.0, gt=0, description="How often the shares are computed again (at least ha.renew_interval_s)."
    )
    tolerance: float = Field(
        0.05,
        ge=0,
        description="How far above fair share a replica may stay (a fraction of it). With n replicas "
        "taking sessions the least loaded holds at least fair x (1 - (n - 1) x tolerance): 0.05 keeps "
        "three replicas within 10 % of a third.",
    )
    max_moves_per_s: float = Field(50.0, gt=0, description="Sessions asked to move per second, per replica.")
    hint_spread_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="The spread of a moved supervisor's reconnect (at most 60 s, as drain.hint_spread_s).",
    )
    max_session_age_s: float = Field(
        0.0,
        ge=0,
        description="A safety net for balancers that pin connections: a session older than this (less a "
        "random part up to max_session_age_jitter of it) is asked to reconnect, while another replica "
        "takes sessions. 0: off.",
    )
    max_session_age_jitter: float = Field(
        0.2, ge=0, le=1, description="The random part of max_session_age_s (a fraction of it)."
    )


class CommandSettings(_Section):
    ttl_s: float = Field(
        300.0,
        gt=0,
        description="A command's time to live when its POST names none (expires_in_s): a command still "
        "unanswered by then ends expired and is never sent again.",
    )
    max_ttl_s: float = Field(
        86400.0, gt=0, description="The longest time to live a POST may ask for (expires_in_s)."
    )
    redeliver_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often a replica reads the pending commands of the sessions it owns from the table, "
        "for a notification missed (its listening connection broke) or an owner that changed.",
    )
    delivery_wait_s: float = Field(
        2.0,
        gt=0,
        description="How long a POST waits for the sandbox's live session to write the command to its "
        "stream before it answers delivered: false (the command stays pending and goes out with the "
        "sandbox's next session).",
    )

    @model_validator(mode="after")
    def _default_within_bound(self) -> CommandSettings:
        if self.ttl_s > self.max_ttl_s:
            raise ValueError(f"ttl_s ({self.ttl_s}) must be at most max_ttl_s ({self.max_ttl_s})")
        return self


class RetentionSettings(_Section):
    """How long the ``events`` table keeps what supervisors sent (docs/log-retention.md)."""

    enabled: bool = Field(
        True, description="Run the retention task on this replica (every replica may run it: see the docs)."
    )
    max_age_s: float | None = Field(
        7 * 86400.0,
        gt=0,
        description="Log lines and health records received longer ago than this are deleted; null: kept "
        "whatever their age. The newest record of each journal is always kept (it is the resume point).",
    )
    lifecycle_max_age_s: float | None = Field(
        None,
        gt=0,
        description="Lifecycle and gap records received longer ago than this are deleted; null: kept while "
        "the sandbox's row exists (they are few, decide its exit and tell lost lines from silence).",
    )
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Bound on the stored size of log lines and health records (message and data, plus 64 "
        "bytes a row), whole table: the oldest go first past it; null: no bound. Each run reads the size "
        "of what it keeps, so a bound of many GiB costs a scan of them every interval_s.",
    )
    interval_s: float = Field(300.0, gt=0, description="Time between two retention runs.")
    batch_size: int = Field(
        1000,
        ge=1,
        le=10000,
        description="Rows deleted per statement, each in its own short transaction: what bounds how long a "
        "writer can wait behind retention (SQLite's single write lock, PostgreSQL's row locks).",
    )
    pause_s: float = Field(
        0.05, ge=0, description="Pause between two deletion batches, so writers get the database in between."
    )


EventKind = Literal["log", "lifecycle", "gap", "health"]
_GRPC_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


class OtlpLogsSettings(_Section):
    """Export of stored events as OTLP logs (docs/otlp-logs.md)."""

    enabled: bool = Field(False, description="Export stored events to endpoint as OTLP/gRPC log records.")
    endpoint: str = Field(
        "http://127.0.0.1:4317",
        description="The OTLP/gRPC receiver (an OpenTelemetry collector): http://host:port or https://host:port.",
    )
    insecure: bool | None = Field(
        None,
        description="Plain gRPC without TLS; null: by the endpoint's scheme (http: plain, https: TLS).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra gRPC metadata sent with every export (e.g. an API key); names are lowercased "
        "(gRPC's are case-insensitive and sent lowercase).",
    )
    kinds: list[EventKind] = Field(
        default_factory=lambda: list[EventKind](["log", "lifecycle", "gap"]),
        description="Which kinds of stored events are exported (gap records should stay: they tell a "
        "receiver lost lines from silence).",
    )
    batch_size: int = Field(512, ge=1, le=10000, description="Records per export request (and per read).")
    max_pending_ids: int = Field(
        20000,
        ge=1,
        description="Most event ids skipped by the tail (not committed yet) looked for again; with "
        "batch_size, what bounds the exporter's memory. Past it the oldest are given up at once, with a "
        "warning.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Deadline of one export request (at most lease_s / 2).")
    poll_interval_s: float = Field(
        1.0, gt=0, description="How often the exporter looks for new events when it is caught up."
    )
    settle_s: float = Field(
        60.0,
        gt=0,
        description="How long an event id skipped by the tail (a transaction still open on PostgreSQL) is "
        "looked for again before it is taken for a rollback or a refused duplicate.",
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="One replica exports at a time: the holder of the export's row renews it; when it has "
        "not for this long another replica takes over from the stored position.",
    )
    max_backoff_s: float = Field(
        15.0, gt=0, description="Longest wait between two failed exports (at most lease_s / 2)."
    )
    service_name: str = Field(
        "openshell-gateway", description="The records' service.name resource attribute."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, value: str) -> str:
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise ValueError(f"{value!r} is not http://host:port or https://host:port")
        return value

    @field_validator("headers")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str]) -> dict[str, str]:
        # gRPC refuses a key with capitals at every export (INTERNAL, "Invalid metadata"), long
        # after the start: lowercase them here, and refuse what no case makes valid.
        out: dict[str, str] = {}
        given: dict[str, str] = {}
        for key, item in value.items():
            name = key.lower()
            if not _GRPC_METADATA_KEY.fullmatch(name) or name.startswith("grpc-"):
                raise ValueError(
                    f"header {key!r} is not a gRPC metadata key (letters, digits, '-', '_' and '.'; "
                    "not starting with 'grpc-')"
                )
            if name in given:
                raise ValueError(f"headers {given[name]!r} and {key!r} are the same gRPC metadata key")
            given[name], out[name] = key, item
        return out

    @model_validator(mode="after")
    def _renewed_within_lease(self) -> OtlpLogsSettings:
        for key in ("timeout_s", "poll_interval_s", "max_backoff_s"):
            if getattr(self, key) * 2 > self.lease_s:
                raise ValueError(
                    f"{key} ({getattr(self, key)}) must be at most half of lease_s ({self.lease_s}): the "
                    "exporter renews its lease between two waits of that length"
                )
        return self


class LocalDriverSettings(_Section):
    work_dir: Path = Field(
        Path("var/openshell/sandboxes"), description="Where local sandboxes keep their journal and files."
    )
    supervisor_command: list[str] = Field(
        default_factory=list,
        description="Command that starts a supervisor; empty: this Python's `-m supervisor`.",
    )


# A Kubernetes resource quantity ("500m", "1Gi", "2"), checked here so a typo fails at start.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")


def _check_quantities(resources: dict[str, str], where: str) -> dict[str, str]:
    for name, value in resources.items():
        if not _QUANTITY.match(str(value)):
            raise ValueError(f"{where}.{name}: {value!r} is not a Kubernetes quantity (e.g. 500m, 1Gi)")
    return resources


class ResourceSettings(_Section):
    requests: dict[str, str] = Field(
        default_factory=lambda: {"cpu": "100m", "memory": "256Mi"},
        description="Container resource requests (Kubernetes quantities).",
    )
    limits: dict[str, str] = Field(
        default_factory=lambda: {"memory": "2Gi"},
        description="Container resource limits (Kubernetes quantities).",
    )

    @model_validator(mode="after")
    def _quantities(self) -> ResourceSettings:
        _check_quantities(self.requests, "requests")
        _check_quantities(self.limits, "limits")
        return self


class SupervisorInjectionSettings(_Section):
    image: str = Field(
        "ghcr.io/openshell/openshell-supervisor:0.1.0",
        description="OCI image holding only the supervisor bundle (imagevolume/); pin a digest in "
        "production.",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the supervisor image."
    )
    injection: Literal["auto", "image-volume", "init-container"] = Field(
        "auto",
        description="image-volume: mount the image read-only (Kubernetes ImageVolume, on by default from "
        "1.35); init-container: an init container copies the supervisor's tree into an emptyDir (older "
        "clusters); auto: image-volume when the API server is 1.35 or newer and keeps a sandbox pod's "
        "image volume in a dry run at start, else init-container (gateway/drivers/injection.py; the "
        "choice is logged and shown on the ops listener's /status).",
    )
    tmp_size_limit: str = Field(
        "256Mi",
        description="sizeLimit of the sandbox's emptyDir at /tmp (the image's root stays read-only; the "
        "supervisor itself writes nothing there).",
    )
    journal_size_limit: str = Field(
        "512Mi",
        description="sizeLimit of the journal's emptyDir; keep above the journal's max_bytes plus its "
        "reserve_bytes and one segment_bytes (an unreadable segment set aside).",
    )
    settings: dict[str, str] = Field(
        default_factory=dict,
        description="Supervisor config values passed as `--set KEY=VALUE` (e.g. journal.max_bytes).",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port on which every sandbox's supervisor serves its own /metrics (and /healthz, "
        "/readyz, /status), declared as the container port named `metrics` for a PodMonitor (the "
        "chart's monitoring.podMonitor; the one-sandbox dashboard reads it). Null: off (the fleet's "
        "metrics are the gateway's). The sandbox's own process must not listen on it.",
    )
    init_resources: ResourceSettings = Field(
        default_factory=lambda: ResourceSettings(requests={"cpu": "50m", "memory": "64Mi"}, limits={}),
        description="Resources of the init container (init-container injection only).",
    )
    gateway_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle (a path in the gateway's pod) that signed the gateway's gRPC certificate, "
        "for supervisors to verify it: the driver publishes it as the ConfigMap openshell-gateway-ca (key "
        "ca.crt) in the sandbox namespace at start and whenever the file changes, and sandbox pods mount it "
        "read-only and speak TLS verified against it (gateway.tls, gateway.ca_file). The gateway's identity "
        "then needs configmaps create, and get/update/patch on that name, in the sandbox namespace "
        "(docs/rbac.md). Unset: supervisors use their settings' roots.",
    )

    @model_validator(mode="after")
    def _sizes(self) -> SupervisorInjectionSettings:
        _check_quantities({"tmp_size_limit": self.tmp_size_limit}, "supervisor")
        _check_quantities({"journal_size_limit": self.journal_size_limit}, "supervisor")
        return self


class SandboxPodSettings(_Section):
    default_image: str | None = Field(
        None, description="Sandbox image when a request names none; unset: every request must name one."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of sandbox images."
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of pull Secrets.")
    service_account_name: str | None = Field(
        None, description="ServiceAccount of sandbox pods; unset: the namespace's default."
    )
    automount_service_account_token: bool = Field(
        False, description="Mount a Kubernetes API token into sandboxes (agents rarely need one)."
    )
    runtime_class_name: str | None = Field(
        None, description="RuntimeClass of sandbox pods, e.g. kata or gvisor; unset: the node's default."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of sandbox pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of sandbox pods.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Tolerations of sandbox pods (Kubernetes objects, as in a pod spec).",
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict, description="Affinity of sandbox pods (a Kubernetes Affinity object)."
    )
    resources: ResourceSettings = Field(
        default_factory=ResourceSettings, description="Resources of the sandbox container."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on sandbox pods.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on sandbox pods."
    )
    # Unset in the config, an id is the platform's: 65534 on Kubernetes, the SCC's on OpenShift
    # (gateway/drivers/openshift.platform_pod_settings reads model_fields_set); null is never set.
    run_as_user: int | None = Field(
        65534,
        ge=1,
        description="UID of the sandbox container (never 0: runAsNonRoot). null: not set (the image's USER, "
        "or on OpenShift the UID its SCC assigns from the namespace's range). Not given: 65534, or on "
        "OpenShift (drivers.kubernetes.platform) left to the SCC.",
    )
    run_as_group: int | None = Field(
        65534,
        ge=0,
        description="GID of the sandbox container. null: not set (the image's group, or 0 on OpenShift). Not "
        "given: 65534, or on OpenShift left unset.",
    )
    fs_group: int | None = Field(
        65534,
        ge=0,
        description="fsGroup of sandbox pods (owner of the emptyDirs). null: none (on OpenShift its SCC "
        "assigns one from the namespace's range). Not given: 65534, or on OpenShift left to the SCC.",
    )
    read_only_root_filesystem: bool = Field(
        True, description="Mount the sandbox image read-only; /tmp and the journal are emptyDirs either way."
    )
    termination_grace_period_s: int = Field(
        75,
        ge=0,
        description="Kubernetes grace before SIGKILL (terminationGracePeriodSeconds). Keep it at least the "
        "supervisor's process.stop_grace_s + session.exit_delivery_s + 5 (10 + 60 + 5 by default): the main "
        "process gets its stop grace, then the supervisor its window to deliver the last records and the "
        "exit.",
    )


class RegistrySettings(_Section):
    resolve_commands: bool = Field(
        True,
        description="When a request names no command, read the image's ENTRYPOINT and CMD from its registry "
        "(with the pod's image_pull_secrets); off: every request must name its command.",
    )
    platform: str = Field(
        "linux/amd64",
        description="os/architecture[/variant] of the sandbox nodes: the image of a multi-platform index "
        "whose command is read.",
    )
    plain_http: list[str] = Field(
        default_factory=list,
        description="Registry hosts (host[:port]) spoken to over plain HTTP instead of HTTPS.",
    )
    allowed: list[str] = Field(
        default_factory=list,
        description="Registry hosts lookups may go to (globs such as *.example.com); empty: any. A request "
        "naming an image elsewhere is refused (the gateway would otherwise fetch from any host it is given).",
    )
    ca_file: Path | None = Field(
        None, description="PEM CA bundle for registries' certificates; unset: the system's."
    )
    timeout_s: float = Field(15.0, gt=0, description="Timeout of each registry request.")
    cache_ttl_s: float = Field(
        600.0,
        ge=0,
        description="How long a tag's command is reused (a digest's is kept); one lookup then serves every "
        "sandbox of that image.",
    )

    @model_validator(mode="after")
    def _platform_shape(self) -> RegistrySettings:
        if not re.fullmatch(r"[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_]+)?", self.platform):
            raise ValueError(f"platform {self.platform!r} is not os/architecture[/variant], e.g. linux/amd64")
        return self


class KubernetesDriverSettings(_Section):
    namespace: str = Field("openshell-sandboxes", description="Namespace the sandbox pods are created in.")
    kubeconfig: Path | None = Field(
        None,
        description="Kubeconfig file; unset: in-cluster credentials when running in a pod, else $KUBECONFIG "
        "or ~/.kube/config.",
    )
    context: str | None = Field(None, description="Kubeconfig context; unset: its current context.")
    gateway_address: str = Field(
        "",
        description="host:port supervisors dial (the gateway Service's gRPC port, e.g. "
        "openshell-gateway.openshell.svc:7070). Required with drivers.kind=kubernetes.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Timeout of each Kubernetes API request.")
    platform: Literal["auto", "kubernetes", "openshift"] = Field(
        "auto",
        description="openshift: sandbox pods leave the ids the config does not give (pod.run_as_user, "
        "run_as_group, fs_group) to the namespace's SecurityContextConstraints (restricted-v2), and the "
        "supervisor's injection (auto) takes the image volume only where a dry run proved the SCC admits it; "
        "kubernetes: neither; auto: openshift when the API server serves the security.openshift.io group, "
        "asked at start (gateway/drivers/openshift.py; docs/openshift.md).",
    )
    supervisor: SupervisorInjectionSettings = Field(default_factory=SupervisorInjectionSettings)
    pod: SandboxPodSettings = Field(default_factory=SandboxPodSettings)
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings,
        description="Registry lookups of images' commands, for requests that name none.",
    )


class DriverSettings(_Section):
    kind: Literal["local", "kubernetes"] = Field(
        "local", description="Where sandboxes run: local processes (development) or Kubernetes pods."
    )
    local: LocalDriverSettings = Field(default_factory=LocalDriverSettings)
    kubernetes: KubernetesDriverSettings = Field(default_factory=KubernetesDriverSettings)

    @model_validator(mode="after")
    def _kubernetes_needs_an_address(self) -> DriverSettings:
        if self.kind == "kubernetes" and not self.kubernetes.gateway_address:
            raise ValueError("kubernetes.gateway_address must be set when kind is kubernetes")
        return self


#: Audiences the Kubernetes API server accepts by default or commonly (kubeadm, kind, k3s, kwok):
#: never the sandbox pods' token audience.
KUBERNETES_API_AUDIENCES = (
    "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local",
    "kubernetes",
    "api",
)


class SupervisorAuthSettings(_Section):
    required: bool = Field(
        True,
        description="Every supervisor call must carry a credential bound to its sandbox (a gateway-minted "
        "sandbox token or, on Kubernetes, the pod's projected ServiceAccount token). Off: any peer that "
        "reaches the gRPC port can speak for any sandbox; for development only (logged at start).",
    )
    issuer: str = Field("openshell-gateway", description="iss of the sandbox tokens this gateway mints.")
    audience: str = Field("openshell-sandbox", description="aud of the sandbox tokens this gateway mints.")
    token_ttl_s: int = Field(
        3600,
        ge=60,
        le=7 * 86400,
        description="Lifetime of a minted sandbox token; the supervisor renews it over its session "
        "(RefreshSandboxToken) at about 80 % of it.",
    )
    key_rotation_s: int = Field(
        86400,
        ge=2,
        description="A new signing key is made this often (kept in the database, shared by every "
        "replica, no restart); an older key still verifies the tokens it signed until they expire, "
        "then it is deleted. Values under an hour are for tests.",
    )
    kubernetes_audience: str = Field(
        "openshell-gateway",
        min_length=1,
        description="Audience of the sandbox pods' projected ServiceAccount tokens (TokenReview checks it). "
        "Must not be one of the API server's own audiences (its --api-audiences): a pod token with one of "
        "those is a Kubernetes API credential. The well-known ones and kubernetes_api_audiences are refused.",
    )
    kubernetes_api_audiences: list[str] = Field(
        default_factory=list,
        description="More audiences of this cluster's API server (its --api-audiences, when it uses others "
        "than https://kubernetes.default.svc[.cluster.local], kubernetes and api, which are always refused) "
        "that kubernetes_audience must not be.",
    )
    kubernetes_token_expiry_s: int = Field(
        3600,
        ge=600,
        le=86400,
        description="expirationSeconds of the projected token in sandbox pods (the kubelet renews it at "
        "80 %, whatever the gateway's state).",
    )
    review_cache_s: float = Field(
        300.0,
        ge=0,
        description="A TokenReview answer is reused this long at most, and never past the token's expiry.",
    )

    @model_validator(mode="after")
    def _audience_is_not_the_api_servers(self) -> SupervisorAuthSettings:
        # An empty audience in a projected token means the API server's own: the pod would carry a
        # credential for the Kubernetes API (automountServiceAccountToken: false notwithstanding).
        refused = {*KUBERNETES_API_AUDIENCES, *self.kubernetes_api_audiences}
        if (
            self.kubernetes_audience.strip() != self.kubernetes_audience
            or self.kubernetes_audience in refused
        ):
            raise ValueError(
                f"auth.supervisors.kubernetes_audience {self.kubernetes_audience!r} is an audience of the "
                "Kubernetes API server (or has blanks around it): the sandbox pods' tokens would be "
                "Kubernetes API credentials; choose one of the gateway's own, e.g. openshell-gateway"
            )
        return self


class RoleBindings(_Section):
    admin: list[str] = Field(
        default_factory=lambda: ["openshell-admin"],
        description="Role, client role or group names (as found at role_claims) that make a caller admin.",
    )
    operator: list[str] = Field(
        default_factory=lambda: ["openshell-operator"], description="Names that make a caller operator."
    )
    viewer: list[str] = Field(
        default_factory=lambda: ["openshell-viewer"], description="Names that make a caller viewer."
    )


class OidcSettings(_Section):
    issuer_url: str = Field(
        "",
        description="OIDC issuer (e.g. https://keycloak.example.com/realms/openshell); its discovery "
        "document and JWKS are fetched from it. Unset: the HTTP API takes no tokens (see "
        "auth.allow_unauthenticated_api).",
    )
    audience: list[str] = Field(
        default_factory=lambda: ["openshell"], description="Accepted aud values (any one must be present)."
    )
    ca_file: Path | None = Field(None, description="PEM CA bundle for the issuer; unset: the system's.")
    leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on exp, nbf and iat (bounded)."
    )
    jwks_cache_s: float = Field(
        3600.0, gt=0, description="The issuer's keys are fetched again after this long."
    )
    jwks_min_refetch_s: float = Field(
        10.0,
        ge=0,
        description="A token with an unknown key id refetches the keys (rotation), at most this often.",
    )
    role_claims: list[str] = Field(
        default_factory=lambda: ["realm_access.roles", "resource_access.openshell.roles", "groups"],
        description="Dotted claim paths whose string values are matched against roles (Keycloak's realm "
        "roles, a client's roles, groups).",
    )
    roles: RoleBindings = Field(default_factory=RoleBindings)
    username_claim: str = Field("preferred_username", description="Claim naming the caller (else sub).")
    team_claim: str = Field(
        "groups",
        description="Claim holding the caller's groups (Keycloak group paths, e.g. /teams/a); those under "
        "team_prefix are the caller's teams. Non-admins see their own and their teams' sandboxes.",
    )
    team_prefix: str = Field(
        "/teams/",
        description="Only groups whose name starts with this are teams (role groups and a realm's default "
        "groups are not); names bound in roles never are. Empty: every group is a team.",
    )
    allowed_clients: list[str] = Field(
        default_factory=lambda: ["openshell-cli"],
        description="Clients (the token's azp) whose tokens the API accepts; add a UI's or a service "
        "account's client here. Empty: any client whose token carries the audience.",
    )
    allow_insecure_issuer: bool = Field(
        False,
        description="Accept an http:// issuer_url or jwks_uri on a non-loopback host (its keys can then be "
        "replaced by anyone on the path: tests only).",
    )
    cli_client_id: str = Field(
        "openshell-cli", description="Public client the CLI uses for the device flow (told to it by the API)."
    )

    def insecure_url(self, url: str) -> bool:
        """Whether fetching ``url`` would trust keys anyone on the path could replace: http:// (or
        anything but https://) to a host that is not loopback, unless allow_insecure_issuer."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme == "https" or self.allow_insecure_issuer:
            return False
        return not (parsed.scheme == "http" and is_loopback(f"{parsed.hostname or ''}:0"))

    @model_validator(mode="after")
    def _issuer_is_https(self) -> OidcSettings:
        if self.issuer_url and self.insecure_url(self.issuer_url):
            raise ValueError(
                f"auth.oidc.issuer_url {self.issuer_url} is not https (nor http to a loopback host): the "
                "issuer's keys decide who everybody is, so they are fetched over https only "
                "(auth.oidc.allow_insecure_issuer: true accepts it, for tests)"
            )
        return self


class AuthSettings(_Section):
    supervisors: SupervisorAuthSettings = Field(default_factory=SupervisorAuthSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    allow_unauthenticated_api: bool = Field(
        False,
        description="Serve the HTTP API without tokens (every caller is admin) on a non-loopback "
        "http.listen while oidc.issuer_url is unset. Without OIDC and without this, the API must listen "
        "on a loopback address.",
    )


class LeaderSettings(_Section):
    lease_name: str = Field(
        "openshell-gateway-leader",
        description="Kubernetes driver: the coordination.k8s.io/v1 Lease (in the gateway's namespace) whose "
        "holder alone watches pods and writes driver state.",
    )
    namespace: str = Field(
        "",
        description="The namespace of that Lease: the gateway's own (the chart sets its release namespace); "
        "empty: drivers.kubernetes.namespace.",
    )
    lease_duration_s: float = Field(
        15.0, gt=0, description="A leader that has not renewed the Lease for this long is replaced."
    )
    renew_deadline_s: float = Field(
        10.0,
        gt=0,
        description="A leader that could not renew within this time stops its cluster-wide work (before "
        "another may take over at lease_duration_s).",
    )
    retry_period_s: float = Field(2.0, gt=0, description="How often the Lease is renewed or tried.")

    @model_validator(mode="after")
    def _ordered(self) -> LeaderSettings:
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                f"need retry_period_s ({self.retry_period_s}) < renew_deadline_s ({self.renew_deadline_s}) "
                f"< lease_duration_s ({self.lease_duration_s}): a leader must stop before another may start"
            )
        return self


class HaSettings(_Section):
    replica_id: str = Field(
        "",
        description="This replica's stable id (the chart sets the pod name). Empty: the host name. Two live "
        "replicas must never share one: the id names the owner of sessions and the lease row.",
    )
    advertise_address: str = Field(
        "",
        description="host:port other replicas and operators see for this replica's gRPC endpoint (recorded "
        "in its lease row). Empty: grpc.listen.",
    )
    lease_s: float = Field(
        15.0,
        gt=0,
        description="A replica whose lease row was not renewed for this long is dead to the others: its "
        "sandboxes show disconnected, then lost after sessions.lost_after_s.",
    )
    renew_interval_s: float = Field(
        5.0, gt=0, description="How often a replica renews its lease row (well under lease_s)."
    )
    leader: LeaderSettings = Field(default_factory=LeaderSettings)

    @model_validator(mode="after")
    def _renew_within_lease(self) -> HaSettings:
        if self.renew_interval_s * 2 > self.lease_s:
            raise ValueError(
                f"renew_interval_s ({self.renew_interval_s}) must be at most half of lease_s "
                f"({self.lease_s}): one late renewal must not make a live replica look dead"
            )
        return self


class GatewayConfig(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPENSHELL_GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    ha: HaSettings = Field(default_factory=HaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    commands: CommandSettings = Field(default_factory=CommandSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    drain: DrainSettings = Field(default_factory=DrainSettings)
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    otlp_logs: OtlpLogsSettings = Field(default_factory=OtlpLogsSettings)
    drivers: DriverSettings = Field(default_factory=DriverSettings)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )

    @model_validator(mode="after")
    def _listen_addresses_differ(self) -> GatewayConfig:
        named = {
            "grpc.listen": self.grpc.listen,
            "http.listen": self.http.listen,
            "ops.listen": self.ops.listen,
        }
        seen: dict[str, str] = {}
        for key, address in named.items():
            if address in seen and not address.endswith(":0"):
                raise ValueError(f"{seen[address]} and {key} are both {address}")
            seen[address] = key
        return self

    @model_validator(mode="after")
    def _rebalance_after_renewals(self) -> GatewayConfig:
        if self.rebalance.enabled and self.rebalance.interval_s < self.ha.renew_interval_s:
            raise ValueError(
                f"rebalance.interval_s ({self.rebalance.interval_s}) must be at least ha.renew_interval_s "
                f"({self.ha.renew_interval_s}): the shares come from the lease rows, renewed that often"
            )
        return self

    @model_validator(mode="after")
    def _api_is_protected(self) -> GatewayConfig:
        if self.auth.oidc.issuer_url or self.auth.allow_unauthenticated_api:
            return self
        if not is_loopback(self.http.listen):
            raise ValueError(
                f"http.listen {self.http.listen} is reachable from the network but auth.oidc.issuer_url is "
                "unset: set OIDC, listen on a loopback address, or set auth.allow_unauthenticated_api: true "
                "(every caller is then admin)"
            )
        return self


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` listens on a loopback address only (``localhost``, 127.0.0.0/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
