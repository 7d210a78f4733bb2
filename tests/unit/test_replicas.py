"""Replica leases and the liveness derived from them (issue 20): the state rule with a stubbed
clock, the ``replicas`` table on a real SQLite store, the renewer through a store outage, the
per-process cache, and a real in-process gateway (its row written at start, deleted at stop, and a
sandbox held by a replica with no live lease shown disconnected by its API and metrics)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc import aio
from sqlalchemy import text

from gateway.app import Gateway, GatewayStartError
from gateway.config import HaSettings
from gateway.replicas import LeaseRenewer, LeaseStartError, LeaseView, ReplicaIdentity, replica_id
from gateway.sandbox_state import Liveness, ReplicaLeases, SandboxState, disconnected_since, sandbox_state
from gateway.store import Database, StoreError
from gateway.store.db import create_engine, upgrade
from gateway.store.replicas import LeaseSnapshot, Renewal, ReplicaLease, ReplicaStore
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config
from tests.support.waiting import until

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
# Heartbeats fresh for 10 s, lost 60 s after the disconnection.
LIVENESS = Liveness(stale_after_s=8.0, fresh_for_s=10.0, lost_after_s=60.0)
HA = HaSettings(lease_s=15.0, renew_interval_s=5.0)


@dataclass(frozen=True)
class _Row:
    connected: bool = True
    connected_at: datetime | None = T0
    disconnected_at: datetime | None = None
    last_heartbeat_at: datetime | None = T0
    exit_code: int | None = None
    owner: str | None = "gw-a"
    owner_run: str | None = None


def _leases(**renewed: datetime) -> ReplicaLeases:
    return ReplicaLeases(lease_s=HA.lease_s, renewed_at={k.replace("_", "-"): v for k, v in renewed.items()})


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _identity(replica: str) -> ReplicaIdentity:
    return ReplicaIdentity(id=replica, run=uuid.uuid4().hex)


def test_a_sandbox_is_connected_while_its_owners_lease_and_its_heartbeat_are_alive() -> None:
    now = _at(5)
    leases = _leases(gw_a=_at(0))
    assert sandbox_state(_Row(), now=now, liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
    assert disconnected_since(_Row(), now=now, liveness=LIVENESS, leases=leases) is None


def test_a_lapsed_lease_shows_the_sandbox_disconnected_then_lost_though_its_heartbeat_is_fresh() -> None:
    # The owner last renewed at T0 - 12 s; its lease (15 s) lapsed at T0 + 3 s.
    leases = _leases(gw_a=_at(-12))
    row = _Row(last_heartbeat_at=_at(1))
    assert sandbox_state(row, now=_at(2), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
    # Lapsed: disconnected, since it was last heard from (the heartbeat alone would say connected).
    assert sandbox_state(row, now=_at(4), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert disconnected_since(row, now=_at(4), liveness=LIVENESS, leases=leases) == _at(1)
    assert sandbox_state(row, now=_at(4), liveness=LIVENESS) is SandboxState.CONNECTED, "no leases: old rule"
    # Lost once disconnected for longer than lost_after_s.
    assert sandbox_state(row, now=_at(61), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert sandbox_state(row, now=_at(62), liveness=LIVENESS, leases=leases) is SandboxState.LOST


def test_an_owner_without_a_lease_row_holds_nothing() -> None:
    leases = _leases(gw_b=_at(0))  # another replica lives; gw-a has no row (deleted, or never)
    assert sandbox_state(_Row(), now=_at(1), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    no_owner = _Row(owner=None)
    assert sandbox_state(no_owner, now=_at(1), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED


def test_a_session_of_a_gateway_from_before_leases_is_judged_by_its_heartbeat_alone() -> None:
    # During a rolling upgrade, a replica of the previous release owns sessions as
    # "gateway-<hex of an object id>" and writes no lease row: its live sandboxes stay connected
    # while their heartbeats are fresh (not disconnected on every new replica), and a stale
    # heartbeat still shows them disconnected.
    leases = _leases(gw_b=_at(0))
    legacy = _Row(owner="gateway-7f3a2b1c0d10")
    assert sandbox_state(legacy, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
    assert sandbox_state(legacy, now=_at(11), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    # A replica id of today's shape without a row holds nothing (the tests' gateway-<port> too).
    for owner in ("gateway-7070", "gw-a", "openshell-gateway-5d9c8b7f6-x2x4q"):
        row = _Row(owner=owner)
        assert sandbox_state(row, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED


def test_a_stale_heartbeat_is_disconnected_though_the_owner_lives() -> None:
    leases = _leases(gw_a=_at(20))
    assert sandbox_state(_Row(), now=_at(21), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert disconnected_since(_Row(), now=_at(21), liveness=LIVENESS, leases=leases) == T0


def test_exited_and_recorded_disconnections_do_not_depend_on_the_lease() -> None:
    leases = _leases()
    exited = _Row(exit_code=0)
    assert sandbox_state(exited, now=_at(1), liveness=LIVENESS, leases=leases) is SandboxState.EXITED
    gone = _Row(connected=False, disconnected_at=_at(1))
    assert sandbox_state(gone, now=_at(2), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert disconnected_since(gone, now=_at(2), liveness=LIVENESS, leases=leases) == _at(1)


def test_alive_counts_only_leases_renewed_within_lease_s() -> None:
    leases = _leases(gw_a=_at(0), gw_b=_at(-16), gw_c=_at(-15))
    assert leases.alive_count(now=T0) == 2
    assert not leases.alive("gw-b", now=T0) and leases.alive("gw-c", now=T0)


def test_a_session_of_an_earlier_run_of_the_same_replica_id_is_not_revived() -> None:
    # Review finding 2: gw-a crashed with the session of run r1 flagged connected, and came back
    # as run r2 under the same id; its renewal must not count for r1's session.
    leases = ReplicaLeases(lease_s=HA.lease_s, renewed_at={"gw-a": _at(4)}, runs={"gw-a": "r2"})
    theirs = _Row(owner_run="r1")
    assert sandbox_state(theirs, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert disconnected_since(theirs, now=_at(5), liveness=LIVENESS, leases=leases) == T0
    mine = _Row(owner_run="r2")
    assert sandbox_state(mine, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
    # A session recorded without its run (before the run was recorded) keeps the rule by id.
    assert sandbox_state(_Row(), now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED


def test_a_lease_row_without_a_run_holds_its_sessions_by_id_during_a_rollout() -> None:
    # Review (s7) finding 6: during a rollout from the release before run ids, an old pod's lease
    # row has no run_id and its hello leaves owner_run as a newer pod's earlier session wrote it.
    # Its live session must stay connected (it was shown disconnected, then lost, on every new
    # replica); its lapsed lease still shows it disconnected.
    for runs in ({"gw-old": None}, {}):
        leases = ReplicaLeases(lease_s=HA.lease_s, renewed_at={"gw-old": _at(4)}, runs=runs)
        assert leases.alive("gw-old", run="r-new", now=_at(5)), runs
        row = _Row(owner="gw-old", owner_run="r-new")
        assert sandbox_state(row, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
        assert not leases.alive("gw-old", run="r-new", now=_at(4 + HA.lease_s + 1)), runs


def test_the_legacy_owner_rule_is_only_for_rows_without_a_run() -> None:
    # Review (s7) finding 7: an owner_run is written only by a release that renews a lease, so a
    # missing lease row means a dead owner even when its id has the legacy shape (a host name
    # such as gateway-1a2b3c4d5 does); a row without owner_run keeps the heartbeat rule.
    leases = _leases(gw_b=_at(0))
    assert not leases.alive("gateway-1a2b3c4d5", run="r1", now=_at(1))
    assert leases.alive("gateway-1a2b3c4d5", now=_at(1))
    new = _Row(owner="gateway-1a2b3c4d5", owner_run="r1")
    assert sandbox_state(new, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.DISCONNECTED
    assert disconnected_since(new, now=_at(5), liveness=LIVENESS, leases=leases) == T0
    legacy = _Row(owner="gateway-1a2b3c4d5")
    assert sandbox_state(legacy, now=_at(5), liveness=LIVENESS, leases=leases) is SandboxState.CONNECTED
    # A legacy owner's hello leaves the owner_run of a newer replica's earlier session (it does not
    # know the column): a run of another lease row is not the owner's, so the legacy rule holds.
    runs = ReplicaLeases(lease_s=HA.lease_s, renewed_at={"gw-b": _at(0)}, runs={"gw-b": "r-b"})
    moved = _Row(owner="gateway-1a2b3c4d5", owner_run="r-b")
    assert sandbox_state(moved, now=_at(5), liveness=LIVENESS, leases=runs) is SandboxState.CONNECTED


def test_leases_are_judged_on_the_database_clock_whatever_this_processs_clock_says() -> None:
    # Review finding 3: renewed at T0 by the database's clock; this process's clock runs an hour
    # behind (skew +1 h) or ahead (skew -1 h): the lease is alive for lease_s of database time.
    for off in (timedelta(hours=-1), timedelta(hours=1)):
        leases = ReplicaLeases(lease_s=HA.lease_s, renewed_at={"gw-a": T0}, runs={"gw-a": "r1"}, skew=-off)
        here = T0 + off  # this process's clock at database time T0
        assert leases.alive("gw-a", run="r1", now=here + timedelta(seconds=HA.lease_s))
        assert not leases.alive("gw-a", run="r1", now=here + timedelta(seconds=HA.lease_s + 1))
        assert leases.alive_count(now=here) == 1


def test_the_replica_id_is_the_setting_or_the_host_name() -> None:
    import socket

    assert replica_id(HaSettings(replica_id="openshell-gateway-0")) == "openshell-gateway-0"
    assert replica_id(HaSettings()) == socket.gethostname()


@pytest.fixture
async def db(tmp_path: Path) -> Any:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    yield database
    await database.close()


async def test_the_lease_row_is_created_renewed_marked_draining_and_deleted(db: Database) -> None:
    store = ReplicaStore(db)
    await store.renew("gw-a", address="a:1", sessions=0, draining=False, started_at=T0, renewed_at=T0)
    await store.renew("gw-a", address="a:1", sessions=3, draining=False, started_at=T0, renewed_at=_at(5))
    await store.renew("gw-b", address="b:1", sessions=1, draining=False, started_at=T0, renewed_at=_at(4))
    await store.mark_draining("gw-b")
    assert await store.leases() == [
        ReplicaLease("gw-a", "a:1", 3, False, T0, _at(5)),
        ReplicaLease("gw-b", "b:1", 1, True, T0, _at(4)),
    ]
    await store.delete("gw-b")
    assert [r.id for r in await store.leases()] == ["gw-a"]


async def test_a_renewal_forgets_rows_lapsed_for_ten_leases(db: Database) -> None:
    store = ReplicaStore(db)
    for rid, age in (("gw-gone", 10 * HA.lease_s + 1), ("gw-late", 10 * HA.lease_s - 1)):
        renewed = T0 - timedelta(seconds=age)
        await store.renew(
            rid, address="x:1", sessions=0, draining=False, started_at=renewed, renewed_at=renewed
        )
    clock = [T0 - timedelta(seconds=10 * HA.lease_s + 1)]  # the renewer's own row is never forgotten
    renewer = LeaseRenewer(
        store, identity=_identity("gw-a"), address="a:1", ha=HA, sessions=lambda: 0, clock=lambda: clock[0]
    )
    assert await renewer.renew_once()
    clock[0] = T0
    assert await renewer.renew_once()
    assert [r.id for r in await store.leases()] == ["gw-a", "gw-late"]


class _FlakyReplicas(ReplicaStore):
    """A real store whose writes and reads fail while ``failing`` (a database outage)."""

    failing = False
    reads = 0

    async def renew(self, replica_id: str, **kwargs: Any) -> Renewal:
        if self.failing:
            raise StoreError("cannot renew the lease: the database is away")
        return await super().renew(replica_id, **kwargs)

    async def snapshot(self, **kwargs: Any) -> LeaseSnapshot:
        self.reads += 1
        if self.failing:
            raise StoreError("cannot read the replicas' leases: the database is away")
        return await super().snapshot(**kwargs)


async def test_the_renewer_outlives_a_store_outage_and_renews_after_it(db: Database) -> None:
    store = _FlakyReplicas(db)
    ha = HaSettings(replica_id="gw-a", lease_s=0.2, renew_interval_s=0.05)
    renewer = LeaseRenewer(store, identity=_identity("gw-a"), address="a:1", ha=ha, sessions=lambda: 2)
    await renewer.start()
    store.failing = True
    await asyncio.sleep(0.2)
    assert renewer.failures >= 2
    store.failing = False
    await asyncio.sleep(0.15)
    [row] = await store.leases()
    assert row.id == "gw-a" and row.sessions == 2 and renewer.failures == 0
    await renewer.drain()
    assert (await store.leases())[0].draining
    await renewer.stop()
    assert await store.leases() == []


async def test_the_start_waits_for_the_first_renewal_and_fails_without_one(db: Database) -> None:
    # Review finding 1: a start that carried on without its row let sessions name an owner with
    # no lease (shown disconnected on every replica).
    store = _FlakyReplicas(db)
    ha = HaSettings(replica_id="gw-a", lease_s=0.4, renew_interval_s=0.05)
    renewer = LeaseRenewer(store, identity=_identity("gw-a"), address="a:1", ha=ha, sessions=lambda: 0)
    store.failing = True
    asyncio.get_running_loop().call_later(0.15, lambda: setattr(store, "failing", False))
    await renewer.start()
    assert [r.id for r in await store.leases()] == ["gw-a"], "the row exists once start() returns"
    await renewer.stop()

    store.failing = True
    never = LeaseRenewer(store, identity=_identity("gw-a"), address="a:1", ha=ha, sessions=lambda: 0)
    with pytest.raises(LeaseStartError, match=r"cannot write this replica's lease \('gw-a'\).*within 0.4s"):
        await never.start()
    assert never.failures >= 2, "retried until the deadline"
    store.failing = False
    assert await store.leases() == []


async def test_two_live_processes_under_one_id_are_reported_and_never_delete_each_others_row(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    store = ReplicaStore(db)
    first, second = _identity("gw-a"), _identity("gw-a")
    a = LeaseRenewer(store, identity=first, address="a:1", ha=HA, sessions=lambda: 0)
    b = LeaseRenewer(store, identity=second, address="b:1", ha=HA, sessions=lambda: 0)
    a.ready()
    with caplog.at_level(logging.WARNING, logger="gateway.replicas"):
        assert await a.renew_once()
        # b's first write finds a's fresh row: a predecessor, or a live twin; not yet an error.
        assert await b.renew_once()
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "was held by run " + first.run in caplog.records[0].getMessage()
        # a wrote the row before and finds b's run in it: two live processes.
        assert await a.renew_once()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "two live gateway processes share the replica id 'gw-a'" in errors[0], errors
    assert first.run in errors[0] and second.run in errors[0] and "ha.replica_id" in errors[0]
    # b stops: the row is a's now, so b neither marks it draining nor deletes it.
    await b.drain()
    await b.stop()
    [row] = await store.leases()
    assert (row.run_id, row.draining) == (first.run, False)
    await a.stop()
    assert await store.leases() == []


class _HeldReplicas(ReplicaStore):
    """A real store whose renewals wait, with their values taken, until ``release`` is set (a
    renewal in flight), and whose snapshot reads hang while ``hang`` is set."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.hang = False

    async def renew(self, replica_id: str, **kwargs: Any) -> Renewal:
        self.entered.set()
        await self.release.wait()
        return await super().renew(replica_id, **kwargs)

    async def snapshot(self, **kwargs: Any) -> LeaseSnapshot:
        if self.hang:
            await asyncio.Event().wait()
        return await super().snapshot(**kwargs)


