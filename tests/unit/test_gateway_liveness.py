"""The gateway's plumbing for liveness and bad input, without a network: the heartbeat renewal of
sessions allowed a longer silence (also across a failed flush), the rate-limited error log, and a
session's cleanup when its call is closed or its connection write fails (the real service over a
real SQLite store, driven directly so that the call is closed exactly at a yield)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import GatewayMetrics
from gateway.rpc import RateLimitedLog, peer_host
from gateway.sandbox_state import Liveness
from gateway.server import OpenShellService
from gateway.sessions import SessionRegistry
from gateway.store import CommandRow, CommandStore, Database, EventStore, SandboxStore, StoreError
from gateway.store.sandboxes import Claim, ClaimRequest
from openshell_wire.convert import event_to_proto
from openshell_wire.records import (
    CAP_COMMANDS,
    CAP_EVENTS,
    Command,
    CommandKind,
    Event,
    JournalEpoch,
    LogRecord,
    LogStream,
    SandboxId,
)
from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.gateway import gateway_config
from tests.support.handler_call import HandlerCall


def _open(registry: SessionRegistry, sandbox_id: str, *, stale_after_s: float) -> None:
    session = registry.open(
        sandbox_id=SandboxId(sandbox_id),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
    )
    assert session is not None
    session.stale_after_s = stale_after_s


def test_only_a_session_allowed_a_longer_silence_is_renewed_when_idle() -> None:
    registry = SessionRegistry()
    _open(registry, "usual", stale_after_s=2.0)
    _open(registry, "widened", stale_after_s=60.0)
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "both were just written by the claim"
    for sid in ("usual", "widened"):
        session = registry.get(sid)
        assert session is not None
        # Both last spoke, and had that written, 3 s ago: longer than the default bound.
        session.last_seen_wall -= timedelta(seconds=3)
        session.last_flushed_wall = session.last_seen_wall
    before = datetime.now(UTC)
    beats = registry.take_heartbeats(renew_after_s=2.0)
    # The usual one has nothing newer to write (its own stale check ends it); the widened one
    # is vouched for by the gateway that holds it.
    assert list(beats) == ["widened"] and beats["widened"] >= before
    registry.heartbeats_written(beats)
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "renewed: not again until idle again"


def test_a_heartbeat_is_written_once_due_and_again_after_a_failed_flush() -> None:
    registry = SessionRegistry()
    _open(registry, "sb", stale_after_s=2.0)
    session = registry.get("sb")
    assert session is not None
    registry.touch(session)
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "the claim's time is fresh enough"
    session.last_flushed_wall -= timedelta(seconds=3)
    before = datetime.now(UTC)
    beats = registry.take_heartbeats(renew_after_s=2.0)
    assert list(beats) == ["sb"] and beats["sb"] >= before, "vouched for: within its own bound"
    # That flush failed (nothing written): the next one finds it due again, with its latest time.
    registry.touch(session)
    again = registry.take_heartbeats(renew_after_s=2.0)
    assert list(again) == ["sb"] and again["sb"] >= beats["sb"]
    registry.heartbeats_written(again, sessions=registry.heartbeat_sessions(again))
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "written: not again until R old"


def test_a_failed_flush_does_not_undo_the_renewal_of_a_widened_session() -> None:
    registry = SessionRegistry()
    _open(registry, "widened", stale_after_s=60.0)
    session = registry.get("widened")
    assert session is not None
    # Its last beat came, and was written, 3 s ago: longer than the default bound.
    session.last_seen_wall -= timedelta(seconds=3)
    session.last_flushed_wall = session.last_seen_wall
    before = datetime.now(UTC)
    renewal = registry.take_heartbeats(renew_after_s=2.0)
    assert renewal["widened"] >= before, "renewed with the flush time"
    # That flush failed: nothing counts as written.
    again = registry.take_heartbeats(renew_after_s=2.0)
    assert again["widened"] >= renewal["widened"], "the next flush renews it again, not the older beat"
    registry.heartbeats_written(again)
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "written: not again until idle again"


def test_the_error_log_lets_one_line_per_key_through_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    errors = RateLimitedLog(
        logging.getLogger("test.ratelimit"), concern="bad", interval_s=60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert errors.log(logging.WARNING, "a", "bad a")
        assert not any(errors.log(logging.WARNING, "a", "bad a") for _ in range(199))
        assert errors.suppressed == 199
        assert errors.log(logging.WARNING, "b", "bad b"), "another key has its own allowance"
        now[0] = 61.0
        assert errors.log(logging.WARNING, "a", "bad a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad a",
        "bad b (and 199 more bad lines left out before this one)",
        "bad a",
    ]
    assert all(r.exc_info is None for r in caplog.records)


def test_the_error_log_limits_a_flood_from_many_keys(caplog: pytest.LogCaptureFixture) -> None:
    """20,000 peers each sending one bad frame cost ``burst`` lines and one summary, not 20,000
    (keys are bounded, and the bucket does not depend on them)."""
    now = [0.0]
    errors = RateLimitedLog(
        logging.getLogger("test.ratelimit"), concern="bad", burst=5, max_keys=100, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        logged = sum(errors.log(logging.WARNING, ("peer", n), f"bad {n}") for n in range(20_000))
        errors.close()
    assert logged == 5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6, messages[:10]
    assert messages[-1] == "19995 more bad lines left out in the last 60s (rate-limited)"
    assert errors.suppressed == 0


async def test_the_error_log_writes_a_summary_when_a_flood_stops(caplog: pytest.LogCaptureFixture) -> None:
    errors = RateLimitedLog(logging.getLogger("test.ratelimit"), concern="bad", interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for _ in range(3):
            errors.log(logging.WARNING, "a", "bad a")
        await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "bad a",
        "2 more bad lines left out in the last 0s (rate-limited)",
    ]
    errors.close()


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.5:41234") == "ipv4:10.0.0.5"
    assert peer_host("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


# -- a session's cleanup, on the real service ---------------------------------------------


class _FlakySandboxes(SandboxStore):
    """A real SQLite store whose claims (``claim_many``: a hello's batched claim, and ``claim``
    and ``mark_connected``, batches of one) fail while ``failing`` (a store outage that begins
    between a hello's registration and its claim)."""

    failing = False

    async def claim_many(
        self, requests: Sequence[ClaimRequest], *, skip_locked: bool = False
    ) -> list[Claim | Exception | None]:
        if self.failing:
            ids = ", ".join(repr(r.sandbox_id) for r in requests)
            raise StoreError(f"cannot mark sandbox {ids} connected: the database is away")
        return await super().claim_many(requests, skip_locked=skip_locked)


async def _hello_then_wait(sandbox_id: str) -> AsyncIterator[pb.SupervisorMessage]:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    yield msg
    await asyncio.Event().wait()  # then silence, as a supervisor between heartbeats


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[OpenShellService, _FlakySandboxes, GatewayMetrics]]:
    config = gateway_config(tmp_path)
    db = await Database.open(config.database.url)
    registry = SessionRegistry()
    metrics = GatewayMetrics(registry)
    sandboxes = _FlakySandboxes(db)
    svc = OpenShellService(
        config=config,
        registry=registry,
        sandboxes=sandboxes,
        events=EventStore(db),
        commands=CommandStore(db),
        metrics=metrics,
    )
    try:
        yield svc, sandboxes, metrics
    finally:
        await svc.drain(timeout_s=5)
        await db.close()


