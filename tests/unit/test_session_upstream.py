"""Issue 21, the supervisor's side: the hello's connection_epoch as upstream counts it, the upstream
log line's level names, and the offline policy's clock while the gateway refuses our credential,
each against a real in-process gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from openshell_wire.configfile import load_settings
from openshell_wire.convert import event_to_log_line
from openshell_wire.records import (
    Event,
    GapReason,
    GapRecord,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from supervisor.agent import Agent
from supervisor.config import SupervisorConfig


class _Gateway(pb_grpc.OpenShellServicer):
    """Records each hello's connection_epoch, then rejects it, or refuses it (UNAUTHENTICATED)."""

    def __init__(self, *, refuse: bool) -> None:
        self.refuse = refuse
        self.epochs: list[int] = []
        self.instance_ids: set[str] = set()

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid sandbox token")
        async for message in request_iterator:
            self.epochs.append(message.hello.connection_epoch)
            self.instance_ids.add(message.hello.instance_id)
            break
        rejected = pb.GatewayMessage()
        rejected.session_rejected.reason = "not now"
        yield rejected


def _config(tmp_path: Path, port: int, **offline: object) -> SupervisorConfig:
    return load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": "upstream-unit",
            "command": ["true"],
            "gateway": {"address": f"127.0.0.1:{port}", "connect_timeout_s": 2},
            "journal": {"directory": str(tmp_path / "journal")},
            "session": {"reconnect_initial_s": 0.01, "reconnect_max_s": 0.05},
            "offline": {"grace_s": 0.3, **offline},
            "http": {"enabled": False},
            "health": {"enabled": False},
        },
    )


@contextlib.asynccontextmanager
async def _agent_against(tmp_path: Path, gateway: _Gateway, **offline: object) -> AsyncIterator[Agent]:
    """An Agent whose session (and offline policy) runs against a real in-process gRPC server;
    the main process is not started."""
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    agent = Agent(_config(tmp_path, port, **offline))
    tasks = [asyncio.create_task(agent.session.run()), asyncio.create_task(agent._offline_policy())]
    try:
        yield agent
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(None)
        agent.journal.close()


async def _until(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_consecutive_attempts_send_connection_epochs_counted_from_one(tmp_path: Path) -> None:
    """Upstream's rule (its HA work): the process's connection attempt, from 1, one instance_id."""
    gateway = _Gateway(refuse=False)
    async with _agent_against(tmp_path, gateway):
        await _until(lambda: len(gateway.epochs) >= 3, within=10, what="three hellos")
    assert gateway.epochs[:3] == [1, 2, 3], gateway.epochs
    assert gateway.epochs == list(range(1, len(gateway.epochs) + 1))
    assert len(gateway.instance_ids) == 1


def _offline_policy_records(agent: Agent) -> list[LifecycleRecord]:
    return [
        e.payload
        for e in agent.journal.read_after(0, max_records=1000)
        if isinstance(e.payload, LifecycleRecord) and e.payload.kind is LifecycleKind.OFFLINE_POLICY
    ]


@pytest.mark.parametrize("count", [False, True], ids=["default", "count_auth_refusals"])
async def test_the_offline_clock_counts_refusals_only_when_told_to(tmp_path: Path, count: bool) -> None:
    """A refusing gateway is there: by default the offline policy does not fire however long it
    refuses; with offline.count_auth_refusals it fires after grace_s, as for an outage."""
    gateway = _Gateway(refuse=True)
    async with _agent_against(tmp_path, gateway, count_auth_refusals=count) as agent:
        status = agent.session.status
        await _until(lambda: status.auth_refusals >= 1, within=10, what="a refusal")
        assert status.offline_since is None and status.refused_since is not None, status
        assert status.auth_refusal_codes == {"UNAUTHENTICATED": status.auth_refusals}
        if count:
            await _until(lambda: bool(_offline_policy_records(agent)), within=10, what="the offline policy")
        else:
            await asyncio.sleep(1.5)  # five times grace_s
        records = _offline_policy_records(agent)
        assert len(records) == (1 if count else 0), records


def _event(payload: LogRecord | GapRecord | LifecycleRecord, sequence: int = 7) -> Event:
    return Event(sequence=sequence, timestamp_ms=1, payload=payload)


def test_upstream_log_lines_use_upstreams_level_names() -> None:
    """Upstream's supervisor sends tracing's names upper case; its CLI prints them as sent."""
    line = event_to_log_line("sb", _event(LogRecord(stream=LogStream.STDOUT, message="out")))
    assert (line.level, line.target, line.message) == ("INFO", "stdout", "out")
    line = event_to_log_line("sb", _event(LogRecord(stream=LogStream.STDERR, message="err")))
    assert (line.level, line.target) == ("ERROR", "stderr")
    line = event_to_log_line("sb", _event(LogRecord(stream=LogStream.OCSF, message="NET:OPEN [INFO] x")))
    assert (line.level, line.target) == ("OCSF", "ocsf")
    structured = LogRecord(
        stream=LogStream.SUPERVISOR,
        message="m",
        level="warn",
        target="app::net",
        fields=(("peer", "x"), ("sequence", "spoofed")),
    )
    line = event_to_log_line("sb", _event(structured, sequence=9))
    assert (line.level, line.target) == ("WARN", "app::net")
    assert dict(line.fields) == {"peer": "x", "sequence": "9"}
    gap = event_to_log_line("sb", _event(GapRecord(GapReason.OVERFLOW, 3, 30, 1, 3)))
    assert (gap.level, gap.target) == ("WARN", "openshell.supervisor.gap")
    started = event_to_log_line("sb", _event(LifecycleRecord(kind=LifecycleKind.STARTED, pid=3)))
    assert (started.level, started.target) == ("INFO", "openshell.supervisor.lifecycle")
