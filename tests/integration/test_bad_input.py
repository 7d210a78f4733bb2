"""Bad input from a supervisor gets a clear answer, and the gateway goes on serving everyone else.

An in-process gateway on SQLite, spoken to over real gRPC with hand-made messages: hellos
that are missing or wrong, oversized messages, message kinds the gateway does not know,
event batches that break the rules.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from gateway.app import Gateway
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config
from tests.support.procs import GatewayProcess

CONNECT = "/openshell.v1.OpenShell/ConnectSupervisor"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = gateway_config(
        tmp_path,
        {
            "grpc": {"max_receive_message_bytes": 64 * 1024, "hello_timeout_s": 1},
            "sessions": {"heartbeat_interval_s": 0.5, "grace_s": 1.0},
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    yield gateway
    await gateway.stop()


def _raw_stream(channel: aio.Channel) -> aio.StreamStreamMultiCallable:
    """A ConnectSupervisor call that sends raw bytes, so we can send what our stubs never would."""
    return channel.stream_stream(
        CONNECT, request_serializer=lambda b: b, response_deserializer=pb.GatewayMessage.FromString
    )


def _hello(sandbox_id: str, *, caps: tuple[str, ...] = ("events", "resume"), epoch: str = "e1") -> bytes:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = sandbox_id
    msg.hello.instance_id = "i1"
    msg.hello.capabilities.extend(caps)
    msg.hello.journal_epoch = epoch
    return msg.SerializeToString()


def _heartbeat(ms: int = 42) -> bytes:
    msg = pb.SupervisorMessage()
    msg.heartbeat.sent_unix_ms = ms
    return msg.SerializeToString()


async def _first_reply(gw: Gateway, *messages: bytes) -> pb.GatewayMessage:
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        for m in messages:
            await call.write(m)
        reply = await call.read()
        call.cancel()
        assert reply is not aio.EOF
        return reply  # type: ignore[no-any-return]


async def test_hello_without_sandbox_id_is_rejected_with_the_reason(gw: Gateway) -> None:
    reply = await _first_reply(gw, _hello(""))
    assert reply.WhichOneof("payload") == "session_rejected"
    assert reply.session_rejected.code == pb.REJECT_CODE_INVALID_HELLO
    assert "without sandbox_id" in reply.session_rejected.reason


async def test_invalid_sandbox_name_is_rejected(gw: Gateway) -> None:
    reply = await _first_reply(gw, _hello("Not A Name!"))
    assert reply.session_rejected.code == pb.REJECT_CODE_INVALID_HELLO
    assert "not a valid name" in reply.session_rejected.reason


async def test_first_message_must_be_a_hello(gw: Gateway) -> None:
    reply = await _first_reply(gw, _heartbeat())
    assert reply.session_rejected.code == pb.REJECT_CODE_PROTOCOL_ERROR
    assert "first message must be hello" in reply.session_rejected.reason


async def test_events_capability_without_journal_epoch_is_rejected(gw: Gateway) -> None:
    reply = await _first_reply(gw, _hello("sb-noepoch", epoch=""))
    assert reply.session_rejected.code == pb.REJECT_CODE_INVALID_HELLO


async def test_silent_stream_gets_no_session(gw: Gateway) -> None:
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        reply = await call.read()  # we never say hello; the hello timeout is 1 s
        assert reply.session_rejected.code == pb.REJECT_CODE_PROTOCOL_ERROR
        assert "no hello" in reply.session_rejected.reason


async def test_unknown_message_kinds_are_ignored_and_the_session_goes_on(gw: Gateway) -> None:
    # Field 200 of SupervisorMessage, a varint: what a newer supervisor's new kind looks like to us.
    unknown = bytes([0xC0, 0x0C, 0x01])
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        await call.write(_hello("sb-unknown"))
        accepted = await call.read()
        assert accepted.WhichOneof("payload") == "session_accepted"
        await call.write(unknown)
        await call.write(_heartbeat(4242))
        reply = await call.read()
        assert reply.WhichOneof("payload") == "heartbeat"
        assert reply.heartbeat.echo_unix_ms == 4242
        call.cancel()


async def test_oversized_message_is_refused_and_the_gateway_keeps_serving(gw: Gateway) -> None:
    big = pb.SupervisorMessage()
    big.events.journal_epoch = "e1"
    ev = big.events.events.add()
    ev.sequence = 1
    ev.log.stream = pb.LOG_STREAM_STDOUT
    ev.log.message = "x" * (128 * 1024)  # twice the configured limit
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        await call.write(_hello("sb-big"))
        await call.read()
        with pytest.raises(aio.AioRpcError) as info:
            await call.write(big.SerializeToString())
            while True:
                msg = await call.read()
                if msg is aio.EOF:
                    break
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing of it was stored, and a well-behaved supervisor is still served.
    reply = await _first_reply(gw, _hello("sb-after-big"))
    assert reply.WhichOneof("payload") == "session_accepted"


async def _send_events(gw: Gateway, sandbox_id: str, batch: pb.SupervisorMessage) -> list[pb.GatewayMessage]:
    replies = []
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        await call.write(_hello(sandbox_id))
        replies.append(await call.read())
        await call.write(batch.SerializeToString())
        while True:
            msg = await call.read()
            if msg is aio.EOF:
                break
            replies.append(msg)
            if msg.WhichOneof("payload") in ("event_ack", "session_rejected"):
                break
        call.cancel()
    return replies


async def test_event_batch_of_another_journal_epoch_ends_the_session(gw: Gateway) -> None:
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "not-e1"
    ev = batch.events.events.add(sequence=1)
    ev.log.stream = pb.LOG_STREAM_STDOUT
    replies = await _send_events(gw, "sb-epoch", batch)
    assert replies[-1].session_rejected.code == pb.REJECT_CODE_PROTOCOL_ERROR
    assert "journal epoch" in replies[-1].session_rejected.reason


async def test_event_without_a_kind_ends_the_session_and_stores_nothing(gw: Gateway) -> None:
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    good = batch.events.events.add(sequence=1)
    good.log.stream = pb.LOG_STREAM_STDOUT
    good.log.message = "fine"
    batch.events.events.add(sequence=2)  # no kind at all
    replies = await _send_events(gw, "sb-nokind", batch)
    assert replies[-1].session_rejected.code == pb.REJECT_CODE_PROTOCOL_ERROR
    assert "event 2" in replies[-1].session_rejected.reason
    from gateway.store import EventStore

    assert gw.db is not None
    assert await EventStore(gw.db).count("sb-nokind") == 0, "a bad batch is refused whole"


async def test_sequence_beyond_int64_is_refused_not_a_traceback(gw: Gateway) -> None:
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    ev = batch.events.events.add(sequence=2**63)
    ev.log.stream = pb.LOG_STREAM_STDOUT
    replies = await _send_events(gw, "sb-huge", batch)
    assert replies[-1].session_rejected.code == pb.REJECT_CODE_PROTOCOL_ERROR
    assert "above the largest allowed" in replies[-1].session_rejected.reason


async def test_descending_sequences_end_the_session(gw: Gateway) -> None:
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    for seq in (5, 3):
        ev = batch.events.events.add(sequence=seq)
        ev.log.stream = pb.LOG_STREAM_STDOUT
    replies = await _send_events(gw, "sb-desc", batch)
    assert "must ascend" in replies[-1].session_rejected.reason


async def test_events_are_acknowledged_and_a_replay_is_stored_once(gw: Gateway) -> None:
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    for seq in (1, 2, 3):
        ev = batch.events.events.add(sequence=seq)
        ev.log.stream = pb.LOG_STREAM_STDOUT
        ev.log.message = f"m{seq}"
    first = await _send_events(gw, "sb-replay", batch)
    again = await _send_events(gw, "sb-replay", batch)
    assert first[0].session_accepted.resume_after_sequence == 0
    assert again[0].session_accepted.resume_after_sequence == 3
    assert first[-1].event_ack.acked_through_sequence == 3
    assert again[-1].event_ack.acked_through_sequence == 3
    from gateway.store import EventStore

    assert gw.db is not None
    assert [e.message for e in await EventStore(gw.db).tail("sb-replay")] == ["m1", "m2", "m3"]


async def test_a_supervisor_that_gives_up_during_accept_leaves_no_ghost_session(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from gateway.store import SandboxStore

    real = SandboxStore.claim  # the hello's claim

    async def slow_claim(self: SandboxStore, *args: object, **kwargs: object) -> object:
        await asyncio.sleep(1.0)  # a slow database
        return await real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SandboxStore, "claim", slow_claim)
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        await call.write(_hello("sb-impatient"))
        await asyncio.sleep(0.3)
        call.cancel()  # the supervisor's connect timeout fired
    for _ in range(50):
        if len(gw.registry) == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)
    assert len(gw.registry) == 0, "the cancelled handler must take its session out of the registry"
    row = await gw.sandboxes.get("sb-impatient")
    assert row is None or not row.connected, "nor leave the sandbox shown as connected"


def _lifecycle_batch(*events: tuple[int, int, int | None]) -> pb.SupervisorMessage:
    """An event batch of (sequence, LIFECYCLE_KIND, exit code) records in journal e1."""
    batch = pb.SupervisorMessage()
    batch.events.journal_epoch = "e1"
    for seq, kind, code in events:
        ev = batch.events.events.add(sequence=seq, timestamp_ms=1_764_072_000_000 + seq)
        ev.lifecycle.kind = kind  # type: ignore[assignment]
        ev.lifecycle.pid = 42
        if code is not None:
            ev.lifecycle.exit_code = code
    return batch


async def _sandbox_json(gw: Gateway, sandbox_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.http_url}/api/v1/sandboxes/{sandbox_id}") as resp,
    ):
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_an_exit_is_recorded_once_and_late_reports_are_ignored(gw: Gateway) -> None:
    started, exited = pb.LIFECYCLE_KIND_STARTED, pb.LIFECYCLE_KIND_EXITED
    replies = await _send_events(gw, "sb-exit", _lifecycle_batch((1, started, None), (2, exited, 3)))
    assert replies[-1].event_ack.acked_through_sequence == 2
    assert (await _sandbox_json(gw, "sb-exit"))["exit_code"] == 3
    # Another source reports the same run's exit with another code (the upstream call), then the
    # journal carries a late second exit: neither rewrites the exit the sandbox shows.
    async with aio.insecure_channel(gw.grpc_address) as channel:
        stub = pb_grpc.OpenShellStub(channel)
        await stub.ReportMainProcessExit(
            pb.ReportMainProcessExitRequest(sandbox_id="sb-exit", instance_id="i1", exit_code=0)
        )
    replies = await _send_events(gw, "sb-exit", _lifecycle_batch((3, exited, 1)))
    assert replies[-1].event_ack.acked_through_sequence == 3, "the record itself is acknowledged"
    doc = await _sandbox_json(gw, "sb-exit")
    assert doc["exit_code"] == 3 and doc["state"] == "exited"
    # A restart is a new run, whose exit is the sandbox's.
    await _send_events(gw, "sb-exit", _lifecycle_batch((4, started, None), (5, exited, 0)))
    assert (await _sandbox_json(gw, "sb-exit"))["exit_code"] == 0


async def test_a_batch_in_flight_when_the_id_is_created_again_stays_with_the_old_sandbox(
    gw: Gateway,
) -> None:
    """The session keeps the generation its hello found: a batch its supervisor sends after the id
    was created again is stored as the old sandbox's, and its exit is not the new one's."""
    started, exited = pb.LIFECYCLE_KIND_STARTED, pb.LIFECYCLE_KIND_EXITED
    async with aio.insecure_channel(gw.grpc_address) as channel:
        call = _raw_stream(channel)()
        await call.write(_hello("sb-gen"))
        assert (await call.read()).WhichOneof("payload") == "session_accepted"
        assert await gw.sandboxes.create("sb-gen", driver="kubernetes", replaces=lambda row: True) == 2
        await call.write(_lifecycle_batch((1, started, None), (2, exited, 137)).SerializeToString())
        while (reply := await call.read()) is not aio.EOF:
            if reply.WhichOneof("payload") == "event_ack":
                break
        assert reply.event_ack.acked_through_sequence == 2, "the records are acknowledged"
        call.cancel()
    doc = await _sandbox_json(gw, "sb-gen")
    assert doc["generation"] == 2 and doc["exit_code"] is None and not doc["connected"]
    from gateway.store import EventStore

    assert gw.db is not None
    store = EventStore(gw.db)
    assert await store.count("sb-gen", generation=2) == 0
    assert await store.count("sb-gen", generation=1) == 2


async def test_http_bodies_are_bounded_in_size_and_depth(gw: Gateway) -> None:
    await _send_events(gw, "sb-http", _lifecycle_batch((1, pb.LIFECYCLE_KIND_STARTED, None)))
    url = f"{gw.http_url}/api/v1/sandboxes/sb-http/commands"
    headers = {"Content-Type": "application/json"}
    cases = [
        ("[" * 100_000 + "]" * 100_000, 400, "nests deeper than"),
        ('{"kind": "stop", "pad": "' + "x" * (2 * 1024 * 1024) + '"}', 413, "larger than 1048576 bytes"),
        ('{"kind": "signal", "signal": {"a": [1, {"b": null}]}}', 400, "signal must be"),
    ]
    async with aiohttp.ClientSession() as http:
        for body, status, words in cases:
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == status, await resp.text()
                assert words in (await resp.json())["error"]
        async with http.post(url, json={"kind": "stop"}) as resp:
            assert resp.status == 201, "and the gateway goes on serving"


@pytest.fixture
async def kube_gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with the Kubernetes driver whose API server does not answer (127.0.0.1:1): a
    request the gateway refuses is refused before the driver is asked, so it never gets to 502."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    config = gateway_config(
        tmp_path,
        {
            "drivers": {
                "kind": "kubernetes",
                "kubernetes": {
                    "kubeconfig": str(kubeconfig),
                    "gateway_address": "gw:7070",
                    "request_timeout_s": 2,
                    "pod": {"default_image": "busybox:1.36"},
                },
            }
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    yield gateway
    await gateway.stop()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"image": "../../etc/passwd"}, "image: "),
        ({"image": "registry.example/team/../../x:1"}, "image: "),
        ({"image": "busybox\x00:1"}, "image: "),
        ({"image": "BusyBox:1"}, "image: "),
        ({"image": "busybox@sha256:abc"}, "image: "),
        ({"env": {"FOO": "a\x00b"}}, "env.FOO: value contains a NUL byte"),
        ({"env": {"OPENSHELL_GATEWAY": "evil:1"}}, "reserved"),
        ({"env": {"FOO": ["x"]}}, "env.'FOO': must be a string"),
        ({"command": ["sh", "-c", "echo\x00rm -rf /"]}, "command[2]: contains a NUL byte"),
        ({"command": "sh"}, "command must be a list of strings"),
        ({"id": 7}, "id must be a string"),
    ],
)
async def test_sandbox_requests_are_validated_with_the_field_named(
    kube_gw: Gateway, fields: dict[str, Any], words: str
) -> None:
    body = {"id": "sb-bad", "command": ["sleep", "1"], **fields}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{kube_gw.http_url}/api/v1/sandboxes", json=body) as resp:
            assert resp.status == 400, await resp.text()
            assert words in (await resp.json())["error"]
        # The same request without the bad field reaches the driver (whose API is away: 502).
        good = {"id": "sb-bad", "command": ["sleep", "1"]}
        async with http.post(f"{kube_gw.http_url}/api/v1/sandboxes", json=good) as resp:
            assert resp.status == 502, await resp.text()
    assert await kube_gw.sandboxes.get("sb-bad") is None, "nothing was registered"


async def test_an_unterminated_escaped_string_does_not_freeze_the_gateway(tmp_path: Path) -> None:
    """The nesting check is one linear pass: a body of nearly 1 MiB of escaped quotes that never
    ends (a regex for whole strings retried at every quote: about 50 minutes of a frozen event
    loop, gRPC included) is answered at once. A real gateway process, so the old code fails the
    timeout here instead of hanging the test."""
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.start()
    try:
        async with aio.insecure_channel(gateway.address) as channel:
            await pb_grpc.OpenShellStub(channel).ReportMainProcessExit(
                pb.ReportMainProcessExitRequest(sandbox_id="sb-regex", instance_id="i1", exit_code=0)
            )
        body = '{"kind": "stop", "pad": "' + '\\"' * 500_000
        assert len(body) < 1024 * 1024
        url = f"http://127.0.0.1:{gateway.http_port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.post(
                f"{url}/api/v1/sandboxes/sb-regex/commands",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400, await resp.text()
                assert "not valid JSON" in (await resp.json())["error"]
            async with http.get(f"http://127.0.0.1:{gateway.ops_port}/healthz") as resp:
                assert resp.status == 200
    finally:
        gateway.stop()