def _live_sessions(metrics: GatewayMetrics) -> float | None:
    return metrics.registry.get_sample_value("openshell_gateway_sessions")


async def test_a_call_cancelled_at_a_write_cleans_up_at_once(
    service: tuple[OpenShellService, _FlakySandboxes, GatewayMetrics],
) -> None:
    """gRPC cancels the handler when the call is cancelled while a write waits (the peer left):
    the session must leave the registry then, and its disconnection be written (when the handler
    was a chain of async generators, not whenever asyncio's finalizer of the inner one ran)."""
    svc, sandboxes, metrics = service
    call = HandlerCall(svc.ConnectSupervisor, _hello_then_wait("sb-closed"))
    accepted = await anext(call)
    assert accepted.WhichOneof("payload") == "session_accepted"
    assert _live_sessions(metrics) == 1
    await call.aclose()
    assert _live_sessions(metrics) == 0, "the session left the registry with the call"
    await svc.drain(timeout_s=5)
    row = await sandboxes.get("sb-closed")
    assert row is not None and not row.connected and row.disconnected_at is not None


async def test_a_hello_whose_claim_failed_leaves_the_owner_in_place(
    service: tuple[OpenShellService, _FlakySandboxes, GatewayMetrics],
) -> None:
    """S2's claim of a sandbox S1 holds fails (the store is away): S2 is refused with a retry hint
    and never enters the registry, so S1, still the row's owner, keeps its session; when S1 ends,
    its own disconnection clears the row."""
    svc, sandboxes, metrics = service
    first = HandlerCall(svc.ConnectSupervisor, _hello_then_wait("sb-replaced"))
    accepted = await anext(first)
    assert accepted.WhichOneof("payload") == "session_accepted"
    sandboxes.failing = True
    second = HandlerCall(svc.ConnectSupervisor, _hello_then_wait("sb-replaced"))
    rejected = await anext(second)
    assert rejected.session_rejected.retry_after_ms > 0, rejected
    with pytest.raises(Exception, match="store unavailable"):
        await anext(second)
    sandboxes.failing = False
    assert _live_sessions(metrics) == 1, "S1 still holds the sandbox"
    row = await sandboxes.get("sb-replaced")
    assert row is not None and row.connected
    assert row.session_id == accepted.session_accepted.session_id
    assert row.owner_epoch == accepted.session_accepted.owner_epoch
    await first.aclose()
    assert _live_sessions(metrics) == 0
    await svc.drain(timeout_s=5)
    row = await sandboxes.get("sb-replaced")
    assert row is not None and not row.connected, "no session holds it: it must not stay connected"


