"""The hellos' group commit (issue 22 points 3 and 7): many claims in one transaction of a constant
number of statements (``SandboxStore.claim_many``), with every rule of a single claim holding for
each, on SQLite and PostgreSQL; and a burst of hellos on a real gateway costs far fewer statements
than its hellos one by one.

The store tests run on a real database of each dialect; the failure of a whole batch is a real one
too (a trigger refusing one of its rows), not a mock.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from sqlalchemy import event, insert, select, text
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.app import Gateway
from gateway.store import SandboxStore
from gateway.store.db import Database, StoreError
from gateway.store.fencing import Fenced
from gateway.store.sandboxes import Claim, ClaimBusy, ClaimRequest, NoSuchSandbox, StaleConnection
from gateway.store.schema import events as events_table
from gateway.store.schema import sandboxes as sandboxes_table
from openshell_wire.records import ALL_CAPABILITIES
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.integration.test_hello_cost import Counts, counting
from tests.support.gateway import gateway_config

LIVE_S = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of each dialect (PostgreSQL's: a fresh one on the module's server)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await Database.open(url)
    try:
        yield database
    finally:
        await database.close()


def _request(sandbox_id: str, **overrides: Any) -> ClaimRequest:
    values: dict[str, Any] = {
        "instance_id": "i-" + uuid.uuid4().hex[:6],
        "session_id": "s-" + uuid.uuid4().hex[:8],
        "journal_epoch": "e1",
        "owner": "replica-a",
        "at": datetime.now(UTC),
        "connection_epoch": 1,
        "live_for_s": LIVE_S,
        "read_high_water_mark": True,
    }
    values.update(overrides)
    return ClaimRequest(sandbox_id, **values)


async def _store_events(db: Database, sandbox_id: str, epoch: str, upto: int) -> None:
    rows = [
        {
            "sandbox_id": sandbox_id,
            "journal_epoch": epoch,
            "sequence": n,
            "timestamp_ms": 0,
            "kind": "log",
            "message": f"m{n}",
            "received_at": datetime.now(UTC),
        }
        for n in range(1, upto + 1)
    ]
    async with db.begin() as conn:
        await conn.execute(insert(events_table), rows)


async def _rows(db: Database) -> dict[str, Any]:
    c = sandboxes_table.c
    async with db.engine.connect() as conn:
        result = await conn.execute(select(c.id, c.owner_epoch, c.session_id, c.connected, c.generation))
        return {row.id: row for row in result}


async def test_a_batch_claims_each_sandbox_with_its_own_epoch_and_high_water_mark(db: Database) -> None:
    store = SandboxStore(db)
    ids = [f"sb-{n:03d}" for n in range(40)]
    for n, sandbox_id in enumerate(ids):
        await store.ensure(sandbox_id)
        # Earlier claims, a different number each, so each row's epoch is its own.
        for _ in range(n % 3):
            await store.claim(sandbox_id, **_single(_request(sandbox_id)))
        if n % 2 == 0:
            await _store_events(db, sandbox_id, "e1", n + 1)
            await _store_events(db, sandbox_id, "other-epoch", n + 5)  # not this journal's
    before = await _rows(db)
    requests = [_request(i) for i in reversed(ids)]  # not in id order: answers stay in order
    outcomes = await store.claim_many(requests)
    after = await _rows(db)
    for request, outcome in zip(requests, outcomes, strict=True):
        n = ids.index(request.sandbox_id)
        assert isinstance(outcome, Claim), outcome
        assert outcome.owner_epoch == before[request.sandbox_id].owner_epoch + 1
        assert outcome.owner_epoch == after[request.sandbox_id].owner_epoch
        assert outcome.high_water_mark == (n + 1 if n % 2 == 0 else 0)
        assert outcome.generation == 1
        assert after[request.sandbox_id].session_id == request.session_id
        assert after[request.sandbox_id].connected


async def test_a_batch_runs_the_same_cached_statements_whatever_its_size(db: Database) -> None:
    """A batch's statements do not grow with it and are compiled once, not per batch size: the
    registering INSERT is one statement run for many parameter sets (a VALUES list has no cache
    key: it was compiled again for every batch, a third of the claim's CPU in a burst), and
    on SQLite there is no row-lock read before the UPDATE (no row locks there: a plain read that
    cost each batch a statement's round trips through the driver's thread)."""
    store = SandboxStore(db)
    # Compiles what a batch needs (a batch of one registers with a single execution, its own form).
    await store.claim_many([_request(f"sb-warm-{n}", register=True) for n in range(2)])
    seen: list[tuple[str, Any]] = []

    def record(*args: Any) -> None:
        # before_cursor_execute(conn, cursor, statement, parameters, context, executemany)
        statement, context = args[2], args[4]
        seen.append((statement.split(None, 1)[0].upper(), context.cache_hit))

    sync_engine = db.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", record)
    try:
        per_batch = []
        for size in (3, 7, 20):
            seen.clear()
            outcomes = await store.claim_many(
                [_request(f"sb-{size}-{n:02d}", register=True) for n in range(size)]
            )
            assert all(isinstance(o, Claim) for o in outcomes), outcomes
            per_batch.append([kind for kind, _ in seen])
            missed = [kind for kind, hit in seen if hit is not CacheStats.CACHE_HIT]
            assert not missed, f"batch of {size}: compiled again: {missed} (all: {seen})"
    finally:
        event.remove(sync_engine, "before_cursor_execute", record)
    expected = ["INSERT", "UPDATE", "SELECT"]
    if db.dialect == "postgresql":
        expected = ["INSERT", "SELECT", "UPDATE", "SELECT"]  # the rows locked FOR UPDATE first
    assert per_batch == [expected] * 3, per_batch


def _single(request: ClaimRequest) -> dict[str, Any]:
    """``claim``'s keyword arguments for ``request``."""
    return {
        "instance_id": request.instance_id,
        "session_id": request.session_id,
        "journal_epoch": request.journal_epoch,
        "owner": request.owner,
        "at": request.at,
        "generation": request.generation,
        "connection_epoch": request.connection_epoch,
        "live_for_s": request.live_for_s,
        "read_high_water_mark": request.read_high_water_mark,
    }


async def test_two_hellos_of_one_sandbox_in_a_batch_are_claimed_in_order(db: Database) -> None:
    store = SandboxStore(db)
    await store.ensure("sb-twice")
    await store.ensure("sb-other")
    base = (await _rows(db))["sb-twice"].owner_epoch
    first, second = _request("sb-twice"), _request("sb-twice")
    outcomes = await store.claim_many([first, _request("sb-other"), second])
    assert isinstance(outcomes[0], Claim) and isinstance(outcomes[2], Claim)
    assert outcomes[0].owner_epoch == base + 1
    assert outcomes[2].owner_epoch == base + 2
    assert (await _rows(db))["sb-twice"].session_id == second.session_id  # the later owns the row
    # The earlier is fenced exactly as if the two had come one after the other.
    with pytest.raises(Fenced):
        await store.mark_disconnected(
            "sb-twice", session_id=first.session_id, at=datetime.now(UTC), owner_epoch=base + 1
        )
    fenced = await store.record_heartbeats(
        {"sb-twice": datetime.now(UTC)},
        sessions={"sb-twice": second.session_id},
        epochs={"sb-twice": base + 2},
    )
    assert fenced == set()


async def test_a_stale_connection_in_a_batch_is_refused_and_the_others_claimed(db: Database) -> None:
    store = SandboxStore(db)
    for sandbox_id in ("sb-held", "sb-a", "sb-b", "sb-gone"):
        await store.ensure(sandbox_id)
    held = _request("sb-held", connection_epoch=5)
    await store.claim("sb-held", **_single(held))
    gen = (await _rows(db))["sb-gone"].generation
    late = _request("sb-held", instance_id=held.instance_id, connection_epoch=4)  # its late hello
    pinned_elsewhere = _request("sb-gone", generation=gen + 1)  # created again since
    outcomes = await store.claim_many(
        [_request("sb-a"), late, _request("sb-missing"), pinned_elsewhere, _request("sb-b")]
    )
    assert isinstance(outcomes[0], Claim) and isinstance(outcomes[4], Claim)
    assert isinstance(outcomes[1], StaleConnection) and outcomes[1].held_epoch == 5
    assert isinstance(outcomes[2], NoSuchSandbox)
    assert outcomes[3] is None
    rows = await _rows(db)
    assert rows["sb-held"].session_id == held.session_id  # untouched
    assert "sb-missing" not in rows
    assert rows["sb-gone"].session_id is None
    # A newer connection of the same supervisor in the next batch takes it, and registering works.
    newer = _request("sb-held", instance_id=held.instance_id, connection_epoch=6)
    outcomes = await store.claim_many([newer, _request("sb-new", register=True)])
    assert isinstance(outcomes[0], Claim) and isinstance(outcomes[1], Claim)
    assert (await _rows(db))["sb-new"].connected


async def _poison(db: Database) -> None:
    """A real failure of the claims' transaction: a trigger refusing one session id."""
    async with db.begin() as conn:
        if db.dialect == "postgresql":
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF NEW.session_id = 'poison' THEN RAISE EXCEPTION 'poisoned claim'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE UPDATE ON sandboxes FOR EACH ROW "
                    "EXECUTE FUNCTION refuse_poison()"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE UPDATE ON sandboxes "
                    "WHEN NEW.session_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned claim'); END"
                )
            )


