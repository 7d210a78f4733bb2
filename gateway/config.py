"""The gateway's one typed configuration model (the unified gateway config file).

Loaded flags > environment (``OPENSHELL_GATEWAY_<SECTION>__<KEY>``) > YAML file > defaults by
:func:`openshell_wire.configfile.load_settings` and validated at start; ``openshell-gateway
config check FILE`` reports every problem with its key path and ``config schema`` prints the
JSON Schema. Later sections (HA, auth, Kubernetes driver) join this same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    shutdown_grace_s: float = Field(5.0, ge=0, description="Time given to open calls on shutdown.")
    tls: GrpcTlsSettings = Field(default_factory=GrpcTlsSettings)


class HttpSettings(_Section):
    listen: str = Field("127.0.0.1:7080", description="host:port of the HTTP JSON API.")


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


class DriverSettings(_Section):
    local: LocalDriverSettings = Field(default_factory=LocalDriverSettings)


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
