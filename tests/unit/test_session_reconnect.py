"""The session's reconnect rules against a real in-process gRPC server: the gateway's retry pushback
is honoured (and capped), a gateway that answers is not offline, an exit cuts the waits short, and
the exit-delivery settings (with their deprecated name) load as documented."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio
from pydantic import ValidationError

from gateway.config import DrainSettings, RebalanceSettings
from openshell_wire.configfile import ConfigError, load_settings
from openshell_wire.convert import command_to_proto
from openshell_wire.records import (
    ALL_CAPABILITIES,
    CAP_INTERVAL,
    Command,
    CommandKind,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from supervisor.agent import journal_options
from supervisor.config import SupervisorConfig
from supervisor.journal import Journal
from supervisor.session import (
    MAX_HINT_WINDOW_S,
    MAX_RETRY_HINT_S,
    PUSHBACK_KEY,
    UPSTREAM_KEEPALIVE_S,
    Session,
    SessionEnded,
    StreamWriter,
    pushback_s,
)
from tests.support.procs import free_port


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
    """A gateway whose store fails: every session ends with ``code`` and a retry pushback."""

    def __init__(self, pushback_ms: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.pushback_ms = pushback_ms
        self.code = code
        self.attempts: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.attempts.append(time.monotonic())
        # The hello first, as the gateway reads it before its store: a call ended while the client
        # still writes its hello can reach the client as gRPC's own "INTERNAL: Internal error from
        # Core" instead of this status and its pushback (a client-side race of grpc aio: the status
        # is lost, the supervisor can only back off as for any failure), which failed CI once.
        async for _hello in request_iterator:
            break
        await context.abort(
            self.code, "store unavailable", trailing_metadata=((PUSHBACK_KEY, self.pushback_ms),)
        )
        yield pb.GatewayMessage()  # unreachable: makes this an async generator, as the method streams


class _Answering(pb_grpc.OpenShellServicer):
    """A gateway that answers every hello with ``answer`` (a rejection, or an acceptance followed
    by a reconnect hint), then waits for the supervisor to go."""

    def __init__(self, *answer: pb.GatewayMessage) -> None:
        self.answer = answer
        self.attempts: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.attempts.append(time.monotonic())
        async for _hello in request_iterator:
            break
        for message in self.answer:
            yield message
        async for _message in request_iterator:
            pass


_Servicer = _StoreDown | _Answering


@contextlib.asynccontextmanager
async def _serving(servicer: pb_grpc.OpenShellServicer) -> AsyncIterator[str]:
    """A real in-process gRPC server with ``servicer``; its address."""
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def _session_against(tmp_path: Path, servicer: _Servicer, **session: object) -> AsyncIterator[Session]:
    """A running Session against a real in-process gRPC server with ``servicer``."""
    settings: dict[str, object] = {"reconnect_initial_s": 0.01, "reconnect_max_s": 0.05, **session}
    async with _serving(servicer) as address:
        config = _config(tmp_path, address, **settings)
        journal = Journal.open(journal_options(config))
        live = Session(config=config, journal=journal, instance_id="i")
        task = asyncio.create_task(live.run())
        try:
            yield live
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            journal.close()


async def _until(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_retry_pushback_is_honoured(tmp_path: Path) -> None:
    servicer = _StoreDown("1000")
    async with _session_against(tmp_path, servicer):
        await asyncio.sleep(2.5)
    gaps = [b - a for a, b in itertools.pairwise(servicer.attempts)]
    # At least the pushback between attempts (not the 50 ms backoff cap), spread upwards.
    assert 2 <= len(servicer.attempts) <= 3, servicer.attempts
    assert all(gap >= 1.0 for gap in gaps), gaps


@pytest.mark.parametrize(
    "servicer",
    [
        pytest.param(lambda: _StoreDown("soon"), id="malformed"),
        pytest.param(lambda: _StoreDown("1000", grpc.StatusCode.INTERNAL), id="not-unavailable"),
    ],
)
async def test_a_pushback_is_ignored_when_malformed_or_on_another_status(
    tmp_path: Path, servicer: Callable[[], _StoreDown]
) -> None:
    gateway = servicer()
    async with _session_against(tmp_path, gateway):
        await _until(lambda: len(gateway.attempts) >= 4, within=5, what="four attempts")
    gaps = [b - a for a, b in itertools.pairwise(gateway.attempts)]
    assert all(gap < 0.9 for gap in gaps), gaps  # the ordinary short backoff, not the 1 s pushback


def test_the_pushback_is_capped() -> None:
    def failed(code: grpc.StatusCode, ms: str) -> aio.AioRpcError:
        return aio.AioRpcError(code, aio.Metadata(), aio.Metadata((PUSHBACK_KEY, ms)))

    assert pushback_s(failed(grpc.StatusCode.UNAVAILABLE, "1500")) == 1.5
    assert pushback_s(failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "1500")) == 1.5
    assert pushback_s(failed(grpc.StatusCode.UNAVAILABLE, str(10**9))) == MAX_RETRY_HINT_S
    assert pushback_s(failed(grpc.StatusCode.UNAVAILABLE, "-5")) == 0.0
    assert pushback_s(failed(grpc.StatusCode.INTERNAL, "1500")) == 0.0


def _rejected(retry_after_ms: int) -> pb.GatewayMessage:
    message = pb.GatewayMessage()
    message.session_rejected.reason = "store unavailable"
    message.session_rejected.retry_after_ms = retry_after_ms
    return message


@pytest.mark.parametrize(
    "servicer",
    [
        pytest.param(lambda: _StoreDown("200"), id="pushback"),
        pytest.param(lambda: _Answering(_rejected(200)), id="rejected"),
    ],
)
async def test_a_gateway_that_answers_is_not_offline(
    tmp_path: Path, servicer: Callable[[], _Servicer]
) -> None:
    """A gateway that refuses us (its database is down) is reachable: the offline policy, which
    counts status.offline_since, must not stop a healthy sandbox for the gateway's outage."""
    gateway = servicer()
    async with _session_against(tmp_path, gateway) as session:
        assert session.status.offline_since is not None  # not yet answered
        await _until(lambda: len(gateway.attempts) >= 3, within=10, what="three answered attempts")
        assert session.status.offline_since is None, session.status
        assert session.status.state != "connected"


