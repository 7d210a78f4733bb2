"""Replica leases with real parts (issue 20 point 2): two gateway processes on one real
PostgreSQL database, a real supervisor connected to replica A, A killed with SIGKILL (no shutdown,
no disconnection write, its lease row left behind). Replica B, which never held the session,
shows the sandbox disconnected once A's lease lapsed, then lost after ``sessions.lost_after_s``.

The heartbeat interval is long (30 s), so the heartbeat rule alone would show the sandbox
connected for half a minute after the kill: the lease is what B goes by. Before the lease, a
crashed gateway's sandboxes stayed "connected" for as long as their heartbeat bound.

Then the review's follow-ups on the same real database: A killed and started again under the same
replica id (a new run) does not bring its predecessor's session back as connected on either
replica; renewers whose clocks are an hour off change no lease (one clock, the database's); and
revision 0008 marks expired the legacy pending commands that a replica of a release before
expiry would still send, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from gateway.config import HaSettings, SessionSettings
from gateway.replicas import FORGET_AFTER_LEASES, LeaseRenewer, LeaseView, ReplicaIdentity
from gateway.sandbox_state import Liveness
from gateway.store import Database
from gateway.store.commands import LEGACY_TTL_S
from gateway.store.db import create_engine, upgrade
from gateway.store.replicas import ReplicaStore
from gateway.store.schema import commands as commands_table
from gateway.store.schema import sandboxes as sandboxes_table
from tests.support.postgres import pg_bindir
from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until, writer_command

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

LEASE_S, RENEW_S, LOST_AFTER_S = 2.0, 0.5, 4.0
HEARTBEAT_S = 30.0
FRESH_FOR_S = Liveness.from_settings(
    SessionSettings(heartbeat_interval_s=HEARTBEAT_S, grace_s=1.0, heartbeat_flush_interval_s=0.5)
).fresh_for_s
# The lease lapses LEASE_S after the last renewal; B reads the table at most RENEW_S / 2 late.
SLACK_S = 3.0


def _replica(workdir: Path, replica_id: str, database_url: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        heartbeat_interval_s=HEARTBEAT_S,
        database_url=database_url,
        extra=[
            "--set", f"ha.replica_id={replica_id}",
            "--set", f"ha.lease_s={LEASE_S}",
            "--set", f"ha.renew_interval_s={RENEW_S}",
            "--set", f"sessions.lost_after_s={LOST_AFTER_S}",
        ],
    )  # fmt: skip


def _get(gateway: GatewayProcess, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}{path}", timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 404 until the supervisor's hello registered it
        return {"state": f"http {exc.code}"}


def _metric(gateway: GatewayProcess, series: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
    return None


async def _lease_rows(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return {r["id"]: r for r in await conn.fetch("SELECT * FROM replicas")}
    finally:
        await conn.close()


async def test_a_killed_replicas_sandbox_is_shown_disconnected_then_lost_by_another(
    tmp_path: Path, database_url: str, supervisors: list[SupervisorProcess]
) -> None:
    assert FRESH_FOR_S > LEASE_S + SLACK_S + LOST_AFTER_S, "the heartbeat alone must not explain it"
    a = _replica(tmp_path / "a", "gw-a", database_url)
    b = _replica(tmp_path / "b", "gw-b", database_url)
    a.start()  # A migrates first: B then finds the schema in place
    try:
        b.start()
        rows = await _lease_rows(database_url)
        assert set(rows) == {"gw-a", "gw-b"} and rows["gw-a"]["address"] == a.address
        sv = SupervisorProcess(tmp_path / "sv", "sb-1", a.address, command=writer_command(100_000, delay=0.1))
        supervisors.append(sv)
        sv.start()
        wait_until(
            lambda: _get(b, "/api/v1/sandboxes/sb-1")["state"] == "connected",
            timeout=30,
            what="B showing the sandbox held by A connected",
        )
        assert _metric(b, "openshell_gateway_replicas_alive") == 2.0

        a.kill()  # SIGKILL: no draining mark, no disconnection write, the lease row stays
        killed = time.monotonic()
        doc = wait_until(
            lambda: (d := _get(b, "/api/v1/sandboxes/sb-1"))["state"] != "connected" and d,
            timeout=LEASE_S + SLACK_S,
            what="B showing the dead replica's sandbox not connected within the lease",
        )
        assert doc["state"] == "disconnected" and doc["connected"] is False, doc
        # Since it was last heard from: after it connected, before B noticed.
        since = datetime.fromisoformat(doc["disconnected_since"])
        assert since >= datetime.fromisoformat(doc["connected_at"]), doc
        wait_until(
            lambda: _get(b, "/api/v1/sandboxes/sb-1")["state"] == "lost",
            timeout=LOST_AFTER_S + SLACK_S,
            what="B showing it lost after sessions.lost_after_s",
        )
        assert time.monotonic() - killed < FRESH_FOR_S, "the lease decided, not the heartbeat"
        wait_until(
            lambda: _metric(b, "openshell_gateway_replicas_alive") == 1.0,
            timeout=10,  # the count is redone every few seconds
            what="B counting one replica alive",
        )
        # B never held the session: the row still names A (whose row is still there, lapsed).
        rows = await _lease_rows(database_url)
        assert set(rows) == {"gw-a", "gw-b"} and not rows["gw-a"]["draining"]
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            owner, connected = await conn.fetchrow("SELECT owner, connected FROM sandboxes WHERE id = 'sb-1'")
        finally:
            await conn.close()
        assert (owner, connected) == ("gw-a", True), "nothing was written for the sandbox since the kill"
        assert "sb-1" not in b.log_text(), "B never heard of the session"

        # A clean stop marks the row draining and then deletes it.
        b.stop()
        assert set(await _lease_rows(database_url)) == {"gw-a"}
    finally:
        a.kill()
        b.stop()


async def test_a_replica_restarted_under_its_id_does_not_revive_its_predecessors_session(
    tmp_path: Path, database_url: str, supervisors: list[SupervisorProcess]
) -> None:
    # Review finding 2: the lease row is keyed by the stable id; a new run of gw-a renewing it must
    # not make the session its killed predecessor left flagged connected count as alive. The new
    # run listens elsewhere, so the supervisor (still dialling the dead address) cannot reconnect:
    # any "connected" seen afterwards is the predecessor's session revived.
    a = _replica(tmp_path / "a", "gw-a", database_url)
    b = _replica(tmp_path / "b", "gw-b", database_url)
    a.start()
    again = _replica(tmp_path / "a2", "gw-a", database_url)
    try:
        b.start()
        sv = SupervisorProcess(tmp_path / "sv", "sb-1", a.address, command=writer_command(100_000, delay=0.1))
        supervisors.append(sv)
        sv.start()
        wait_until(
            lambda: _get(b, "/api/v1/sandboxes/sb-1")["state"] == "connected",
            timeout=30,
            what="B showing the sandbox held by A connected",
        )
        first_run = (await _lease_rows(database_url))["gw-a"]["run_id"]
        a.kill()
        killed = time.monotonic()
        again.start()  # the same replica id, a new run: it renews the row at once
        rows = await _lease_rows(database_url)
        assert rows["gw-a"]["run_id"] not in (None, first_run), "the new run took the row over"
        # Every replica's view of the table refreshes within RENEW_S / 2: look for a while longer.
        seen = []
        until = time.monotonic() + 4 * RENEW_S
        while time.monotonic() < until:
            seen += [_get(g, "/api/v1/sandboxes/sb-1")["state"] for g in (b, again)]
            await asyncio.sleep(0.1)
        assert time.monotonic() - killed < FRESH_FOR_S, "the heartbeat alone would still say connected"
        assert "connected" not in seen, seen
        # Since it was last heard from, which with a 30 s heartbeat may be past lost_after_s already.
        assert set(seen) <= {"disconnected", "lost"}, seen
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            owner, owner_run, connected = await conn.fetchrow(
                "SELECT owner, owner_run, connected FROM sandboxes WHERE id = 'sb-1'"
            )
        finally:
            await conn.close()
        assert (owner, owner_run, connected) == ("gw-a", first_run, True), "the row still names the dead run"
    finally:
        a.kill()
        again.stop()
        b.stop()


def _clock(off: timedelta) -> Callable[[], datetime]:
    """A wall clock ``off`` from the true one (a replica whose NTP failed)."""
    return lambda: datetime.now(UTC) + off


async def test_renewers_with_clocks_an_hour_off_change_no_lease(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Review finding 3: on PostgreSQL a lease is written and judged on the database's clock.
    # Before, a replica an hour behind wrote renewals already lapsed for every other replica, and
    # one far enough ahead deleted the others' live rows as forgotten on every renewal.
    ha = HaSettings(lease_s=LEASE_S, renew_interval_s=RENEW_S)
    behind = timedelta(hours=-1)
    ahead = timedelta(seconds=FORGET_AFTER_LEASES * LEASE_S + 60)
    db = await Database.open(database_url)
    try:
        store = ReplicaStore(db)
        renewers = [
            LeaseRenewer(
                store,
                identity=ReplicaIdentity(id=rid, run=rid + "-run"),
                address=f"{rid}:1",
                ha=ha,
                sessions=lambda: 0,
                clock=_clock(off),
            )
            for rid, off in (("gw-behind", behind), ("gw-ahead", ahead), ("gw-right", timedelta()))
        ]
        for _ in range(2):  # each renews after the others: the one ahead would forget the one behind
            for renewer in renewers:
                assert await renewer.renew_once()
        rows = {r.id: r for r in await store.leases()}
        assert set(rows) == {"gw-behind", "gw-ahead", "gw-right"}, "a live row was forgotten"
        spread = max(r.renewed_at for r in rows.values()) - min(r.renewed_at for r in rows.values())
        assert spread < timedelta(seconds=LEASE_S), rows
        # Every reader, whatever its clock, sees the three alive, and a lapsed one dead.
        for off in (behind, ahead, timedelta()):
            view = LeaseView(store, ha=ha, timeout_s=5.0, clock=_clock(off))
            leases = await view.leases()
            here = datetime.now(UTC) + off
            assert leases.alive_count(now=here) == 3, off
            assert all(leases.alive(r.id, run=r.run_id, now=here) for r in rows.values())
            assert not leases.alive("gw-right", now=here + timedelta(seconds=LEASE_S + 1))
        for renewer in renewers:
            await renewer.stop()
    finally:
        await db.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_lease_views_skew_leaves_out_the_wait_for_a_connection(database_url: str) -> None:
    # Review (s7) finding 9: the view took this process's time before checking out a connection,
    # so a wait for the pool counted as clock skew and made every lease look older by it; with a
    # wait as long as the lease, a replica that had just renewed was shown dead.
    ha = HaSettings(lease_s=LEASE_S, renew_interval_s=RENEW_S)
    db = await Database.open(database_url)
    slow = False

    def checkout(*_: Any) -> None:
        if slow:
            time.sleep(LEASE_S)  # a checkout that waits (a busy pool, a slow pre-ping)

    try:
        store = ReplicaStore(db)
        renewer = LeaseRenewer(
            store, identity=ReplicaIdentity(id="gw-a", run="r1"), address="a:1", ha=ha, sessions=lambda: 0
        )
        assert await renewer.renew_once()
        renewed = datetime.now(UTC)
        event.listen(db.engine.sync_engine, "checkout", checkout)
        slow = True
        leases = await LeaseView(store, ha=ha, timeout_s=10 * LEASE_S).leases()
        slow = False
        assert leases.skew is not None and abs(leases.skew.total_seconds()) < LEASE_S / 4, leases.skew
        # Judged as of its renewal, the lease is alive (the skew made it LEASE_S older: lapsed).
        assert leases.alive("gw-a", run="r1", now=renewed)
        await renewer.stop()
    finally:
        slow = False
        await db.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_revision_0008_expires_legacy_pending_commands_an_old_replica_would_send(
    tmp_path: Path, database_url: str, dialect: str
) -> None:
    # Review finding 4: a replica of a release before 0007 reads only ``state``; pending rows
    # past the legacy time to live must not look pending to it once the rollout migrated.
    url = database_url if dialect == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    now = datetime.now(UTC)
    old, recent = now - timedelta(seconds=LEGACY_TTL_S + 60), now - timedelta(seconds=30)
    rows = {
        # id: (state, created_at, expires_at) -> the state expected after 0008
        "legacy-old": (("pending", old, None), "expired"),
        "legacy-recent": (("pending", recent, None), "pending"),
        "new-old": (("pending", old, now + timedelta(seconds=600)), "pending"),  # its own expiry rules
        "answered-old": (("applied", old, None), "applied"),
    }
    engine = create_engine(url)
    try:
        await upgrade(engine, "0007")
        async with engine.begin() as conn:
            await conn.execute(insert(sandboxes_table).values(id="sb-1", driver="external", created_at=old))
            for cid, ((state, created_at, expires_at), _) in rows.items():
                await conn.execute(
                    insert(commands_table).values(
                        id=cid,
                        sandbox_id="sb-1",
                        kind="signal",
                        args=json.dumps({"signal": 15}),
                        state=state,
                        created_at=created_at,
                        expires_at=expires_at,
                    )
                )
        await upgrade(engine, "0008")
        async with engine.connect() as conn:
            stored = {
                r.id: (r.state, r.error)
                for r in await conn.execute(
                    select(commands_table.c.id, commands_table.c.state, commands_table.c.error)
                )
            }
    finally:
        await engine.dispose()
    assert {cid: state for cid, (state, _) in stored.items()} == {
        cid: want for cid, (_, want) in rows.items()
    }
    assert stored["legacy-old"][1] is not None and stored["legacy-old"][1].startswith("expired")