async def test_a_renewal_in_flight_cannot_undo_the_draining_mark(db: Database) -> None:
    # Review finding 7: the renewal read draining=false before drain() began.
    store = _HeldReplicas(db)
    store.release.set()
    renewer = LeaseRenewer(store, identity=_identity("gw-a"), address="a:1", ha=HA, sessions=lambda: 0)
    assert await renewer.renew_once()
    store.release.clear()
    store.entered.clear()
    in_flight = asyncio.create_task(renewer.renew_once())
    await store.entered.wait()
    drain = asyncio.create_task(renewer.drain())
    await asyncio.sleep(0.05)
    store.release.set()
    assert await in_flight
    await drain
    [row] = await store.leases()
    assert row.draining, "the renewal in flight wrote draining=false over the mark"
    await renewer.stop()


async def test_the_lease_view_reads_with_a_deadline_and_serves_the_last_snapshot_one_more_ttl(
    db: Database,
) -> None:
    # Review finding 8: a hung read held every API request and the metrics on the view's lock.
    store = _HeldReplicas(db)
    store.release.set()
    await store.renew("gw-a", address="a:1", sessions=0, draining=False, started_at=T0, renewed_at=T0)
    clock = [100.0]
    ttl = HA.renew_interval_s / 2
    view = LeaseView(store, ha=HA, timeout_s=0.1, monotonic=lambda: clock[0])
    snapshot = await view.leases()
    store.hang = True
    clock[0] += ttl + 0.1  # due for a read, which hangs: the snapshot is served once more
    assert await asyncio.wait_for(view.leases(), 1.0) is snapshot
    clock[0] += ttl  # two TTLs old: no longer served
    with pytest.raises(StoreError, match=r"cannot read the replicas' leases within 0.1s"):
        await asyncio.wait_for(view.leases(), 1.0)
    # Requests meanwhile get the failure at once, not one deadline each.
    waits = await asyncio.wait_for(
        asyncio.gather(*(view.leases() for _ in range(5)), return_exceptions=True), 0.5
    )
    assert all(isinstance(w, StoreError) for w in waits)
    store.hang = False
    clock[0] += ttl
    assert (await view.leases()).renewed_at == {"gw-a": T0}