async def test_an_unreachable_gateway_is_offline(tmp_path: Path) -> None:
    config = _config(tmp_path, f"127.0.0.1:{free_port()}", reconnect_initial_s=0.01, reconnect_max_s=0.05)
    journal = Journal.open(journal_options(config))
    session = Session(config=config, journal=journal, instance_id="i")
    task = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.status.attempts >= 3, within=10, what="three refused attempts")
        assert session.status.offline_since is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()


async def test_an_exit_ends_the_wait_in_progress(tmp_path: Path) -> None:
    gateway = _StoreDown("soon")  # refused, no pushback: the ordinary (here 300 s) backoff
    async with _session_against(tmp_path, gateway, reconnect_initial_s=300, reconnect_max_s=300) as session:
        await _until(lambda: session.status.state == "backoff", within=5, what="the backoff")
        assert len(gateway.attempts) == 1
        session.deliver_exit()
        await _until(lambda: len(gateway.attempts) >= 3, within=5, what="the attempts of the exit")
    gaps = [b - a for a, b in itertools.pairwise(gateway.attempts[1:])]
    assert all(gap <= 1.5 for gap in gaps), gaps  # exit_reconnect_max_s (1 s) plus room


async def test_an_exit_does_not_cut_the_gateways_pushback_short(tmp_path: Path) -> None:
    gateway = _StoreDown("1500")
    async with _session_against(tmp_path, gateway) as session:
        await _until(lambda: len(gateway.attempts) == 1, within=5, what="the first attempt")
        session.deliver_exit()
        await _until(lambda: len(gateway.attempts) >= 2, within=10, what="the second attempt")
    assert gateway.attempts[1] - gateway.attempts[0] >= 1.5


