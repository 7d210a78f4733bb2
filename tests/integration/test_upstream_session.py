"""An upstream supervisor's session, log lines and connection epochs against our gateway (issue 21,
points 3 and 5), over real gRPC and HTTP to a real gateway on SQLite, with streams written as
upstream's supervisor writes them: no capabilities in the hello, beats no faster than every 5 s,
upper-case levels, OCSF lines, ``connection_epoch`` counting its reconnects."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from grpc import aio
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.app import Gateway
from gateway.auth.sandbox_tokens import LEEWAY_S
from gateway.sandbox_state import UPSTREAM_HEARTBEAT_FLOOR_S
from gateway.status import render
from gateway.store import Database, SandboxStore
from gateway.store.sandboxes import StaleConnection
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.integration.test_fencing import needs_postgres
from tests.support.gateway import gateway_config

#: What the test gateway hands out: one-second beats and a short grace, so a session that beats
#: every 5 s is silent for longer than our own supervisors' bound (1 + 0.5 s).
INTERVAL_S, GRACE_S = 1.0, 0.5


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = gateway_config(
        tmp_path,
        {
            "sessions": {
                "heartbeat_interval_s": INTERVAL_S,
                "grace_s": GRACE_S,
                "heartbeat_flush_interval_s": 0.5,
            }
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    yield gateway
    await gateway.stop()


def _hello(
    sandbox_id: str, *, instance_id: str = "inst-1", connection_epoch: int = 0
) -> pb.SupervisorMessage:
    """An upstream supervisor's hello: no capabilities, no journal."""
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = instance_id
    msg.hello.connection_epoch = connection_epoch
    return msg


def _beat() -> pb.SupervisorMessage:
    msg = pb.SupervisorMessage()
    msg.heartbeat.SetInParent()
    return msg


async def _read(call: Any) -> pb.GatewayMessage:
    async with asyncio.timeout(10):
        message = await call.read()
    assert isinstance(message, pb.GatewayMessage), "the stream ended without a word"
    return message


async def _sandbox(gw: Gateway, sandbox_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


async def _logs(gw: Gateway, sandbox_id: str) -> list[dict[str, Any]]:
    url = f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}/logs"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        events: list[dict[str, Any]] = doc["events"]
        return events


# -- log lines ------------------------------------------------------------------------------


async def test_upstream_log_lines_keep_their_level_target_and_fields(gw: Gateway) -> None:
    lines = [
        # Upstream's own tracing output, its levels in upper case.
        pb.SandboxLogLine(level="WARN", target="openshell_sandbox::proxy", message="slow upstream"),
        pb.SandboxLogLine(level="ERROR", target="openshell_sandbox", message="policy reload failed"),
        pb.SandboxLogLine(level="WARNING", target="app", message="spelled long"),
        pb.SandboxLogLine(level="INFO", target="openshell_sandbox", message="started"),
        # An OCSF event: level OCSF, target ocsf, the shorthand text as message.
        pb.SandboxLogLine(
            level="OCSF",
            target="ocsf",
            message="NET:OPEN [INFO] ALLOWED python3(42) -> api.example.com:443 [policy:default-egress]",
        ),
        # Our own supervisor's upstream form: the main process's streams by target.
        pb.SandboxLogLine(level="info", target="stdout", message="out line"),
        pb.SandboxLogLine(level="error", target="stderr", message="err line"),
    ]
    lines[0].fields["peer"] = "10.0.0.7:443"
    lines[0].fields["attempt"] = "3"
    for n, line in enumerate(lines):
        line.timestamp_ms = 1_764_072_000_000 + n
        line.source = "sandbox"
    async with aio.insecure_channel(gw.grpc_address) as channel:
        await pb_grpc.OpenShellStub(channel).PushSandboxLogs(
            iter([pb.PushSandboxLogsRequest(sandbox_id="sb-logs", logs=lines)]), timeout=10
        )

    events = await _logs(gw, "sb-logs")
    seen = [
        (e["stream"], e["message"], (e["data"] or {}).get("level"), (e["data"] or {}).get("target"))
        for e in events
    ]
    assert seen == [
        ("supervisor", "slow upstream", "warn", "openshell_sandbox::proxy"),
        ("supervisor", "policy reload failed", "error", "openshell_sandbox"),
        ("supervisor", "spelled long", "warn", "app"),
        ("supervisor", "started", "info", "openshell_sandbox"),
        ("ocsf", lines[4].message, "ocsf", "ocsf"),
        ("stdout", "out line", "info", "stdout"),
        ("stderr", "err line", "error", "stderr"),
    ], events
    assert events[0]["data"]["fields"] == {"attempt": "3", "peer": "10.0.0.7:443"}
    # The status command shows the level beside the stream.
    shown = render([{**(await _sandbox(gw, "sb-logs")), "_events": events}])
    assert "supervisor/warn" in shown and "ocsf/ocsf" in shown and "stderr/error" in shown, shown


