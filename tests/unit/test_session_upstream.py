"""Issue 21, the supervisor's side: the hello's connection_epoch as upstream counts it, the upstream
log line's level names, and the offline policy's clock while the gateway refuses our credential,
each against a real in-process gRPC server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from openshell_wire.configfile import load_settings
from openshell_wire.convert import describe, event_to_log_line
from openshell_wire.records import (
    ALL_CAPABILITIES,
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
from supervisor.session import UPSTREAM_MAX_LINES, UPSTREAM_MAX_REQUEST_BYTES, SessionEnded, upstream_requests


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


# -- against a gateway that accepts the session ---------------------------------------------------

#: What upstream's gateway decodes of one message (openshell-server src/multiplex.rs:200).
UPSTREAM_DECODE_LIMIT = 1_048_576


def _jwt(claims: dict[str, object]) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"


class _Accepting(pb_grpc.OpenShellServicer):
    """Accepts every session (events mode, or upstream mode: no capabilities), echoes heartbeats,
    acks event batches, keeps pushed log lines, and answers RefreshSandboxToken with a refusal or
    with an ``exp: 0`` token, as upstream's gateway mints them by default."""

    def __init__(self, *, events: bool, refresh: str) -> None:
        self.events = events
        self.refresh = refresh
        self.refresh_calls = 0
        self.pushed: list[pb.SandboxLogLine] = []
        self.sessions = 0

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        epoch = ""
        async for message in request_iterator:
            kind = message.WhichOneof("payload")
            reply = pb.GatewayMessage()
            if kind == "hello":
                epoch = message.hello.journal_epoch
                self.sessions += 1
                reply.session_accepted.session_id = f"s{self.sessions}"
                reply.session_accepted.heartbeat_interval_ms = 200
                if self.events:
                    reply.session_accepted.capabilities.extend(ALL_CAPABILITIES)
            elif kind == "heartbeat":
                reply.heartbeat.echo_unix_ms = message.heartbeat.sent_unix_ms
            elif kind == "events" and message.events.events:
                reply.event_ack.journal_epoch = epoch
                reply.event_ack.acked_through_sequence = message.events.events[-1].sequence
            else:
                continue
            yield reply

    async def PushSandboxLogs(
        self,
        request_iterator: AsyncIterator[pb.PushSandboxLogsRequest],
        context: aio.ServicerContext[object, object],
    ) -> pb.PushSandboxLogsResponse:
        async for request in request_iterator:
            self.pushed.extend(request.logs)
        return pb.PushSandboxLogsResponse()

    async def RefreshSandboxToken(
        self, request: pb.RefreshSandboxTokenRequest, context: aio.ServicerContext[object, object]
    ) -> pb.RefreshSandboxTokenResponse:
        self.refresh_calls += 1
        if self.refresh == "refuse":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "sandbox was re-created")
        return pb.RefreshSandboxTokenResponse(token=_jwt({"sub": "upstream-unit", "exp": 0}))


@contextlib.asynccontextmanager
async def _session_against(
    tmp_path: Path, gateway: _Accepting, *, token: str, settings: dict[str, object] | None = None
) -> AsyncIterator[Agent]:
    """An Agent (session and offline policy) with a bearer token file, against ``gateway`` served
    with upstream's 1 MiB receive limit; the main process is not started."""
    server = aio.server(options=[("grpc.max_receive_message_length", UPSTREAM_DECODE_LIMIT)])
    pb_grpc.add_OpenShellServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    (tmp_path / "token").write_text(token)
    overrides: dict[str, object] = {
        "sandbox_id": "upstream-unit",
        "command": ["true"],
        "gateway": {
            "address": f"127.0.0.1:{port}",
            "connect_timeout_s": 2,
            "credential_file": str(tmp_path / "token"),
            "credential_refresh": True,
        },
        "journal": {"directory": str(tmp_path / "journal")},
        "offline": {"grace_s": 0.3, "count_auth_refusals": True},
        "http": {"enabled": False},
        "health": {"enabled": False},
        **(settings or {}),
    }
    agent = Agent(load_settings(SupervisorConfig, overrides=overrides))
    tasks = [asyncio.create_task(agent.session.run()), asyncio.create_task(agent._offline_policy())]
    try:
        yield agent
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(None)
        agent.journal.close()


@pytest.mark.parametrize("events", [True, False], ids=["events mode", "upstream mode"])
async def test_a_refused_renewal_does_not_stop_a_connected_sandbox(tmp_path: Path, events: bool) -> None:
    """With offline.count_auth_refusals, a refused RefreshSandboxToken while the session is up and
    the token still valid for a minute starts no offline clock, in either mode (review s8 3)."""
    now = time.time()
    # Issued long ago, valid for a minute more: the renewal is due at once.
    token = _jwt({"sub": "upstream-unit", "iat": now - 1000, "exp": now + 60})
    gateway = _Accepting(events=events, refresh="refuse")
    async with _session_against(tmp_path, gateway, token=token) as agent:
        status = agent.session.status
        await _until(
            lambda: gateway.refresh_calls >= 1 and status.auth_refusals >= 1, within=10, what="a refusal"
        )
        # Still a health reason while it lasts (events mode: until the next session is accepted).
        assert status.auth_refusal_codes == {"UNAUTHENTICATED": 1}
        await asyncio.sleep(1.5)  # five times grace_s
        assert status.state == "connected" and status.sessions == 1, status
        assert status.refused_since is None, status
        assert _offline_policy_records(agent) == []


