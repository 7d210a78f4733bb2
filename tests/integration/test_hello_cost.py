"""The database work of one warm hello, counted (issue 22 point 3: "the cost of a hello in database
round trips measured and reduced").

An in-process gateway with production's hello settings (supervisor auth required, unknown
sandboxes refused) and its background loops slowed out of the way; one known sandbox says hello
twice (the second is the warm one counted) with every capability, and SQLAlchemy's event
listeners count the transactions, the write transactions and the statements from the hello's write
until the pending commands were read; on PostgreSQL, every asyncpg call (each one round trip) is
counted too. Before the cuts of 2026-12 (design: /work/notes/i22, C1 and C2) a warm hello took 6
transactions (3 writing), 9 statements and 39 PostgreSQL round trips: the bind's read, the same read
again, a registering write, the claim, the high-water mark's read and the pending commands' write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.prepared_stmt
import pytest
from grpc import aio
from sqlalchemy import event

from gateway.app import Gateway
from openshell_wire.records import ALL_CAPABILITIES
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config
from tests.support.postgres import pg_bindir, running_postgres

#: The bounds a warm hello now keeps: the bind's read (1 statement); the claim, with the
#: high-water mark read after its UPDATE in the same transaction (3); the pending commands' read
#: (1; a write only when one has expired, not the case here).
MAX_TRANSACTIONS = 3
MAX_WRITE_TRANSACTIONS = 1
MAX_STATEMENTS = 5
#: asyncpg calls: each transaction's BEGIN and COMMIT/ROLLBACK (6), its statements (5), and the
#: pool's pre-ping (BEGIN, ';', ROLLBACK) at each of the 3 checkouts (9). A statement's first use
#: on a pooled connection adds its PREPARE: counted apart (which connection the pool hands out
#: varies), not bounded here.
MAX_PG_ROUND_TRIPS = 20

#: The gateway's own loops that may touch the store while a hello is counted (not the hello's).
BACKGROUND_TASKS = frozenset({"readiness-check", "grpc-health-follower"})


def _the_hellos() -> bool:
    task = asyncio.current_task()
    return task is None or task.get_name() not in BACKGROUND_TASKS


WRITES = ("INSERT", "UPDATE", "DELETE")


@dataclass
class Counts:
    on: bool = False
    transactions: list[list[str]] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    round_trips: list[str] = field(default_factory=list)
    open: dict[int, list[str]] = field(default_factory=dict)

    def read_commands(self) -> bool:
        """The pending commands' read (the hello's last store work) has ended its transaction."""
        return any(s.startswith("SELECT commands.") for txn in self.transactions for s in txn)

    def writes(self) -> int:
        return sum(1 for txn in self.transactions if any(_writes(s) for s in txn))

    def report(self) -> str:
        lines = [f"{len(self.transactions)} transactions, {len(self.statements)} statements:"]
        lines += [f"  txn: {txn}" for txn in self.transactions]
        if self.round_trips:
            lines.append(f"{len(self.round_trips)} round trips: {self.round_trips}")
        return "\n".join(lines)


def _writes(statement: str) -> bool:
    return statement.startswith(WRITES) or "FOR UPDATE" in statement


@contextlib.contextmanager
def counting(gw: Gateway, counts: Counts) -> Iterator[None]:
    engine = gw.db.engine.sync_engine

    def begin(conn: Any) -> None:
        if counts.on and _the_hellos():
            counts.open[id(conn)] = []

    def end(conn: Any) -> None:
        txn = counts.open.pop(id(conn), None)
        if txn is not None:
            counts.transactions.append(txn)

    def statement(conn: Any, _cursor: Any, text: str, *_rest: Any) -> None:
        if counts.on and _the_hellos():
            one = " ".join(text.split())[:90]
            counts.statements.append(one)
            txn = counts.open.get(id(conn))
            if txn is not None:
                txn.append(one)

    hooks = [("begin", begin), ("commit", end), ("rollback", end), ("before_cursor_execute", statement)]
    for name, fn in hooks:
        event.listen(engine, name, fn)
    try:
        yield
    finally:
        for name, fn in hooks:
            event.remove(engine, name, fn)


@contextlib.contextmanager
def counting_round_trips(counts: Counts) -> Iterator[None]:
    """Every asyncpg call SQLAlchemy makes is one round trip to the server."""
    patched: list[tuple[type, str, Any]] = []

    def wrap(cls: type, name: str) -> None:
        original = getattr(cls, name)

        async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if counts.on and _the_hellos():
                query = args[0] if args and isinstance(args[0], str) else ""
                counts.round_trips.append(f"{name}:{' '.join(query.split())[:40]}")
            return await original(self, *args, **kwargs)

        patched.append((cls, name, original))
        setattr(cls, name, counted)

    for cls, name in (
        (asyncpg.connection.Connection, "execute"),
        (asyncpg.connection.Connection, "prepare"),
        (asyncpg.connection.Connection, "fetchrow"),
        (asyncpg.prepared_stmt.PreparedStatement, "fetch"),
        (asyncpg.prepared_stmt.PreparedStatement, "fetchrow"),
        (asyncpg.prepared_stmt.PreparedStatement, "executemany"),
    ):
        wrap(cls, name)
    try:
        yield
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, url: str | None) -> AsyncIterator[Gateway]:
    overrides: dict[str, Any] = {
        "sessions": {"register_unknown": False, "heartbeat_flush_interval_s": 300},
        "auth": {"supervisors": {"required": True}},
        # The background loops' store work kept out of the counted window.
        "ha": {"lease_s": 600, "renew_interval_s": 300},
        "rebalance": {"enabled": False},
    }
    if url is not None:
        overrides["database"] = {"url": url}
    gw = Gateway(gateway_config(tmp_path, overrides))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def _until(predicate: Any, *, what: str, within: float = 30.0) -> None:
    """Polls an async predicate: the counted window is fenced by what happened, not by sleeps a
    loaded machine could outlast."""
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def hello(gw: Gateway, sandbox_id: str, token: str, counts: Counts, *, counted: bool) -> str:
    """One hello with every capability, counted (``counted``) from its write until the pending
    commands were read (the session sends them right after SessionAccepted; a command-less
    sandbox's read is the last store work of the hello)."""
    channel = aio.insecure_channel(gw.grpc_address)
    try:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor(
            metadata=(("authorization", f"Bearer {token}"),)
        )
        message = pb.SupervisorMessage()
        message.hello.sandbox_id = sandbox_id
        message.hello.instance_id = "i-" + uuid.uuid4().hex[:6]
        message.hello.connection_epoch = 1
        message.hello.capabilities.extend(ALL_CAPABILITIES)
        message.hello.journal_epoch = "e1"
        counts.on = True
        await call.write(message)
        first = await call.read()
        if counted:  # the pending commands' read runs after the answer: it ends inside the window

            async def read() -> bool:
                return counts.read_commands()

            await _until(read, what="the pending commands read")
        counts.on = False
        call.cancel()
        return str(first.WhichOneof("payload"))
    finally:
        counts.on = False
        await channel.close()


async def count_warm_hello(gw: Gateway, counts: Counts) -> Counts:
    sandbox_id = "sb-" + uuid.uuid4().hex[:6]
    await gw.sandboxes.create(sandbox_id, driver="external")
    token = await gw.sandbox_token(sandbox_id, generation=1)
    # The first hello warms the caches (the token's verification, prepared statements).
    assert await hello(gw, sandbox_id, token, Counts(), counted=False) == "session_accepted"

    async def disconnected() -> bool:  # its disconnection written, outside the counted window
        row = await gw.sandboxes.get(sandbox_id)
        return gw.registry.get(sandbox_id) is None and row is not None and not row.connected

    await _until(disconnected, what="the first hello's disconnection written")
    with counting(gw, counts):
        assert await hello(gw, sandbox_id, token, counts, counted=True) == "session_accepted"
    return counts


def check(counts: Counts) -> None:
    report = counts.report()
    print(report)  # the figures, for docs/performance.md (pytest -s)
    assert len(counts.transactions) <= MAX_TRANSACTIONS, report
    assert counts.writes() <= MAX_WRITE_TRANSACTIONS, report
    assert len(counts.statements) <= MAX_STATEMENTS, report


async def test_a_warm_hello_on_sqlite_costs_few_transactions(tmp_path: Path) -> None:
    async with gateway(tmp_path, None) as gw:
        counts = await count_warm_hello(gw, Counts())
    check(counts)


@pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)
async def test_a_warm_hello_on_postgres_costs_few_round_trips(tmp_path: Path) -> None:
    with running_postgres() as pg:
        async with gateway(tmp_path, pg.url("postgres")) as gw:
            counts = Counts()
            with counting_round_trips(counts):
                counted = await count_warm_hello(gw, counts)
    check(counted)
    trips = [trip for trip in counted.round_trips if not trip.startswith("prepare:")]
    assert len(trips) <= MAX_PG_ROUND_TRIPS, counted.report()
