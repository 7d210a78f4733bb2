"""Migrations under concurrency, a schema newer than the code, and data kept across every revision
(issue 20 point 6), on SQLite and a real PostgreSQL server, with real ``openshell-gateway`` processes.

- Three ``migrate`` processes started at once on a fresh database all succeed and leave the schema
  at head once: they are held at the database's own lock (the test holds it first) and released
  together, so they really do meet there.
- A database migrated by a newer gateway (a revision the scripts do not know) is refused by
  ``serve`` (migrating at start or not) and ``migrate`` with exit status 78 and a message naming both
  revisions; nothing is changed.
- A gateway told not to migrate serves a database whose schema is missing or older, and /readyz
  says not ready and why until ``migrate`` has run; a running gateway whose schema a newer version
  migrated (a rollout's hook) stays ready and says so.
- A database filled at every earlier revision migrates to head with every row kept and readable
  through the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from gateway.store import CommandStore, Database, EventStore, SandboxStore
from gateway.store.db import _PG_MIGRATION_LOCK_KEY, alembic_config, create_engine, upgrade
from gateway.store.signing_keys import SigningKeyStore
from tests.support.postgres import PgServer
from tests.support.procs import PYTHON, REPO, GatewayProcess, free_port, wait_until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

EX_CONFIG = 78
T0 = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)
FUTURE = "9f00_from_a_newer_gateway"


def _earlier_revisions() -> list[str]:
    """Every packaged revision but the head, oldest first (a new revision joins the list by itself)."""
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [rev.revision for rev in script.walk_revisions()]
    return [rev for rev in reversed(revisions) if rev != _head()]


def _head() -> str:
    (head,) = ScriptDirectory.from_config(alembic_config()).get_heads()
    return str(head)


# -- databases ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database of each dialect (PostgreSQL: a database of its own on one server).
    Over conftest's PostgreSQL-only ``database_url`` on purpose: every test here runs on both."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(host="127.0.0.1", port=server.port, user=server.user, database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield server.url(name)
    admin = await asyncpg.connect(host="127.0.0.1", port=server.port, user=server.user, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(sql))]
    finally:
        await engine.dispose()


async def _execute(url: str, sql: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


async def _migrate_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine, revision)
    finally:
        await engine.dispose()


def _gateway(*args: str) -> list[str]:
    return [PYTHON, "-m", "gateway", *args]


async def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` run to its end (in a thread: the test's event loop stays free)."""
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def _serve_args(url: str, *settings: str) -> list[str]:
    return _gateway(
        "serve",
        "--database-url", url,
        "--grpc-listen", f"127.0.0.1:{free_port()}",
        "--http-listen", f"127.0.0.1:{free_port()}",
        "--ops-listen", f"127.0.0.1:{free_port()}",
        "--set", "sessions.register_unknown=true",
        "--set", "auth.supervisors.required=false",
        *(arg for setting in settings for arg in ("--set", setting)),
    )  # fmt: skip


# -- (1) several migrate processes at once ------------------------------------------------------


