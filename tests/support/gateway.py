"""An in-process gateway for tests that talk to it over real gRPC and HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from openshell_wire.configfile import deep_merge, load_settings


def gateway_config(tmp_path: Path, overrides: Mapping[str, Any] | None = None) -> GatewayConfig:
    """Free ports, a SQLite file in ``tmp_path``, the environment ignored; ``overrides`` on top."""
    base = {
        "grpc": {"listen": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
        "ops": {"listen": "127.0.0.1:0"},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        # Most tests start supervisors of sandboxes they never created through the API, without
        # credentials: the tests of supervisor auth (test_supervisor_auth) turn it on.
        "sessions": {"register_unknown": True},
        "auth": {"supervisors": {"required": False}},
    }
    return load_settings(GatewayConfig, overrides=deep_merge(base, overrides or {}), use_env=False)