async def test_an_exp_0_token_is_not_renewed_and_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream's gateway mints ``exp: 0`` ("never expires"): no renewal, no warning, no error
    (handcheck 2.2: it was read as 1970, renewed at once and an ERROR logged every session)."""
    gateway = _Accepting(events=False, refresh="exp0")
    token = _jwt({"sub": "upstream-unit", "iat": time.time() - 10, "exp": 0})
    with caplog.at_level(logging.WARNING, logger="supervisor"):
        async with _session_against(tmp_path, gateway, token=token) as agent:
            await _until(lambda: agent.session.status.sessions >= 1, within=10, what="a session")
            await asyncio.sleep(1.0)
            assert agent.session.status.state == "connected"
    assert gateway.refresh_calls == 0
    session_lines = [r for r in caplog.records if r.name == "supervisor.session"]
    assert [r.getMessage() for r in session_lines if r.levelno >= logging.WARNING] == []


async def test_upstream_pushes_stay_under_upstreams_message_limit(tmp_path: Path) -> None:
    """batch_max_bytes raised past 1 MiB: 100 lines of 16 KiB are more than upstream's gateway
    decodes in one message; every line still arrives, and a single line over the limit arrives
    cut, with what follows it (review s8 2)."""
    gateway = _Accepting(events=False, refresh="exp0")
    settings: dict[str, object] = {"session": {"batch_max_bytes": 8 * 1024 * 1024, "batch_max_records": 4000}}
    async with _session_against(tmp_path, gateway, token="opaque-token", settings=settings) as agent:
        journal = agent.journal
        for i in range(150):
            journal.append(LogRecord(stream=LogStream.STDOUT, message=f"{i:04d}" + "x" * 16_000))
        journal.append(LogRecord(stream=LogStream.STDOUT, message="huge" + "y" * 2_000_000))
        journal.append(LogRecord(stream=LogStream.STDOUT, message="after the huge one"))
        last = journal.last_sequence
        await _until(lambda: journal.acked_through >= last, within=15, what="every line acknowledged")
    messages = [line.message for line in gateway.pushed]
    long_lines = [m for m in messages if m[:4].isdigit()]
    assert [m[:4] for m in long_lines] == [f"{i:04d}" for i in range(150)]
    (huge,) = [m for m in messages if m.startswith("huge")]
    assert "cut by the supervisor" in huge and len(huge.encode()) < UPSTREAM_DECODE_LIMIT
    assert messages[-1] == "after the huge one"


def test_upstream_requests_respect_both_limits() -> None:
    lines = [pb.SandboxLogLine(message="z" * 30_000, fields={"sequence": str(i)}) for i in range(70)]
    lines += [pb.SandboxLogLine(message="s", fields={"sequence": str(70 + i)}) for i in range(250)]
    requests = upstream_requests("sb", lines)
    assert all(r.ByteSize() <= UPSTREAM_MAX_REQUEST_BYTES for r in requests)
    assert all(len(r.logs) <= UPSTREAM_MAX_LINES for r in requests)
    assert [line.fields["sequence"] for r in requests for line in r.logs] == [str(i) for i in range(320)]


def test_a_main_process_exit_without_a_pid_reads_as_such() -> None:
    """Upstream's ReportMainProcessExit carries no pid (handcheck 1.3)."""
    assert describe(_event(LifecycleRecord(kind=LifecycleKind.EXITED, exit_code=7))) == (
        "main process exited with code 7"
    )
    assert describe(_event(LifecycleRecord(kind=LifecycleKind.EXITED, pid=42, exit_code=3))) == (
        "main process 42 exited with code 3"
    )


def test_a_refusal_after_a_healthy_session_keeps_the_long_wait(tmp_path: Path) -> None:
    """A long upstream-mode session whose calls start being refused is not retried at once
    (review s8 6): only a non-refusal end of a healthy session restarts without backoff."""
    agent = Agent(_config(tmp_path, 1))
    try:
        long_ago = time.monotonic() - 10 * agent.config.session.healthy_session_s
        refused = agent.session._after(SessionEnded("refused", answered=True, refused=True), long_ago)
        assert not refused.restart
        ended = agent.session._after(SessionEnded("the gateway closed the stream", answered=True), long_ago)
        assert ended.restart
    finally:
        agent.journal.close()