# -- the 5 s heartbeat floor ----------------------------------------------------------------


async def test_an_upstream_session_beating_at_its_5s_floor_stays_connected(gw: Gateway) -> None:
    """Told to beat every second, upstream's supervisor beats every 5 s (its floor): its session
    is neither ended nor shown disconnected between two beats."""
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
        await call.write(_hello("sb-floor"))
        accepted = (await _read(call)).session_accepted
        assert accepted.session_id and accepted.heartbeat_interval_secs == 1
        assert accepted.stale_after_ms >= UPSTREAM_HEARTBEAT_FLOOR_S * 1000

        answers: list[pb.GatewayMessage] = []

        async def read_all() -> None:
            while True:
                message = await call.read()
                if not isinstance(message, pb.GatewayMessage):
                    return  # EOF: the gateway ended the session
                answers.append(message)

        reader = asyncio.create_task(read_all())
        try:
            for beat in range(3):
                # Just before the next beat is due: the longest silence of an upstream session.
                await asyncio.sleep(UPSTREAM_HEARTBEAT_FLOOR_S - 0.3)
                assert not reader.done(), f"the session ended before beat {beat + 1}: {answers}"
                state = (await _sandbox(gw, "sb-floor"))["state"]
                assert state == "connected", f"shown {state} before beat {beat + 1}"
                await call.write(_beat())
            assert not any(a.WhichOneof("payload") == "session_rejected" for a in answers), answers
            assert (await _sandbox(gw, "sb-floor"))["state"] == "connected"
        finally:
            reader.cancel()
            call.cancel()


# -- connection_epoch -------------------------------------------------------------------------


async def _connect(
    channel: aio.Channel, sandbox_id: str, *, instance_id: str, connection_epoch: int
) -> tuple[Any, pb.GatewayMessage]:
    call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
    await call.write(_hello(sandbox_id, instance_id=instance_id, connection_epoch=connection_epoch))
    return call, await _read(call)