def _accepted_then_reconnect(window_ms: int) -> tuple[pb.GatewayMessage, pb.GatewayMessage]:
    accepted = pb.GatewayMessage()
    accepted.session_accepted.session_id = "s"
    accepted.session_accepted.heartbeat_interval_ms = 10_000
    hint = pb.GatewayMessage()
    hint.reconnect.reason = "draining"
    hint.reconnect.delay_window_ms = window_ms
    return accepted, hint


async def test_during_an_exit_a_reconnect_hint_waits_at_most_the_exit_backoff(tmp_path: Path) -> None:
    """The gateway asks to reconnect within 600 s (a drain's spread): while an exit is being
    delivered the supervisor comes back within exit_reconnect_max_s instead."""
    gateway = _Answering(*_accepted_then_reconnect(600_000))
    # reconnect_max_s 300: the hint's window is then capped at MAX_HINT_WINDOW_S (60 s) only, so
    # what brings the supervisor back sooner is the exit's cap.
    async with _session_against(tmp_path, gateway, reconnect_max_s=300) as session:
        session.deliver_exit()  # the first wait is skipped; the later ones are what is checked
        await _until(lambda: len(gateway.attempts) >= 4, within=10, what="sessions after reconnect hints")
    gaps = [b - a for a, b in itertools.pairwise(gateway.attempts[1:])]
    assert all(gap <= 1.5 for gap in gaps), gaps


async def test_an_upstream_gateway_is_pinged_no_more_often_than_its_default_policy_allows(
    tmp_path: Path,
) -> None:
    """A gateway without our capabilities (gRPC's default server policy: a ping every 5 minutes
    without data) would answer 20 s pings with GOAWAY too_many_pings: the next channels ping it
    at most every UPSTREAM_KEEPALIVE_S."""
    accepted, hint = _accepted_then_reconnect(0)
    accepted.session_accepted.ClearField("capabilities")
    gateway = _Answering(accepted, hint)
    async with _session_against(tmp_path, gateway) as session:
        assert dict(session._channel_options())["grpc.keepalive_time_ms"] == 20_000
        await _until(lambda: session.status.sessions >= 1, within=10, what="a session")
        assert dict(session._channel_options())["grpc.keepalive_time_ms"] == UPSTREAM_KEEPALIVE_S * 1000


