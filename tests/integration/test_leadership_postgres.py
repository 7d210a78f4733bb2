"""The leader's term fence on a real PostgreSQL server: the checks tests/unit/test_leadership.py
runs on SQLite, held to the same behaviour."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import Database
from gateway.store.leadership import LeadershipStore, NotLeader
from tests.integration.test_store_postgres import pg, pg_server, pg_url, pytestmark
from tests.unit.test_leadership import check_a_stale_leader_writes_nothing, check_terms_only_grow

__all__ = ["pg", "pg_server", "pg_url", "pytestmark"]  # the fixtures and the skip, shared


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