async def test_a_failed_batch_fails_every_claim_and_writes_nothing(db: Database) -> None:
    store = SandboxStore(db)
    for sandbox_id in ("sb-a", "sb-b"):
        await store.ensure(sandbox_id)
    await _poison(db)
    before = await _rows(db)
    with pytest.raises(StoreError, match="poisoned claim"):
        await store.claim_many(
            [_request("sb-a"), _request("sb-b", session_id="poison"), _request("sb-new", register=True)]
        )
    assert await _rows(db) == before  # nothing claimed, nothing registered


async def test_a_batch_through_the_batcher_gives_each_caller_its_outcome(db: Database) -> None:
    """The batcher in front of claim_many, as the hello path uses it: concurrent callers share
    batches; a failed batch's error reaches each of its callers."""
    from gateway.batching import Batcher
    from gateway.tasks import BackgroundTasks

    store = SandboxStore(db)
    ids = [f"sb-{n:03d}" for n in range(30)]
    tasks = BackgroundTasks("test")
    batcher: Batcher[ClaimRequest, Claim | None] = Batcher(store.claim_many, name="claims", tasks=tasks)
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit(_request(i, register=True)) for i in ids), return_exceptions=True
        )
        assert all(isinstance(o, Claim) for o in outcomes), outcomes
        assert batcher.batches < len(ids)  # grouped
        await _poison(db)
        failed = await asyncio.gather(
            *(batcher.submit(_request(i, session_id="poison" if i == ids[3] else "s")) for i in ids[:10]),
            return_exceptions=True,
        )
        assert all(isinstance(o, StoreError) for o in failed), failed
    finally:
        batcher.close()
        await tasks.close()