async def test_a_commands_audit_line_is_journaled_before_its_answer(tmp_path: Path) -> None:
    """The stream is cut exactly at the write of a command's answer (the real call cancelled, then
    written to): the command is applied, and its audit line must be in the journal all the same
    (it goes out with the next session); before, it was journaled only after the write."""
    command = pb.GatewayMessage()
    command.command.CopyFrom(
        command_to_proto(Command(command_id="c1", kind=CommandKind.HEARTBEAT, interval_ms=5_000))
    )
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(_Answering(command), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = _config(tmp_path, f"127.0.0.1:{port}")
    journal = Journal.open(journal_options(config))
    session = Session(config=config, journal=journal, instance_id="i")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
            hello = pb.SupervisorMessage()
            hello.hello.sandbox_id = "pushback"
            await call.write(hello)

            async def cut_at_the_answer(message: pb.SupervisorMessage) -> None:
                assert message.WhichOneof("payload") == "command_result"
                call.cancel()
                await call.write(message)

            with pytest.raises((asyncio.InvalidStateError, aio.AioRpcError, aio.UsageError)):
                await session._receive(call, cut_at_the_answer, 1.0)
        lines = [getattr(e.payload, "message", "") for e in journal.read_after(0)]
        assert any(line.startswith("command c1 (") and line.endswith(": applied") for line in lines), lines
    finally:
        await server.stop(None)
        journal.close()


class _Beats(pb_grpc.OpenShellServicer):
    """A gateway that answers every hello with ``answer`` and records when heartbeats come
    (answering each with an echo when ``echo``)."""

    def __init__(self, *answer: pb.GatewayMessage, echo: bool = True) -> None:
        self.answer = answer
        self.echo = echo
        self.beats: list[float] = []
        self.ends: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        async for _hello in request_iterator:
            break
        for message in self.answer:
            yield message
        async for message in request_iterator:
            if message.WhichOneof("payload") == "heartbeat":
                self.beats.append(time.monotonic())
                if self.echo:
                    echo = pb.GatewayMessage()
                    echo.heartbeat.echo_unix_ms = message.heartbeat.sent_unix_ms
                    yield echo
        self.ends.append(time.monotonic())


def _update(interval_ms: int) -> pb.GatewayMessage:
    message = pb.GatewayMessage()
    message.session_update.heartbeat_interval_ms = interval_ms
    message.session_update.stale_after_ms = interval_ms + 20_000
    return message


def _accepted(interval_ms: int) -> pb.GatewayMessage:
    accepted = pb.GatewayMessage()
    accepted.session_accepted.session_id = "s"
    accepted.session_accepted.heartbeat_interval_ms = interval_ms
    accepted.session_accepted.capabilities.extend(ALL_CAPABILITIES)
    return accepted


def test_the_supervisor_announces_the_interval_capability() -> None:
    assert CAP_INTERVAL in ALL_CAPABILITIES


async def test_a_session_update_sets_the_heartbeat_interval_at_once(tmp_path: Path) -> None:
    """Accepted at 30 s, then told 100 ms: the sleep in progress is cut short and beats follow the
    new interval (before SessionUpdate existed, the first beat came after ~30 s)."""
    gateway = _Beats(_accepted(30_000), _update(100))
    async with _session_against(tmp_path, gateway):
        await _until(lambda: len(gateway.beats) >= 8, within=10, what="beats at the updated interval")
    gaps = [b - a for a, b in itertools.pairwise(gateway.beats)]
    assert max(gaps) < 1.0, gaps


async def test_a_session_update_sets_the_stale_bound(tmp_path: Path) -> None:
    """A gateway that stops answering is given up after the updated interval x
    stale_after_intervals (0.2 s x 3), not the accepted 30 s one."""
    gateway = _Beats(_accepted(30_000), _update(200), echo=False)
    async with _session_against(tmp_path, gateway) as session:
        await _until(
            lambda: "no message from the gateway for 0.6s" in session.status.last_error,
            within=10,
            what="the session ended stale on the updated bound",
        )


async def test_a_heartbeat_command_wins_over_a_session_update(tmp_path: Path) -> None:
    """The operator's HEARTBEAT command (30 s) set on the session, then the gateway's adaptive
    100 ms: the command's interval stays."""
    command = pb.GatewayMessage()
    command.command.CopyFrom(
        command_to_proto(Command(command_id="c-hb", kind=CommandKind.HEARTBEAT, interval_ms=30_000))
    )
    gateway = _Beats(_accepted(200), command, _update(100))
    async with _session_against(tmp_path, gateway):
        await asyncio.sleep(1.5)
    # At most the beat whose sleep began before the command (at the accepted 200 ms).
    assert len(gateway.beats) <= 1, gateway.beats


def _reconnected(journal: Journal) -> int:
    return sum(
        1
        for e in journal.read_after(0)
        if isinstance(e.payload, LifecycleRecord) and e.payload.kind is LifecycleKind.RECONNECTED
    )


async def test_no_reconnected_record_after_a_hinted_move(tmp_path: Path) -> None:
    """Every session ends on a reconnect hint (a drain, a rebalance) and the next is accepted
    within the hint's window: no RECONNECTED lifecycle record (before, one per move)."""
    accepted, hint = _accepted_then_reconnect(200)
    gateway = _Answering(accepted, hint)
    async with _session_against(tmp_path, gateway) as session:
        await _until(lambda: session.status.sessions >= 4, within=10, what="four sessions")
        assert _reconnected(session._journal) == 0


async def test_a_reconnected_record_after_a_real_outage(tmp_path: Path) -> None:
    """A session that ends without a hint (the gateway closed the stream), then a new one: the
    outage is journaled."""
    accepted = _accepted(10_000)

    class _Closing(_Answering):
        async def ConnectSupervisor(
            self,
            request_iterator: AsyncIterator[pb.SupervisorMessage],
            context: aio.ServicerContext[object, object],
        ) -> AsyncIterator[pb.GatewayMessage]:
            self.attempts.append(time.monotonic())
            async for _hello in request_iterator:
                break
            for message in self.answer:
                yield message

    gateway = _Closing(accepted)
    async with _session_against(tmp_path, gateway) as session:
        await _until(lambda: session.status.sessions >= 3, within=10, what="three sessions")
        assert _reconnected(session._journal) >= 1


class _HintThenDown(pb_grpc.OpenShellServicer):
    """The first session is accepted and ended by a reconnect hint with ``window_ms``; every hello
    is then refused (UNAVAILABLE, no pushback) for ``down_s`` after the hint; then the next is
    accepted and kept: a real outage right after a hint."""

    def __init__(self, window_ms: int, *, down_s: float) -> None:
        self.accepted, self.hint = _accepted_then_reconnect(window_ms)
        self.down_s = down_s
        self.hinted_at: float | None = None
        self.accepted_at: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        if self.hinted_at is not None and time.monotonic() < self.hinted_at + self.down_s:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        async for _hello in request_iterator:
            break
        self.accepted_at.append(time.monotonic())
        yield self.accepted
        if self.hinted_at is None:
            self.hinted_at = time.monotonic()
            yield self.hint
        async for _message in request_iterator:
            pass


@pytest.mark.parametrize(
    "window_ms",
    [
        pytest.param(100, id="short-window"),
        # A misconfigured gateway's 10 min window: capped (at reconnect_max_s, 50 ms here), it
        # neither keeps the supervisor away nor hides the outage (before: no hello for minutes).
        pytest.param(600_000, id="huge-window-capped"),
    ],
)
async def test_a_real_outage_after_a_reconnect_hint_is_journaled(tmp_path: Path, window_ms: int) -> None:
    """A hint, then the gateways refuse for longer than the window plus connect_timeout_s (2 s):
    the first RECONNECTED record is the next session's, whose duration covers the refusal (none
    for the hinted move itself). Later ones may follow: a loaded CI machine once ended the session
    after the outage too (a 4 ms reconnect), which is journaled as it should be."""
    down_s = 2.8
    gateway = _HintThenDown(window_ms, down_s=down_s)
    async with _session_against(tmp_path, gateway) as session:
        await _until(lambda: session.status.sessions >= 2, within=15, what="the session after the outage")
        records = [
            e.payload
            for e in session._journal.read_after(0)
            if isinstance(e.payload, LifecycleRecord) and e.payload.kind is LifecycleKind.RECONNECTED
        ]
    assert records, "the outage after the hint was not journaled"
    assert gateway.hinted_at is not None
    assert records[0].duration_ms >= (down_s - 0.1) * 1000, records


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param(DrainSettings, "hint_spread_s", id="drain.hint_spread_s"),
        pytest.param(DrainSettings, "final_spread_s", id="drain.final_spread_s"),
        pytest.param(RebalanceSettings, "hint_spread_s", id="rebalance.hint_spread_s"),
    ],
)
def test_the_gateways_hint_spreads_are_bounded_to_the_supervisors_cap(
    settings: type[DrainSettings | RebalanceSettings], field: str
) -> None:
    """A gateway configured with a 10 min spread fails with a clear error rather than sending a
    window every supervisor would cap at MAX_HINT_WINDOW_S."""
    assert settings.model_validate({field: MAX_HINT_WINDOW_S})
    with pytest.raises(ValidationError, match="less than or equal to 60"):
        settings.model_validate({field: 600})


