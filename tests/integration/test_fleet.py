"""The fleet summary (``GET /api/v1/fleet``, ``openshell-gateway fleet``) on SQLite and PostgreSQL.

Real parts: the API over real stores on a real database (a throwaway PostgreSQL server too), the
replicas' leases written by the real lease store and read by the real ``LeaseView``, people's
tokens from an issuer made in the test (tests/support/oidc.py), and the CLI's ``main()`` talking
HTTP to the served API. The sandboxes' facts are written through the store's own methods, as the
session handler writes them (claims, heartbeats, disconnections, journaled records).

The counts by state are checked against what ``GET /api/v1/sandboxes`` shows for the same rows,
at several clocks around each bound of the state rule: the summary counts in SQL what the list
decides row by row in Python.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import insert, select, text

from gateway.api import build_api
from gateway.auth.people import PeopleAuth
from gateway.cli import main
from gateway.config import HaSettings, OidcSettings, SessionSettings
from gateway.replicas import LeaseView
from gateway.sandbox_state import Liveness, ReplicaLeases, SandboxState, sandbox_state
from gateway.store import Database, EventStore, SandboxStore, utcnow
from gateway.store.fleet import health_column
from gateway.store.replicas import ReplicaStore
from gateway.store.schema import sandboxes as sandboxes_table
from openshell_wire.records import (
    Event,
    HealthRecord,
    HealthState,
    LifecycleKind,
    LifecycleRecord,
)
from tests.support.oidc import AUDIENCE, SigningKey, TestIssuer
from tests.support.procs import PYTHON, REPO, GatewayProcess, SupervisorProcess, wait_until
from tests.unit.test_api_auth import OIDC

LOST_AFTER_S = 60.0
LIVENESS = Liveness.from_settings(SessionSettings(lost_after_s=LOST_AFTER_S))
HA = HaSettings(lease_s=30.0, renew_interval_s=5.0)
TEAM_X, TEAM_Y = "/teams/x", "/teams/y"


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Ticks:
    """A monotonic clock that moves a minute per read: every read of the leases is a fresh one."""

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self) -> float:
        self.at += 60.0
        return self.at


@dataclass
class Env:
    client: TestClient[Any, Any]
    issuer: TestIssuer
    sandboxes: SandboxStore
    events: EventStore
    replicas: ReplicaStore
    clock: Clock
    t0: datetime
    db: Database

    def token(self, user: str, *, role: str, teams: tuple[str, ...] = ()) -> str:
        return self.issuer.token(
            preferred_username=user,
            realm_access={"roles": [f"openshell-{role}"]},
            groups=list(teams),
        )

    async def get(self, path: str, token: str, *, status: int = 200) -> Any:
        resp = await self.client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert resp.status == status, f"{path}: {resp.status} {await resp.text()}"
        assert resp.content_type == "application/json"
        return await resp.json()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    url = request.getfixturevalue("database_url")
    assert isinstance(url, str)
    return url


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[Env]:
    issuer = await TestIssuer(published=[SigningKey.rsa("k1")]).start()
    db = await Database.open(db_url, migrate=True)
    sandboxes, events, replicas = SandboxStore(db), EventStore(db), ReplicaStore(db)
    # Whole seconds: the record times the tests write are in ms.
    t0 = utcnow().replace(microsecond=0)
    clock = Clock(t0)
    view = LeaseView(replicas, ha=HA, timeout_s=10.0, monotonic=Ticks(), clock=clock)
    settings = OidcSettings.model_validate({"issuer_url": issuer.url, "audience": [AUDIENCE], **OIDC})
    app = build_api(
        sandboxes=sandboxes,
        events=events,
        liveness=LIVENESS,
        now=clock,
        auth=PeopleAuth(settings),
        leases=view.leases,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield Env(client, issuer, sandboxes, events, replicas, clock, t0, db)
    finally:
        await db.close()
        await issuer.stop()


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def renew(env: Env, replica: str, *, run: str, sessions: int, draining: bool = False) -> None:
    await env.replicas.renew(
        replica,
        run=run,
        address=f"{replica}:7070",
        sessions=sessions,
        draining=draining,
        started_at=env.t0,
        renewed_at=env.clock.at,
    )


async def connect(env: Env, sid: str, *, owner: str, run: str, at: datetime) -> None:
    claimed = await env.sandboxes.mark_connected(
        sid,
        instance_id=f"i-{sid}",
        session_id=f"s-{sid}",
        journal_epoch="e1",
        owner=owner,
        owner_run=run,
        at=at,
    )
    assert claimed is not None


async def health(env: Env, sid: str, seq: int, state: HealthState, at: datetime, *reasons: str) -> None:
    record = HealthRecord(state=state, reasons=reasons, change=True)
    await env.events.store_events(sid, "e1", [Event(seq, ms(at), record)])


async def exit_(env: Env, sid: str, seq: int, code: int, at: datetime, *, signal: int = 0) -> None:
    record = LifecycleRecord(LifecycleKind.EXITED, pid=40 + seq, exit_code=code, signal=signal)
    await env.events.store_events(sid, "e1", [Event(seq, ms(at), record)])


async def seed(env: Env) -> None:
    """Every branch of the state rule, in team x, with leases: gw-a alive (run a2; its run a1 is
    a predecessor's), gw-b alive and draining, gw-dead with no row."""
    t0 = env.t0
    await renew(env, "gw-a", run="a2", sessions=3)
    await renew(env, "gw-b", run="b1", sessions=1, draining=True)
    for sid in (
        "pending",
        "fresh",
        "fresh-b",
        "stale-beat",
        "old-run",
        "dead-owner",
        "written",
        "lost",
        "done",
    ):
        await env.sandboxes.create(sid, driver="test", created_by="someone", team=TEAM_X)
    await connect(env, "fresh", owner="gw-a", run="a2", at=t0)
    await connect(env, "fresh-b", owner="gw-b", run="b1", at=t0 - timedelta(seconds=5))
    await connect(
        env, "stale-beat", owner="gw-a", run="a2", at=t0 - timedelta(seconds=LIVENESS.fresh_for_s + 1)
    )
    await connect(env, "old-run", owner="gw-a", run="a1", at=t0)
    await connect(env, "dead-owner", owner="gw-dead", run="d1", at=t0 - timedelta(seconds=10))
    for sid in ("written", "lost"):
        await connect(env, sid, owner="gw-a", run="a2", at=t0 - timedelta(seconds=200))
    await env.sandboxes.mark_disconnected("written", session_id="s-written", at=t0 - timedelta(seconds=10))
    await env.sandboxes.mark_disconnected(
        "lost", session_id="s-lost", at=t0 - timedelta(seconds=LOST_AFTER_S + 1)
    )
    await connect(env, "done", owner="gw-a", run="a2", at=t0 - timedelta(seconds=30))
    await exit_(env, "done", 1, 3, t0 - timedelta(seconds=20))


async def check_counts_match_the_list(env: Env, token: str) -> dict[str, Any]:
    fleet: dict[str, Any] = await env.get("/api/v1/fleet", token)
    listing = await env.get("/api/v1/sandboxes", token)
    shown = Counter(s["state"] for s in listing["sandboxes"])
    assert fleet["by_state"] == {s: shown.get(s, 0) for s in fleet["by_state"]}, env.clock.at - env.t0
    assert fleet["sandboxes"] == len(listing["sandboxes"])
    return fleet


async def test_counts_by_state_are_the_lists_states_at_every_bound(env: Env) -> None:
    await seed(env)
    admin = env.token("ada", role="admin")
    fleet = await check_counts_match_the_list(env, admin)
    assert fleet["by_state"] == {"pending": 1, "connected": 2, "disconnected": 4, "lost": 1, "exited": 1}
    assert set(fleet["by_state"]) == {"pending", "connected", "disconnected", "lost", "exited"}
    # Across each bound: fresh_for_s of the connected ones' last word, lost_after_s of each kind
    # of disconnection, to the second and on either side of it.
    bounds = {LIVENESS.fresh_for_s, LIVENESS.fresh_for_s + 5, LOST_AFTER_S - 10, LOST_AFTER_S + 10}
    bounds |= {LOST_AFTER_S - LIVENESS.fresh_for_s - 1, LOST_AFTER_S - LIVENESS.fresh_for_s + 1}
    for bound in sorted(bounds):
        for delta in (-1.0, 0.0, 1.0):
            env.clock.at = env.t0 + timedelta(seconds=max(0.0, bound + delta))
            await check_counts_match_the_list(env, admin)
    # Far later: the lease lapsed too (nothing renews it here): every one not exited is lost.
    env.clock.at = env.t0 + timedelta(seconds=1000)
    fleet = await check_counts_match_the_list(env, admin)
    assert fleet["by_state"] == {"pending": 1, "connected": 0, "disconnected": 0, "lost": 7, "exited": 1}


async def test_unhealthy_sandboxes_with_their_reasons_and_since(env: Env) -> None:
    t0 = env.t0
    await renew(env, "gw-a", run="a2", sessions=3)
    for sid in ("ok", "hot", "sick", "quiet", "gone"):
        await env.sandboxes.create(sid, driver="test", created_by="someone", team=TEAM_X)
        await connect(env, sid, owner="gw-a", run="a2", at=t0)
    await health(env, "ok", 1, HealthState.HEALTHY, t0 - timedelta(seconds=50))
    await health(env, "hot", 1, HealthState.DEGRADED, t0 - timedelta(seconds=40), "memory 91% of limit")
    # Unhealthy since its second report: the third, a periodic one, says so again.
    await health(env, "sick", 1, HealthState.DEGRADED, t0 - timedelta(seconds=90), "disk 91% full")
    await health(env, "sick", 2, HealthState.UNHEALTHY, t0 - timedelta(seconds=60), "disk 100% full")
    await env.events.store_events(
        "sick",
        "e1",
        [
            Event(
                3,
                ms(t0 - timedelta(seconds=30)),
                HealthRecord(state=HealthState.UNHEALTHY, reasons=("disk 100% full", "OOM kill")),
            )
        ],
    )
    # An exited sandbox's last report says nothing of now: not counted, not listed.
    await health(env, "gone", 1, HealthState.UNHEALTHY, t0 - timedelta(seconds=70), "OOM kill")
    await exit_(env, "gone", 2, 137, t0 - timedelta(seconds=65), signal=9)

    fleet = await env.get("/api/v1/fleet", env.token("ada", role="admin"))
    assert fleet["by_health"] == {"healthy": 1, "degraded": 1, "unhealthy": 1, "unknown": 1}
    unhealthy = fleet["unhealthy"]
    assert unhealthy["total"] == 2 and unhealthy["truncated"] is False
    assert [u["id"] for u in unhealthy["sandboxes"]] == ["sick", "hot"]  # unhealthy first
    sick, hot = unhealthy["sandboxes"]
    assert sick["health"] == "unhealthy" and sick["state"] == "connected"
    assert sick["reasons"] == ["disk 100% full", "OOM kill"]
    assert sick["reason"] == "disk 100% full; OOM kill"
    assert datetime.fromisoformat(sick["since"]) == t0 - timedelta(seconds=60)
    assert datetime.fromisoformat(sick["reported_at"]) == t0 - timedelta(seconds=30)
    assert hot["health"] == "degraded" and hot["reason"] == "memory 91% of limit"
    assert datetime.fromisoformat(hot["since"]) == t0 - timedelta(seconds=40)

    # Healthy again: out of the list.
    await health(env, "sick", 4, HealthState.HEALTHY, t0 - timedelta(seconds=10))
    fleet = await env.get("/api/v1/fleet?limit=1", env.token("ada", role="admin"))
    assert fleet["by_health"] == {"healthy": 2, "degraded": 1, "unhealthy": 0, "unknown": 1}
    assert [u["id"] for u in fleet["unhealthy"]["sandboxes"]] == ["hot"]


async def test_recently_exited_with_their_codes_since_and_limit(env: Env) -> None:
    t0 = env.t0
    for index, (sid, code, signal, ago_s) in enumerate(
        [("old", 0, 0, 7200), ("killed", 137, 9, 1800), ("failed", 2, 0, 600), ("ok", 0, 0, 60)]
    ):
        await env.sandboxes.create(sid, driver="test", created_by="someone", team=TEAM_X)
        await exit_(env, sid, index + 1, code, t0 - timedelta(seconds=ago_s), signal=signal)
    admin = env.token("ada", role="admin")
    fleet = await env.get("/api/v1/fleet", admin)
    exited = fleet["exited"]
    assert datetime.fromisoformat(exited["since"]) == t0 - timedelta(hours=1)
    assert exited["total"] == 3 and exited["truncated"] is False
    assert [(x["id"], x["exit_code"]) for x in exited["sandboxes"]] == [
        ("ok", 0),
        ("failed", 2),
        ("killed", 137),
    ]
    killed = exited["sandboxes"][2]
    assert killed["reason"] == "main process 42 exited with code 137, signal 9", killed["reason"]
    assert datetime.fromisoformat(killed["exited_at"]) == t0 - timedelta(seconds=1800)
    assert fleet["by_state"]["exited"] == 4

    narrow = (await env.get("/api/v1/fleet?since=15m&limit=1", admin))["exited"]
    assert narrow["total"] == 2 and narrow["truncated"] is True
    assert [x["id"] for x in narrow["sandboxes"]] == ["ok"]
    since = (t0 - timedelta(hours=3)).isoformat().replace("+00:00", "Z")
    wide = (await env.get(f"/api/v1/fleet?since={since}", admin))["exited"]
    assert [x["id"] for x in wide["sandboxes"]] == ["ok", "failed", "killed", "old"]


async def renewed_ago(env: Env, replica: str, seconds: float) -> None:
    """On PostgreSQL a renewal is written on the database's clock, which this test's clock does not
    move: set back the row as a renewal that long ago would have written it."""
    if env.db.dialect == "postgresql":
        async with env.db.engine.begin() as conn:
            await conn.execute(
                text("UPDATE replicas SET renewed_at = now() - make_interval(secs => :s) WHERE id = :id"),
                {"s": seconds, "id": replica},
            )


async def test_replicas_load_for_admins_only(env: Env) -> None:
    await renew(env, "gw-a", run="a1", sessions=12)
    env.clock.at = env.t0 + timedelta(seconds=10)
    await renew(env, "gw-b", run="b1", sessions=4, draining=True)
    env.clock.at = env.t0 + timedelta(seconds=35)
    await renewed_ago(env, "gw-a", 35.0)
    await renewed_ago(env, "gw-b", 25.0)
    fleet = await env.get("/api/v1/fleet", env.token("ada", role="admin"))
    by_id = {r["id"]: r for r in fleet["replicas"]}
    assert sorted(by_id) == ["gw-a", "gw-b"]
    assert by_id["gw-a"]["sessions"] == 12 and by_id["gw-a"]["draining"] is False
    assert by_id["gw-b"]["sessions"] == 4 and by_id["gw-b"]["draining"] is True
    # gw-a renewed 35 s ago, past lease_s (30 s): dead to the others; gw-b 25 s ago: alive.
    assert by_id["gw-a"]["alive"] is False and by_id["gw-b"]["alive"] is True
    # The lease's age on the clock it was written with (PostgreSQL's own: a little off this test's).
    tolerance = 0.01 if env.db.dialect == "sqlite" else 2.0
    assert abs(by_id["gw-a"]["lease_age_s"] - 35.0) <= tolerance, by_id["gw-a"]
    assert abs(by_id["gw-b"]["lease_age_s"] - 25.0) <= tolerance, by_id["gw-b"]
    viewer = await env.get("/api/v1/fleet", env.token("vic", role="viewer", teams=(TEAM_X,)))
    assert viewer["replicas"] is None


async def test_a_caller_sees_only_the_sandboxes_it_may_list(env: Env) -> None:
    t0 = env.t0
    await renew(env, "gw-a", run="a1", sessions=3)
    for sid, team, creator in (("x1", TEAM_X, "someone"), ("y1", TEAM_Y, "other"), ("mine", None, "vic")):
        await env.sandboxes.create(sid, driver="test", created_by=creator, team=team)
        await connect(env, sid, owner="gw-a", run="a1", at=t0)
        await health(env, sid, 1, HealthState.UNHEALTHY, t0 - timedelta(seconds=5), f"{sid} is ill")
    await env.sandboxes.create("y-done", driver="test", created_by="other", team=TEAM_Y)
    await exit_(env, "y-done", 1, 1, t0 - timedelta(seconds=5))

    vic = env.token("vic", role="viewer", teams=(TEAM_X,))
    fleet = await check_counts_match_the_list(env, vic)
    assert (
        fleet["sandboxes"] == 2 and fleet["by_state"]["connected"] == 2 and fleet["by_state"]["exited"] == 0
    )
    assert fleet["by_health"]["unhealthy"] == 2
    assert sorted(u["id"] for u in fleet["unhealthy"]["sandboxes"]) == ["mine", "x1"]
    assert fleet["exited"] == {
        "since": fleet["exited"]["since"],
        "total": 0,
        "truncated": False,
        "sandboxes": [],
    }

    yves = env.token("yves", role="operator", teams=(TEAM_Y,))
    fleet = await check_counts_match_the_list(env, yves)
    assert fleet["sandboxes"] == 2 and fleet["by_state"]["exited"] == 1
    assert [u["id"] for u in fleet["unhealthy"]["sandboxes"]] == ["y1"]
    assert [x["id"] for x in fleet["exited"]["sandboxes"]] == ["y-done"]

    nobody = env.token("nina", role="viewer")  # no team, created nothing
    fleet = await check_counts_match_the_list(env, nobody)
    assert fleet["sandboxes"] == 0 and fleet["unhealthy"]["sandboxes"] == []

    admin = await check_counts_match_the_list(env, env.token("ada", role="admin"))
    assert admin["sandboxes"] == 4 and admin["by_health"]["unhealthy"] == 3
    # No token: 401, as every API call.
    assert (await env.client.get("/api/v1/fleet")).status == 401


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=many", "limit"),
        ("since=yesterday", "since"),
        ("since=2026-01-02T15:04:05", "since"),  # no offset
    ],
)
async def test_bad_parameters_are_400_naming_them(env: Env, query: str, named: str) -> None:
    answer = await env.get(f"/api/v1/fleet?{query}", env.token("ada", role="admin"), status=400)
    assert answer["error"].startswith(f"{named} must be"), answer


