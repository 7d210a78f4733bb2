"""The leader gauge (``openshell_gateway_leader``), read from the gateway metrics' text exposition
while a real :class:`gateway.leader.LeaderElector` campaigns: its term recorded in a real SQLite
store, its Lease in the in-memory Lease API of tests/unit/test_leadership.py (the elector runs only
with the Kubernetes driver; the full gateway with a cluster is tests/integration/test_ha_proof.py's
ground). Also: the exposition has no label naming a sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import Database
from gateway.store.leadership import LeadershipStore, LeaderTerm
from tests.unit.test_leadership import LeaseApi, elector


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    try:
        yield database
    finally:
        await database.close()


def leader(metrics: GatewayMetrics) -> float | None:
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name == "openshell_gateway_leader":
            (sample,) = family.samples
            return sample.value
    return None


async def until(metrics: GatewayMetrics, expected: float | None) -> None:
    for _ in range(200):
        if leader(metrics) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"openshell_gateway_leader stayed {leader(metrics)}, expected {expected}")


async def test_the_leader_gauge_follows_the_election(db: Database) -> None:
    async def leases() -> None:
        raise AssertionError("not counted here")

    metrics = GatewayMetrics(SessionRegistry())
    metrics.use_leases("gw-a", leases)  # type: ignore[arg-type]
    assert leader(metrics) is None, "no election: no series"

    api = LeaseApi()
    leading = asyncio.Event()

    async def lead(term: LeaderTerm) -> None:
        leading.set()
        await asyncio.Event().wait()

    el = elector(api, LeadershipStore(db), lead, retry_period_s=0.2, renew_deadline_s=1, lease_duration_s=3)
    el.start()
    try:
        await asyncio.wait_for(leading.wait(), 10)
        await until(metrics, 1.0)
        # Renewals fail: the work stops at the deadline, the gauge says so.
        api.refuse_after = api.writes
        await until(metrics, 0.0)
    finally:
        await el.stop()
    assert leader(metrics) is None, "the election stopped: no series"


async def test_another_replicas_election_is_not_this_ones(db: Database) -> None:
    async def leases() -> None:
        raise AssertionError("not counted here")

    metrics = GatewayMetrics(SessionRegistry())
    metrics.use_leases("gw-b", leases)  # type: ignore[arg-type]
    leading = asyncio.Event()

    async def lead(term: LeaderTerm) -> None:
        leading.set()
        await asyncio.Event().wait()

    el = elector(LeaseApi(), LeadershipStore(db), lead, replica="gw-a", retry_period_s=0.2)
    el.start()
    try:
        await asyncio.wait_for(leading.wait(), 10)
        assert leader(metrics) is None
    finally:
        await el.stop()


async def test_the_statement_hook_leaves_nothing_on_the_connection(db: Database) -> None:
    """A connection lives for hours in the pool: what the hook keeps on it is one start time, that
    of the statement in flight or the last one, whether anyone observes or not and however many
    statements fail (f3a3d27 kept a list there, and without an observer never emptied it). A failed
    statement's time is not taken off the connection: that would revalidate an invalidated
    connection from inside the error handling."""
    from sqlalchemy import text

    from gateway.store import db as db_module

    observer = db_module._statement_observer
    try:
        for watching in (False, True):
            db_module._statement_observer = observer if watching else None
            async with db.engine.connect() as conn:
                for _ in range(3):
                    await conn.execute(text("SELECT 1"))
                with pytest.raises(Exception, match="no such table"):
                    await conn.execute(text("SELECT * FROM no_such_table"))
                info = (await conn.get_raw_connection()).info
                assert isinstance(info.get(db_module._STARTED, 0.0), float), info
    finally:
        db_module._statement_observer = observer