async def test_a_session_update_interval_has_a_floor(tmp_path: Path) -> None:
    """A gateway bug sends a 1 ms interval: the supervisor beats at its 100 ms floor, not ~1,000/s
    (before the floor: hundreds of beats in the second)."""
    gateway = _Beats(_accepted(30_000), _update(1))
    async with _session_against(tmp_path, gateway):
        await _until(lambda: len(gateway.beats) >= 3, within=10, what="beats at the floor")
        first = gateway.beats[0]
        await asyncio.sleep(1.0)
    in_the_second = [t for t in gateway.beats if first < t <= first + 1.0]
    # 100 ms apart at least, jitter aside: about 10 in a second; 1 ms would give hundreds.
    assert len(in_the_second) <= 20, len(in_the_second)


class _NeverReads(pb_grpc.OpenShellServicer):
    """Accepts the hello, never reads the supervisor's messages again (its writes block on flow
    control once the window is full), then sends a reconnect hint."""

    def __init__(self, *, hint_after_s: float) -> None:
        self.accepted, self.hint = _accepted_then_reconnect(0)
        self.accepted.session_accepted.capabilities.extend(ALL_CAPABILITIES)
        self.hint_after_s = hint_after_s
        self.attempts: list[float] = []

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.attempts.append(time.monotonic())
        async for _hello in request_iterator:
            break
        yield self.accepted
        await asyncio.sleep(self.hint_after_s)
        yield self.hint
        await asyncio.sleep(3600)  # no Close: only the supervisor's own bound ends the session