async def test_a_replaced_session_cannot_refresh_the_row_of_another(tmp_path: Path) -> None:
    """A half-dead session held here while its supervisor reconnected to another gateway: that
    gateway's session now owns the row, and this gateway's flush of the old session's beats
    leaves it alone (the heartbeat write is conditional on the session), while the beats of the
    session the row does name are written."""
    db = await Database.open(gateway_config(tmp_path).database.url)
    try:
        sandboxes = SandboxStore(db)
        registry = SessionRegistry()
        for sandbox_id in ("moved", "stays"):
            await sandboxes.ensure(sandbox_id)
            session = registry.open(
                sandbox_id=SandboxId(sandbox_id),
                instance_id="i1",
                journal_epoch=JournalEpoch("e1"),
                capabilities=frozenset(),
            )
            assert session is not None
            await sandboxes.mark_connected(
                sandbox_id,
                instance_id="i1",
                session_id=session.session_id,
                journal_epoch="e1",
                owner="here",
                at=session.opened_at,
            )
        elsewhere = datetime.now(UTC)
        await sandboxes.mark_connected(
            "moved",
            instance_id="i1",
            session_id="s-elsewhere",
            journal_epoch="e1",
            owner="there",
            at=elsewhere,
        )
        for sandbox_id in ("moved", "stays"):
            session = registry.get(sandbox_id)
            assert session is not None
            registry.touch(session)
            session.last_seen_wall = elsewhere + timedelta(seconds=5)
        beats = registry.take_heartbeats()
        await sandboxes.record_heartbeats(beats, sessions=registry.heartbeat_sessions(beats))
        moved, stays = await sandboxes.get("moved"), await sandboxes.get("stays")
        assert moved is not None and moved.last_heartbeat_at == elsewhere, "another session's row"
        assert stays is not None and stays.last_heartbeat_at == elsewhere + timedelta(seconds=5)
    finally:
        await db.close()


async def test_the_newest_claim_owns_the_row_whatever_the_clocks_say(tmp_path: Path) -> None:
    """Claims are ordered by the database's epoch, not by when each replica's clock says its
    session opened: the claim that commits last owns the row (even with an earlier ``at``), and
    the heartbeats and disconnection of the session it displaced are refused (fenced)."""
    db = await Database.open(gateway_config(tmp_path).database.url)
    try:
        sandboxes = SandboxStore(db)
        await sandboxes.ensure("sb")
        later = datetime.now(UTC)
        earlier = later - timedelta(seconds=1)  # a replica whose clock is behind
        fields: dict[str, Any] = {"instance_id": "i1", "journal_epoch": "e1", "owner": "here"}
        first = await sandboxes.mark_connected("sb", session_id="s-first", at=later, **fields)
        second = await sandboxes.mark_connected("sb", session_id="s-second", at=earlier, **fields)
        assert first is not None and second is not None and second > first
        row = await sandboxes.get("sb")
        assert row is not None and row.session_id == "s-second" and row.owner_epoch == second
        beat = later + timedelta(seconds=5)
        fenced = await sandboxes.record_heartbeats(
            {"sb": beat}, sessions={"sb": "s-second"}, epochs={"sb": second}
        )
        assert fenced == set()
        row = await sandboxes.get("sb")
        assert row is not None and row.last_heartbeat_at == beat, "the owner's beat is written"
        fenced = await sandboxes.record_heartbeats(
            {"sb": beat + timedelta(seconds=5)}, sessions={"sb": "s-second"}, epochs={"sb": first}
        )
        assert fenced == {"sb"}
        row = await sandboxes.get("sb")
        assert row is not None and row.last_heartbeat_at == beat, "the displaced claim's beat is not"
        with pytest.raises(StoreError, match="no such sandbox"):
            await sandboxes.mark_connected("missing", session_id="s", at=later, **fields)
    finally:
        await db.close()


