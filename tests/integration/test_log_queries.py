"""Log queries through the HTTP API (``GET /api/v1/sandboxes/{id}/logs``): by time range, stream,
level and text, in the tail and in a follow, against a real gateway process on SQLite and on
PostgreSQL, with what a real supervisor captured and what the upstream path (PushSandboxLogs)
brought in with levels.

The supervisor's main process fills its journal before the gateway is there (the bound is small,
so the oldest lines are evicted and gap records say so), then writes two groups of lines four
seconds apart (``alpha``, ``bravo``; on stdout and stderr, some with ``needle``), and one more group
(``charlie``) when the test asks for it, while a follow is open.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway.store import Database, EventStore, SandboxStore
from gateway.store.events import LogQuery
from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.postgres import PgServer
from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until

CAPTURED = "queried"
STRUCTURED = "structured"
#: The pushed lines' times: T0 + n seconds for the n-th line (2025-11-25T12:00:00Z).
T0 = 1_764_072_000_000

MAIN = textwrap.dedent(
    """
    import os, sys, time
    work = sys.argv[1]
    for i in range(400):
        print(f"fill {i}".ljust(60, "."), flush=True)
    def group(tag):
        print(f"{tag} out needle", flush=True)
        print(f"{tag} out plain", flush=True)
        print(f"{tag} err needle", file=sys.stderr, flush=True)
        print(f"{tag} err Needle", file=sys.stderr, flush=True)
    group("alpha")
    time.sleep(4)
    group("bravo")
    open(os.path.join(work, "written"), "w").close()
    # "end" also ends the first wait: the fixture's teardown kills the supervisor (SIGKILL), which
    # leaves this process behind if the follow test that writes "go" did not run (-k, a failure).
    while not os.path.exists(os.path.join(work, "go")):
        if os.path.exists(os.path.join(work, "end")):
            sys.exit(0)
        time.sleep(0.05)
    print("charlie out needle", flush=True)
    print("charlie err plain", file=sys.stderr, flush=True)
    print("charlie err needle", file=sys.stderr, flush=True)
    while not os.path.exists(os.path.join(work, "end")):
        time.sleep(0.05)
    """
)

#: (level, target, message) of the pushed lines, the n-th at T0 + n s; the last has no time.
PUSHED = [
    ("TRACE", "app", "a trace line"),
    ("DEBUG", "app", "a debug line"),
    ("INFO", "app", "an info line"),
    ("WARN", "openshell_sandbox::proxy", "slow upstream"),
    ("ERROR", "openshell_sandbox", "policy reload failed"),
    ("OCSF", "ocsf", "NET:OPEN [INFO] ALLOWED python3(42) -> api.example.com:443"),
    ("NOTICE", "app", "an odd level"),
    ("", "app", "no level at all"),
    ("error", "stderr", "err line"),
    ("INFO", "app", "untimed"),
]


@dataclass
class Logged:
    gateway: GatewayProcess
    work: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}/api/v1/sandboxes"


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _events(logged: Logged, sandbox_id: str, **params: str | int) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"tail": 10_000, **params})
    status, body = _get(f"{logged.api}/{sandbox_id}/logs?{query}")
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


def _lines(events: list[dict[str, Any]], *, groups: tuple[str, ...] = ("alpha", "bravo")) -> list[str]:
    """The messages of the captured lines of ``groups``, in order (the filler left out)."""
    return [e["message"] for e in events if e["kind"] == "log" and e["message"].split(" ")[0] in groups]


def _messages(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events]


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _create_database(server: PgServer, statement: str) -> None:
    asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (pip install asyncpg)")
    admin = await asyncpg.connect(host="127.0.0.1", port=server.port, user=server.user, database="postgres")
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


def _push(gateway: GatewayProcess, sandbox_id: str, lines: list[tuple[str, str, str, int]]) -> None:
    """Lines through the upstream path, as upstream's supervisor pushes them: (level, target,
    message, timestamp_ms)."""
    request = pb.PushSandboxLogsRequest(sandbox_id=sandbox_id)
    for level, target, message, at in lines:
        request.logs.add(
            sandbox_id=sandbox_id,
            timestamp_ms=at,
            level=level,
            target=target,
            message=message,
            source="sandbox",
        )
    with grpc.insecure_channel(gateway.address) as channel:
        pb_grpc.OpenShellStub(channel).PushSandboxLogs(iter([request]), timeout=10)


def _push_all(gateway: GatewayProcess, sandbox_id: str) -> None:
    _push(
        gateway, sandbox_id, [(lvl, tgt, msg, T0 + n * 1000) for n, (lvl, tgt, msg) in enumerate(PUSHED[:-1])]
    )
    _push(gateway, sandbox_id, [(*PUSHED[-1], 0)])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    work = tmp_path_factory.mktemp(f"logs-{request.param}")
    server: PgServer | None = None
    database = f"t_{uuid.uuid4().hex[:12]}"
    if request.param == "postgresql":
        server = request.getfixturevalue("pg_server")
        asyncio.run(_create_database(server, f'CREATE DATABASE "{database}"'))
    gateway = GatewayProcess(work / "gateway", database_url=server.url(database) if server else None)
    sv = SupervisorProcess(
        work / "sv",
        CAPTURED,
        gateway.address,
        [sys.executable, "-u", "-c", MAIN, str(work)],
        settings=["journal.segment_bytes=4096", "journal.max_bytes=16384", "session.exit_flush_timeout_s=60"],
    )
    try:
        # No gateway yet: the filler overflows the journal's bound, which records the loss as gaps.
        sv.start()
        wait_until((work / "written").exists, timeout=60, what="the main process wrote its lines")
        gateway.start()
        logged = Logged(gateway=gateway, work=work)
        _push_all(gateway, STRUCTURED)
        wait_until(
            lambda: "bravo err Needle" in json.dumps(_get(f"{logged.api}/{CAPTURED}/logs?tail=100")[1]),
            timeout=60,
            what="the supervisor's lines stored",
        )
        yield logged
    finally:
        (work / "end").touch()
        sv.stop()
        gateway.stop()
        if server is not None:
            asyncio.run(_create_database(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


# -- stream and text ----------------------------------------------------------------------------


def test_stream_keeps_that_streams_lines_and_every_gap(logged: Logged) -> None:
    events = _events(logged, CAPTURED, stream="stderr")
    assert _lines(events) == ["alpha err needle", "alpha err Needle", "bravo err needle", "bravo err Needle"]
    assert {e["kind"] for e in events} == {"log", "gap"}, "gap records are kept, other kinds are not"
    assert all(e["stream"] == "stderr" for e in events if e["kind"] == "log")
    both = _events(logged, CAPTURED, stream="stdout,stderr")
    assert len(_lines(both)) == 8
    # Explicit kinds are the caller's choice: without gap, no gap records.
    assert {e["kind"] for e in _events(logged, CAPTURED, stream="stderr", kinds="log")} == {"log"}


def test_text_is_a_case_sensitive_substring_and_gaps_stay(logged: Logged) -> None:
    events = _events(logged, CAPTURED, text="needle")
    assert _lines(events) == ["alpha out needle", "alpha err needle", "bravo out needle", "bravo err needle"]
    assert any(e["kind"] == "gap" for e in events)
    assert _messages(_events(logged, STRUCTURED, text="reload")) == ["policy reload failed"]
    assert _events(logged, STRUCTURED, text="Reload") == []
    # Characters LIKE would take as wildcards are plain text here.
    assert _events(logged, STRUCTURED, text="%") == [] and _events(logged, STRUCTURED, text="_") == []
    assert _messages(_events(logged, STRUCTURED, text="(42)")) == [PUSHED[5][2]]


# -- level --------------------------------------------------------------------------------------


def test_level_is_a_floor_over_the_records_that_carry_one(logged: Logged) -> None:
    warn = ["slow upstream", "policy reload failed", "an odd level", "err line"]
    assert _messages(_events(logged, STRUCTURED, level="warn")) == warn
    assert _messages(_events(logged, STRUCTURED, level="WARNING")) == warn
    assert _messages(_events(logged, STRUCTURED, level="error")) == [
        "policy reload failed",
        "an odd level",
        "err line",
    ]
    info = _messages(_events(logged, STRUCTURED, level="info"))
    assert info == ["an info line", *warn[:2], PUSHED[5][2], "an odd level", "err line", "untimed"]
    everything = _messages(_events(logged, STRUCTURED, level="trace"))
    assert everything == [m for _, _, m in PUSHED if m != "no level at all"], (
        "a line without a level never matches"
    )


def test_captured_lines_have_no_level_and_gaps_pass_every_level(logged: Logged) -> None:
    errors = _events(logged, CAPTURED, level="error")
    assert errors and {e["kind"] for e in errors} == {"gap"}, "stderr lines are not errors; gaps are kept"
    info = _events(logged, CAPTURED, level="info")
    assert not [e for e in info if e["kind"] == "log"]
    assert {e["kind"] for e in info} <= {"lifecycle", "health", "gap"}
    assert any(e["kind"] == "lifecycle" for e in info), "the supervisor's lifecycle records are info"
    healthy = [e for e in _events(logged, CAPTURED, level="warn") if e["kind"] == "health"]
    assert all(e["data"]["state"] != "healthy" for e in healthy)


# -- time ---------------------------------------------------------------------------------------


def test_time_range_is_on_the_records_own_time(logged: Logged) -> None:
    # The pushed lines carry the times their writer gave them, years before they were received.
    window = _events(logged, STRUCTURED, since=_rfc3339(T0 + 3000), until=_rfc3339(T0 + 5000))
    assert _messages(window) == ["slow upstream", "policy reload failed", PUSHED[5][2]]
    assert _messages(_events(logged, STRUCTURED, until="2025-11-25T13:00:01+01:00")) == [
        "a trace line",
        "a debug line",
    ]
    # One without a time of its own is placed by when the gateway received it: within the hour.
    assert _messages(_events(logged, STRUCTURED, since="1h")) == ["untimed"]
    assert _messages(_events(logged, STRUCTURED, since="1h", until="0s")) == ["untimed"]


def test_time_range_splits_what_the_supervisor_captured(logged: Logged) -> None:
    stored = _events(logged, CAPTURED)
    alpha = max(e["timestamp_ms"] for e in stored if e["message"].startswith("alpha"))
    bravo = min(e["timestamp_ms"] for e in stored if e["message"].startswith("bravo"))
    assert bravo - alpha >= 3000, "the main process slept four seconds between the groups"
    middle = (alpha + bravo) // 2
    assert _lines(_events(logged, CAPTURED, since=_rfc3339(middle))) == _lines(stored, groups=("bravo",))
    assert _lines(_events(logged, CAPTURED, until=_rfc3339(middle))) == _lines(stored, groups=("alpha",))
    # Relative, as kubectl's --since (a Go duration, fractions allowed): from the gateway's clock
    # a moment later than this one, so a little after the middle, well before the bravo group.
    back_s = (time.time() * 1000 - middle) / 1000
    assert _lines(_events(logged, CAPTURED, since=f"{back_s:.3f}s")) == _lines(stored, groups=("bravo",))
    assert _lines(_events(logged, CAPTURED, since="1h", stream="stdout", text="needle")) == [
        "alpha out needle",
        "bravo out needle",
    ]


def test_a_gap_noted_after_the_range_is_kept(logged: Logged) -> None:
    """A gap record is written when the loss is noticed, at or after the lost lines' time: one
    noted after ``until`` may stand for lines inside the range, so it is returned; one noted
    before ``since`` is not."""
    stored = _events(logged, CAPTURED)
    gaps = [e for e in stored if e["kind"] == "gap"]
    assert gaps and gaps[0]["data"]["reason"] == "overflow"
    first_gap = min(g["timestamp_ms"] for g in gaps)
    before = _events(logged, CAPTURED, until=_rfc3339(first_gap - 1))
    assert [e["id"] for e in before if e["kind"] == "gap"] == [g["id"] for g in gaps]
    assert all(e["timestamp_ms"] < first_gap for e in before if e["kind"] != "gap")
    later = max(e["timestamp_ms"] for e in stored) + 1
    assert _events(logged, CAPTURED, since=_rfc3339(later), kinds="gap") == []


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("since=yesterday", "since"),
        ("since=2026-12-07T10:00:00", "since"),
        ("since=2026-12-07", "since"),
        ("until=10x", "until"),
        ("until=10m5", "until"),
        ("since=2026-12-07T10:00:00+01:00", "%2B"),
        ("since=99999999999999h", "since"),
        # In range as written, out of it in UTC (year 0, year 10000).
        ("since=0001-01-01T00:00:00%2B01:00", "since"),
        ("until=9999-12-31T23:59:59-01:00", "until"),
        ("since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "since"),
        ("stream=stdin", "stream"),
        ("stream=,", "stream"),
        ("level=fatal", "level"),
        ("text=" + "x" * 1001, "text"),
    ],
)
@pytest.mark.parametrize("follow", ["0", "1"])
def test_bad_parameters_are_400_naming_them(logged: Logged, query: str, named: str, follow: str) -> None:
    status, body = _get(f"{logged.api}/{CAPTURED}/logs?follow={follow}&{query}")
    assert status == 400, body
    assert named in body["error"]


# -- follow -------------------------------------------------------------------------------------


async def _follow(url: str, *, tail: int, new: int, trigger: Any) -> tuple[list[str], list[str]]:
    """The messages of the ``tail`` (at least one) log lines a follow of ``url`` sends first, and of
    the ``new`` ones it sends after ``trigger`` ran (run once the tail is in: the follower is past
    its first read by then, so what the trigger brings comes as new)."""
    first: list[str] = []
    later: list[str] = []
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async with asyncio.timeout(30):
            async for raw in resp.content:
                event = json.loads(raw)
                assert "error" not in event, event
                if event.get("kind") != "log":
                    continue
                if len(first) < tail:
                    first.append(event["message"])
                    if len(first) == tail:
                        await asyncio.to_thread(trigger)
                    continue
                later.append(event["message"])
                if len(later) == new:
                    break
    return first, later


async def test_a_follow_sends_what_matches_and_nothing_else(logged: Logged) -> None:
    url = f"{logged.api}/{CAPTURED}/logs?follow=1&tail=1&stream=stderr&text=needle"
    first, later = await _follow(url, tail=1, new=1, trigger=(logged.work / "go").touch)
    assert first == ["bravo err needle"]
    # charlie out needle and charlie err plain came first: only their absence lets this line be
    # the first new one sent.
    assert later == ["charlie err needle"]
    stored = _lines(_events(logged, CAPTURED), groups=("charlie",))
    assert stored == ["charlie out needle", "charlie err plain", "charlie err needle"]


async def test_a_follow_by_level_and_time(logged: Logged) -> None:
    # A sandbox of its own: the lines pushed here must not change what the other tests read.
    await asyncio.to_thread(_push_all, logged.gateway, "followed")
    url = f"{logged.api}/followed/logs?follow=1&tail=2&level=warn&since={_rfc3339(T0 + 4000)}"
    pushed = [
        ("INFO", "app", "later info", T0 + 20_000),
        ("WARN", "app", "later warn but early", T0 + 1000),
        ("ERROR", "app", "later error", T0 + 21_000),
    ]
    first, later = await _follow(
        url, tail=2, new=1, trigger=lambda: _push(logged.gateway, "followed", pushed)
    )
    # The tail (the last two that match), then only the new line that matches both.
    assert first == ["an odd level", "err line"]
    assert later == ["later error"]


# -- the follow's cursor ------------------------------------------------------------------------


async def test_a_filtered_follow_page_moves_past_what_did_not_match(tmp_path: Path) -> None:
    """A follower whose filter matches little reads each row once: its next page starts after the
    newest row read, not after the last one that matched."""
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    try:
        await SandboxStore(db).ensure("sb")
        events = EventStore(db)
        lines = [(T0, LogRecord(stream=LogStream.STDOUT, message=f"line {i}")) for i in range(10)]
        await events.append_unsequenced("sb", [*lines, (T0, LogRecord(LogStream.STDERR, "the one"))])
        newest = (await events.tail("sb", 1))[-1].id
        stderr = LogQuery(streams=("stderr",))
        page, cursor = await events.page_after("sb", 0, 5, matching=stderr)
        assert [e.message for e in page] == ["the one"] and cursor == newest
        assert await events.page_after("sb", cursor, 5, matching=stderr) == ([], newest)
        # Nothing matched: the cursor still moves to the newest row read.
        page, cursor = await events.page_after("sb", 0, 5, matching=LogQuery(text="absent"))
        assert page == [] and cursor == newest
        # A full page: the next one starts after its last row (more may match beyond it).
        page, cursor = await events.page_after("sb", 0, 3, matching=LogQuery(streams=("stdout",)))
        assert [e.message for e in page] == ["line 0", "line 1", "line 2"] and cursor == page[-1].id
    finally:
        await db.close()


@pytest.mark.parametrize("text", ["%00", "%FF", "%ED%A0%80", "%F0%9F%98%80", "%5C", "'%3B--"])
def test_odd_text_is_searched_for_not_a_failure(logged: Logged, text: str) -> None:
    """A NUL (stored as U+FFFD, which PostgreSQL text cannot hold), bytes that are not UTF-8, quotes."""
    status, body = _get(f"{logged.api}/{CAPTURED}/logs?text={text}")
    assert status == 200, body
    assert {e["kind"] for e in body["events"]} <= {"gap"}


def test_a_nul_in_a_pushed_level_or_target_does_not_break_level_queries(logged: Logged) -> None:
    """A structured line's level and target are stored as the message is (a NUL as U+FFFD): in
    the row's JSON a NUL is the escape \\u0000, which PostgreSQL's jsonb refuses, so every
    ``level`` query of the sandbox that read the row failed there (5xx) while SQLite answered."""
    _push(
        logged.gateway,
        "nul-fields",
        [("warn", "tar\x00get", "after a NUL", T0), ("wa\x00rn", "t", "odd level", T0)],
    )
    wait_until(
        lambda: len(_events(logged, "nul-fields", kinds="log")) == 2,
        timeout=30,
        what="the pushed lines stored",
    )
    events = _events(logged, "nul-fields", level="warn")
    assert [e["message"] for e in events if e["kind"] == "log"] == ["after a NUL", "odd level"], events