async def test_a_reconnect_hint_is_not_held_up_by_a_write_blocked_on_flow_control(tmp_path: Path) -> None:
    """Megabytes pending and a gateway that stops reading: a write blocks holding the write lock
    when the hint comes. The session ends all the same (half_close's wait for the lock is bounded)
    and the supervisor comes back (before: it waited on the lock for ever)."""
    gateway = _NeverReads(hint_after_s=2.0)
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = _config(tmp_path, f"127.0.0.1:{port}", reconnect_initial_s=0.01, reconnect_max_s=0.05)
    journal = Journal.open(journal_options(config))
    for i in range(12_000):
        journal.append(LogRecord(stream=LogStream.STDOUT, message=f"{i:06d} " + "x" * 1000))
    live = Session(config=config, journal=journal, instance_id="i")
    task = asyncio.create_task(live.run())
    try:
        await _until(lambda: len(gateway.attempts) >= 2, within=20, what="a hello after the hint")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
        journal.close()


def _accepted_with_window(window_ms: int) -> pb.GatewayMessage:
    accepted = pb.GatewayMessage()
    accepted.session_accepted.session_id = "s"
    accepted.session_accepted.heartbeat_interval_ms = 10_000
    accepted.session_accepted.reconnect_window_ms = window_ms
    return accepted


