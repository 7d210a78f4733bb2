"""The gateway's one typed configuration model (the unified gateway config file).

Loaded flags > environment (``OPENSHELL_GATEWAY_<SECTION>__<KEY>``) > YAML file > defaults by
:func:`openshell_wire.configfile.load_settings` and validated at start; ``openshell-gateway
config check FILE`` reports every problem with its key path and ``config schema`` prints the
JSON Schema. Later sections (HA, auth, Kubernetes driver) join this same model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from openshell_wire.configfile import LayeredSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrpcTlsSettings(_Section):
    cert_file: Path | None = Field(
        None,
        description="PEM certificate chain the gRPC endpoint presents. Set with key_file to serve TLS; "
        "unset: plaintext gRPC.",
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle for client certificates. Set: every supervisor must present a "
        "certificate signed by it (mTLS).",
    )

    @model_validator(mode="after")
    def _pairs(self) -> GrpcTlsSettings:
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
    max_unrequested_time_s: float = Field(30.0, gt=0, description="How long a call may wait in that queue.")
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
        "that is sending; keep it under supervisors' stale bound (session.stale_after_intervals x "
        "sessions.heartbeat_interval_s, 30 s by default: the session's heartbeats are answered after a "
        "batch's store ends).",
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Time given to open calls on shutdown.")
    tls: GrpcTlsSettings = Field(default_factory=GrpcTlsSettings)


class HttpSettings(_Section):
    listen: str = Field("127.0.0.1:7080", description="host:port of the HTTP JSON API.")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body the HTTP API reads; a larger one is refused with 413.",
    )


class DatabaseSettings(_Section):
    url: str = Field(
        "sqlite+aiosqlite:///var/openshell/gateway.db",
        description="SQLAlchemy async URL. The embedded default is SQLite; PostgreSQL: "
        "postgresql+asyncpg://user:pass@host/db.",
    )
    migrate_on_start: bool = Field(True, description="Run the schema migrations when the gateway starts.")


class SessionSettings(_Section):
    heartbeat_interval_s: float = Field(10.0, ge=0.1, description="Heartbeat interval handed to supervisors.")
    grace_s: float = Field(
        20.0, gt=0, description="A session is stale after heartbeat_interval_s + grace_s without a message."
    )
    lost_after_s: float = Field(
        300.0, gt=0, description="A sandbox disconnected longer than this is shown as lost."
    )
    register_unknown: bool = Field(
        True, description="Accept supervisors of sandboxes this gateway did not create (and register them)."
    )
    heartbeat_flush_interval_s: float = Field(
        5.0, gt=0, description="Last-heartbeat times are written to the database in batches this often."
    )


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
    injection: Literal["image-volume", "init-container"] = Field(
        "image-volume",
        description="image-volume: mount the image read-only (Kubernetes ImageVolume, on by default from "
        "1.35); init-container: an init container copies the supervisor's tree into an emptyDir (older "
        "clusters).",
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
    init_resources: ResourceSettings = Field(
        default_factory=lambda: ResourceSettings(requests={"cpu": "50m", "memory": "64Mi"}, limits={}),
        description="Resources of the init container (init-container injection only).",
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
    run_as_user: int = Field(65534, ge=1, description="UID of the sandbox container (never 0: runAsNonRoot).")
    run_as_group: int = Field(65534, ge=0, description="GID of the sandbox container.")
    fs_group: int | None = Field(65534, ge=0, description="fsGroup of sandbox pods (owner of the emptyDirs).")
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


class GatewayConfig(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPENSHELL_GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    drivers: DriverSettings = Field(default_factory=DriverSettings)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )

    @model_validator(mode="after")
    def _listen_addresses_differ(self) -> GatewayConfig:
        if self.grpc.listen == self.http.listen and not self.grpc.listen.endswith(":0"):
            raise ValueError(f"grpc.listen and http.listen are both {self.grpc.listen}")
        return self