async def test_a_late_hello_of_the_same_instance_cannot_take_the_sandbox(gw: Gateway) -> None:
    async with aio.insecure_channel(gw.grpc_address) as channel:
        newer, first = await _connect(channel, "sb-epoch", instance_id="inst-1", connection_epoch=2)
        assert first.WhichOneof("payload") == "session_accepted"
        # Epoch 1 of the same supervisor arrives late (a delayed connection): refused, unclaimed.
        late, answer = await _connect(channel, "sb-epoch", instance_id="inst-1", connection_epoch=1)
        assert answer.WhichOneof("payload") == "session_rejected", answer
        rejected = answer.session_rejected
        assert rejected.code == pb.REJECT_CODE_SUPERSEDED, rejected
        assert "inst-1" in rejected.reason and "epoch 2" in rejected.reason and "epoch 1" in rejected.reason
        # The same epoch again is no newer either.
        same, answer = await _connect(channel, "sb-epoch", instance_id="inst-1", connection_epoch=2)
        assert answer.WhichOneof("payload") == "session_rejected", answer
        # The newer connection keeps the sandbox: its session goes on, the row still names it.
        await newer.write(_beat())
        assert (await _read(newer)).WhichOneof("payload") == "heartbeat"
        row = await gw.sandboxes.get("sb-epoch")
        assert row is not None and row.session_id == first.session_accepted.session_id and row.connected
        for call in (newer, late, same):
            call.cancel()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("inst-1", 1), ("inst-1", 2)),  # the same supervisor's newer connection
        (("inst-1", 5), ("inst-2", 1)),  # another instance (a restarted supervisor), lower epoch
        (("inst-1", 3), ("inst-1", 0)),  # no epoch sent: the newest hello wins, as before
    ],
)
async def test_the_newest_hello_still_wins_otherwise(
    gw: Gateway, first: tuple[str, int], second: tuple[str, int]
) -> None:
    async with aio.insecure_channel(gw.grpc_address) as channel:
        old, a = await _connect(channel, "sb-wins", instance_id=first[0], connection_epoch=first[1])
        new, b = await _connect(channel, "sb-wins", instance_id=second[0], connection_epoch=second[1])
        assert a.WhichOneof("payload") == b.WhichOneof("payload") == "session_accepted", (a, b)
        assert b.session_accepted.owner_epoch > a.session_accepted.owner_epoch
        row = await gw.sandboxes.get("sb-wins")
        assert row is not None and row.session_id == b.session_accepted.session_id
        old.cancel()
        new.cancel()


# -- connection_epoch in the store, on both dialects -------------------------------------------


