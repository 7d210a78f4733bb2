"""The proof with real parts (issue 20 point 7a): three gateway processes on one real PostgreSQL
behind Debian haproxy in TCP mode (standing in for a Service), real supervisors whose main
processes write numbered lines all along, connected through haproxy. Meanwhile:

1. the replica holding the most sessions is killed with SIGKILL, and its supervisors reconnect
   through haproxy to the other two; it is started again;
2. all three are restarted one by one (SIGTERM, wait, start again under the same id and ports);
3. two replicas are killed with SIGKILL at once (every session moves to the last one), then
   started again;
4. the replica holding the most sessions is frozen (SIGSTOP) until its supervisors moved and its
   lease lapsed, then woken;
5. all along, commands (a SIGUSR1 the main process counts, a heartbeat interval) are POSTed
   through haproxy's API frontend, so most reach a replica that does not hold the session.

The scenario runs once (a module fixture); each invariant is its own test over what it left in
the database: every line exactly once and in order, every main process the one that started
(one STARTED record, its PID in every line it wrote), every command applied, exactly once,
wherever it was posted (a replica that does not hold the session routes it, issue 20 point 3),
and recorded delivered, every replica's own API (asked directly, not through haproxy) showing
every sandbox connected, and a frozen replica that wakes taking nothing back.

Run with ``-s`` to see what was measured (reconnect times, lines, repeats dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.haproxy import Backend, HAProxy, running_haproxy
from tests.support.postgres import PgServer, pg_bindir
from tests.support.procs import PYTHON, GatewayProcess, SupervisorProcess, wait_until

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

SANDBOXES = 6
LINE_EVERY_S = 0.05
COMMAND_EVERY_S = 0.25
#: Short leases, so a killed replica's sandboxes are not shown connected for long (nothing here
#: depends on it: haproxy's check takes the replica out, the supervisors' cut stream moves them).
LEASE_S, RENEW_S = 2.0, 0.5
#: A session moved to another replica within this (haproxy's check, the supervisor's backoff,
#: the hello, the replay); a wait, not a speed asserted.
SETTLE_S = 30.0

#: The main process: ``<pid> <i>`` every LINE_EVERY_S until the stop file appears, then one last
#: line with the count and the SIGUSR1s it received (the signal commands, as the process saw them).
WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    stop, every = sys.argv[1], float(sys.argv[2])
    received = 0
    def on_usr1(signum, frame):
        global received
        received += 1
    signal.signal(signal.SIGUSR1, on_usr1)
    pid, i = os.getpid(), 0
    while not os.path.exists(stop):
        print(f"{pid} {i}", flush=True)
        i += 1
        time.sleep(every)
    print(f"done {pid} {i} signals {received}", flush=True)
    """
)


@dataclass
class Posted:
    sandbox_id: str
    status: int
    body: dict[str, Any]
    phase: str


@dataclass
class Proof:
    """What the scenario left behind, read from the database once every supervisor had exited."""

    sandbox_ids: list[str]
    supervisor_pids: dict[str, int]
    exit_codes: dict[str, int]
    events: dict[str, list[dict[str, Any]]]
    commands: dict[str, dict[str, Any]]
    posted: list[Posted]
    post_errors: list[str]
    final_round: set[str]
    #: Each sandbox's (owner, session id, connected) before the frozen replica woke and after.
    before_wake: dict[str, tuple[Any, ...]]
    after_wake: dict[str, tuple[Any, ...]]
    frozen_id: str
    #: Why the sessions did not all move off the frozen replica ("" when they did).
    frozen_stuck: str
    #: GET /api/v1/sandboxes asked of each replica directly (its own HTTP port, not haproxy's
    #: round robin), by replica id, once all had settled.
    views: dict[str, dict[str, Any]]
    #: For each sandbox, the phases whose stopped (SIGTERM) or killed (SIGKILL) replica held its
    #: session just before, e.g. ["kill-1", "restart-gw1", "kill-2"].
    moved_in: dict[str, list[str]] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    def lines(self, sandbox_id: str) -> list[str]:
        return [
            e["message"] for e in self.events[sandbox_id] if e["kind"] == "log" and e["stream"] == "stdout"
        ]

    def trail(self, sandbox_id: str, command_id: str) -> list[str]:
        """The supervisor's own lines about ``command_id``."""
        prefix = f"command {command_id} "
        return [
            e["message"]
            for e in self.events[sandbox_id]
            if e["kind"] == "log" and e["stream"] != "stdout" and e["message"].startswith(prefix)
        ]

    def lifecycle(self, sandbox_id: str, kind: str) -> list[dict[str, Any]]:
        return [
            e["data"]
            for e in self.events[sandbox_id]
            if e["kind"] == "lifecycle" and e["data"]["kind"] == kind
        ]