class _HungLiveness(SandboxStore):
    """A real store whose liveness read hangs and, once cancelled, still takes until ``release``
    to end, as SQLAlchemy does: it finishes a connection's cleanup (a rollback that waits for the
    hung server) before it lets a cancellation through."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.release = asyncio.Event()

    async def liveness(self) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            while not self.release.is_set():  # further cancellations are held back too
                with contextlib.suppress(asyncio.CancelledError):
                    await self.release.wait()
            raise


async def test_closing_the_metrics_does_not_wait_for_a_hung_count(tmp_path: Path) -> None:
    """Shutdown has one deadline for all its phases: a count stuck on the database is cancelled
    and given a bounded time to end, not awaited until the database answers."""
    config = gateway_config(tmp_path)
    db = await Database.open(config.database.url)
    store = _HungLiveness(db)
    metrics = GatewayMetrics(SessionRegistry())
    scrape = asyncio.create_task(
        metrics.count_sandboxes(
            store, now=datetime.now(UTC), liveness=Liveness.from_settings(config.sessions)
        )
    )
    closing: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(0.1)  # the count is under way
        closing = asyncio.create_task(metrics.close())
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert closing in done, "close() waited for the count stuck on the database"
    finally:
        store.release.set()
        scrape.cancel()
        await asyncio.gather(scrape, *([closing] if closing else []), return_exceptions=True)
        await db.close()


class _HungSandboxes(SandboxStore):
    """A real store whose connection write hangs like a write on a stopped database server:
    a cancellation is held back until ``release`` (SQLAlchemy finishes its cleanup first)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.release = asyncio.Event()

    async def claim_many(
        self, requests: Sequence[ClaimRequest], *, skip_locked: bool = False
    ) -> list[Claim | Exception | None]:
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        raise StoreError("the database went away meanwhile")


async def test_a_hello_whose_store_work_hangs_is_rejected_with_a_retry_hint(tmp_path: Path) -> None:
    """The supervisor waiting on a hung database's write gets SessionRejected OVERLOADED with a
    retry hint after grpc.store_timeout_s, an answer (a timeout would count as offline), and the
    session leaves the registry; shutdown does not wait for the write stuck on the database."""
    config = gateway_config(tmp_path, {"grpc": {"store_timeout_s": 0.3}})
    db = await Database.open(config.database.url)
    registry = SessionRegistry()
    sandboxes = _HungSandboxes(db)
    svc = OpenShellService(
        config=config,
        registry=registry,
        sandboxes=sandboxes,
        events=EventStore(db),
        commands=CommandStore(db),
    )
    call = HandlerCall(svc.ConnectSupervisor, _hello_then_wait("sb-hung"))
    first = asyncio.create_task(anext(call))
    try:
        done, _ = await asyncio.wait({first}, timeout=5)
        assert first in done, "the hello got no answer while the database hung"
        answer = first.result()
        assert answer.session_rejected.code == pb.REJECT_CODE_OVERLOADED, answer
        assert answer.session_rejected.retry_after_ms > 0, answer
        with pytest.raises(Exception, match="store unavailable"):
            await anext(call)
        assert len(registry) == 0
        draining = asyncio.create_task(svc.drain(timeout_s=0.2))
        done, _ = await asyncio.wait({draining}, timeout=5)
        assert draining in done, "drain waited for the write stuck on the database"
    finally:
        sandboxes.release.set()
        await asyncio.gather(first, return_exceptions=True)
        await call.aclose()
        await svc.drain(timeout_s=5)
        await db.close()


class _SlowEvents(EventStore):
    """A real store whose batches take ``delay_s`` longer: a slow moment of a healthy database."""

    delay_s = 0.6

    async def store_wire_batch(self, *args: Any, **kwargs: Any) -> int:
        await asyncio.sleep(self.delay_s)
        return await super().store_wire_batch(*args, **kwargs)


async def _hello_then_one_batch(sandbox_id: str) -> AsyncIterator[pb.SupervisorMessage]:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.append(CAP_EVENTS)
    msg.hello.journal_epoch = "e1"
    yield msg
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    batch.events.events.append(
        event_to_proto(Event(sequence=1, timestamp_ms=1, payload=LogRecord(LogStream.STDOUT, "a line")))
    )
    yield batch
    await asyncio.Event().wait()


