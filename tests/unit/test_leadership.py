"""The leader's term fence (gateway/store/leadership.py) on SQLite; the PostgreSQL run of the same
checks is tests/integration/test_leadership_postgres.py.

A Kubernetes Lease says who leads, not who may still write: a leader paused past its lease wakes
up with pod events still to record. Its driver-state writes carry its term and change nothing once
a newer leader claimed a higher one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.drivers.kubernetes import PodState
from gateway.store import Database, SandboxStore
from gateway.store.leadership import LeadershipStore, NotLeader
from tests.unit.test_provisioner import FakeDriver, provisioner

NAME = "openshell-gateway-leader"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    try:
        yield database
    finally:
        await database.close()


async def check_terms_only_grow(db: Database) -> None:
    store = LeadershipStore(db)
    assert await store.get(NAME) is None
    first = await store.claim(NAME, holder="gw-a", term=0)
    assert first is not None and (first.holder, first.term) == ("gw-a", 0)
    second = await store.claim(NAME, holder="gw-b", term=1)
    assert second is not None
    # An acquisition that lost the Lease race, or was paused before recording its term, never
    # takes the row back; nor does a second claim of a term already recorded.
    assert await store.claim(NAME, holder="gw-a", term=0) is None
    assert await store.claim(NAME, holder="gw-a", term=1) is None
    recorded = await store.get(NAME)
    assert recorded is not None and (recorded.holder, recorded.term) == ("gw-b", 1)


async def check_a_stale_leader_writes_nothing(db: Database) -> None:
    store = LeadershipStore(db)
    sandboxes = SandboxStore(db)
    await sandboxes.create("sb-1", driver="kubernetes", driver_state={"phase": "Creating", "at": "x"})
    old = await store.claim(NAME, holder="gw-a", term=3)
    assert old is not None
    assert await sandboxes.set_driver_state("sb-1", {"phase": "Pending"}, leader=old)
    new = await store.claim(NAME, holder="gw-b", term=4)
    assert new is not None
    with pytest.raises(NotLeader, match=r"no longer leads.*its term is 3, the recorded one 4"):
        await sandboxes.set_driver_state("sb-1", {"phase": "Running"}, leader=old)
    row = await sandboxes.get("sb-1")
    assert row is not None and row.driver_state == {"phase": "Pending"}, "the fenced write changed nothing"
    assert await sandboxes.set_driver_state("sb-1", {"phase": "Running"}, leader=new)
    # An unknown sandbox under a valid term is just not written (not a lost leadership).
    assert await sandboxes.set_driver_state("nobody", {"phase": "Running"}, leader=new) is False


async def test_terms_only_grow(db: Database) -> None:
    await check_terms_only_grow(db)


async def test_a_stale_leader_writes_nothing(db: Database) -> None:
    await check_a_stale_leader_writes_nothing(db)


async def test_a_paused_ex_leaders_pod_watch_records_nothing_after_a_takeover(db: Database) -> None:
    """The pod watch's own writes (gateway/provisioner.py) carry the term: the ex-leader's event,
    delivered after another replica claimed, raises NotLeader (which ends its watch) and leaves
    the newer leader's record as it was."""
    sandboxes = SandboxStore(db)
    terms = LeadershipStore(db)
    a, b = provisioner(sandboxes, FakeDriver()), provisioner(sandboxes, FakeDriver())
    await a.create("sb-1", ["true"], image=None, env={})
    old = await terms.claim(NAME, holder="gw-a", term=1)
    assert old is not None
    assert await a._record(PodState("sb-1", "sandbox-sb-1", "Pending", pod_uid="uid-1"), old)
    new = await terms.claim(NAME, holder="gw-b", term=2)
    assert new is not None
    assert await b._record(PodState("sb-1", "sandbox-sb-1", "Succeeded", pod_uid="uid-1"), new)
    with pytest.raises(NotLeader):
        await a._record(PodState("sb-1", "sandbox-sb-1", "Running", pod_uid="uid-1"), old)
    row = await sandboxes.get("sb-1")
    assert row is not None and row.driver_state is not None
    assert (row.driver_state["phase"], row.driver_state["leader_term"]) == ("Succeeded", 2)
    # The list a stale leader starts from marks nothing either.
    b_driver = FakeDriver()
    stale = provisioner(sandboxes, b_driver)
    with pytest.raises(NotLeader):
        await stale._catch_up(old)  # no pod listed: it would mark sb-1 Deleted
    row = await sandboxes.get("sb-1")
    assert row is not None and (row.driver_state or {})["phase"] == "Succeeded"
