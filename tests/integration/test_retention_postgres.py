"""Log retention against a real PostgreSQL server (tests/support/postgres.py): the scenarios the
SQLite unit tests run (tests/unit/test_retention.py), and the size-bound query's plan."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from gateway.store import Database
from gateway.store.retention import EventRetention, delete_statement, page_query
from tests.support.postgres import pg_bindir
from tests.unit.test_retention import (
    check_age_bound,
    check_full_walk_catches_resumed_journal,
    check_resume_after_retention,
    check_size_bound,
    check_statements_per_page,
    check_writers_keep_flowing,
    interleaved,
)

pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Database]:
    db = await Database.open(pg_url)
    yield db
    await db.close()


async def test_age_bound(pg: Database) -> None:
    assert pg.dialect == "postgresql"
    await check_age_bound(pg)


async def test_resume_after_retention(pg: Database) -> None:
    await check_resume_after_retention(pg)


async def test_size_bound(pg: Database) -> None:
    await check_size_bound(pg)


async def test_writers_keep_flowing(pg: Database) -> None:
    # PostgreSQL: the deletes take row locks on old rows only and the inserts take none of them,
    # so a store waits for I/O, not for retention; 1 s bounds a loaded 2-core machine's stall.
    deletion_s, worst = await check_writers_keep_flowing(pg, rows=40_000, bound_s=1.0)
    print(f"PostgreSQL: 40,000 rows deleted in {deletion_s:.2f}s, longest store {worst * 1000:.1f} ms")


async def test_statements_per_page(pg: Database) -> None:
    await check_statements_per_page(pg)


async def test_full_walk_catches_resumed_journal(pg: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await check_full_walk_catches_resumed_journal(pg, monkeypatch)


async def test_page_and_delete_probe_the_unique_index(pg: Database) -> None:
    """The page is a range of the primary key and the delete primary-key lookups; each row's
    newest sequence (the correlated max) is one probe of the unique index, never a scan."""
    async with pg.engine.connect() as conn:
        await conn.execute(text("SET enable_seqscan = off"))  # a small table would be scanned anyway
        for statement in (page_query(5, batch_size=1000), delete_statement([1, 2, 3])):
            sql = str(statement.compile(pg.engine, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(str(r[0]) for r in await conn.execute(text("EXPLAIN " + sql)))
            assert "events_pkey" in plan, plan
            assert (
                "Index Only Scan Backward using uq_events_sandbox_epoch_sequence on events newer" in plan
            ), plan
            assert "Seq Scan" not in plan, plan


async def test_totals_are_the_planners_estimate(pg: Database) -> None:
    """Without a size bound PostgreSQL's row count is the planner's estimate (no count(*) over the
    table every run); an exact count only while the table was never analysed."""
    store = EventRetention(pg)
    await interleaved(pg, journals=20, rows=50)
    first = await store.totals(with_bytes=False)
    assert (first.rows, first.exact) == (1000, True)  # never analysed: counted
    async with pg.engine.connect() as conn:
        await conn.execute(text("COMMIT"))
        await conn.execute(text("ANALYZE events"))
    estimate = await store.totals(with_bytes=False)
    assert not estimate.exact and 900 <= estimate.rows <= 1100, estimate
    exact = await store.totals(with_bytes=True)
    assert exact.exact and exact.rows == 1000


async def test_deletes_use_the_primary_key(pg: Database) -> None:
    """The walk's page and the delete are primary-key range and lookups, never a table scan."""
    async with pg.engine.connect() as conn:
        await conn.execute(text("SET enable_seqscan = off"))  # a small table would be scanned anyway
        page = await conn.execute(text("EXPLAIN SELECT id FROM events WHERE id > 5 ORDER BY id LIMIT 1000"))
        plan = "\n".join(str(r[0]) for r in page)
        assert "events_pkey" in plan, plan
        newest = await conn.execute(
            text("EXPLAIN SELECT max(sequence) FROM events WHERE sandbox_id = 'a' AND journal_epoch = 'b'")
        )
        plan = "\n".join(str(r[0]) for r in newest)
        assert "uq_events_sandbox_epoch_sequence" in plan, plan
