"""The gateway's plumbing for liveness and bad input, without a network: the heartbeat renewal of
sessions allowed a longer silence, and the rate-limited error log."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from gateway.rpc import RateLimitedLog, peer_host
from gateway.sessions import SessionRegistry
from openshell_wire.records import JournalEpoch, SandboxId


def _open(registry: SessionRegistry, sandbox_id: str, *, stale_after_s: float) -> None:
    session = registry.open(
        sandbox_id=SandboxId(sandbox_id),
        instance_id="i",
        journal_epoch=JournalEpoch("e"),
        capabilities=frozenset(),
    )
    session.stale_after_s = stale_after_s


def test_only_a_session_allowed_a_longer_silence_is_renewed_when_idle() -> None:
    registry = SessionRegistry()
    _open(registry, "usual", stale_after_s=2.0)
    _open(registry, "widened", stale_after_s=60.0)
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "both were just handed out"
    for sid in ("usual", "widened"):
        session = registry.get(sid)
        assert session is not None
        session.last_flushed_wall -= timedelta(seconds=3)
    before = datetime.now(UTC)
    beats = registry.take_heartbeats(renew_after_s=2.0)
    assert list(beats) == ["widened"] and beats["widened"] >= before
    assert registry.take_heartbeats(renew_after_s=2.0) == {}, "renewed: not again until idle again"


def test_a_heartbeat_is_handed_out_once_and_again_after_a_failed_flush() -> None:
    registry = SessionRegistry()
    _open(registry, "sb", stale_after_s=2.0)
    session = registry.get("sb")
    assert session is not None
    registry.touch(session)
    beats = registry.take_heartbeats(renew_after_s=2.0)
    assert beats == {"sb": session.last_seen_wall}
    assert registry.take_heartbeats(renew_after_s=2.0) == {}
    registry.requeue_heartbeats(beats)
    assert registry.take_heartbeats(renew_after_s=2.0) == beats


def test_the_error_log_lets_one_line_per_key_through_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    errors = RateLimitedLog(
        logging.getLogger("test.ratelimit"), interval_s=60, max_keys=2, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert errors.log(logging.WARNING, "a", "bad a")
        assert not any(errors.log(logging.WARNING, "a", "bad a") for _ in range(199))
        assert errors.log(logging.WARNING, "b", "bad b"), "another key has its own allowance"
        now[0] = 61.0
        assert errors.log(logging.WARNING, "a", "bad a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad a", "bad b", "bad a (and 199 more like it in the last 60s)"]
    assert all(r.exc_info is None for r in caplog.records)
    errors.log(logging.WARNING, "c", "bad c")
    assert len(errors._seen) == 2, "keys are bounded"


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.5:41234") == "ipv4:10.0.0.5"
    assert peer_host("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
