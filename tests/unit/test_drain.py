"""The drain's pacing (gateway.drain) over a real SessionRegistry, and the shutdown's final hints."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import pytest

from gateway.admission import Admission, Ticket
from gateway.app import Gateway
from gateway.config import AdmissionSettings, DrainSettings, GatewayConfig
from gateway.drain import HINT_BURST, Drainer, disconnect_delay_s, pace
from gateway.sessions import Close, InboxItem, Outbound, Session, SessionRegistry
from gateway.store.replicas import ReplicaStore
from openshell_wire.records import CAP_EVENTS, CAP_RECONNECT, JournalEpoch, SandboxId
from tests.support.gateway import gateway_config


def _open(
    registry: SessionRegistry, n: int, *, capabilities: frozenset[str], prefix: str = "s"
) -> list[Session]:
    sessions = []
    for i in range(n):
        session = registry.open(
            sandbox_id=SandboxId(f"{prefix}{i}"),
            instance_id="i",
            journal_epoch=JournalEpoch("e"),
            capabilities=capabilities,
            owner_epoch=1,
        )
        assert session is not None
        sessions.append(session)
    return sessions


async def _handler(
    registry: SessionRegistry, session: Session, seen: dict[str, list[tuple[float, InboxItem]]]
) -> None:
    """What the session's stream handler does with its inbox: writes, then ends on Close."""
    while True:
        item = await session.inbox.get()
        seen.setdefault(session.sandbox_id, []).append((time.monotonic(), item))
        if isinstance(item, Close):
            registry.close(session)
            return


def test_pace_spreads_over_the_window_within_the_bounds() -> None:
    assert pace(1000, window_s=10, min_rate=20, max_rate=200) == 100
    assert pace(10_000, window_s=10, min_rate=20, max_rate=200) == 200
    assert pace(5, window_s=10, min_rate=20, max_rate=200) == 20
    assert pace(0, window_s=10, min_rate=20, max_rate=200) == 20


def test_only_moved_sessions_wait_for_their_disconnection_write() -> None:
    config = GatewayConfig()
    assert disconnect_delay_s(None, config) == 0
    assert disconnect_delay_s("shutdown", config) == 0
    assert disconnect_delay_s("drain", config) == config.drain.hint_spread_s + config.grpc.store_timeout_s
    assert (
        disconnect_delay_s("rebalance", config)
        == config.rebalance.hint_spread_s + config.grpc.store_timeout_s
    )


async def test_the_drain_settles_then_hints_every_session_once_at_the_paced_rate() -> None:
    registry = SessionRegistry()
    sessions = _open(registry, 30, capabilities=frozenset({CAP_EVENTS, CAP_RECONNECT}))
    # One without `reconnect` (an upstream supervisor): its stream just ends, paced the same.
    (plain,) = _open(registry, 1, capabilities=frozenset({CAP_EVENTS}), prefix="plain")
    seen: dict[str, list[tuple[float, InboxItem]]] = {}
    handlers = [asyncio.create_task(_handler(registry, s, seen)) for s in [*sessions, plain]]
    settings = DrainSettings(
        settle_s=0.3, window_s=1.6, max_hints_per_s=1000, min_hints_per_s=1, hint_spread_s=0.5
    )
    began = time.monotonic()
    await Drainer(registry, settings).run(deadline=began + settings.settle_s + settings.window_s)
    took = time.monotonic() - began
    await asyncio.gather(*handlers)
    assert len(registry) == 0
    # Empty before the deadline: it returned then, not at the deadline.
    assert took < settings.settle_s + settings.window_s
    hints = sorted(t for items in seen.values() for t, item in items if isinstance(item, Close))
    assert hints[0] - began >= settings.settle_s * 0.95
    # Spread over (most of) the window, not sent at once.
    assert hints[-1] - hints[0] >= 0.8 * (settings.window_s - settings.settle_s) * 0.9 * 30 / 31
    for session in sessions:
        kinds = [type(item) for _, item in seen[session.sandbox_id]]
        assert kinds == [Outbound, Close], kinds
        (message,) = [item.message for _, item in seen[session.sandbox_id] if isinstance(item, Outbound)]
        assert message.reconnect.reason == "drain" and message.reconnect.delay_window_ms == 500
    assert [type(item) for _, item in seen[plain.sandbox_id]] == [Close]


async def test_at_the_deadline_the_rest_get_the_shutdown_hint_and_nobody_two() -> None:
    registry = SessionRegistry()
    sessions = _open(registry, 20, capabilities=frozenset({CAP_RECONNECT}))
    settings = DrainSettings(settle_s=0, window_s=1, max_hints_per_s=10, min_hints_per_s=1)
    began = time.monotonic()
    # Nobody leaves (the handlers are stuck): the drain ends at its deadline.
    await Drainer(registry, settings).run(deadline=began + 0.5)
    assert 0.5 <= time.monotonic() - began < 1.0
    drained = [s for s in sessions if s.hinted == "drain"]
    assert 1 <= len(drained) <= 7, len(drained)
    hinted = registry.close_all("gateway shutting down", hint="shutdown", spread_s=5)
    assert hinted == len(sessions) - len(drained)
    for session in sessions:
        items = [session.inbox.get_nowait() for _ in range(session.inbox.qsize())]
        reconnects = [i.message.reconnect for i in items if isinstance(i, Outbound)]
        assert len(reconnects) == 1, items  # one hint each, whichever came first
        assert isinstance(items[-1], Close)
        if session in drained:
            assert reconnects[0].reason == "drain"
        else:
            assert reconnects[0].reason == "shutdown" and reconnects[0].delay_window_ms == 5000


