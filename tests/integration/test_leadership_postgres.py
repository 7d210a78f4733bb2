"""The leader's term fence on a real PostgreSQL server: the checks tests/unit/test_leadership.py
runs on SQLite, held to the same behaviour."""

from __future__ import annotations

from gateway.store import Database
from tests.integration.test_store_postgres import pg, pg_server, pg_url, pytestmark
from tests.unit.test_leadership import check_a_stale_leader_writes_nothing, check_terms_only_grow

__all__ = ["pg", "pg_server", "pg_url", "pytestmark"]  # the fixtures and the skip, shared


async def test_terms_only_grow(pg: Database) -> None:
    await check_terms_only_grow(pg)


async def test_a_stale_leader_writes_nothing(pg: Database) -> None:
    await check_a_stale_leader_writes_nothing(pg)