# -- the database, read directly ----------------------------------------------------------


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _sql(url: str, query: str, *args: object) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(_dsn(url))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def _admin(server: PgServer, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=server.port, user=server.user, database="postgres"
        )
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def _line_counts(url: str) -> dict[str, int]:
    rows = _sql(
        url, "SELECT sandbox_id, count(*) FROM events WHERE kind = 'log' AND stream = 'stdout' GROUP BY 1"
    )
    return {r[0]: int(r[1]) for r in rows}


def _owners(url: str) -> dict[str, str | None]:
    """Each sandbox's owner while it is connected (None while not)."""
    return {r[0]: (r[1] if r[2] else None) for r in _sql(url, "SELECT id, owner, connected FROM sandboxes")}


def _rows(url: str) -> dict[str, tuple[Any, ...]]:
    return {r[0]: tuple(r[1:]) for r in _sql(url, "SELECT id, owner, session_id, connected FROM sandboxes")}


def _waits(url: str) -> str:
    """The database's open transactions and the lock waits, for a failure's message."""
    rows = _sql(
        url,
        "SELECT pid, state, wait_event_type, now() - xact_start AS age, pg_blocking_pids(pid) AS blocked_by,"
        " left(query, 160) AS query FROM pg_stat_activity"
        " WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
    )
    return "transactions: " + "; ".join(str(dict(r)) for r in rows)


def _api(gw: GatewayProcess, path: str) -> dict[str, Any]:
    """``path`` of this replica's own API (its HTTP port, not haproxy's frontend)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}{path}", timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


# -- the scenario ---------------------------------------------------------------------------


class CommandPoster:
    """POSTs a command every COMMAND_EVERY_S through haproxy's API frontend, to each sandbox in
    turn, alternating a SIGUSR1 and a heartbeat interval, in a thread owned by the scenario."""

    def __init__(self, proxy: HAProxy, sandbox_ids: list[str]) -> None:
        self._proxy = proxy
        self._ids = sandbox_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="command-poster", daemon=True)
        self.phase = "start"
        self.posted: list[Posted] = []
        self.errors: list[str] = []
        self._n = 0

    def post(self, sandbox_id: str) -> Posted | None:
        body: dict[str, Any] = (
            {"kind": "signal", "signal": "SIGUSR1"}
            if self._n % 2 == 0
            else {"kind": "heartbeat", "interval_ms": 500}
        )
        self._n += 1
        request = urllib.request.Request(
            f"{self._proxy.http_url}/api/v1/sandboxes/{sandbox_id}/commands",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                posted = Posted(sandbox_id, resp.status, json.loads(resp.read()), self.phase)
        except urllib.error.HTTPError as exc:
            posted = Posted(sandbox_id, exc.code, {"error": exc.read().decode(errors="replace")}, self.phase)
        except OSError as exc:  # a replica cut mid-request: whether it stored the command is unknown
            self.errors.append(f"{self.phase}: {sandbox_id}: {exc}")
            return None
        self.posted.append(posted)
        return posted

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(COMMAND_EVERY_S):
            self.post(self._ids[i % len(self._ids)])
            i += 1

    def __enter__(self) -> CommandPoster:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _replica(workdir: Path, database_url: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        database_url=database_url,
        extra=["--set", f"ha.lease_s={LEASE_S}", "--set", f"ha.renew_interval_s={RENEW_S}"],
    )


def _rid(gw: GatewayProcess) -> str:
    return f"gateway-{gw.grpc_port}"  # GatewayProcess's replica id, stable across its restarts


def _events_received(gw: GatewayProcess) -> float:
    """This run of ``gw``'s count of events received (repeats included); 0 if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.ops_port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == "openshell_gateway_events_received_total":
                    return float(value)
    except OSError:
        pass
    return 0.0