async def test_the_cli_prints_the_summary_and_its_json(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(env)
    await health(env, "fresh", 2, HealthState.UNHEALTHY, env.t0 - timedelta(seconds=5), "disk 100% full")
    token_file = tmp_path / "token"
    token_file.write_text(env.token("ada", role="admin"))
    api = str(env.client.make_url("")).rstrip("/")

    def run(*args: str) -> int:
        return main(["fleet", "--api", api, "--token-file", str(token_file), *args])

    # main() runs its own event loop: in a thread, while this loop serves the API.
    assert await asyncio.to_thread(run, "-o", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["by_state"]["connected"] == 2 and doc["unhealthy"]["sandboxes"][0]["id"] == "fresh"

    assert await asyncio.to_thread(run) == 0
    text = capsys.readouterr().out
    assert "9 sandboxes" in text and "connected 2" in text and "lost 1" in text
    assert "fresh" in text and "disk 100% full" in text
    assert "done" in text and "exit 3" in text
    assert "gw-a" in text and "draining" in text

    assert await asyncio.to_thread(run, "--since", "soon") == 1
    assert "since must be" in capsys.readouterr().err
    token_file.write_text("not-a-token")
    assert await asyncio.to_thread(run) == 77
    unreachable = ["fleet", "--api", "http://127.0.0.1:1", "--token-file", str(token_file)]
    assert await asyncio.to_thread(main, unreachable) == 69
    assert "cannot reach the gateway API at http://127.0.0.1:1" in capsys.readouterr().err


async def test_the_newest_health_is_found_through_the_partial_index(env: Env) -> None:
    """Each sandbox's newest health report is one probe of ix_events_health (the health events
    only), never a walk back over its log lines: the plan of the counts' health column says so on
    both dialects (PostgreSQL told not to scan sequentially: on a few rows it would)."""
    statement = select(sandboxes_table.c.id, health_column())
    async with env.db.engine.connect() as conn:
        # Compiled as the gateway runs it: its bound parameters stay parameters.
        compiled = statement.compile(dialect=conn.dialect)
        params: Any = (
            tuple(compiled.params[name] for name in compiled.positiontup or ())
            if compiled.positional
            else compiled.params
        )
        if conn.dialect.name == "sqlite":
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            plan = [" ".join(map(str, row)) for row in rows]
        else:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            plan = [str(row[0]) for row in await conn.exec_driver_sql(f"EXPLAIN {compiled}", params)]
    assert any("ix_events_health" in line for line in plan), "\n".join(plan)


async def test_the_sql_rule_decides_as_the_python_rule_on_random_rows(env: Env) -> None:
    """Rows no session handler would leave as well (a heartbeat without a connection, a legacy
    owner's id, a lease row without a run), times on and around every bound: the SQL ``CASE``
    and :func:`sandbox_state` agree on each row."""
    rng = random.Random(23)
    now = env.t0
    edges = [0.0, LIVENESS.fresh_for_s, LOST_AFTER_S, 200.0]

    def ago() -> datetime | None:
        if rng.random() < 0.2:
            return None
        edge = rng.choice(edges)
        return now - timedelta(seconds=max(0.0, edge + rng.choice([-1e-6, 0.0, 1e-6, rng.uniform(-30, 30)])))

    rows = [
        {
            "id": f"r{i:04d}",
            "driver": "test",
            "created_at": now,
            "connected": rng.random() < 0.6,
            "connected_at": ago(),
            "disconnected_at": ago(),
            "last_heartbeat_at": ago(),
            "exit_code": 1 if rng.random() < 0.1 else None,
            "owner": rng.choice([None, "gw-a", "gw-b", "gw-old", "gw-dead", "gateway-0123456789ab"]),
            "owner_run": rng.choice([None, "a1", "a2", "b1", "o1"]),
        }
        for i in range(600)
    ]
    async with env.db.engine.begin() as conn:
        await conn.execute(insert(sandboxes_table), rows)
    leases = ReplicaLeases(
        lease_s=HA.lease_s,
        renewed_at={"gw-a": now - timedelta(seconds=10), "gw-b": now - timedelta(seconds=40), "gw-old": now},
        runs={"gw-a": "a2", "gw-b": "b1", "gw-old": None},
    )
    queries = env.sandboxes.fleet()
    for leases_given in (leases, None):
        live = await queries.live_owners(owners=None, leases=leases_given, now=now)
        counts = await queries.counts(
            owners=None, now=now, liveness=LIVENESS, live=live, exited_since=now - timedelta(hours=1)
        )
        decided = Counter(
            str(sandbox_state(r, now=now, liveness=LIVENESS, leases=leases_given))
            for r in await env.sandboxes.list()
        )
        assert counts.by_state == {s.value: decided.get(s.value, 0) for s in SandboxState}
        # Every branch was taken, with and without leases.
        assert all(counts.by_state.values()), counts.by_state


# ------------------------------------------------------------ a real gateway and real supervisors


def _fleet_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", "fleet", "--api", f"http://127.0.0.1:{gateway.http_port}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_a_real_gateways_fleet_through_the_cli(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    """A gateway process (without OIDC every caller is admin), three supervisors: one whose disk
    counts as full (unhealthy), one healthy, one whose main process exits with 3; the CLI, run
    as a process, reads them as the summary says."""
    gateway.start()
    sleeper = [PYTHON, "-c", "import time; time.sleep(120)"]
    health = ["health.interval_s=0.5", "health.check_interval_s=0.2", f"health.disk_paths=[{tmp_path}]"]
    for sid, command, settings in (
        (
            "ill",
            sleeper,
            [*health, "health.disk_degraded_ratio=0.000001", "health.disk_unhealthy_ratio=0.000001"],
        ),
        ("fine", sleeper, health),
        ("quits", [PYTHON, "-c", "import sys; sys.exit(3)"], health),
    ):
        sv = SupervisorProcess(tmp_path / sid, sid, gateway.address, command, settings=settings)
        supervisors.append(sv)
        sv.start()

    seen: list[dict[str, Any]] = []

    def summary() -> dict[str, Any] | None:
        run = _fleet_cli(gateway, "-o", "json")
        assert run.returncode == 0, run.stderr
        doc: dict[str, Any] = json.loads(run.stdout)
        seen[:] = [doc]
        replicas = doc["replicas"]
        ready = (
            doc["by_state"]["connected"] == 2
            and doc["by_state"]["exited"] == 1
            and doc["by_health"]["unhealthy"] == 1
            and doc["by_health"]["healthy"] == 1
            and replicas
            and replicas[0]["sessions"] == 2
        )
        return doc if ready else None

    try:
        doc = wait_until(summary, timeout=60, what="the fleet as the supervisors made it", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last summary: {seen}") from None
    (ill,) = doc["unhealthy"]["sandboxes"]
    assert ill["id"] == "ill" and ill["state"] == "connected" and ill["health"] == "unhealthy"
    assert ill["reason"].startswith("disk "), ill
    (quits,) = doc["exited"]["sandboxes"]
    assert quits["id"] == "quits" and quits["exit_code"] == 3
    assert quits["reason"].endswith("exited with code 3"), quits
    (replica,) = doc["replicas"]
    assert replica["id"] == f"gateway-{gateway.grpc_port}" and replica["alive"] is True
    assert replica["draining"] is False and 0 <= replica["lease_age_s"] < 30

    text = _fleet_cli(gateway, "--since", "10m")
    assert text.returncode == 0, text.stderr
    assert "3 sandboxes: pending 0, connected 2, disconnected 0, lost 0, exited 1" in text.stdout
    assert "ill" in text.stdout and "unhealthy" in text.stdout and "exit 3" in text.stdout
    bad = _fleet_cli(gateway, "--limit", "0")
    assert bad.returncode == 1 and "limit must be an integer from 1 to 500" in bad.stderr