async def _burst(gw: Gateway, ids: list[str], counts: Counts) -> list[str]:
    """Every sandbox's hello written at once on its own channel (one TCP connection each, as
    pods have); the answers' kinds, once each sandbox's pending commands were read. Each session
    accepted is checked against its row (its claim recorded) while it is open."""
    channels = [aio.insecure_channel(gw.grpc_address) for _ in ids]
    calls = [pb_grpc.OpenShellStub(ch).ConnectSupervisor() for ch in channels]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        hellos = [_hello(sandbox_id) for sandbox_id in ids]
        counts.on = True
        await asyncio.gather(*(call.write(m) for call, m in zip(calls, hellos, strict=True)))
        answers = await asyncio.gather(*(call.read() for call in calls))
        deadline = asyncio.get_running_loop().time() + 30
        # The pending commands' reads run after the answers: each sandbox's within the window.
        while sum(s.startswith("SELECT commands.") for s in counts.statements) == 0 or any(
            gw.registry.get(i) is None for i in ids
        ):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        counts.on = False
        for sandbox_id, answer in zip(ids, answers, strict=True):
            session = gw.registry.get(sandbox_id)
            row = await gw.sandboxes.get(sandbox_id)
            assert session is not None and row is not None
            assert row.session_id == session.session_id and row.connected
            assert row.owner_epoch == session.owner_epoch == answer.session_accepted.owner_epoch
        return [str(a.WhichOneof("payload")) for a in answers]
    finally:
        counts.on = False
        for call in calls:
            call.cancel()
        await asyncio.gather(*(ch.close() for ch in channels))