@contextlib.contextmanager
def _sqlite_write_lock(path: Path) -> Iterator[None]:
    """Hold the SQLite file's write lock (in WAL mode, as the gateway makes it) until the block ends."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())
    return False


async def _waiting_for_advisory_lock(url: str) -> int:
    rows = await _query(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return int(rows[0][0])


async def test_concurrent_migrate_processes_serialise_on_the_database_lock(
    database_url: str, tmp_path: Path
) -> None:
    url = make_url(database_url)
    procs: list[subprocess.Popen[bytes]] = []

    def start_three() -> None:
        for i in range(3):
            with (tmp_path / f"migrate{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        _gateway("migrate", "--database-url", database_url),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=REPO,
                    )
                )

    try:
        if url.get_backend_name() == "sqlite":
            path = Path(str(url.database))
            # Held until all three have the file open and so are at (or about to reach) their first
            # write: released together, they race for the lock as replicas starting at once do.
            with _sqlite_write_lock(path):
                start_three()
                wait_until(
                    lambda: all(_has_open(p.pid, path) or p.poll() is not None for p in procs),
                    timeout=60,
                    what="three migrate processes opening the database",
                )
                await asyncio.sleep(1.0)
        else:
            holder = await asyncpg.connect(str(url.set(drivername="postgresql")))
            try:
                await holder.execute("SELECT pg_advisory_lock($1)", _PG_MIGRATION_LOCK_KEY)
                start_three()
                deadline = time.monotonic() + 60
                # All three queue on the advisory lock the gateway migrates under.
                while await _waiting_for_advisory_lock(database_url) < 3:
                    assert all(p.poll() is None for p in procs), "a migrate process ended before the lock"
                    assert time.monotonic() < deadline, "three migrate processes never waited on the lock"
                    await asyncio.sleep(0.1)
            finally:
                await holder.close()
        codes = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = [(tmp_path / f"migrate{i}.log").read_text(errors="replace") for i in range(3)]
    assert codes == [0, 0, 0], "\n---\n".join(logs)
    assert all("database schema is up to date" in log for log in logs)
    assert await _query(database_url, "SELECT version_num FROM alembic_version") == [(_head(),)]
    db = await Database.open(database_url, migrate=False)
    try:
        await SandboxStore(db).ensure("after")  # the schema is whole: the store works on it
        assert await SandboxStore(db).get("after") is not None
    finally:
        await db.close()


# -- (2) a schema newer than the code; a schema missing or older ----------------------------------


async def test_a_schema_newer_than_the_code_is_refused_and_left_alone(database_url: str) -> None:
    await _migrate_to(database_url, "head")
    await _execute(database_url, f"UPDATE alembic_version SET version_num = '{FUTURE}'")
    runs = {
        "serve migrating at start": _serve_args(database_url),
        "serve without migrating": _serve_args(database_url, "database.migrate_on_start=false"),
        "migrate": _gateway("migrate", "--database-url", database_url),
    }
    # Run side by side (none of them may change anything, so they cannot disturb each other).
    results = await asyncio.gather(*(_run(argv) for argv in runs.values()))
    for what, done in zip(runs, results, strict=True):
        output = done.stdout + done.stderr
        assert done.returncode == EX_CONFIG, f"{what}: exit {done.returncode}\n{output}"
        assert "Traceback" not in output, f"{what}:\n{output}"
        assert "gateway ready" not in output, f"{what} served:\n{output}"
        assert FUTURE in done.stderr and _head() in done.stderr, f"{what}:\n{output}"
        assert "newer than this gateway knows" in done.stderr, f"{what}:\n{output}"
        # Neither "upgraded" nor stamped back: the newer gateway's schema is as it left it.
        assert await _query(database_url, "SELECT version_num FROM alembic_version") == [(FUTURE,)]


def _readyz(gateway: GatewayProcess) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{gateway.ops_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_readiness_says_why_a_schema_missing_or_older_is_not_ready(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw", extra=["--set", "database.migrate_on_start=false"])
    url = f"sqlite+aiosqlite:///{gateway.db_path}"
    try:
        gateway.start()
        status, body = _readyz(gateway)
        reason = body["checks"]["database"]["reason"]
        assert status == 503 and not body["ready"], body
        assert "schema missing" in reason and "openshell-gateway migrate" in reason, reason
        gateway.stop()

        older = _earlier_revisions()[-1]
        await _migrate_to(url, older)
        gateway.start()
        status, body = _readyz(gateway)
        reason = body["checks"]["database"]["reason"]
        assert status == 503 and not body["ready"], body
        assert f"at revision {older}, older than this gateway's {_head()}" in reason, reason
        assert "openshell-gateway migrate" in reason, reason

        # The migration job runs while the gateway serves: it turns ready without a restart.
        done = await _run(_gateway("migrate", "--database-url", url))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(lambda: _readyz(gateway)[0] == 200, timeout=30, what="ready once migrated")
        assert _readyz(gateway)[1]["checks"]["database"]["reason"] == "reachable, schema at head"

        # A newer version's migration (a rollout's hook) moves the schema past this running
        # replica: it stays ready, saying so, or each rollout would take every old pod out at once.
        await _execute(url, f"UPDATE alembic_version SET version_num = '{FUTURE}'")
        wait_until(
            lambda: FUTURE in _readyz(gateway)[1]["checks"]["database"]["reason"],
            timeout=30,
            what="the readiness check seeing the newer schema",
        )
        status, body = _readyz(gateway)
        assert status == 200 and body["ready"], body
        assert "newer than this gateway's" in body["checks"]["database"]["reason"], body
    finally:
        gateway.stop()


# -- (3) data at every earlier revision ---------------------------------------------------------


#: Representative values for every column the earlier revisions had; a revision's rows get those of
#: its tables' columns (read from the database at that revision), so each revision gets what it had.
SANDBOX = {
    "driver": "kubernetes",
    "created_at": T0,
    "instance_id": "pod-1",
    "session_id": "s1",
    "journal_epoch": "e1",
    "connected": False,
    "connected_at": T0,
    "disconnected_at": T0,
    "last_heartbeat_at": T0,
    "exit_code": 3,
    "exited_at": T0,
    "owner": "gw-old",
    "owner_epoch": 2,
    "spec": json.dumps({"image": "busybox", "command": ["sh", "-c", "echo é"]}),
    "driver_state": json.dumps({"phase": "Succeeded"}),
    "generation": 1,
    "run_epoch": "e1",
    "run_sequence": 1,
    "created_by": "ada",
    "team": "core",
    "pod_uid": "0b7c7a8e-uid",
}
EVENTS = [
    {"journal_epoch": "e1", "sequence": 1, "timestamp_ms": 1_000, "kind": "lifecycle", "stream": None,
     "message": "started", "data": json.dumps({"kind": "started"})},
    {"journal_epoch": "e1", "sequence": 2, "timestamp_ms": 1_001, "kind": "log", "stream": "stdout",
     "message": "line \u00e9 1", "data": None},
    {"journal_epoch": "e1", "sequence": 3, "timestamp_ms": 1_002, "kind": "log", "stream": "stderr",
     "message": "line 2", "data": None},
]  # fmt: skip
COMMAND = {"kind": "signal", "args": json.dumps({"signal": 15}), "state": "applied", "error": None,
           "created_at": T0, "answered_at": T0}  # fmt: skip
SIGNING_KEY = {"algorithm": "EdDSA", "private_pem": "PRIVATE", "public_pem": "PUBLIC", "created_at": T0,
               "sign_until": datetime(2100, 1, 1, tzinfo=UTC),
               "verify_until": datetime(2100, 1, 2, tzinfo=UTC)}  # fmt: skip
REPLICA = {"address": "10.0.0.7:50051", "sessions": 2, "draining": False, "started_at": T0, "renewed_at": T0}
TABLES = ("sandboxes", "events", "commands", "signing_keys", "replicas")


async def _fill(url: str, revision: str) -> dict[str, int]:
    """Rows in every table of ``revision``'s schema, by plain SQL of that schema; the count per table."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            columns = await conn.run_sync(
                lambda c: {
                    table: {col["name"] for col in inspect(c).get_columns(table)}
                    for table in inspect(c).get_table_names()
                }
            )

            async def insert(table: str, values: dict[str, Any]) -> None:
                kept = {k: v for k, v in values.items() if k in columns[table]}
                names = ", ".join(kept)
                params = ", ".join(f":{k}" for k in kept)
                await conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({params})"), kept)

            for n in (1, 2):
                await insert("sandboxes", {"id": f"sb{n}", **SANDBOX})
                for event in EVENTS:
                    await insert("events", {"sandbox_id": f"sb{n}", "received_at": T0, **event})
                if "commands" in columns:
                    await insert("commands", {"id": f"cmd{n}", "sandbox_id": f"sb{n}", **COMMAND})
            if "signing_keys" in columns:
                await insert("signing_keys", {"kid": "k1", **SIGNING_KEY})
            if "replicas" in columns:
                await insert("replicas", {"id": "gw-0", **REPLICA})
    finally:
        await engine.dispose()
    return await _counts(url)