async def test_the_lease_view_reads_the_table_once_per_half_interval(db: Database) -> None:
    store = _FlakyReplicas(db)
    await store.renew("gw-a", address="a:1", sessions=0, draining=False, started_at=T0, renewed_at=T0)
    clock = [100.0]
    view = LeaseView(store, ha=HA, timeout_s=1.0, monotonic=lambda: clock[0])
    first, second = await asyncio.gather(view.leases(), view.leases())
    assert first is second and store.reads == 1
    clock[0] += HA.renew_interval_s / 2 - 0.1
    await view.leases()
    assert store.reads == 1
    clock[0] += 0.2
    assert (await view.leases()).renewed_at == {"gw-a": T0} and store.reads == 2


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_a_gateway_holds_a_lease_and_shows_a_dead_owners_sandbox_disconnected(tmp_path: Path) -> None:
    config = gateway_config(
        tmp_path,
        {
            "ha": {
                "replica_id": "gw-here",
                "advertise_address": "gw-here.example:50051",
                "lease_s": 2.0,
                "renew_interval_s": 1.0,
            },
            "sessions": {"heartbeat_interval_s": 60.0},  # the heartbeat stays fresh for minutes
        },
    )
    gw = Gateway(config)
    await gw.start()
    try:
        assert gw.db is not None
        store = ReplicaStore(gw.db)
        [row] = await store.leases()
        assert (row.id, row.address) == ("gw-here", "gw-here.example:50051")

        async def taking_sessions() -> bool:
            # The row says draining until the first SERVING verdict, written by the renewer's
            # next write (in the background, after start() has returned).
            return [(r.id, r.draining) for r in await store.leases()] == [("gw-here", False)]

        await until(taking_sessions, within=10, what="the lease row saying the replica takes sessions")
        now = datetime.now(UTC)
        # One sandbox held by this replica, one by a replica that died and whose row lapsed.
        await ReplicaStore(gw.db).renew(
            "gw-dead",
            address="x:1",
            sessions=1,
            draining=False,
            started_at=now,
            renewed_at=now - timedelta(seconds=3),
        )
        for sandbox_id, owner in (("sb-here", "gw-here"), ("sb-dead", "gw-dead")):
            await gw.sandboxes.ensure(sandbox_id, driver="external")
            await gw.sandboxes.mark_connected(
                sandbox_id, instance_id="i", session_id="s", journal_epoch="e", owner=owner, at=now
            )
        listed = await _get_json(f"{gw.http_url}/api/v1/sandboxes")
        states = {s["id"]: (s["state"], s["connected"]) for s in listed["sandboxes"]}
        assert states == {"sb-here": ("connected", True), "sb-dead": ("disconnected", False)}
        one = await _get_json(f"{gw.http_url}/api/v1/sandboxes/sb-dead")
        assert one["state"] == "disconnected" and one["disconnected_since"] is not None
        async with aiohttp.ClientSession() as http, http.get(f"{gw.ops_url}/metrics") as resp:
            metrics = await resp.text()
        assert 'openshell_gateway_sandboxes{state="connected"} 1.0' in metrics
        assert 'openshell_gateway_sandboxes{state="disconnected"} 1.0' in metrics
        assert "openshell_gateway_replicas_alive 1.0" in metrics
        assert 'openshell_gateway_replica_info{replica="gw-here"} 1.0' in metrics
    finally:
        db = await Database.open(config.database.url)
        await gw.stop()
        try:
            # A clean stop deletes the row: the others know at once that it holds nothing.
            assert [r.id for r in await ReplicaStore(db).leases()] == ["gw-dead"]
        finally:
            await db.close()


