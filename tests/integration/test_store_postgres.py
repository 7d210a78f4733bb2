"""The store against a real PostgreSQL server, started for this test session.

A throwaway cluster (``tests/support/postgres.py``) listens on 127.0.0.1 at a free port; each test
gets a database of its own. The scenarios
are the ones the SQLite unit tests run (``tests/unit/test_store.py``), so both dialects are held
to the same behaviour.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from gateway.store import Database, EventStore, SandboxStore, StoreError
from gateway.store.db import create_engine, upgrade
from openshell_wire.records import LogRecord, LogStream
from tests.support.postgres import PgServer, pg_bindir
from tests.unit.test_store import (
    check_append_unsequenced,
    check_events_keep_their_sessions_generation,
    check_exit_after_a_gap,
    check_exit_moves_only_by_a_newer_run,
    check_exit_recorded_once,
    check_exit_updates_sandbox,
    check_heartbeats,
    check_idempotent_store,
    check_list_by_owner,
    check_migration_keeps_rows_as_generation_one,
    check_migrations_match_schema,
    check_recreate_after_delete,
    check_restart_clears_exit_and_nul_survives,
    check_schema,
    check_sessions,
    check_tail_and_after,
    check_wire_batch_rejects_what_the_decoder_rejects,
    check_wire_batch_stores_what_store_events_stores,
    log,
)
from tests.unit.test_upstream_config import check_policy_store

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")


pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Database]:
    db = await Database.open(pg_url)
    yield db
    await db.close()


async def test_migrations_create_the_schema(pg: Database) -> None:
    assert pg.dialect == "postgresql"
    await check_schema(pg)
    await check_migrations_match_schema(pg)


async def test_migrating_twice_and_concurrently_is_safe(pg_url: str) -> None:
    # Replicas starting together all migrate: the advisory lock must make the losers no-ops.
    opened = await asyncio.gather(*(Database.open(pg_url) for _ in range(4)))
    try:
        for db in opened:
            await check_schema(db)
    finally:
        for db in opened:
            await db.close()


async def test_migration_0004_keeps_rows_as_generation_one(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        await upgrade(engine, "0003")
    finally:
        await engine.dispose()
    db = await Database.open(pg_url, migrate=False)
    try:
        await check_migration_keeps_rows_as_generation_one(db)
    finally:
        await db.close()


async def test_an_exit_is_recorded_once_per_run(pg: Database) -> None:
    await check_exit_recorded_once(pg)


async def test_an_exit_moves_only_by_a_newer_run(pg: Database) -> None:
    await check_exit_moves_only_by_a_newer_run(pg)


async def test_an_exit_after_a_gap_is_the_next_runs(pg: Database) -> None:
    await check_exit_after_a_gap(pg)


async def test_events_keep_their_sessions_generation(pg: Database) -> None:
    await check_events_keep_their_sessions_generation(pg)


async def test_a_deleted_sandbox_id_can_be_created_again(pg: Database) -> None:
    await check_recreate_after_delete(pg)


async def test_the_list_filters_by_owner_in_the_query(pg: Database) -> None:
    await check_list_by_owner(pg)


async def test_store_events_is_idempotent(pg: Database) -> None:
    await check_idempotent_store(pg)


async def test_wire_batch_stores_what_store_events_stores(pg: Database) -> None:
    await check_wire_batch_stores_what_store_events_stores(pg)


async def test_wire_batch_rejects_what_the_decoder_rejects(pg: Database) -> None:
    await check_wire_batch_rejects_what_the_decoder_rejects(pg)


async def test_an_exit_event_updates_the_sandbox(pg: Database) -> None:
    await check_exit_updates_sandbox(pg)


async def test_restart_clears_exit_and_nul_survives(pg: Database) -> None:
    await check_restart_clears_exit_and_nul_survives(pg)


async def test_append_unsequenced_numbers_concurrent_calls(pg: Database) -> None:
    await check_append_unsequenced(pg)


async def test_append_unsequenced_across_two_engines(pg: Database, pg_url: str) -> None:
    # Two engines stand in for two replicas: only the row lock, not the asyncio lock, orders them.
    second = await Database.open(pg_url, migrate=False)
    try:
        await SandboxStore(pg).ensure("sb")
        stores = [EventStore(pg), EventStore(second)]
        await asyncio.gather(
            *(
                stores[n % 2].append_unsequenced(
                    "sb", [(0, LogRecord(LogStream.STDOUT, f"{n}.{i}")) for i in range(3)]
                )
                for n in range(8)
            )
        )
        stored = await EventStore(pg).tail("sb", 100)
        assert sorted(e.sequence for e in stored) == list(range(1, 25))
    finally:
        await second.close()


async def test_mark_disconnected_ignores_a_stale_session(pg: Database) -> None:
    await check_sessions(pg)


async def test_record_heartbeats(pg: Database) -> None:
    await check_heartbeats(pg)


async def test_tail_and_after_order(pg: Database) -> None:
    await check_tail_and_after(pg)


async def test_delete_cascades(pg: Database) -> None:
    sandboxes, events = SandboxStore(pg), EventStore(pg)
    await sandboxes.ensure("sb")
    await events.store_events("sb", "e1", [log(1), log(2)])
    await sandboxes.delete("sb")
    assert await events.count("sb") == 0


async def test_unknown_database_is_a_readable_store_error(pg_server: PgServer) -> None:
    with pytest.raises(StoreError, match=re.escape(f"cannot open database {pg_server.url('missing')}")):
        await Database.open(pg_server.url("missing"))


async def test_policy_sync_store(pg: Database) -> None:
    # Upstream supervisors' synced policy (tests/unit/test_upstream_config.py): the version CASE
    # and the reset of a new generation, on PostgreSQL.
    await check_policy_store(pg)
