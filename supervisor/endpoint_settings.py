"""Settings of the supervisor's HTTP endpoints and readiness check.

They live apart from ``http`` and ``readiness`` so that the configuration model can hold them
without importing aiohttp and prometheus_client: a supervisor whose endpoints are off never loads
either (together some 15 MiB of memory).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False,
        description="Serve /healthz, /readyz, /metrics and /status. Off by default so that several "
        "supervisors on one host (the local driver) do not fight over a port; pod specs turn it on.",
    )
    listen: str = Field(
        "0.0.0.0:9469",
        description="host:port to listen on. The kubelet's probes and Prometheus reach the pod's IP, "
        "so a pod needs 0.0.0.0 (or its IP); port 0 picks a free port.",
        min_length=3,
    )
    healthz_stale_after_s: float = Field(
        10.0,
        gt=0,
        description="/healthz fails when the supervisor loop has not ticked for this long.",
    )


class ReadinessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "command", "tcp", "http"] = Field(
        "none",
        description="none: ready while the main process runs; command: `command` exits 0; tcp: a "
        "connection to `address` opens; http: a GET of `url` answers 2xx.",
    )
    command: list[str] = Field(
        default_factory=list, description="argv of the check for kind=command (no shell)."
    )
    address: str = Field("", description="host:port to connect to for kind=tcp.")
    url: str = Field("", description="URL to GET for kind=http, e.g. http://127.0.0.1:8080/ready.")
    period_s: float = Field(5.0, gt=0, description="Time between the end of one check and the next.")
    timeout_s: float = Field(2.0, gt=0, description="A check that takes longer fails (a command is killed).")
    initial_delay_s: float = Field(
        0.0, ge=0, description="Wait this long after the main process started before its first check."
    )

    @model_validator(mode="after")
    def _target_given(self) -> ReadinessSettings:
        if self.kind == "command" and not self.command:
            raise ValueError("kind=command needs `command`")
        if self.kind == "tcp":
            host, sep, port = self.address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("kind=tcp needs `address` as host:port")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError("kind=http needs `url` starting with http:// or https://")
        return self