async def _counts(url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in TABLES:
        with contextlib.suppress(Exception):  # a table that revision did not have yet
            counts[table] = int((await _query(url, f"SELECT count(*) FROM {table}"))[0][0])
    return counts


@pytest.mark.parametrize("revision", _earlier_revisions())
async def test_a_database_filled_at_an_earlier_revision_keeps_every_row(
    database_url: str, revision: str
) -> None:
    await _migrate_to(database_url, revision)
    before = await _fill(database_url, revision)
    assert before["sandboxes"] == 2 and before["events"] == 6

    # In process, as the gateway's start and its migrate command both do (the command itself is
    # run as a process by the tests above).
    await _migrate_to(database_url, "head")
    assert await _query(database_url, "SELECT version_num FROM alembic_version") == [(_head(),)]
    after = await _counts(database_url)
    assert {table: after[table] for table in before} == before, (before, after)

    db = await Database.open(database_url, migrate=False)
    try:
        sandboxes, events = SandboxStore(db), EventStore(db)
        for n in (1, 2):
            row = await sandboxes.get(f"sb{n}")
            assert row is not None
            assert (row.driver, row.created_at, row.exit_code, row.generation) == ("kubernetes", T0, 3, 1)
            assert row.spec == json.loads(SANDBOX["spec"])  # type: ignore[arg-type]
            if revision >= "0003":
                assert row.driver_state == {"phase": "Succeeded"}
            if revision >= "0005":
                assert (row.created_by, row.team, row.pod_uid) == ("ada", "core", "0b7c7a8e-uid")
            stored = await events.tail(f"sb{n}", 10, generation=1)
            fields = ("journal_epoch", "sequence", "kind", "stream", "message")
            assert [tuple(getattr(e, f) for f in fields) for e in stored] == [
                tuple(ev[f] for f in fields) for ev in EVENTS
            ]
            assert stored[0].data == {"kind": "started"}
            assert await events.high_water_mark(f"sb{n}", "e1") == 3
            if revision >= "0002":
                command = await CommandStore(db).get(f"cmd{n}")
                assert command is not None and command.sandbox_id == f"sb{n}"
                assert (command.state, command.command.signal, command.answered_at) == ("applied", 15, T0)
        if revision >= "0005":
            key = await SigningKeyStore(db).get("k1")
            assert key is not None
            assert (key.algorithm, key.public_pem, key.created_at) == ("EdDSA", "PUBLIC", T0)
        # Rows written at head still go in beside the migrated ones.
        await sandboxes.ensure("new")
        assert {r.id for r in await sandboxes.list()} >= {"sb1", "sb2", "new"}
    finally:
        await db.close()