async def test_a_gateway_that_cannot_write_its_lease_does_not_start(tmp_path: Path) -> None:
    config = gateway_config(
        tmp_path, {"ha": {"replica_id": "gw-here", "lease_s": 0.6, "renew_interval_s": 0.3}}
    )
    db = await Database.open(config.database.url)
    try:
        async with db.engine.begin() as conn:  # the replicas table gone: every renewal fails
            await conn.execute(text("ALTER TABLE replicas RENAME TO replicas_away"))
    finally:
        await db.close()
    gw = Gateway(config)
    try:
        with pytest.raises(
            GatewayStartError, match=r"cannot write this replica's lease \('gw-here'\).*within 0.6s"
        ):
            await gw.start()
        assert gw.db is None, "the database was closed"
    finally:
        if gw.db is not None:  # it started (without its lease): stopped, for the failure to show
            await gw.stop()


async def test_a_command_for_a_sandbox_whose_owner_is_dead_is_not_waited_for(tmp_path: Path) -> None:
    # The POST waits for a delivery only while the one state rule says a live session holds the
    # sandbox; the raw flag of a crashed owner's row made it wait delivery_wait_s for nothing.
    config = gateway_config(
        tmp_path,
        {
            "ha": {"replica_id": "gw-here", "lease_s": 2.0, "renew_interval_s": 1.0},
            "sessions": {"heartbeat_interval_s": 60.0},  # the heartbeat alone says connected
            "commands": {"delivery_wait_s": 60.0},
        },
    )
    gw = Gateway(config)
    await gw.start()
    try:
        assert gw.db is not None
        now = datetime.now(UTC)
        await ReplicaStore(gw.db).renew(
            "gw-dead",
            address="x:1",
            sessions=1,
            draining=False,
            started_at=now,
            renewed_at=now - timedelta(seconds=3),
        )
        await gw.sandboxes.ensure("sb-dead", driver="external")
        await gw.sandboxes.mark_connected(
            "sb-dead", instance_id="i", session_id="s", journal_epoch="e", owner="gw-dead", at=now
        )
        url = f"{gw.http_url}/api/v1/sandboxes/sb-dead/commands"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
            http.post(url, json={"kind": "signal", "signal": "SIGUSR1"}) as resp,
        ):
            assert resp.status == 201, await resp.text()
            body = await resp.json()
        assert (body["delivered"], body["state"]) == (False, "pending"), body
    finally:
        await gw.stop()