async def test_a_burst_of_hellos_costs_far_fewer_statements_than_its_hellos_one_by_one(
    tmp_path: Path, url: str
) -> None:
    overrides: dict[str, Any] = {
        # Auth off, unknown sandboxes registered (the bench's settings): the hello's store work
        # is the claim (registering) and the pending commands' read.
        "sessions": {"register_unknown": True, "heartbeat_flush_interval_s": 300},
        "ha": {"lease_s": 600, "renew_interval_s": 300},
        "rebalance": {"enabled": False},
        "admission": {"enabled": False},
    }
    overrides["database"] = {"url": url}
    gw = Gateway(gateway_config(tmp_path, overrides))
    await gw.start()
    try:
        known = [f"sb-known-{n:03d}" for n in range(50)]
        for sandbox_id in known:
            await gw.sandboxes.create(sandbox_id, driver="external")
        single = Counts()
        with counting(gw, single):
            assert await _burst(gw, ["sb-alone"], single) == ["session_accepted"]
        ids = known + [f"sb-new-{n:03d}" for n in range(50)]
        burst = Counts()
        with counting(gw, burst):
            answers = await _burst(gw, ids, burst)
        assert answers == ["session_accepted"] * len(ids)
    finally:
        await gw.stop()
    print(f"one hello: {len(single.statements)} statements; {len(ids)} hellos: {len(burst.statements)}")
    # One by one (the code before the group commit) a hello took 5 statements: 500 here.
    assert len(burst.statements) < len(ids) * len(single.statements) / 3, burst.report()


def _hello(sandbox_id: str) -> pb.SupervisorMessage:
    message = pb.SupervisorMessage()
    message.hello.sandbox_id = sandbox_id
    message.hello.instance_id = "i-" + sandbox_id
    message.hello.connection_epoch = 1
    message.hello.capabilities.extend(ALL_CAPABILITIES)
    message.hello.journal_epoch = "e1"
    return message


async def test_a_row_held_by_another_transaction_delays_its_own_hello_only(
    tmp_path: Path, database_url: str
) -> None:
    """PostgreSQL: a sandbox's row held long (a replica frozen inside a write of it) must not stall
    the batch, nor the hellos queued behind it: the batch skips the row (FOR UPDATE SKIP LOCKED)
    and that hello alone waits for the lock, then is claimed."""
    overrides: dict[str, Any] = {
        "database": {"url": database_url},
        "sessions": {"register_unknown": True},
        "rebalance": {"enabled": False},
        "admission": {"enabled": False},
        # Room for a loaded machine: the held hello must outlast the others, not its deadline.
        "grpc": {"store_timeout_s": 20.0},
    }
    gw = Gateway(gateway_config(tmp_path, overrides))
    await gw.start()
    ids = [f"sb-{n:02d}" for n in range(20)]
    for sandbox_id in [*ids, "sb-held"]:
        await gw.sandboxes.create(sandbox_id, driver="external")
    # A plain engine: no idle-in-transaction timeout ends its hold before the test does.
    holder = create_async_engine(database_url)
    channels = [aio.insecure_channel(gw.grpc_address) for _ in range(len(ids) + 1)]
    try:
        async with holder.connect() as conn:
            txn = await conn.begin()
            await conn.execute(
                select(sandboxes_table.c.id).where(sandboxes_table.c.id == "sb-held").with_for_update()
            )
            held_call = pb_grpc.OpenShellStub(channels[0]).ConnectSupervisor()
            await held_call.write(_hello("sb-held"))
            held_answer = asyncio.ensure_future(held_call.read())
            await asyncio.sleep(0.2)  # its batch is in flight, or it is queued: either way
            calls = [pb_grpc.OpenShellStub(ch).ConnectSupervisor() for ch in channels[1:]]
            for call, sandbox_id in zip(calls, ids, strict=True):
                await call.write(_hello(sandbox_id))
            # Answered while the row is still held (a batch waiting on it would hold them all).
            answers = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 15)
            assert [a.WhichOneof("payload") for a in answers] == ["session_accepted"] * len(ids)
            assert not held_answer.done()  # still waiting for the row
            await txn.rollback()
        answer = await asyncio.wait_for(held_answer, 15)
        assert answer.WhichOneof("payload") == "session_accepted"
        held_call.cancel()
        for call in calls:
            call.cancel()
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
        await holder.dispose()
        await gw.stop()


