"""The leader's term fence (gateway/store/leadership.py) on SQLite; the PostgreSQL run of the same
checks is tests/integration/test_leadership_postgres.py.

A Kubernetes Lease says who leads, not who may still write: a leader paused past its lease wakes
up with pod events still to record. Its driver-state writes carry its term and change nothing once
a newer leader claimed a higher one.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from lightkube import ApiError
from lightkube.models.meta_v1 import Status
from lightkube.resources.coordination_v1 import Lease

from gateway.config import LeaderSettings
from gateway.drivers.kubernetes import PodState
from gateway.leader import Election, LeaderElector
from gateway.provisioner import CREATE_DEADLINE_S, KubernetesProvisioner
from gateway.replicas import ReplicaIdentity
from gateway.store import Database, SandboxStore
from gateway.store.db import utcnow
from gateway.store.leadership import LeadershipStore, LeaderTerm, NotLeader
from tests.unit.test_provisioner import SETTINGS, FakeDriver, provisioner

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
    # The same claim again (its first attempt committed but the reply was lost) is not a newer
    # leader's: it answers the term, and the elector leads rather than wait out a lease duration.
    assert await store.claim(NAME, holder="gw-b", term=1) == second
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


class LeaseApi:
    """The Lease part of the Kubernetes API, in memory: get, create and replace with the API
    server's optimistic concurrency (a replace at a stale resourceVersion is 409). The elector's
    behaviour against the real API server is tests/e2e/test_leader_election.py; this one can
    refuse calls at a chosen moment, which the real one cannot be made to do in a unit test.
    After ``refuse_after`` successful writes every call raises (the API unreachable)."""

    def __init__(self, *, refuse_after: int | None = None) -> None:
        self.lease: Lease | None = None
        self.version = 0
        self.writes = 0
        self.refuse_after = refuse_after
        #: Monotonic time the last successful write landed.
        self.written_at = 0.0

    def _refuse(self) -> None:
        if self.refuse_after is not None and self.writes >= self.refuse_after:
            raise ConnectionRefusedError("the API server is unreachable")

    async def get(self, resource: type[Lease], name: str, *, namespace: str) -> Lease:
        self._refuse()
        if self.lease is None:
            raise ApiError(status=Status(code=404, message=f"leases {name!r} not found"))
        return copy.deepcopy(self.lease)

    async def create(self, lease: Lease) -> Lease:
        self._refuse()
        if self.lease is not None:
            raise ApiError(status=Status(code=409, message="already exists"))
        return self._write(lease)

    async def replace(self, lease: Lease) -> Lease:
        self._refuse()
        assert self.lease is not None and lease.metadata is not None and self.lease.metadata is not None
        if lease.metadata.resourceVersion != self.lease.metadata.resourceVersion:
            raise ApiError(status=Status(code=409, message="the object has been modified"))
        return self._write(lease)

    def _write(self, lease: Lease) -> Lease:
        self.version += 1
        self.writes += 1
        self.written_at = time.monotonic()
        lease = copy.deepcopy(lease)
        assert lease.metadata is not None
        lease.metadata.resourceVersion = str(self.version)
        self.lease = lease
        return copy.deepcopy(lease)

    @property
    def holder(self) -> str | None:
        return self.lease.spec.holderIdentity if self.lease is not None and self.lease.spec else None


def elector(
    api: LeaseApi,
    store: LeadershipStore,
    lead: Callable[[LeaderTerm], Awaitable[None]],
    *,
    namespace: str = "ns",
    replica: str = "gw-a",
    **timings: float,
) -> LeaderElector:
    async def work(term: LeaderTerm) -> None:
        await lead(term)

    return LeaderElector(
        api,  # type: ignore[arg-type]
        namespace=namespace,
        identity=ReplicaIdentity(id=replica, run="run-1"),
        settings=LeaderSettings(lease_name=NAME, **timings),
        store=store,
        lead=work,
    )


async def test_a_leader_whose_renewals_fail_stops_before_another_may_take_over(db: Database) -> None:
    """Review finding 2: renewals that fail at once (connection refused) must not push the stop a
    retry period past the renew deadline. With retry 0.9 s, deadline 1 s and lease 1.7 s (a valid
    config) the loop used to sleep a full retry period after a failure at 0.9 s and stop at 1.8 s,
    after another replica may take over at 1.7 s; it now wakes at the deadline."""
    api = LeaseApi(refuse_after=2)  # the takeover and one renewal, then nothing gets through
    started, stopped = asyncio.Event(), asyncio.Event()
    stopped_at = 0.0

    async def lead(term: LeaderTerm) -> None:
        nonlocal stopped_at
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped_at = time.monotonic()
            stopped.set()

    lease_duration_s = 1.7
    el = elector(
        api,
        LeadershipStore(db),
        lead,
        retry_period_s=0.9,
        renew_deadline_s=1.0,
        lease_duration_s=lease_duration_s,
    )
    el.start()
    try:
        await asyncio.wait_for(stopped.wait(), 10)
        assert started.is_set() and api.writes == 2
        # Another replica may take over lease_duration_s after it saw the last renewal land.
        assert stopped_at - api.written_at < lease_duration_s, (
            f"the work stopped {stopped_at - api.written_at:.2f} s after the last renewal"
        )
    finally:
        await el.stop()


async def test_a_stop_while_the_work_unwinds_does_not_lead_again(db: Database) -> None:
    """Review finding 3: stop() landing while the election loop waits for the work to end (its
    deadline missed) cancelled the loop inside that wait, which absorbed the cancellation; the
    loop went on, took the Lease again and restarted the work after stop() (and stop() never
    returned). Now the loop ends, the work runs once, and stop() releases the Lease."""
    api = LeaseApi()
    started, unwinding = asyncio.Event(), asyncio.Event()
    leads = 0

    async def lead(term: LeaderTerm) -> None:
        nonlocal leads
        leads += 1
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwinding.set()
            await asyncio.sleep(0.5)  # a database call unwinding on cancellation

    el = elector(api, LeadershipStore(db), lead, retry_period_s=0.2, renew_deadline_s=1, lease_duration_s=3)
    el.start()
    await asyncio.wait_for(started.wait(), 10)
    api.refuse_after = api.writes  # renewals fail: the loop stops the work at the deadline
    await asyncio.wait_for(unwinding.wait(), 10)  # the loop now waits for the work to end
    api.refuse_after = None  # the API is back: a loop still running would take the Lease again
    await asyncio.wait_for(el.stop(), 5)
    await asyncio.sleep(0.5)  # a few retry periods for a loop that survived
    assert leads == 1, "the work was started again after stop()"
    assert api.holder is None, "stop() released the Lease"


async def test_leadership_is_recorded_per_lease_namespace(db: Database) -> None:
    """Review finding 7: two deployments sharing one database, each with its own Lease of the same
    name in its own namespace, shared one leadership row: each acquisition raised the other's
    term and fenced its writes. The row is keyed by namespace/name now: both lead, both write."""
    store = LeadershipStore(db)
    terms: dict[str, LeaderTerm] = {}
    led = {"ns-a": asyncio.Event(), "ns-b": asyncio.Event()}

    def lead_in(namespace: str) -> Callable[[LeaderTerm], Awaitable[None]]:
        async def lead(term: LeaderTerm) -> None:
            terms[namespace] = term
            led[namespace].set()
            await asyncio.Event().wait()

        return lead

    electors = [
        elector(LeaseApi(), store, lead_in(ns), namespace=ns, replica=f"gw-{ns}", retry_period_s=0.1)
        for ns in ("ns-a", "ns-b")
    ]
    for el in electors:
        el.start()
        # One after the other: the second reads the recorded term only after the first claimed.
        await asyncio.wait_for(led[el._namespace].wait(), 10)
    try:
        sandboxes = SandboxStore(db)
        await sandboxes.create("sb-1", driver="kubernetes", driver_state={"phase": "Creating"})
        for ns in ("ns-a", "ns-b"):
            assert await sandboxes.set_driver_state("sb-1", {"phase": ns}, leader=terms[ns])
            assert terms[ns].name == f"{ns}/{NAME}"
    finally:
        for el in electors:
            await el.stop()


async def check_a_clock_ahead_does_not_free_a_create_in_flight(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 5: a sandbox registered by one replica (its create still making the pod) is
    judged by another, whose clock is ahead by more than CREATE_DEADLINE_S: its DELETE finding no
    pod freed the id (a second create could then race the first for the same pod), and its list
    marked the create Failed. The deadline is stamped and judged on the database's clock now."""
    sandboxes = SandboxStore(db)
    await sandboxes.create(
        "sb-1", driver="kubernetes", driver_state={"phase": "Creating", "at": utcnow().isoformat()}
    )
    election = Election(
        identity=ReplicaIdentity(id="gw-ahead", run="run-1"),
        settings=LeaderSettings(),
        store=LeadershipStore(db),
    )
    ahead = KubernetesProvisioner(SETTINGS, sandboxes, driver=FakeDriver(), election=election)  # type: ignore[arg-type]
    skew = timedelta(seconds=CREATE_DEADLINE_S + 60)
    monkeypatch.setattr("gateway.provisioner.utcnow", lambda: utcnow() + skew)
    assert await ahead.delete("sb-1") is False  # no pod yet: the create has not made it
    await ahead._catch_up()  # its list sees no pod either
    row = await sandboxes.get("sb-1")
    assert row is not None and (row.driver_state or {}).get("phase") == "Creating", row
    # What the create stamps is the database's clock too (not the skewed one).
    monkeypatch.setattr("gateway.provisioner.utcnow", lambda: utcnow() - skew)
    created = await ahead.create("sb-2", ["true"], image=None, env={})
    row = await sandboxes.get("sb-2")
    assert created["generation"] == 1 and row is not None and row.driver_state is not None
    stamped = datetime.fromisoformat(row.driver_state["at"])
    assert abs((stamped - utcnow()).total_seconds()) < 60, stamped


async def test_a_clock_ahead_does_not_free_a_create_in_flight(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await check_a_clock_ahead_does_not_free_a_create_in_flight(db, monkeypatch)
