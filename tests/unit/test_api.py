"""The HTTP JSON API, served by a real aiohttp test server over a temporary SQLite store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import build_api
from gateway.config import SessionSettings
from gateway.sandbox_state import Liveness
from gateway.store import CommandStore, Database, EventStore, SandboxStore
from openshell_wire.records import Event, LifecycleKind, LifecycleRecord, LogRecord, LogStream

T0 = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)
LOST_AFTER_S = 60.0
LIVENESS = Liveness.from_settings(SessionSettings(lost_after_s=LOST_AFTER_S))


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@dataclass
class Env:
    client: TestClient[Any, Any]
    sandboxes: SandboxStore
    events: EventStore
    clock: Clock


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    sandboxes, events = SandboxStore(db), EventStore(db)
    clock = Clock(T0)
    app = build_api(sandboxes=sandboxes, events=events, liveness=LIVENESS, now=clock)
    try:
        async with TestClient(TestServer(app)) as client:
            yield Env(client, sandboxes, events, clock)
    finally:
        await db.close()


def log(seq: int, message: str | None = None) -> Event:
    return Event(seq, 1_764_072_000_000 + seq, LogRecord(LogStream.STDOUT, message or f"line {seq}"))


async def get_json(env: Env, path: str, status: int = 200) -> Any:
    resp = await env.client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def connect(env: Env, sandbox_id: str, session: str = "s1") -> None:
    await env.sandboxes.mark_connected(
        sandbox_id, instance_id="i1", session_id=session, journal_epoch="e1", owner="gw", at=T0
    )


async def test_states(env: Env) -> None:
    for sid in ("pending", "connected", "disconnected", "lost", "exited"):
        await env.sandboxes.ensure(sid)
    for sid in ("connected", "disconnected", "lost", "exited"):
        await connect(env, sid)
    await env.sandboxes.mark_disconnected("disconnected", session_id="s1", at=T0 + timedelta(seconds=100))
    await env.sandboxes.mark_disconnected("lost", session_id="s1", at=T0)
    await env.events.store_events(
        "exited", "e1", [Event(1, 0, LifecycleRecord(LifecycleKind.EXITED, pid=1, exit_code=2))]
    )
    env.clock.at = T0 + timedelta(seconds=100 + LOST_AFTER_S / 2)
    # Connected means a fresh heartbeat too (gateway.sandbox_state).
    await env.sandboxes.record_heartbeats({"connected": env.clock.at})

    listing = await get_json(env, "/api/v1/sandboxes")
    states = {s["id"]: s["state"] for s in listing["sandboxes"]}
    assert states == {sid: sid for sid in states}
    assert len(states) == 5

    lost = await get_json(env, "/api/v1/sandboxes/lost")
    assert lost["connected"] is False
    assert lost["disconnected_since"] == T0.isoformat()
    assert lost["connected_at"] == T0.isoformat()
    assert lost["session_id"] == "s1" and lost["instance_id"] == "i1" and lost["journal_epoch"] == "e1"
    connected = await get_json(env, "/api/v1/sandboxes/connected")
    assert connected["disconnected_since"] is None and connected["connected"] is True
    assert connected["last_heartbeat_at"] == env.clock.at.isoformat()
    ex = await get_json(env, "/api/v1/sandboxes/exited")
    assert ex["exit_code"] == 2 and ex["exited_at"] is not None
    pending = await get_json(env, "/api/v1/sandboxes/pending")
    assert pending["connected_at"] is None and pending["exit_code"] is None

    # The same disconnected sandbox turns lost once the clock passes the threshold.
    env.clock.at = T0 + timedelta(seconds=100 + LOST_AFTER_S + 1)
    assert (await get_json(env, "/api/v1/sandboxes/disconnected"))["state"] == "lost"


async def test_a_connected_flag_with_a_stale_heartbeat_is_not_shown_connected(env: Env) -> None:
    """The flag is cleared by one write of one process (which may die, or whose write may fail):
    past the heartbeat bound the sandbox is disconnected since its last heartbeat, then lost."""
    bound = LIVENESS.fresh_for_s
    await env.sandboxes.ensure("flagged")
    await connect(env, "flagged")
    env.clock.at = T0 + timedelta(seconds=bound)
    assert (await get_json(env, "/api/v1/sandboxes/flagged"))["state"] == "connected"
    env.clock.at = T0 + timedelta(seconds=bound + 1)
    body = await get_json(env, "/api/v1/sandboxes/flagged")
    assert body["state"] == "disconnected" and body["connected"] is False
    assert body["disconnected_since"] == T0.isoformat()
    env.clock.at = T0 + timedelta(seconds=LOST_AFTER_S + 1)
    assert (await get_json(env, "/api/v1/sandboxes/flagged"))["state"] == "lost"
    # A fresh heartbeat shows it connected again: the flag was never cleared.
    await env.sandboxes.record_heartbeats({"flagged": env.clock.at})
    assert (await get_json(env, "/api/v1/sandboxes/flagged"))["state"] == "connected"


async def test_unknown_sandbox_is_404(env: Env) -> None:
    body = await get_json(env, "/api/v1/sandboxes/nope", 404)
    assert "nope" in body["error"]
    body = await get_json(env, "/api/v1/sandboxes/nope/logs", 404)
    assert "nope" in body["error"]


async def test_router_errors_are_json_too(env: Env) -> None:
    assert "error" in await get_json(env, "/api/v1/elsewhere", 404)
    resp = await env.client.put("/api/v1/sandboxes")
    assert resp.status == 405 and resp.content_type == "application/json"
    assert "error" in await resp.json()


async def test_creating_sandboxes_needs_the_kubernetes_driver(env: Env) -> None:
    resp = await env.client.post("/api/v1/sandboxes", json={"id": "x", "command": ["true"]})
    assert resp.status == 501
    assert "drivers.kind" in (await resp.json())["error"]


async def test_tail(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    await env.events.store_events("sb", "e1", [log(s) for s in range(1, 151)])
    body = await get_json(env, "/api/v1/sandboxes/sb/logs")
    assert body["sandbox_id"] == "sb"
    assert [e["sequence"] for e in body["events"]] == list(range(51, 151))
    body = await get_json(env, "/api/v1/sandboxes/sb/logs?tail=3")
    first = body["events"][0]
    assert [e["sequence"] for e in body["events"]] == [148, 149, 150]
    assert first["message"] == "line 148" and first["kind"] == "log" and first["stream"] == "stdout"
    assert first["journal_epoch"] == "e1" and first["data"] is None and isinstance(first["id"], int)
    assert (await get_json(env, "/api/v1/sandboxes/sb/logs?tail=0"))["events"] == []


async def test_kinds_filter(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    lifecycle = Event(3, 0, LifecycleRecord(LifecycleKind.STARTED, pid=9, argv=("sleep", "1")))
    await env.events.store_events("sb", "e1", [log(1), log(2), lifecycle])
    body = await get_json(env, "/api/v1/sandboxes/sb/logs?kinds=lifecycle,gap")
    assert [e["kind"] for e in body["events"]] == ["lifecycle"]
    assert body["events"][0]["data"]["argv"] == ["sleep", "1"]


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ("tail=abc", "tail"),
        ("tail=-1", "tail"),
        ("tail=10001", "tail"),
        ("kinds=log,noise", "kinds"),
        ("kinds=,", "kinds"),
        ("follow=maybe", "follow"),
        ("follow=1&until_exit=2", "until_exit"),
    ],
)
async def test_bad_parameters_are_400(env: Env, query: str, word: str) -> None:
    await env.sandboxes.ensure("sb")
    body = await get_json(env, f"/api/v1/sandboxes/sb/logs?{query}", 400)
    assert word in body["error"]


async def read_event(resp: Any) -> dict[str, Any]:
    async with asyncio.timeout(10):
        line = await resp.content.readline()
    assert line.endswith(b"\n"), line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def test_follow_streams_events_stored_after_the_request(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    await env.events.store_events("sb", "e1", [log(s) for s in range(1, 6)])
    resp = await env.client.get("/api/v1/sandboxes/sb/logs?follow=1&tail=2")
    try:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        assert [(await read_event(resp))["sequence"] for _ in range(2)] == [4, 5]
        await env.events.store_events("sb", "e1", [log(6, "late")])
        late = await read_event(resp)
        assert late["sequence"] == 6 and late["message"] == "late"
        await env.events.append_unsequenced("sb", [(0, LogRecord(LogStream.STDERR, "upstream"))])
        upstream = await read_event(resp)
        assert upstream["journal_epoch"] == "" and upstream["message"] == "upstream"
    finally:
        resp.close()


async def test_follow_with_tail_zero_sends_only_new_events(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    await env.events.store_events("sb", "e1", [log(1)])
    resp = await env.client.get("/api/v1/sandboxes/sb/logs?follow=true&tail=0")
    try:
        await asyncio.sleep(0.05)
        await env.events.store_events("sb", "e1", [log(2)])
        assert (await read_event(resp))["sequence"] == 2
    finally:
        resp.close()


async def test_follow_until_exit_ends_after_the_exit(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    await env.events.store_events("sb", "e1", [log(1)])
    resp = await env.client.get("/api/v1/sandboxes/sb/logs?follow=1&until_exit=1")
    exit_event = Event(3, 0, LifecycleRecord(LifecycleKind.EXITED, pid=1, exit_code=0))
    await env.events.store_events("sb", "e1", [log(2), exit_event])
    async with asyncio.timeout(10):
        body = await resp.read()
    lines = [json.loads(line) for line in body.splitlines()]
    assert [e["sequence"] for e in lines] == [1, 2, 3]
    assert lines[-1]["kind"] == "lifecycle" and lines[-1]["data"]["kind"] == "exited"


async def test_follow_until_exit_of_an_exited_sandbox_returns_at_once(env: Env) -> None:
    await env.sandboxes.ensure("sb")
    await env.events.store_events(
        "sb", "e1", [log(1), Event(2, 0, LifecycleRecord(LifecycleKind.EXITED, exit_code=1))]
    )
    async with asyncio.timeout(5):
        resp = await env.client.get("/api/v1/sandboxes/sb/logs?follow=1&until_exit=1&kinds=log")
        body = await resp.read()
    assert [json.loads(line)["sequence"] for line in body.splitlines()] == [1]


async def test_following_an_earlier_generation_ends_once_caught_up(env: Env) -> None:
    """The id was created again: nothing more is coming for its earlier generation, so a follow
    of it ends (until_exit or not) once everything stored for it is sent."""
    assert await env.sandboxes.create("sb", driver="kubernetes") == 1
    await env.events.store_events("sb", "e1", [log(1, "first life")])
    assert await env.sandboxes.create("sb", driver="kubernetes", replaces=lambda row: True) == 2
    await env.events.store_events("sb", "e2", [log(1, "second life")])
    async with asyncio.timeout(5):
        resp = await env.client.get("/api/v1/sandboxes/sb/logs?follow=1&generation=1")
        body = await resp.read()
    assert [json.loads(line)["message"] for line in body.splitlines()] == ["first life"]


@pytest.fixture
async def commands_client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """An API that serves commands, with a small body bound (4 KiB)."""
    db = await Database.open(f"sqlite:///{tmp_path}/commands.db")
    sandboxes = SandboxStore(db)
    await sandboxes.ensure("sb")
    app = build_api(
        sandboxes=sandboxes,
        events=EventStore(db),
        liveness=LIVENESS,
        commands=CommandStore(db),
        max_body_bytes=4096,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield client
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        # Deeper than Python's recursion limit: the parser itself would raise RecursionError.
        ("[" * 1500 + "]" * 1500, 400, "nests deeper than 32"),
        ('{"kind": ' + "[" * 33 + "]" * 33 + "}", 400, "nests deeper than 32"),
        ("x" * 5000, 413, "larger than 4096 bytes"),
        (b"\xff\xfe", 400, "not UTF-8"),
        ('{"kind": "stop"', 400, "not valid JSON"),
        ('{"kind": "stop", "grace_ms": 1e999}', 400, "grace_ms"),
        ('{"kind": "stop", "grace_ms": "5"}', 400, "grace_ms"),
        ('{"kind": ["stop"]}', 400, "kind must be one of"),
    ],
)
async def test_bad_bodies_are_refused_with_the_reason(
    commands_client: TestClient[Any, Any], body: str | bytes, status: int, words: str
) -> None:
    resp = await commands_client.post(
        "/api/v1/sandboxes/sb/commands", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert words in (await resp.json())["error"]
    # The gateway goes on serving: a good body right after is accepted.
    resp = await commands_client.post("/api/v1/sandboxes/sb/commands", json={"kind": "stop"})
    assert resp.status == 201, await resp.text()


async def test_brackets_inside_strings_do_not_count_as_nesting(commands_client: TestClient[Any, Any]) -> None:
    body = '{"kind": "signal", "signal": "' + "[{" * 100 + '\\"]"}'
    resp = await commands_client.post(
        "/api/v1/sandboxes/sb/commands", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400, await resp.text()
    assert "signal must be a signal name" in (await resp.json())["error"]


async def test_a_body_of_exactly_the_bound_is_read(commands_client: TestClient[Any, Any]) -> None:
    """http.max_body_bytes is the largest body read, as its 413 says ("larger than")."""
    head, tail = '{"kind": "stop", "pad": "', '"}'
    for size, status, words in ((4096, 400, "unknown field"), (4097, 413, "larger than 4096 bytes")):
        body = head + "x" * (size - len(head) - len(tail)) + tail
        resp = await commands_client.post(
            "/api/v1/sandboxes/sb/commands", data=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status == status, await resp.text()
        assert words in (await resp.json())["error"]
