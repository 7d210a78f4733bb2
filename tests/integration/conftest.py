"""Fixtures shared by the integration tests: a gateway and supervisors that stop with the test, and
PostgreSQL: one server per test module and a fresh database per test.

``pg_server`` is module-scoped on purpose: a module that stops, pauses or cuts its server (the
store-failure and database-fault tests) disturbs no other module. ``database`` is the fresh
database's name, ``database_url`` its SQLAlchemy URL and ``pg_url`` the same URL under the name the
store tests use. A module needing something else defines it under its own name (or, visibly, over
one of these: test_migrations' ``database_url`` runs each test on SQLite and on PostgreSQL).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PgServer, PostgresUnavailable, pg_bindir, running_postgres
from tests.support.procs import GatewayProcess, SupervisorProcess


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gateway")
    yield gw
    gw.stop()


@pytest.fixture
def supervisors() -> Iterator[list[SupervisorProcess]]:
    started: list[SupervisorProcess] = []
    yield started
    for sv in started:
        sv.stop()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """Skipped where PostgreSQL cannot run here; failed where it could but did not start."""
    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))


async def _admin(server: PgServer, statement: str) -> None:
    asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")
    admin = await asyncpg.connect(host="127.0.0.1", port=server.port, user=server.user, database="postgres")
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@pytest.fixture
async def database(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, empty database on ``pg_server`` (its name), dropped after the test, connections and all."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await _admin(pg_server, f'CREATE DATABASE "{name}"')
    yield name
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_server: PgServer, database: str) -> str:
    return pg_server.url(database)


@pytest.fixture
def pg_url(database_url: str) -> str:
    return database_url