@pytest.mark.parametrize("window_ms", [0, 5000])
async def test_a_lost_gateway_is_redialled_over_its_reconnect_window(tmp_path: Path, window_ms: int) -> None:
    """The gateway that accepted us said how long it needs to take its fleet back
    (reconnect_window_ms); it dies. The first attempt after the healthy session still comes at
    once (a lone supervisor that lost its connection is not slowed), but once an attempt gets no
    answer the waits are drawn over the window, not the first backoff steps: a fleet that lost its
    gateway at once comes back spread (issue 22's storm). Without a window, the ordinary backoff."""
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(_Answering(_accepted_with_window(window_ms)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = _config(
        tmp_path,
        f"127.0.0.1:{port}",
        reconnect_initial_s=0.01,
        reconnect_max_s=10,
        healthy_session_s=0.1,
    )
    journal = Journal.open(journal_options(config))
    session = Session(config=config, journal=journal, instance_id="i")
    task = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.status.state == "connected", within=10, what="the session")
        await asyncio.sleep(0.3)  # healthy: its end restarts the backoff
        await server.stop(None)  # killed: nothing answers on the port from now on
        await _until(lambda: session.status.attempts >= 2, within=2, what="the first attempt after the loss")
        stopped_at = time.monotonic()
        await asyncio.sleep(3.0)
        redials = session.status.attempts - 2
        assert time.monotonic() - stopped_at < 4.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        journal.close()
    if window_ms:
        # Waits drawn from U(0, 5 s): six of them within 3 s has probability (3/5)^6 / 6! < 1e-4.
        assert redials <= 5, redials
    else:
        # The backoff's first steps (U(0, 0.01 x 2^n)) add up to under 1.3 s for seven waits.
        assert redials >= 7, redials


class _AcceptsThenAborts(pb_grpc.OpenShellServicer):
    """A gateway that accepts, reads a little and ends the call with UNAVAILABLE and a pushback
    (or, ``clean``, returns: status OK), while the supervisor is still writing."""

    def __init__(self, *, clean: bool = False) -> None:
        self.attempts: list[float] = []
        self.clean = clean

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.attempts.append(time.monotonic())
        accepted = pb.GatewayMessage()
        accepted.session_accepted.session_id = "s"
        accepted.session_accepted.heartbeat_interval_ms = 10_000
        accepted.session_accepted.capabilities.extend(ALL_CAPABILITIES)
        async for _hello in request_iterator:
            break
        yield accepted
        async for _message in request_iterator:
            break
        if self.clean:
            return
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "stale session", trailing_metadata=((PUSHBACK_KEY, "20"),)
        )


async def _ended_under_a_writer(
    channel: aio.Channel, code: grpc.StatusCode
) -> tuple[StreamWriter, pb.SupervisorMessage]:
    """A session's call that the servicer (``_AcceptsThenAborts``) ended with ``code`` after the
    hello and one more message, its status not read by anyone; its writer and a message."""
    call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
    writer = StreamWriter(call)
    hello = pb.SupervisorMessage()
    hello.hello.sandbox_id = "s"
    await writer.write(hello)
    assert (await call.read()).HasField("session_accepted")  # status comes after the messages
    await writer.write(hello)  # the servicer ends the call after reading the message after the hello
    assert await call.code() == code  # finished; nothing read its status
    return writer, hello


async def test_a_write_to_a_call_the_gateway_ended_raises_the_calls_status() -> None:
    """The gateway ends a session's call while a writer of the supervisor is between messages (a
    stale bound on a loaded machine, say): the write must raise the call's status, as a read does,
    so the session ends with it and its pushback, not with gRPC's InvalidStateError taken for an
    internal error of ours (test_network_cut failed so once)."""
    async with _serving(_AcceptsThenAborts()) as address, aio.insecure_channel(address) as channel:
        writer, hello = await _ended_under_a_writer(channel, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(aio.AioRpcError) as ended:
            await writer.write(hello)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == "stale session"
    assert pushback_s(ended.value) == 0.02


async def test_a_write_to_a_call_the_gateway_closed_cleanly_ends_the_session_as_a_read_would() -> None:
    """The gateway ends a stale or closed session by returning (status OK): a write after that is
    the stream's end, as a read's EOF is, not an error with code OK."""
    async with _serving(_AcceptsThenAborts(clean=True)) as address, aio.insecure_channel(address) as channel:
        writer, hello = await _ended_under_a_writer(channel, grpc.StatusCode.OK)
        with pytest.raises(SessionEnded, match="the gateway closed the stream"):
            await writer.write(hello)
