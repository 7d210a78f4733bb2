"""Commands from the gateway: stored until answered, redelivered on every new session, applied
at most once by the supervisor however often they arrive."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc import aio

from gateway.app import Gateway
from gateway.store import Database
from openshell_wire.records import Command, CommandKind
from openshell_wire.v1 import openshell_pb2 as pb
from tests.integration.test_control import AGENT, _http
from tests.integration.test_session_robustness import _accepted, _serve, _session
from tests.support.gateway import gateway_config
from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until
from tests.unit.test_commands_store import check_command_expiry

CONNECT = "/openshell.v1.OpenShell/ConnectSupervisor"


def _command(command_id: str, **action: Any) -> bytes:
    msg = pb.GatewayMessage()
    msg.command.command_id = command_id
    if "signal" in action:
        msg.command.signal.signal = action["signal"]
    elif "interval_ms" in action:
        msg.command.heartbeat.interval_ms = action["interval_ms"]
    return msg.SerializeToString()


async def test_supervisor_applies_each_command_once_and_answers_every_delivery(tmp_path: Path) -> None:
    results: list[pb.CommandResult] = []
    done = asyncio.Event()

    async def handler(requests: AsyncIterator[pb.SupervisorMessage], context: Any) -> AsyncIterator[bytes]:
        await anext(requests)
        yield _accepted()
        yield _command("c1", signal=10)
        yield _command("c1", signal=10)  # redelivered: must not be applied again
        yield _command("c2", interval_ms=250)
        yield _command("c3")  # no action at all
        yield _command("c4", signal=99)  # not a signal
        async for msg in requests:
            if msg.WhichOneof("payload") == "command_result":
                results.append(msg.command_result)
                if len(results) == 5:
                    done.set()

    applied: list[Command] = []

    async def on_command(command: Command) -> str | None:
        applied.append(command)
        return None

    server, port = await _serve(handler)
    try:
        session, journal = _session(tmp_path, port)
        session._on_command = on_command
        runner = asyncio.create_task(session.run())
        try:
            await asyncio.wait_for(done.wait(), 20)
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
    finally:
        await server.stop(None)
    by_id = [(r.command_id, r.applied, r.duplicate, bool(r.error)) for r in results]
    assert by_id == [
        ("c1", True, False, False),
        ("c1", True, True, False),
        ("c2", True, False, False),
        ("c3", False, False, True),
        ("c4", False, False, True),
    ]
    assert applied == [Command("c1", CommandKind.SIGNAL, signal=10)]
    # The audit trail is in the journal, as the supervisor's own lines.
    trail = [e.payload.message for e in journal.read_after(0) if hasattr(e.payload, "message")]
    journal.close()
    assert any("command c1 (signal 10): applied" in line for line in trail)
    # A new supervisor process over the same directory still knows c1.
    again, journal2 = _session(tmp_path, port)
    outcome = again._applied.outcome("c1")
    assert outcome is not None and outcome.applied is True
    journal2.close()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(gateway_config(tmp_path))
    await gateway.start()
    yield gateway
    await gateway.stop()


async def _post(gw: Gateway, sandbox_id: str, body: object) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        url = f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}/commands"
        async with http.post(url, json=body) as resp:
            return resp.status, await resp.json()


async def _get(gw: Gateway, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.http_url}{path}") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


def _hello(sandbox_id: str) -> bytes:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.extend(["events", "resume", "commands"])
    msg.hello.journal_epoch = "e1"
    return msg.SerializeToString()


def _result(command_id: str, *, applied: bool = True, error: str = "") -> bytes:
    msg = pb.SupervisorMessage()
    msg.command_result.command_id = command_id
    msg.command_result.applied = applied
    msg.command_result.error = error
    return msg.SerializeToString()


async def test_gateway_redelivers_pending_commands_until_answered(gw: Gateway) -> None:
    await gw.sandboxes.ensure("cmd")
    status, created = await _post(gw, "cmd", {"kind": "signal", "signal": "SIGUSR1"})
    assert status == 201 and created["state"] == "pending" and created["delivered"] is False
    assert created["signal"] == 10

    async with aio.insecure_channel(gw.grpc_address) as channel:
        raw = channel.stream_stream(
            CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
        )
        # First session: the command arrives, but the stream dies before we answer.
        call = raw()
        await call.write(_hello("cmd"))
        assert (await call.read()).WhichOneof("payload") == "session_accepted"
        first = await call.read()
        assert first.command.command_id == created["id"] and first.command.signal.signal == 10
        call.cancel()
        # Second session: sent again; now answered.
        call = raw()
        await call.write(_hello("cmd"))
        await call.read()
        again = await call.read()
        assert again.command.command_id == created["id"]
        await call.write(_result(created["id"]))
        # A command created while the session is up goes out at once.
        status, live = await _post(gw, "cmd", {"kind": "heartbeat", "interval_ms": 2000})
        assert status == 201 and live["delivered"] is True
        pushed = await call.read()
        assert pushed.command.command_id == live["id"] and pushed.command.heartbeat.interval_ms == 2000
        await call.write(_result(live["id"], applied=False, error="nope"))
        for _ in range(50):
            doc = await _get(gw, f"/api/v1/commands/{live['id']}")
            if doc["state"] != "pending":
                break
            await asyncio.sleep(0.05)
        call.cancel()
    assert (await _get(gw, f"/api/v1/commands/{created['id']}"))["state"] == "applied"
    assert doc["state"] == "failed" and doc["error"] == "nope"
    listed = await _get(gw, "/api/v1/sandboxes/cmd/commands")
    assert {c["id"] for c in listed["commands"]} == {created["id"], live["id"]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"kind": "reboot"}, "kind must be one of"),
        ({"kind": "signal", "signal": "SIGNOPE"}, "signal must be a signal name"),
        ({"kind": "signal", "signal": 0}, "signal must be a signal name"),
        ({"kind": "heartbeat", "interval_ms": 5}, "interval_ms must be an integer from 100"),
        ({"kind": "stop", "grace_ms": -1}, "grace_ms must be an integer from 0"),
        ({"kind": "stop", "force": True}, "unknown field(s) for a stop command: force"),
        (["stop"], "must be a JSON object"),
    ],
)
async def test_bad_commands_are_refused_with_the_reason(gw: Gateway, body: object, expected: str) -> None:
    await gw.sandboxes.ensure("cmd-bad")
    status, doc = await _post(gw, "cmd-bad", body)
    assert status == 400
    assert expected in doc["error"]


async def test_a_command_for_an_unknown_sandbox_is_404(gw: Gateway) -> None:
    status, doc = await _post(gw, "nobody", {"kind": "stop"})
    assert status == 404 and "no sandbox" in doc["error"]


async def test_a_stop_command_during_the_exit_flush_does_not_cut_it(tmp_path: Path) -> None:
    """The gateway that sends ``stop`` is the one receiving the flush: the flush must go on."""
    from gateway.store import CommandStore, EventStore
    from tests.support.procs import SupervisorProcess, free_port, writer_command

    port = free_port()
    sv = SupervisorProcess(
        tmp_path / "sv",
        "flush-stop",
        f"127.0.0.1:{port}",
        writer_command(2000),
        settings=["session.exit_flush_timeout_s=60"],
    )
    sv.start()  # no gateway yet: the main process writes everything and exits; the flush waits
    gateway = Gateway(gateway_config(tmp_path, {"grpc": {"listen": f"127.0.0.1:{port}"}}))
    try:
        for _ in range(300):
            if "main process exited" in sv.log_text():
                break
            await asyncio.sleep(0.1)
        assert "main process exited" in sv.log_text()
        await gateway.start()
        assert gateway.db is not None
        await gateway.sandboxes.ensure("flush-stop")
        stop = await CommandStore(gateway.db).create("flush-stop", CommandKind.STOP)
        assert sv.proc is not None
        for _ in range(600):
            if sv.proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert sv.proc.returncode == 0, sv.log_text()[-2000:]
        events = EventStore(gateway.db)
        logs = [
            e.message for e in await events.tail("flush-stop", 5000, kinds=["log"]) if e.stream == "stdout"
        ]
        assert logs == [f"line {i}" for i in range(2000)], "the flush went on after the stop command"
        row = await CommandStore(gateway.db).get(stop.command.command_id)
        assert row is not None and row.state == "applied"
    finally:
        sv.stop()
        await gateway.stop()


def test_a_command_that_expires_while_the_supervisor_is_away_is_never_delivered(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    """Real gateway and supervisor processes: commands posted while the supervisor is connected
    are delivered (written to its stream) and applied; one posted while it is away that expires
    before it returns ends expired and never reaches it, while one still valid does."""
    gateway.start()
    api = f"http://127.0.0.1:{gateway.http_port}/api/v1"
    usr1_lines = lambda: gateway.log_lines("exp").count("got USR1")  # noqa: E731

    def start_supervisor() -> SupervisorProcess:
        sv = SupervisorProcess(tmp_path / "exp", "exp", gateway.address, [sys.executable, "-u", "-c", AGENT])
        supervisors.append(sv)
        sv.start()
        return sv

    def state(command_id: str) -> dict[str, Any]:
        status, doc = _http("GET", f"{api}/commands/{command_id}")
        assert status == 200, doc
        return dict(doc)

    def post(body: dict[str, Any]) -> dict[str, Any]:
        status, doc = _http("POST", f"{api}/sandboxes/exp/commands", body)
        assert status == 201, doc
        return dict(doc)

    def stop(sv: SupervisorProcess) -> None:
        stopped = post({"kind": "stop", "grace_ms": 5000})
        assert stopped["delivered"] is True, "the live session wrote it to its stream"
        assert sv.wait(timeout=60) == 0, sv.log_text()[-2000:]
        assert state(stopped["id"])["state"] == "applied"

    first = start_supervisor()
    wait_until(lambda: "ready" in gateway.log_lines("exp"), timeout=30, what="the agent is up")
    live = post({"kind": "signal", "signal": "SIGUSR1"})
    assert live["delivered"] is True and live["state"] == "pending"
    wait_until(lambda: state(live["id"])["state"] == "applied", timeout=30, what="the live command answered")
    assert usr1_lines() == 1
    stop(first)

    # Away: nobody takes these. One expires before the supervisor returns; one is still valid.
    doomed = post({"kind": "signal", "signal": "SIGUSR1", "expires_in_s": 1})
    # Applied by the supervisor's session itself: sent at the hello, before the agent's handlers.
    kept = post({"kind": "heartbeat", "interval_ms": 1000, "expires_in_s": 120})
    assert doomed["delivered"] is False and kept["delivered"] is False
    assert doomed["expires_at"] < kept["expires_at"]
    wait_until(lambda: state(doomed["id"])["state"] == "expired", timeout=10, what="the command expired")

    second = start_supervisor()
    wait_until(lambda: state(kept["id"])["state"] == "applied", timeout=30, what="the valid one redelivered")
    wait_until(lambda: gateway.log_lines("exp").count("ready") == 2, timeout=30, what="the agent is up")
    stop(second)
    after = state(doomed["id"])
    assert (after["state"], after["late_result"], after["answered_at"]) == ("expired", None, None)
    assert usr1_lines() == 1, "the expired command's signal never reached the agent"
    assert gateway.log_lines("exp")[-1] == "bye", "the agent ended by the stop command"
    audit = [e["message"] for e in gateway.events("exp", "log") if e["stream"] == "supervisor"]
    assert any(kept["id"] in line for line in audit), audit
    assert not any(doomed["id"] in line for line in audit), audit
    assert doomed["id"] not in first.log_text() + second.log_text()


async def test_command_expiry_on_postgresql(pg_url: str) -> None:
    db = await Database.open(pg_url)
    try:
        await check_command_expiry(db)
    finally:
        await db.close()