async def test_an_event_batch_has_its_own_longer_store_deadline(tmp_path: Path) -> None:
    """A batch that takes longer than grpc.store_timeout_s (the hello's deadline) but less than
    grpc.batch_store_timeout_s is stored and acknowledged: a slow moment of a healthy database
    must not end every session that is sending (it did while both shared the hello's 2 s)."""
    config = gateway_config(tmp_path, {"grpc": {"store_timeout_s": 0.2, "batch_store_timeout_s": 5}})
    db = await Database.open(config.database.url)
    svc = OpenShellService(
        config=config,
        registry=SessionRegistry(),
        sandboxes=SandboxStore(db),
        events=_SlowEvents(db),
        commands=CommandStore(db),
    )
    call = HandlerCall(svc.ConnectSupervisor, _hello_then_one_batch("sb-slow"))
    try:
        accepted = await asyncio.wait_for(anext(call), 5)
        assert accepted.WhichOneof("payload") == "session_accepted", accepted
        answer = await asyncio.wait_for(anext(call), 5)
        assert answer.WhichOneof("payload") == "event_ack", answer
        assert answer.event_ack.acked_through_sequence == 1
    finally:
        await call.aclose()
        await svc.drain(timeout_s=5)
        await db.close()


async def _hello_with_commands(sandbox_id: str) -> AsyncIterator[pb.SupervisorMessage]:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.append(CAP_COMMANDS)
    yield msg
    await asyncio.Event().wait()


def _heartbeat_command(sandbox_id: str, *, expires_in_s: float) -> CommandRow:
    now = datetime.now(UTC)
    return CommandRow(
        command=Command(command_id=f"hb-{sandbox_id}", kind=CommandKind.HEARTBEAT, interval_ms=60_000),
        sandbox_id=sandbox_id,
        state="pending",
        error=None,
        created_at=now,
        answered_at=None,
        expires_at=now + timedelta(seconds=expires_in_s),
    )


async def test_a_slower_heartbeat_widens_the_silence_only_once_written(
    service: tuple[OpenShellService, _FlakySandboxes, GatewayMetrics],
) -> None:
    """Review finding 9: a heartbeat command that expires in the inbox (never sent) must not
    widen the silence the session may keep; one written to the stream does."""
    svc, _, _ = service
    call = HandlerCall(svc.ConnectSupervisor, _hello_with_commands("sb-hb"))
    assert (await anext(call)).WhichOneof("payload") == "session_accepted"
    session = svc._registry.get("sb-hb")
    assert session is not None
    session.stale_after_s = 1.0
    handed = svc.hand_off(_heartbeat_command("sb-hb", expires_in_s=0.05))
    assert handed is not None
    assert session.stale_after_s == 1.0, "queued, not written: the allowed silence is the same"
    await asyncio.sleep(0.1)  # it expires in the inbox
    with pytest.raises(StopAsyncIteration):  # dropped unsent, then the session goes stale
        await asyncio.wait_for(anext(call), timeout=10)
    assert handed.taken.result() is False
    assert session.stale_after_s == 1.0, "never sent: the allowed silence is the same"

    call = HandlerCall(svc.ConnectSupervisor, _hello_with_commands("sb-hb2"))
    assert (await anext(call)).WhichOneof("payload") == "session_accepted"
    session = svc._registry.get("sb-hb2")
    assert session is not None
    session.stale_after_s = 1.0
    handed = svc.hand_off(_heartbeat_command("sb-hb2", expires_in_s=30))
    assert handed is not None
    assert (await asyncio.wait_for(anext(call), timeout=10)).WhichOneof("payload") == "command"
    assert session.stale_after_s > 60, "written: the session may now stay silent past the slower beat"
    await call.aclose()


@pytest.mark.parametrize("field", ["instance_id", "journal_epoch"])
async def test_a_hello_with_nul_in_its_ids_is_refused_before_any_store_work(
    service: tuple[OpenShellService, _FlakySandboxes, GatewayMetrics], field: str
) -> None:
    """PostgreSQL cannot store NUL in text, and the batched claim sends its requests as one jsonb
    parameter: such a hello would fail the batch of every hello it rode in. Refused at once."""
    svc, sandboxes, _ = service

    async def hello() -> AsyncIterator[pb.SupervisorMessage]:
        msg = pb.SupervisorMessage()
        msg.hello.sandbox_id = "sb-nul"
        msg.hello.instance_id = "i1"
        setattr(msg.hello, field, "bad\x00id")
        yield msg
        await asyncio.Event().wait()

    call = HandlerCall(svc.ConnectSupervisor, hello())
    answer = await anext(call)
    assert answer.session_rejected.code == pb.REJECT_CODE_INVALID_HELLO, answer
    assert "NUL" in answer.session_rejected.reason
    assert await sandboxes.get("sb-nul") is None  # nothing registered or claimed
    await call.aclose()