@pytest.fixture(scope="module")
def proof(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proof]:
    root = tmp_path_factory.mktemp("ha-proof")
    name = f"t_{uuid.uuid4().hex[:12]}"
    _admin(pg_server, f'CREATE DATABASE "{name}"')
    url = pg_server.url(name)
    gateways = [_replica(root / f"gw{i}", url) for i in range(3)]
    supervisors: list[SupervisorProcess] = []
    received = 0.0  # events received, summed over every run of every replica (read before it stops)
    try:
        for gw in gateways:  # one after the other: the first migrates, the others find the schema
            gw.start()
        backends = [Backend(_rid(gw), gw.grpc_port, gw.http_port, gw.ops_port) for gw in gateways]
        with running_haproxy(root / "haproxy", backends) as proxy:
            ids = [f"ha-{i}" for i in range(SANDBOXES)]
            for sandbox_id in ids:
                workdir = root / sandbox_id
                sv = SupervisorProcess(
                    workdir,
                    sandbox_id,
                    proxy.grpc_address,
                    [PYTHON, "-u", "-c", WRITER, str(workdir / "stop"), str(LINE_EVERY_S)],
                    settings=["session.exit_flush_timeout_s=60"],
                )
                supervisors.append(sv)
                sv.start()
            by_id = {_rid(gw): gw for gw in gateways}
            measured: dict[str, Any] = {}

            def settled(
                what: str, alive: list[GatewayProcess] | None, *, at_least: int = 10
            ) -> tuple[float, float]:
                """Wait until every sandbox is connected to a replica of ``alive`` (None: lines
                only, the row is the tests' business) and has stored ``at_least`` more lines
                since. Returns the seconds until every sandbox was there with its first line
                stored since (the move itself, polled every 0.2 s), and until all ``at_least``
                were (the move plus about ``at_least`` * LINE_EVERY_S of writing)."""
                began = time.monotonic()
                before = _line_counts(url)
                live = {_rid(gw) for gw in alive} if alive is not None else None
                first: list[float] = []

                def done() -> bool:
                    owners, counts = _owners(url), _line_counts(url)
                    since = [
                        counts.get(s, 0) - before.get(s, 0)
                        for s in ids
                        if live is None or owners.get(s) in live
                    ]
                    if len(since) < len(ids):
                        return False
                    if not first and min(since) >= 1:
                        first.append(time.monotonic() - began)
                    return min(since) >= at_least

                wait_until(done, timeout=SETTLE_S, what=what, interval=0.2)
                full = time.monotonic() - began
                return round(first[0] if first else full, 2), round(full, 2)

            moved_in: dict[str, list[str]] = {s: [] for s in ids}

            def stop(gw: GatewayProcess, *, kill: bool, phase: str) -> None:
                nonlocal received
                for sandbox_id, owner in _owners(url).items():
                    if owner == _rid(gw) and sandbox_id in moved_in:
                        moved_in[sandbox_id].append(phase)
                received += _events_received(gw)
                if kill:
                    gw.kill()
                else:
                    gw.stop()

            measured["first sessions"] = settled("every supervisor connected through haproxy", gateways)
            spread = Counter(_owners(url).values())
            measured["sessions per replica at first"] = sorted(spread.values(), reverse=True)
            assert len(spread) >= 2, f"haproxy spread the sessions over the replicas: {spread}"

            with CommandPoster(proxy, ids) as poster:
                # 1. kill -9 the replica holding the most sessions
                poster.phase = "kill-1"
                victim = by_id[spread.most_common(1)[0][0]]  # type: ignore[index]
                stop(victim, kill=True, phase="kill-1")
                others = [gw for gw in gateways if gw is not victim]
                measured["moved after kill -9 of one: first line / 10 lines (s)"] = settled(
                    "sessions moved off the killed one", others
                )
                victim.start()
                wait_until(lambda: all(proxy.server_states().values()), timeout=SETTLE_S, what="all UP again")

                # 2. restart all three one by one
                for gw in gateways:
                    poster.phase = f"restart-{_rid(gw)}"
                    began = time.monotonic()
                    stop(gw, kill=False, phase=f"restart-{_rid(gw)}")
                    measured.setdefault("SIGTERM to exit (s)", []).append(round(time.monotonic() - began, 2))
                    measured.setdefault("settled after a SIGTERM: first line / 10 lines (s)", []).append(
                        settled("sessions moved off the stopped one", [g for g in gateways if g is not gw])
                    )
                    gw.start()
                    wait_until(
                        lambda: all(proxy.server_states().values()), timeout=SETTLE_S, what="all UP again"
                    )

                # 3. kill -9 two at once: every session goes to the third
                poster.phase = "kill-2"
                owners = Counter(_owners(url).values())
                pair = sorted(gateways, key=lambda g: owners.get(_rid(g), 0), reverse=True)[:2]
                for gw in pair:
                    stop(gw, kill=True, phase="kill-2")
                (last,) = [gw for gw in gateways if gw not in pair]
                measured["moved after kill -9 of two at once: first line / 10 lines (s)"] = settled(
                    "sessions all on the last one", [last]
                )
                for gw in pair:
                    gw.start()
                wait_until(lambda: all(proxy.server_states().values()), timeout=SETTLE_S, what="all UP again")
                measured["settled after the restarts (s)"] = settled("sessions settled", gateways)

                # 4. freeze (SIGSTOP) the replica holding the most sessions: its connections stay
                # open and silent; the supervisors' stale bound moves them; it wakes up later, its
                # lease lapsed, with sessions it still believes it holds.
                poster.phase = "freeze"
                owners = Counter(_owners(url).values())
                frozen = max(gateways, key=lambda g: owners.get(_rid(g), 0))
                frozen.signal(signal.SIGSTOP)
                stuck = ""
                try:
                    measured["moved off a frozen replica: first line / 10 lines (s)"] = settled(
                        "sessions moved off the frozen one", [g for g in gateways if g is not frozen]
                    )
                except AssertionError as exc:
                    # Said by its own test, with what the database was waiting on; the
                    # scenario goes on once the replica wakes.
                    stuck = f"{exc}; owners {_owners(url)}; {_waits(url)}"
                else:
                    time.sleep(LEASE_S + RENEW_S)  # its lease lapses while it sleeps
                finally:
                    before_wake = _rows(url)
                    frozen.signal(signal.SIGCONT)
                wait_until(lambda: all(proxy.server_states().values()), timeout=SETTLE_S, what="all UP again")
                time.sleep(2 * RENEW_S + 1.0)  # whatever the woken one does with its old sessions, done
                after_wake = _rows(url)
                poster.phase = "after"
                settled("lines flowing after the wake", None)

            # Every replica's API, each asked directly, shows every sandbox connected.
            views = {_rid(gw): _api(gw, "/api/v1/sandboxes") for gw in gateways}

            # 5. a last round with the sessions quiet: three commands per sandbox through haproxy,
            # so round robin sends most to a replica that does not hold the session.
            final = CommandPoster(proxy, ids)
            final.phase = "final"
            for _ in range(3):
                for sandbox_id in ids:
                    final.post(sandbox_id)
            final_round = {p.body["id"] for p in final.posted if p.status == 201}
            # Routing (issue 20 point 3) takes them within a second; the test says if it did not.
            with contextlib.suppress(AssertionError):
                wait_until(
                    lambda: all(
                        r[0] != "pending"
                        for r in _sql(url, "SELECT state FROM commands WHERE id = ANY($1)", list(final_round))
                    ),
                    timeout=5,
                    what="the last round of commands answered",
                )

            # Every main process ends: its last line says how far it got.
            for sv in supervisors:
                (sv.workdir / "stop").touch()
            exit_codes = {sv.sandbox_id: sv.wait(90) for sv in supervisors}
            received += sum(_events_received(gw) for gw in gateways)

        events: dict[str, list[dict[str, Any]]] = {s: [] for s in ids}
        rows = _sql(
            url,
            "SELECT sandbox_id, journal_epoch, sequence, kind, stream, message, data FROM events "
            "WHERE sandbox_id = ANY($1) ORDER BY id",
            ids,
        )
        for r in rows:
            events[r[0]].append(
                {"epoch": r[1], "sequence": r[2], "kind": r[3], "stream": r[4], "message": r[5],
                 "data": json.loads(r[6]) if r[6] else None}
            )  # fmt: skip
        commands = {
            r["id"]: dict(r)
            for r in _sql(
                url, "SELECT id, sandbox_id, kind, state, created_at, answered_at, delivered_at FROM commands"
            )
        }
        result = Proof(
            sandbox_ids=ids,
            supervisor_pids={sv.sandbox_id: sv.proc.pid for sv in supervisors if sv.proc is not None},
            exit_codes=exit_codes,
            events=events,
            commands=commands,
            posted=[*poster.posted, *final.posted],
            post_errors=[*poster.errors, *final.errors],
            final_round=final_round,
            before_wake=before_wake,
            after_wake=after_wake,
            frozen_id=_rid(frozen),
            frozen_stuck=stuck,
            views=views,
            moved_in=moved_in,
            measured=measured,
        )
        _measure(result, received)
        print("\nHA proof, measured:", json.dumps(result.measured, indent=1, default=str), file=sys.stderr)
        yield result
    finally:
        for sv in supervisors:
            (sv.workdir / "stop").touch()  # a main process the supervisor's kill would orphan ends too
            sv.stop()
        for gw in gateways:
            gw.stop()
        _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _measure(proof: Proof, received: float) -> None:
    m = proof.measured
    stored = sum(len(e) for e in proof.events.values())
    m["lines stored"] = sum(len(proof.lines(s)) for s in proof.sandbox_ids)
    m["events stored"] = stored
    # Received counts each replica's runs up to their stop (a killed one's last few ms are missed).
    m["events received, repeats included"] = int(received)
    # Repeats a moved session sent again, dropped by the store; approximate (a killed replica's
    # last few milliseconds of events are counted by nobody).
    m["received - stored"] = int(received) - stored
    outages = [d["duration_ms"] for s in proof.sandbox_ids for d in proof.lifecycle(s, "reconnected")]
    m["reconnections"] = len(outages)
    m["phases that stopped or killed the session's replica"] = proof.moved_in
    if outages:
        outages.sort()
        m["outage ms (min/median/max)"] = (outages[0], outages[len(outages) // 2], outages[-1])
    m["commands posted"] = len(proof.posted)
    m["posts failed (replica cut mid-request)"] = len(proof.post_errors)
    m["commands by state"] = dict(Counter(c["state"] for c in proof.commands.values()))
    m["delivered: true at the POST"] = sum(1 for p in proof.posted if p.body.get("delivered"))
    # The other direction, not asserted: false means "not taken within the wait", and such a
    # command goes out later (a hello, the redelivery round). Answered false yet applied: those,
    # plus any answer that beat the owner's delivery mark (review s7 finding 1).
    m["delivered: false at the POST, applied"] = sum(
        1
        for p in proof.posted
        if p.status == 201
        and p.body.get("delivered") is False
        and proof.commands.get(p.body["id"], {}).get("state") == "applied"
    )
    m["applied without delivered_at"] = sum(
        1 for c in proof.commands.values() if c["state"] == "applied" and c["delivered_at"] is None
    )
    m["repeats the supervisors answered without applying"] = sum(
        1
        for s in proof.sandbox_ids
        for e in proof.events[s]
        if e["kind"] == "log" and e["message"].endswith("repeated, not applied again")
    )


# -- the invariants ---------------------------------------------------------------------------


def test_every_line_arrives_exactly_once_and_in_order(proof: Proof) -> None:
    for sandbox_id in proof.sandbox_ids:
        assert proof.exit_codes[sandbox_id] == 0, sandbox_id
        lines = proof.lines(sandbox_id)
        assert lines, sandbox_id
        last = lines[-1].split()
        assert last[0] == "done", f"{sandbox_id}: the last line is the main process's summary: {lines[-1]}"
        pid, count = last[1], int(last[2])
        assert lines == [f"{pid} {i}" for i in range(count)] + [lines[-1]], (
            f"{sandbox_id}: every numbered line once, in order, nothing after the summary"
        )
        sequences = [e["sequence"] for e in proof.events[sandbox_id]]
        assert sequences == sorted(set(sequences)), (
            f"{sandbox_id}: every record stored once, in journal order"
        )
        assert len({e["epoch"] for e in proof.events[sandbox_id]}) == 1, (
            f"{sandbox_id}: one journal throughout"
        )
    # The cuts happened while lines were written: each kill -9 phase and the restarts took down a
    # replica holding sessions (which ones varies with haproxy and the rebalancer). A move on a
    # reconnect hint (a replica's drain on SIGTERM, a rebalance) journals no RECONNECTED record (it
    # is not an outage: docs/protocol.md); a kill -9 is one, so every sandbox whose replica was
    # killed under it journaled at least one.
    phases = {p for moved in proof.moved_in.values() for p in moved}
    assert {"kill-1", "kill-2"} <= phases, proof.moved_in
    assert any(p.startswith("restart-") for p in phases), proof.moved_in
    for sandbox_id in proof.sandbox_ids:
        moved = proof.moved_in[sandbox_id]
        if any(p.startswith("kill-") for p in moved):
            assert proof.lifecycle(sandbox_id, "reconnected"), (
                f"{sandbox_id}: a RECONNECTED record for the outage of the kill -9 ({moved})"
            )


def test_every_main_process_keeps_its_pid(proof: Proof) -> None:
    for sandbox_id in proof.sandbox_ids:
        (started,) = proof.lifecycle(sandbox_id, "started")
        (exited,) = proof.lifecycle(sandbox_id, "exited")
        (supervisor,) = proof.lifecycle(sandbox_id, "supervisor_started")
        assert supervisor["pid"] == proof.supervisor_pids[sandbox_id], "the supervisor itself never restarted"
        pids = {
            line.split()[1] if line.startswith("done") else line.split()[0]
            for line in proof.lines(sandbox_id)
        }
        assert pids == {str(started["pid"])}, f"{sandbox_id}: every line from the process that started"
        assert exited["pid"] == started["pid"] and exited["exit_code"] == 0


def test_commands_are_stored_and_applied_exactly_once(proof: Proof) -> None:
    """Every POST through haproxy is answered and its command stored, none fails or expires, each
    one the owning session took (delivered: true) is applied, and the supervisor applies each
    applied one exactly once however often it arrives (redelivered at a hello, or by the
    periodic round)."""
    assert proof.posted, "commands were posted"
    for p in proof.posted:
        assert p.status == 201, f"a POST through haproxy was refused: {p}"
        assert p.body["id"] in proof.commands, f"a command acknowledged at its POST is stored: {p}"
    states = Counter(c["state"] for c in proof.commands.values())
    assert set(states) <= {"applied", "pending"}, f"no command failed or expired: {states}"
    taken = {p.body["id"] for p in proof.posted if p.body.get("delivered")}
    assert taken, "some commands were taken by their session at once"
    not_applied = sorted(i for i in taken if proof.commands[i]["state"] != "applied")
    assert not not_applied, f"commands their session took but did not apply: {not_applied}"
    # Applied exactly once by the supervisor however often it came, per its own audit lines
    # (journaled and stored with the sandbox's records): it journals the line once the command
    # is applied and before it writes the answer (504ccef), so a command the gateway recorded
    # applied has its line, and a redelivery is noted "repeated, not applied again" instead.
    for command_id, c in proof.commands.items():
        trail = proof.trail(c["sandbox_id"], command_id)
        applied = sum(1 for line in trail if line.endswith(": applied"))
        if c["state"] == "applied":
            assert applied == 1, f"an applied command has one 'applied' line: {command_id}: {trail}"
        else:
            # A pending one may have its line too: applied, its answer lost with a killed
            # replica, and no redelivery since.
            assert applied <= 1, (command_id, trail)
    # The main process saw the signals: at most one per applied signal command (the kernel may
    # merge two sent together, as at a hello with several pending).
    for sandbox_id in proof.sandbox_ids:
        signals = sum(
            1
            for c in proof.commands.values()
            if c["sandbox_id"] == sandbox_id and c["kind"] == "signal" and c["state"] == "applied"
        )
        received = int(proof.lines(sandbox_id)[-1].split()[-1])
        assert received <= signals and (received > 0) == (signals > 0), (sandbox_id, received, signals)


def test_every_replica_shows_every_sandbox_connected(proof: Proof) -> None:
    """Each replica's own API (asked on its HTTP port, so which replica answered is known), not
    only the one holding a session: liveness comes from the database and the leases."""
    assert len(proof.views) == 3, f"one view per replica: {sorted(proof.views)}"
    for replica_id, view in proof.views.items():
        states = {s["id"]: s["state"] for s in view["sandboxes"]}
        assert all(states.get(i) == "connected" for i in proof.sandbox_ids), (replica_id, states)


def test_sessions_move_off_a_frozen_replica(proof: Proof) -> None:
    """A replica frozen (SIGSTOP: a stalled node, a long pause) keeps its connections open and
    silent; its supervisors' stale bound ends them and haproxy sends them to the others, where
    they must carry on storing lines."""
    assert not proof.frozen_stuck, proof.frozen_stuck


def test_a_frozen_replica_that_wakes_takes_nothing_back(proof: Proof) -> None:
    """Its supervisors moved while it slept; awake, it must not mark their new sessions
    disconnected nor claim them back."""
    if proof.frozen_stuck:
        pytest.skip("the sessions never moved off the frozen replica (the test above)")
    moved = [i for i in proof.sandbox_ids if proof.before_wake[i][0] != proof.frozen_id]
    assert moved == proof.sandbox_ids, f"every session had moved off the frozen replica: {proof.before_wake}"
    # What the woken replica could do wrong: claim a session back (the row names it), or end one
    # another replica holds (same owner and session id, no longer connected). A session that
    # moved between two other replicas meanwhile (haproxy redispatching a reconnection, say)
    # is not its doing, so it is left out rather than failing the test spuriously.
    changed = {
        i: (proof.before_wake[i], proof.after_wake[i])
        for i in moved
        if proof.after_wake[i][0] == proof.frozen_id
        or (
            proof.after_wake[i][:2] == proof.before_wake[i][:2]
            and proof.after_wake[i] != proof.before_wake[i]
        )
    }
    assert not changed, f"the woken replica changed sessions held by others: {changed}"


def test_every_applied_command_was_recorded_delivered(proof: Proof) -> None:
    """The other direction of the POST's answer (review s7 finding 1): a command the supervisor
    applied was written to its stream, so its ``delivered_at`` is set; an answer that beat the
    owner's delivery mark left it NULL, and its POST answered ``delivered: false`` although
    the command was applied (a client trusting "false: it goes out later" might post again)."""
    undelivered = sorted(
        i for i, c in proof.commands.items() if c["state"] == "applied" and c["delivered_at"] is None
    )
    assert not undelivered, (
        f"{len(undelivered)} applied commands without delivered_at: {undelivered[:10]}; "
        f"answered delivered: false yet applied: {proof.measured['delivered: false at the POST, applied']}"
    )


def test_every_command_posted_through_any_replica_is_applied(proof: Proof) -> None:
    """Routed between replicas (issue 20 point 3: NOTIFY, redelivery): a command reaches the
    session wherever it was posted, including the last round, posted with the sessions quiet,
    which only routing delivers."""
    assert proof.final_round, "the last round was posted"
    pending = sorted(i for i, c in proof.commands.items() if c["state"] != "applied")
    assert not pending, f"{len(pending)} of {len(proof.commands)} commands not applied: {pending[:10]}"


#: How long a sandbox may stay stalled behind a frozen replica's transaction: the server ends
#: the frozen replica's idle transaction after database.idle_in_transaction_timeout_s (10 s,
#: counted from when it went idle, a little before this wait starts), then the waiting claim
#: goes through and 20 lines (1 s) are stored: 10.1 s measured here. 15 s left under 5 s for a
#: loaded 2-core CI machine (a heartbeat flush, a reconnection's backoff, pool checkouts all
#: slowed), so 20 s: still far from "until the frozen process wakes", which the test tells apart.
FROZEN_TRANSACTION_BOUND_S = 20.0


def test_a_replica_frozen_inside_a_transaction_does_not_stall_its_sandbox(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """The harder version of the freeze, made certain: the replica holding the session is frozen
    while its transaction on the sandbox's row is open (it waits for a lock the test holds; the
    test then releases it, so the frozen process's connection holds the row, idle in
    transaction). The session must move to the other replica and go on storing lines."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    _admin(pg_server, f'CREATE DATABASE "{name}"')
    url = pg_server.url(name)
    gateways = [_replica(tmp_path / f"gw{i}", url) for i in range(2)]
    sv: SupervisorProcess | None = None
    frozen: GatewayProcess | None = None
    try:
        for gw in gateways:
            gw.start()
        backends = [Backend(_rid(gw), gw.grpc_port, gw.http_port, gw.ops_port) for gw in gateways]
        with running_haproxy(tmp_path / "haproxy", backends) as proxy:
            sv = SupervisorProcess(
                tmp_path / "sv",
                "frozen-tx",
                proxy.grpc_address,
                [PYTHON, "-u", "-c", WRITER, str(tmp_path / "stop"), str(LINE_EVERY_S)],
            )
            sv.start()
            holder_id = wait_until(
                lambda: _line_counts(url).get("frozen-tx", 0) >= 20 and _owners(url).get("frozen-tx"),
                timeout=SETTLE_S,
                what="the session storing lines",
            )
            frozen = next(gw for gw in gateways if _rid(gw) == holder_id)
            (other,) = [gw for gw in gateways if gw is not frozen]
            assert frozen.proc is not None
            ports = {c.laddr.port for c in psutil.Process(frozen.proc.pid).net_connections(kind="tcp")}

            async def freeze_inside_a_transaction() -> None:
                conn = await asyncpg.connect(_dsn(url))
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT 1 FROM sandboxes WHERE id = 'frozen-tx' FOR UPDATE")
                        me = await conn.fetchval("SELECT pg_backend_pid()")
                        waiting = (
                            "SELECT client_port FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
                        )
                        for _ in range(100):  # the holder's next write for the sandbox (its heartbeat flush)
                            if {r[0] for r in await conn.fetch(waiting, me)} & ports:
                                break
                            await asyncio.sleep(0.1)
                        else:
                            raise AssertionError("the holder never waited on the sandbox's row")
                        frozen.signal(signal.SIGSTOP)
                    # Released: the frozen process's statement takes the row and its transaction
                    # stays open, the process not there to end it.
                    idle = "SELECT state FROM pg_stat_activity WHERE client_port = ANY($1::int[])"
                    for _ in range(50):
                        if "idle in transaction" in {r[0] for r in await conn.fetch(idle, list(ports))}:
                            return
                        await asyncio.sleep(0.1)
                    raise AssertionError("the frozen replica's transaction is not left open")
                finally:
                    await conn.close()

            asyncio.run(freeze_inside_a_transaction())
            before = _line_counts(url)["frozen-tx"]
            began = time.monotonic()
            moved = False
            with contextlib.suppress(AssertionError):
                moved = wait_until(
                    lambda: (
                        _owners(url).get("frozen-tx") == _rid(other)
                        and _line_counts(url)["frozen-tx"] >= before + 20
                    ),
                    timeout=FROZEN_TRANSACTION_BOUND_S,
                    what="the session moved and storing lines",
                )
            print(
                f"\nfrozen inside a transaction: moved, 20 lines stored, in {time.monotonic() - began:.1f} s",
                file=sys.stderr,
            )
            assert moved, (
                f"the sandbox stalled behind the frozen replica for {FROZEN_TRANSACTION_BOUND_S:.0f} s: "
                f"owner {_owners(url).get('frozen-tx')}, "
                f"{_line_counts(url)['frozen-tx'] - before} lines since; "
                f"{_waits(url)}"
            )
    finally:
        (tmp_path / "stop").touch()
        if sv is not None:
            sv.stop()
        for gw in gateways:
            gw.stop()  # SIGCONT first
        _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