class _TimedRegistry(SessionRegistry):
    """Records when each hint is sent (the gateway's side, not when a handler reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.hinted_at: list[float] = []

    def hint(self, session: Session, *, reason: str, spread_s: float) -> bool:
        sent = super().hint(session, reason=reason, spread_s=spread_s)
        if sent:
            self.hinted_at.append(time.monotonic())
        return sent


async def test_a_stalled_loop_is_not_caught_up_in_a_burst() -> None:
    """The pace is a token bucket: after the loop stalls (here 0.6 s of blocking work 0.3 s into
    the hints), at most HINT_BURST missed slots go back to back, so no second holds more than
    rate + HINT_BURST hints (the slot arithmetic from the start sent 24 at once, 60 in a second)."""
    registry = _TimedRegistry()
    rate = 40
    sessions = _open(registry, 60, capabilities=frozenset({CAP_RECONNECT}))
    seen: dict[str, list[tuple[float, InboxItem]]] = {}
    handlers = [asyncio.create_task(_handler(registry, s, seen)) for s in sessions]
    settings = DrainSettings(settle_s=0, window_s=5, max_hints_per_s=rate, min_hints_per_s=rate)

    async def stall() -> None:
        await asyncio.sleep(0.3)
        time.sleep(0.6)  # noqa: ASYNC251 - blocks the loop, as a GC or a slow callback does

    staller = asyncio.create_task(stall())
    await Drainer(registry, settings).run(deadline=time.monotonic() + settings.window_s)
    await asyncio.gather(staller, *handlers)
    assert len(registry.hinted_at) == len(sessions)
    times = registry.hinted_at
    peak = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert peak <= rate + HINT_BURST, peak
    # The longest run of hints sent back to back (< 1 ms apart) is the burst, not the missed slots.
    run = longest = 1
    for earlier, later in itertools.pairwise(times):
        run = run + 1 if later - earlier < 0.001 else 1
        longest = max(longest, run)
    assert longest <= HINT_BURST, longest


async def test_a_second_signal_during_begin_drain_leaves_the_lease_mark_and_step_down_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain cancelled (a second signal) while begin_drain waits for the lease's draining
    mark: the mark still completes and the leader step-down after it still runs, within stop()
    (before, stop()'s begin_drain returned at once and the Lease was held until it lapsed)."""
    marked: list[str] = []
    stepped: list[bool] = []
    mark_draining = ReplicaStore.mark_draining

    async def slow_mark(self: ReplicaStore, replica_id: str, *, run: str | None = None) -> None:
        await asyncio.sleep(0.3)  # a database answering slowly
        await mark_draining(self, replica_id, run=run)
        marked.append(replica_id)

    async def step_down() -> None:
        stepped.append(True)

    monkeypatch.setattr(ReplicaStore, "mark_draining", slow_mark)
    gw = Gateway(gateway_config(tmp_path, {"ha": {"replica_id": "gw-drained"}}))
    await gw.start()
    try:
        # The Kubernetes driver's leader step-down, on the provisioner where begin_drain looks.
        monkeypatch.setattr(gw._provisioner, "step_down", step_down, raising=False)
        drain = asyncio.create_task(gw.drain())
        await asyncio.sleep(0.1)  # inside the lease mark
        assert gw.draining and not marked
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    finally:
        await gw.stop()
    assert marked == ["gw-drained"]
    assert stepped == [True]


async def test_the_drain_waits_for_a_hello_admitted_before_it_and_hints_its_session() -> None:
    """A hello admitted just before the drain, still in its claim when the last session leaves:
    the drain waits for it (admission's in-flight count) and hints the session it opens, instead
    of leaving it to the stop's cancellation (before: the drain returned on the empty registry)."""
    registry = SessionRegistry()
    admission = Admission(AdmissionSettings(), sessions=lambda: len(registry))
    ticket = admission.try_enter()
    assert isinstance(ticket, Ticket)
    admission.draining = True
    settings = DrainSettings(settle_s=0.1, window_s=5, max_hints_per_s=50, min_hints_per_s=1)
    seen: dict[str, list[tuple[float, InboxItem]]] = {}

    async def hello() -> None:
        await asyncio.sleep(0.5)  # the claim's store work
        (session,) = _open(registry, 1, capabilities=frozenset({CAP_RECONNECT}), prefix="late")
        ticket.accepted()  # SessionAccepted written: the ticket goes after the session opened
        await _handler(registry, session, seen)

    began = time.monotonic()
    late = asyncio.create_task(hello())
    await Drainer(registry, settings, handshakes=lambda: admission.inflight).run(
        deadline=began + settings.settle_s + settings.window_s
    )
    # Hinted, so its handler ends (unhinted, it would wait for the stop's cancellation).
    done, _ = await asyncio.wait({late}, timeout=5)
    late.cancel()
    assert done, "the session opened after the drain was never hinted"
    assert [type(item) for _, item in seen["late0"]] == [Outbound, Close]
    assert len(registry) == 0 and admission.inflight == 0