async def test_two_replicas_batches_of_overlapping_sandboxes_neither_deadlock_nor_lose_a_claim(
    url: str,
) -> None:
    """Two replicas (two engines on one database) claim overlapping sets of sandboxes in batches,
    each batch in its own order, many times at once: no deadlock (the rows are locked in id
    order), and each sandbox's claims got distinct epochs, one per claim, the last one the row's."""
    one, two = await Database.open(url), await Database.open(url, migrate=False)
    try:
        stores = [SandboxStore(one), SandboxStore(two)]
        ids = [f"sb-{n:02d}" for n in range(12)]
        for sandbox_id in ids:
            await stores[0].ensure(sandbox_id)
        rng = random.Random(3)

        async def replica(store: SandboxStore, owner: str) -> list[tuple[str, int]]:
            got: list[tuple[str, int]] = []
            for _ in range(8):
                batch = rng.sample(ids, 8)  # overlapping the other replica's, in any order
                outcomes = await store.claim_many([_request(i, owner=owner) for i in batch])
                for sandbox_id, outcome in zip(batch, outcomes, strict=True):
                    assert isinstance(outcome, Claim), outcome
                    got.append((sandbox_id, outcome.owner_epoch))
            return got

        results = await asyncio.wait_for(
            asyncio.gather(replica(stores[0], "replica-a"), replica(stores[1], "replica-b")), 60
        )
        rows = await _rows(one)
        for sandbox_id in ids:
            epochs = sorted(e for r in results for i, e in r if i == sandbox_id)
            assert epochs == list(range(1, len(epochs) + 1)), (sandbox_id, epochs)
            assert rows[sandbox_id].owner_epoch == len(epochs)
    finally:
        await two.close()
        await one.close()


async def test_a_skipping_batch_leaves_held_rows_and_the_single_claim_explains_the_missing(
    db: Database,
) -> None:
    """``claim_many(skip_locked=True)`` (the hello path's): a row another transaction holds is
    answered ClaimBusy on PostgreSQL, as is a missing one there (the lock's read cannot tell them
    apart); ``claim_one`` then waits for the lock, or says NoSuchSandbox. SQLite skips nothing."""
    store = SandboxStore(db)
    for sandbox_id in ("sb-held", "sb-free"):
        await store.ensure(sandbox_id)
    async with db.engine.connect() as conn:
        txn = await conn.begin()
        if db.dialect == "postgresql":
            await conn.execute(
                select(sandboxes_table.c.id).where(sandboxes_table.c.id == "sb-held").with_for_update()
            )
            outcomes = await store.claim_many(
                [_request("sb-held"), _request("sb-free"), _request("sb-missing")], skip_locked=True
            )
            assert isinstance(outcomes[0], ClaimBusy) and isinstance(outcomes[2], ClaimBusy)
            assert isinstance(outcomes[1], Claim)
            waiting = asyncio.ensure_future(store.claim_one(_request("sb-held")))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # waits for the lock, as a single claim always did
        await txn.rollback()
    if db.dialect == "postgresql":
        assert isinstance(await asyncio.wait_for(waiting, 10), Claim)
    else:
        outcomes = await store.claim_many(
            [_request("sb-held"), _request("sb-free"), _request("sb-missing")], skip_locked=True
        )
        assert isinstance(outcomes[0], Claim) and isinstance(outcomes[1], Claim)
        assert isinstance(outcomes[2], NoSuchSandbox)
    with pytest.raises(NoSuchSandbox):
        await store.claim_one(_request("sb-missing"))