async def _hello(gw: Gateway, sandbox_id: str) -> pb.GatewayMessage:
    """A raw hello over gRPC; the gateway's first answer."""
    async with aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        hello = pb.SupervisorMessage()
        hello.hello.sandbox_id = sandbox_id
        hello.hello.instance_id = "i1"
        await call.write(hello)
        try:
            return await asyncio.wait_for(call.read(), 10)
        finally:
            call.cancel()


async def test_a_replica_started_before_its_migration_takes_no_session_before_its_lease(
    tmp_path: Path,
) -> None:
    # Review (s7) finding 10: a replica started on a schema not migrated yet renews in the
    # background; once the migration job had run, a hello could claim a sandbox (owner_run = this
    # run) before the first renewal wrote the row, and the sandbox showed disconnected everywhere.
    # Here the lease write keeps failing after the migration (the table renamed away), which
    # stretches that window: the hello is refused, retryable, until the row exists.
    config = gateway_config(
        tmp_path,
        {
            "database": {"migrate_on_start": False},
            "ha": {"replica_id": "gw-here", "lease_s": 2.0, "renew_interval_s": 0.5},
        },
    )
    engine = create_engine(config.database.url)
    try:
        await upgrade(engine, "0008")  # an older schema: the gateway does not migrate it
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE replicas RENAME TO replicas_away"))
    finally:
        await engine.dispose()
    gw = Gateway(config)
    await gw.start()
    try:
        assert gw.db is not None
        engine = create_engine(config.database.url)
        try:
            await upgrade(engine)  # the migration job: sandboxes can be claimed from now on
        finally:
            await engine.dispose()
        answer = await _hello(gw, "sb-early")
        assert answer.session_rejected.code == pb.REJECT_CODE_OVERLOADED, answer
        assert answer.session_rejected.retry_after_ms > 0, answer
        row = await gw.sandboxes.get("sb-early")
        assert row is None or row.owner is None, row
        async with gw.db.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE replicas_away RENAME TO replicas"))
        for _ in range(100):  # the background renewal writes the row within a second or so
            if [r.id for r in await ReplicaStore(gw.db).leases()] == ["gw-here"]:
                break
            await asyncio.sleep(0.1)
        answer = await _hello(gw, "sb-early")
        assert answer.HasField("session_accepted"), answer
    finally:
        await gw.stop()


async def test_the_row_says_draining_until_the_gateway_is_ready(db: Database) -> None:
    # Review finding 2 (gateway): a row written before the gateway takes sessions made the others'
    # rebalancers shed toward a replica no supervisor could reach yet.
    store = ReplicaStore(db)
    ha = HaSettings(replica_id="gw-a", lease_s=10.0, renew_interval_s=5.0)
    renewer = LeaseRenewer(store, identity=_identity("gw-a"), address="a:1", ha=ha, sessions=lambda: 0)
    await renewer.start()
    [row] = await store.leases()
    assert row.draining, "not ready yet: not a receiver"
    renewer.ready()  # written at once, not at the next renewal 5 s later
    for _ in range(100):
        [row] = await store.leases()
        if not row.draining:
            break
        await asyncio.sleep(0.01)
    assert not row.draining
    await renewer.drain()
    renewer.ready()  # a late readiness verdict does not undo the drain's mark
    await asyncio.sleep(0.05)
    assert (await store.leases())[0].draining
    await renewer.stop()