async def test_connection_epoch_claims_on_sqlite(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        await _connection_epoch_claims(SandboxStore(db))
    finally:
        await db.close()


@needs_postgres
async def test_connection_epoch_claims_on_postgresql(pg_url: str) -> None:
    db = await Database.open(pg_url)
    try:
        await _connection_epoch_claims(SandboxStore(db))
    finally:
        await db.close()


async def _connection_epoch_claims(sandboxes: SandboxStore) -> None:
    await sandboxes.ensure("sb")
    at = datetime.now(UTC)
    live = 10.0

    async def claim(instance_id: str, epoch: int, session_id: str, *, when: datetime = at) -> int | None:
        return await sandboxes.mark_connected(
            "sb",
            instance_id=instance_id,
            session_id=session_id,
            journal_epoch="",
            owner="gw-a",
            at=when,
            connection_epoch=epoch,
            live_for_s=live,
        )

    first = await claim("inst-1", 2, "s-2")
    assert first is not None
    row = await sandboxes.get("sb")
    assert row is not None
    with pytest.raises(StaleConnection, match=r"'inst-1' \(connection epoch 2\).* epoch 1 is not newer"):
        await claim("inst-1", 1, "s-1")
    after = await sandboxes.get("sb")
    assert after == row, "a refused hello writes nothing"
    # A newer epoch of the same instance, another instance, or no epoch: the newest hello wins.
    assert (second := await claim("inst-1", 3, "s-3")) is not None and second > first
    assert (third := await claim("inst-2", 1, "s-other")) is not None and third > second
    assert (fourth := await claim("inst-2", 0, "s-none")) is not None and fourth > third
    # A holder no longer live is not protected: past its bound, a lower epoch claims the sandbox.
    assert await claim("inst-2", 0, "s-x") is not None
    later = at + timedelta(seconds=live + 1)
    await sandboxes.mark_connected(
        "sb",
        instance_id="inst-3",
        session_id="s-5",
        journal_epoch="",
        owner="gw-a",
        at=at,
        connection_epoch=5,
    )
    assert await claim("inst-3", 4, "s-4", when=later) is not None
    assert (await sandboxes.get("sb")).session_id == "s-4"  # type: ignore[union-attr]
    # Nor is one marked disconnected.
    await sandboxes.mark_connected(
        "sb",
        instance_id="inst-3",
        session_id="s-6",
        journal_epoch="",
        owner="gw-a",
        at=at,
        connection_epoch=6,
    )
    assert await sandboxes.mark_disconnected("sb", session_id="s-6", at=at)
    assert await claim("inst-3", 1, "s-1b") is not None


# -- an open log stream and its token's expiry -------------------------------------------------


@pytest.fixture
async def gw_auth(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway requiring supervisor credentials, as upstream's supervisor meets it."""
    config = gateway_config(
        tmp_path,
        {"sessions": {"register_unknown": False}, "auth": {"supervisors": {"required": True}}},
    )
    gateway = Gateway(config)
    await gateway.start()
    yield gateway
    await gateway.stop()


def _token(db_path: Path, sandbox_id: str, *, exp: float) -> str:
    """A sandbox token signed with the gateway's own key (read from its database, as
    test_compat_upstream_supervisor does), expiring at ``exp``."""
    with sqlite3.connect(db_path) as db:
        kid, pem = db.execute(
            "SELECT kid, private_pem FROM signing_keys ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    now = int(time.time())
    claims = {
        "iss": "openshell-gateway",
        "aud": "openshell-sandbox",
        "sub": f"spiffe://openshell/sandbox/{sandbox_id}",
        "sandbox_id": sandbox_id,
        "gen": 1,
        "iat": now - 60,
        "exp": int(exp),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, pem, algorithm="EdDSA", headers={"kid": kid})


async def test_an_open_log_stream_keeps_delivering_after_its_token_expired(
    gw_auth: Gateway, tmp_path: Path
) -> None:
    """Upstream's supervisor keeps one PushSandboxLogs stream open for the sandbox's life, with the
    token it opened it with, and turns its log push off for good on an UNAUTHENTICATED end: a
    request written after that token's expiry (and the verifier's leeway) is stored."""
    await gw_auth.sandboxes.ensure("sb-long")
    # A token minted the gateway's way makes its signing key; ours is signed with that key.
    assert await gw_auth.sandbox_token("sb-long", generation=1) is not None
    # Valid for about 2 s more (exp + the leeway), so the stream outlives it in a short test.
    expires_at = time.time() - LEEWAY_S + 2
    token = _token(tmp_path / "gw.db", "sb-long", exp=expires_at)
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.PushSandboxLogsRequest]:
        while (line := await lines.get()) is not None:
            yield pb.PushSandboxLogsRequest(
                sandbox_id="sb-long",
                logs=[pb.SandboxLogLine(level="INFO", target="openshell_sandbox", message=line)],
            )

    async with aio.insecure_channel(gw_auth.grpc_address) as channel:
        call = pb_grpc.OpenShellStub(channel).PushSandboxLogs(
            requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
        lines.put_nowait("while the token is valid")
        async with asyncio.timeout(10):
            while not any(  # noqa: ASYNC110 - polls the gateway's HTTP API, nothing to wait on
                e["message"] == "while the token is valid" for e in await _logs(gw_auth, "sb-long")
            ):
                await asyncio.sleep(0.1)
        await asyncio.sleep(max(0.0, int(expires_at) + LEEWAY_S - time.time()) + 0.5)
        lines.put_nowait("after the token expired")
        lines.put_nowait(None)
        await call  # OK: not UNAUTHENTICATED
    stored = [e["message"] for e in await _logs(gw_auth, "sb-long")]
    assert stored == ["while the token is valid", "after the token expired"], stored


# -- connection_epoch out of range -----------------------------------------------------------


async def test_a_connection_epoch_beyond_the_store_s_range_is_refused_at_the_hello(gw: Gateway) -> None:
    await _refuses_an_epoch_out_of_range(gw)


@needs_postgres
async def test_a_connection_epoch_beyond_the_store_s_range_is_refused_at_the_hello_on_postgresql(
    tmp_path: Path,
    pg_url: str,
) -> None:
    config = gateway_config(
        tmp_path,
        {
            "database": {"url": pg_url},
            "sessions": {"heartbeat_interval_s": INTERVAL_S, "grace_s": GRACE_S},
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        await _refuses_an_epoch_out_of_range(gateway)
    finally:
        await gateway.stop()


async def _refuses_an_epoch_out_of_range(gw: Gateway) -> None:
    """uint64 on the wire, a signed 64-bit column: 2^63 and above are refused INVALID_HELLO with a
    reason (not INTERNAL, not a store outage), nothing is claimed, and 2^63 - 1 still claims."""
    async with aio.insecure_channel(gw.grpc_address) as channel:
        for epoch in (2**63, 2**64 - 1):
            call, answer = await _connect(channel, "sb-range", instance_id="inst-1", connection_epoch=epoch)
            assert answer.WhichOneof("payload") == "session_rejected", answer
            assert answer.session_rejected.code == pb.REJECT_CODE_INVALID_HELLO, answer
            assert "connection_epoch" in answer.session_rejected.reason, answer
            assert "out of range" in answer.session_rejected.reason, answer
            call.cancel()
        row = await gw.sandboxes.get("sb-range")
        assert row is None or not row.connected, "a refused hello claims nothing"
        call, answer = await _connect(channel, "sb-range", instance_id="inst-1", connection_epoch=2**63 - 1)
        assert answer.WhichOneof("payload") == "session_accepted", answer
        call.cancel()


# -- the stale-connection rule and the claim are one statement -------------------------------


async def test_a_late_hello_paused_before_its_claims_update_cannot_win_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late hello (epoch 1) is paused inside its claim, right before its UPDATE; the newer one
    (epoch 2) claims and commits meanwhile; the late one then must not claim: whatever its claim
    read or decided before the UPDATE (on SQLite a read there runs outside the write transaction
    and locks nothing), the rule must be in the UPDATE itself. (Paused before the UPDATE, not
    after it: the UPDATE takes the file's write lock, and the newer claim would wait for it.)
    The newer hello claims through a second Database on the file, as another gateway process
    would: within one process the store's SQLite writer lock (Database.begin) already keeps the
    two claims apart, so only another process can interleave."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    db = await Database.open(url)
    other = await Database.open(url)
    try:
        sandboxes = SandboxStore(db)
        elsewhere = SandboxStore(other)
        await sandboxes.ensure("sb")
        at = datetime.now(UTC)
        paused, resume = asyncio.Event(), asyncio.Event()
        real_execute = AsyncConnection.execute

        async def execute(self: AsyncConnection, statement: Any, *args: Any, **kwargs: Any) -> Any:
            task = asyncio.current_task()
            is_update = getattr(statement, "is_update", False)
            if is_update and task is not None and task.get_name() == "late" and not paused.is_set():
                paused.set()
                await resume.wait()
            return await real_execute(self, statement, *args, **kwargs)

        monkeypatch.setattr(AsyncConnection, "execute", execute)

        async def claim(session_id: str, epoch: int, store: SandboxStore = sandboxes) -> int | None:
            return await store.mark_connected(
                "sb",
                instance_id="inst-1",
                session_id=session_id,
                journal_epoch="",
                owner="gw-a",
                at=at,
                connection_epoch=epoch,
                live_for_s=30.0,
            )

        late = asyncio.create_task(claim("s-late", 1), name="late")
        async with asyncio.timeout(10):
            await paused.wait()
            assert await claim("s-newer", 2, elsewhere) is not None
            resume.set()
            with pytest.raises(StaleConnection):
                await late
        row = await sandboxes.get("sb")
        assert row is not None and row.session_id == "s-newer" and row.connected
    finally:
        await other.close()
        await db.close()
