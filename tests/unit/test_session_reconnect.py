"""The session's reconnect rules against a real in-process gRPC server: the gateway's retry pushback
is honoured, and the exit-delivery settings (with their deprecated name) load as documented."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from openshell_wire.configfile import ConfigError, load_settings
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from supervisor.agent import journal_options
from supervisor.config import SupervisorConfig
from supervisor.journal import Journal
from supervisor.session import PUSHBACK_KEY, Session


def _config(tmp_path: Path, address: str = "127.0.0.1:1", **session: object) -> SupervisorConfig:
    return load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": "pushback",
            "gateway": {"address": address, "connect_timeout_s": 2},
            "journal": {"directory": str(tmp_path / "journal")},
            "session": session,
        },
    )


def test_exit_delivery_window_and_its_deprecated_name(tmp_path: Path) -> None:
    assert _config(tmp_path).session.exit_delivery_s == 60.0
    old = _config(tmp_path, exit_flush_timeout_s=7).session
    assert old.exit_delivery_s == 7 and old.exit_flush_timeout_s == 7
    new = _config(tmp_path, exit_delivery_s=9).session
    assert new.exit_delivery_s == 9 and new.exit_flush_timeout_s == 9  # old readers see the window
    assert _config(tmp_path, exit_delivery_s=9, exit_flush_timeout_s=9).session.exit_delivery_s == 9
    with pytest.raises(ConfigError, match="exit_delivery_s only"):  # both in one layer
        _config(tmp_path, exit_delivery_s=9, exit_flush_timeout_s=8)
    with pytest.raises(ConfigError, match="keepalive_time_s"):
        _config(tmp_path, keepalive_time_s=5)  # the gateway would answer GOAWAY too_many_pings


class _StoreDown(pb_grpc.OpenShellServicer):
    """A gateway whose store fails: every session ends UNAVAILABLE with a retry pushback."""

    def __init__(self, pushback_ms: str) -> None:
        self.pushback_ms = pushback_ms
        self.attempts: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.attempts.append(time.monotonic())
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "store unavailable",
            trailing_metadata=((PUSHBACK_KEY, self.pushback_ms),),
        )
        yield pb.GatewayMessage()  # unreachable: makes this an async generator, as the method streams


async def _attempts_against(tmp_path: Path, pushback_ms: str, *, seconds: float) -> list[float]:
    servicer = _StoreDown(pushback_ms)
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = _config(tmp_path, f"127.0.0.1:{port}", reconnect_initial_s=0.01, reconnect_max_s=0.05)
    journal = Journal.open(journal_options(config))
    session = Session(config=config, journal=journal, instance_id="i")
    task = asyncio.create_task(session.run())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
        journal.close()
    return servicer.attempts


async def test_a_retry_pushback_is_honoured(tmp_path: Path) -> None:
    attempts = await _attempts_against(tmp_path, "1000", seconds=2.5)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # At least the pushback between attempts (not the 50 ms backoff cap), spread upwards by jitter.
    assert 2 <= len(attempts) <= 3, attempts
    assert all(gap >= 1.0 for gap in gaps), gaps


async def test_a_malformed_pushback_is_ignored(tmp_path: Path) -> None:
    attempts = await _attempts_against(tmp_path, "soon", seconds=0.5)
    assert len(attempts) >= 4  # the ordinary short backoff
