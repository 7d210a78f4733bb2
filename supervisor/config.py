"""The supervisor's one typed configuration model.

Loaded flags > environment (``OPENSHELL_SUPERVISOR_<SECTION>__<KEY>``) > YAML file > defaults by
:func:`openshell_wire.configfile.load_settings`, and validated before anything starts: a wrong
type or an unknown key stops the supervisor with every problem listed by key path.
``openshell-supervisor config schema`` prints the JSON Schema of this model and
``docs/configuration.md`` documents it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from openshell_wire.configfile import LayeredSettings
from openshell_wire.hostport import listen_address_problem
from openshell_wire.records import sandbox_id_problem
from supervisor.endpoint_settings import HttpSettings, ReadinessSettings
from supervisor.health import HealthSettings
from supervisor.telemetry import TelemetrySettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewaySettings(_Section):
    address: str = Field(
        "127.0.0.1:7070",
        description="host:port of the gateway's gRPC endpoint.",
        min_length=3,
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Time allowed for connect + hello + accept.")
    tls: bool = Field(
        False, description="Speak TLS to the gateway (verify it with ca_file or the system roots)."
    )
    ca_file: Path | None = Field(
        None,
        description="PEM CA bundle that verifies the gateway's certificate; unset: gRPC's default roots "
        "(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else its bundled roots). Needs tls. Re-read on every connection "
        "attempt.",
    )
    cert_file: Path | None = Field(
        None,
        description="PEM client certificate chain for mTLS (with key_file). Needs tls. Re-read on every "
        "connection attempt.",
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    server_name: str = Field(
        "",
        description="Name the gateway's certificate is verified against (and sent as SNI) instead of the "
        "host in address; empty: the host in address. Needs tls.",
    )
    credential_file: Path | None = Field(
        None,
        description="File holding a bearer token, sent as `authorization: Bearer <token>` on every call. "
        "Symlinks are followed; the file is re-read when it changes (a rotated Kubernetes projected token). "
        "Missing, unreadable or empty: the connection attempt fails and is retried.",
    )
    credential_refresh: bool = Field(
        True,
        description="When the credential is a gateway-minted sandbox token (a JWT with exp), renew it over "
        "the session with RefreshSandboxToken at about 80 % of its lifetime (with jitter, retried with "
        "backoff while time remains) and keep the renewed token in memory and in "
        "`<journal.directory>/credential` (0600), so a restarted supervisor still has it; each connection "
        "attempt uses the newest valid token (largest exp) of credential_file and the renewed one. A gateway "
        "answering UNIMPLEMENTED or FAILED_PRECONDITION stops the renewal of that token. false: never renew "
        "(a Kubernetes projected token, which the kubelet rotates).",
    )

    @model_validator(mode="after")
    def _tls_settings_hold_together(self) -> GatewaySettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both (mTLS) or neither")
        if not self.tls:
            stray = [
                name
                for name, value in (
                    ("ca_file", self.ca_file),
                    ("cert_file", self.cert_file),
                    ("key_file", self.key_file),
                    ("server_name", self.server_name),
                )
                if value
            ]
            if stray:
                raise ValueError(f"{', '.join(stray)} need tls: true")
        return self


class JournalSettings(_Section):
    directory: Path = Field(
        Path("/tmp/openshell/journal"),
        description="Writable directory for the on-disk journal (an emptyDir in a pod).",
    )
    segment_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, description="Roll to a new segment file past this size."
    )
    max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=16 * 1024,
        description="Byte bound of undelivered records; past it the oldest log records give way to a "
        "gap record that counts them. Lifecycle records are never dropped.",
    )
    fsync: Literal["always", "interval", "never"] = Field(
        "interval",
        description="always: fsync every record; interval: every fsync_interval_s; never: leave it to the OS",
    )
    fsync_interval_s: float = Field(0.2, gt=0, description="Period of fsync under the interval policy.")
    reserve_bytes: int = Field(
        256 * 1024,
        ge=0,
        description="Room kept allocated in a `reserve` file beside the segments and freed when the disk "
        "fills, so that the gap record counting the lines that could not be written, health changes and "
        "lifecycle records still get written (log lines are counted, not written, until it is allocated "
        "again). The journal takes up to max_bytes plus this. 0: no reserve (on a full disk those records "
        "wait for room like the rest).",
    )

    @model_validator(mode="after")
    def _bound_holds_segments(self) -> JournalSettings:
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("max_bytes must be at least twice segment_bytes")
        return self


class SessionSettings(_Section):
    heartbeat_jitter: float = Field(
        0.2, ge=0, lt=1, description="Each heartbeat is sent at interval x (1 +/- jitter x random)."
    )
    stale_after_intervals: float = Field(
        3.0, gt=1, description="The gateway is presumed gone after this many heartbeat intervals of silence."
    )
    reconnect_initial_s: float = Field(0.5, gt=0, description="First reconnect backoff (full jitter).")
    reconnect_max_s: float = Field(30.0, gt=0, description="Cap of the exponential reconnect backoff.")
    healthy_session_s: float = Field(
        10.0, ge=0, description="A session that lasted this long resets the backoff to its start."
    )
    batch_max_records: int = Field(
        4000,
        ge=1,
        description=(
            "Most events in one EventBatch. Large batches keep the per-batch costs (a gRPC message, "
            "a transaction, an ack) small per line under load; when little is pending a batch is small."
        ),
    )
    batch_max_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="Soft byte bound of one EventBatch (below the gateway's message limit).",
    )
    max_inflight_batches: int = Field(8, ge=1, description="Batches sent but not yet acknowledged.")
    keepalive_time_s: float = Field(
        20.0,
        ge=10,
        description="Send an HTTP/2 keepalive ping on an established gateway connection after this long "
        "without a frame from the gateway, so a connection whose peer no longer answers is closed also "
        "while the gateway's heartbeat interval is long (the TCP/TLS handshake is bounded by "
        "gateway.connect_timeout_s only; a gateway whose loop is stuck still answers pings, its "
        "heartbeats' stale bound catches that). At least 10 s: our gateway accepts pings that often (more "
        "often, it would end the connection with GOAWAY too_many_pings). Towards a gateway that lacked our "
        "capabilities in the last session (upstream, gRPC's default ping policy) at least 300 s.",
    )
    keepalive_timeout_s: float = Field(
        10.0, gt=0, description="A keepalive ping unanswered this long closes the connection."
    )
    exit_delivery_s: float = Field(
        60.0,
        ge=0,
        description="After the main process exits, keep delivering for this long until the gateway has "
        "acknowledged everything: reconnect at once, then with backoff capped at exit_reconnect_max_s. "
        "Past it the supervisor exits and the undelivered records stay in the journal directory (counted "
        "in its log). On Kubernetes keep the pod's terminationGracePeriodSeconds at least "
        "process.stop_grace_s + exit_delivery_s + 5 (the gateway's default, "
        "drivers.kubernetes.pod.termination_grace_period_s, is 75 = 10 + 60 + 5), so a pod deletion leaves "
        "the whole window before the SIGKILL. A SIGTERM after the main process exited cuts it short.",
    )
    exit_reconnect_max_s: float = Field(
        1.0,
        gt=0,
        description="Cap of the reconnect backoff while the exit is being delivered, so a heal is used "
        "within about this long (the gateway's retry-after still holds).",
    )
    exit_flush_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Deprecated: the old name of exit_delivery_s, still accepted with a warning. In each "
        "layer (flags, environment, file) it is read as exit_delivery_s, so the usual order decides "
        "between the two names (both in one layer must agree). Reads back as exit_delivery_s.",
    )

    @model_validator(mode="after")
    def _exit_window_alias(self) -> SessionSettings:
        # Loaded configuration has the old name renamed per layer already (SupervisorConfig's
        # deprecated_keys); this covers a SessionSettings built directly.
        given = self.model_fields_set
        if "exit_flush_timeout_s" in given:
            if "exit_delivery_s" in given and self.exit_delivery_s != self.exit_flush_timeout_s:
                raise ValueError(
                    "exit_flush_timeout_s is the deprecated name of exit_delivery_s: set exit_delivery_s only"
                )
            self.exit_delivery_s = self.exit_flush_timeout_s
        # Code written against the old name reads the window in force.
        self.exit_flush_timeout_s = self.exit_delivery_s
        return self


class CaptureSettings(_Section):
    max_line_bytes: int = Field(
        16 * 1024, ge=64, description="Longer lines are split into parts marked as continued, never cut off."
    )
    echo: bool = Field(
        True, description="Also copy the main process's output to the supervisor's own stdout/stderr."
    )


class ProcessSettings(_Section):
    stop_grace_s: float = Field(
        10.0,
        ge=0,
        description="Asked to stop (SIGTERM or SIGINT to the supervisor), the supervisor forwards the "
        "signal to the main process group, waits this long, then SIGKILLs the group (exit code 137, "
        "journaled as an exit by signal 9). On Kubernetes keep the pod's terminationGracePeriodSeconds "
        "at least this plus session.exit_delivery_s + 5.",
    )
    restart: Literal["never", "on-failure"] = Field(
        "never",
        description="never: the supervisor exits with the main process; on-failure: a non-zero exit "
        "(not one the supervisor caused by stopping) starts the main process again after a backoff. "
        "Every restart is journaled; the supervisor exits with the last run's code.",
    )
    restart_limit: int = Field(
        5, ge=0, description="Most restarts under the on-failure policy; past it the last exit code stands."
    )
    restart_backoff_initial_s: float = Field(
        1.0, gt=0, description="First restart backoff (full jitter: a random wait up to this long)."
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, description="Cap of the exponential restart backoff (full jitter)."
    )


class OfflineSettings(_Section):
    policy: Literal["keep-running", "stop"] = Field(
        "keep-running",
        description="What to do once the gateway has been unreachable for grace_s: keep the main process "
        "running, or stop it (SIGTERM, then SIGKILL after process.stop_grace_s). Either way the decision is "
        "journaled and reaches the gateway when it is back.",
    )
    grace_s: float = Field(300.0, gt=0, description="How long without the gateway before the policy applies.")
    count_auth_refusals: bool = Field(
        False,
        description="Count the time in which the gateway refuses our credential (UNAUTHENTICATED or "
        "PERMISSION_DENIED) as time without the gateway. Off by default: a refusing gateway is there, the "
        "journal keeps everything, and stopping the sandbox does not renew its credential. Turn it on for a "
        "sandbox that must stop once it can no longer prove its identity to the gateway.",
    )


class SupervisorConfig(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPENSHELL_SUPERVISOR_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )
    deprecated_keys: ClassVar[Mapping[str, str]] = {
        "session.exit_flush_timeout_s": "session.exit_delivery_s",
    }

    sandbox_id: str = Field(
        ..., min_length=1, max_length=253, description="The sandbox this supervisor runs."
    )
    instance_id: str = Field(
        "",
        description="Boot id of this supervisor process; generated when empty. Set it only to a value that "
        "differs per process: a restarted supervisor counts its connection_epoch from 1 again, so with the "
        "same instance_id the gateway refuses its hellos (SUPERSEDED) until the previous process's session "
        "goes stale.",
    )
    command: list[str] = Field(
        default_factory=list, description="The main process: argv of the sandbox's agent."
    )
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    offline: OfflineSettings = Field(default_factory=OfflineSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    readiness: ReadinessSettings = Field(default_factory=ReadinessSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    process: ProcessSettings = Field(default_factory=ProcessSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged."
    )

    @field_validator("sandbox_id")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        problem = sandbox_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("http")
    @classmethod
    def _listen_address(cls, value: HttpSettings) -> HttpSettings:
        # Checked with the rest of the config, not when the endpoint binds (exit status 70 then,
        # after the journal was opened): aiohttp would bind port 99999 as 34463 without a word.
        problem = listen_address_problem(value.listen)
        if problem is not None:
            raise ValueError(f"http.listen {problem}")
        return value

    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )
