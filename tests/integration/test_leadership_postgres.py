"""The leader's term fence on a real PostgreSQL server: the checks tests/unit/test_leadership.py
runs on SQLite, held to the same behaviour."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import Database
from gateway.store.leadership import LeadershipStore, LeaderTerm, NotLeader
from tests.integration.test_store_postgres import pg, pytestmark
from tests.unit.test_leadership import (
    NAME,
    LeaseApi,
    check_a_clock_ahead_does_not_free_a_create_in_flight,
    check_a_stale_leader_writes_nothing,
    check_terms_only_grow,
    elector,
)

__all__ = ["pg", "pytestmark"]  # the fixture and the skip, shared


async def test_terms_only_grow(pg: Database) -> None:
    await check_terms_only_grow(pg)


async def test_a_stale_leader_writes_nothing(pg: Database) -> None:
    await check_a_stale_leader_writes_nothing(pg)


async def test_a_newer_leaders_claim_waits_for_a_fenced_write_in_flight(pg: Database) -> None:
    """No write of an old term commits after a newer term is recorded: the fenced write holds the
    leadership row share-locked until its commit, so the claim waits for it (and a write that
    starts after the claim finds the newer term)."""
    store = LeadershipStore(pg)
    old = await store.claim("lease", holder="gw-a", term=1)
    assert old is not None
    async with pg.engine.begin() as conn:
        await old.hold(conn)
        claim = asyncio.create_task(store.claim("lease", holder="gw-b", term=2))
        await asyncio.sleep(0.5)
        assert not claim.done(), "the claim went past a write of the old term still in flight"
    new = await asyncio.wait_for(claim, 10)
    assert new is not None and new.term == 2
    async with pg.engine.begin() as conn:
        with pytest.raises(NotLeader):
            await old.hold(conn)


async def test_a_clock_ahead_does_not_free_a_create_in_flight(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await check_a_clock_ahead_does_not_free_a_create_in_flight(pg, monkeypatch)


async def test_a_claim_waiting_on_a_frozen_write_does_not_stop_the_renewals(pg: Database) -> None:
    """Review finding 4b: the new leader's claim waits for an ex-leader's fenced write in flight
    (frozen inside it, until PostgreSQL ends its transaction). It used to wait inside the election
    round, renewing nothing: past renew_deadline_s, it started the work and stopped it at the next
    round, and leadership flapped. The claim now runs beside the renewals: the Lease stays renewed
    and the work starts once, when the write ended, and keeps running."""
    store = LeadershipStore(pg)
    old = await store.claim(f"ns/{NAME}", holder="gw-old", term=0)
    assert old is not None
    api = LeaseApi()
    started, stops = asyncio.Event(), 0

    async def lead(term: LeaderTerm) -> None:
        nonlocal stops
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stops += 1

    el = elector(api, store, lead, retry_period_s=0.2, renew_deadline_s=1, lease_duration_s=1.5)
    try:
        async with pg.engine.begin() as conn:
            await old.hold(conn)  # the ex-leader, frozen inside a fenced write
            el.start()
            await asyncio.sleep(2)  # twice the renew deadline
            assert not started.is_set(), "work started before its term was recorded"
            writes = api.writes
            await asyncio.sleep(0.5)
            assert api.writes > writes, "the Lease is still renewed while the claim waits"
        # The frozen write ended (here: committed): the claim goes through and the work starts.
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(1.5)  # past a renew deadline: a leader that missed it would stop
        assert stops == 0, "the work was stopped: the Lease was not renewed while the claim waited"
        recorded = await store.get(f"ns/{NAME}")
        assert recorded is not None and (recorded.holder, recorded.term) == ("gw-a", 1)
    finally:
        await el.stop()
