"""Frames that are not valid messages, sent to every method the gateway serves: each call ends
INVALID_ARGUMENT with a short reason, the gateway logs no traceback, and a flood of them costs a
few log lines (a metric counts them all).

A real gateway process, spoken to over real gRPC with raw bytes (no serializer), so the frame
reaches the server exactly as written.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2

from openshell_wire.v1 import openshell_pb2 as pb
from tests.support.procs import GatewayProcess, wait_until

#: A length-delimited field 1 that claims 5 bytes and carries 2: no message type parses it.
MALFORMED = b"\x0a\x05ab"
SERVICES = (pb.DESCRIPTOR.services_by_name["OpenShell"], health_pb2.DESCRIPTOR.services_by_name["Health"])
METHODS = [m for service in SERVICES for m in service.methods]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def _frames(*frames: bytes) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame


async def _call(channel: aio.Channel, method: MethodDescriptor, *frames: bytes) -> grpc.StatusCode:
    """Send ``frames`` raw to ``method``; the call's status code (OK if it did not fail)."""
    path = _path(method)
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path)(_frames(*frames))
            async for _ in call:
                pass
        elif method.client_streaming:
            await channel.stream_unary(path)(_frames(*frames))
        elif method.server_streaming:
            async for _ in channel.unary_stream(path)(frames[0]):
                pass
        else:
            await channel.unary_unary(path)(frames[0])
    except aio.AioRpcError as exc:
        assert exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "malformed" in (exc.details() or ""), (
            exc.details()
        )
        return exc.code()
    return grpc.StatusCode.OK


def _hello() -> bytes:
    msg = pb.SupervisorMessage()
    msg.hello.sandbox_id = "sb-malformed"
    msg.hello.instance_id = "i1"
    return msg.SerializeToString()


def _metric(gateway: GatewayProcess, name: str, method: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf'^{name}\{{method="{method}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _gauge(gateway: GatewayProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        found = re.search(rf"^{name} (\S+)$", resp.read().decode(), re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


@pytest.fixture
def started(gateway: GatewayProcess) -> GatewayProcess:
    gateway.start()
    return gateway


@pytest.mark.parametrize("method", METHODS, ids=[m.full_name for m in METHODS])
async def test_a_malformed_frame_is_invalid_argument_on_every_method(
    started: GatewayProcess, method: MethodDescriptor
) -> None:
    async with aio.insecure_channel(started.address) as channel:
        assert await _call(channel, method, MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
    log = started.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert re.search(rf"{method.name} from \S+ refused: malformed", log), log[-3000:]


async def test_a_malformed_frame_inside_a_session_or_a_log_stream_ends_that_call(
    started: GatewayProcess,
) -> None:
    connect, push = (
        pb.DESCRIPTOR.services_by_name["OpenShell"].methods_by_name[n]
        for n in ("ConnectSupervisor", "PushSandboxLogs")
    )
    good_logs = pb.PushSandboxLogsRequest(sandbox_id="sb-malformed").SerializeToString()
    async with aio.insecure_channel(started.address) as channel:
        assert await _call(channel, connect, _hello(), MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _call(channel, push, good_logs, MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
        # The gateway goes on serving well-formed calls.
        health = pb.DESCRIPTOR.services_by_name["OpenShell"].methods_by_name["Health"]
        assert await _call(channel, health, pb.HealthRequest().SerializeToString()) == grpc.StatusCode.OK
    # The session the bad frame ended is gone from the registry, and its row says so.
    assert _gauge(started, "openshell_gateway_sessions") == 0
    wait_until(
        lambda: started.query("SELECT connected FROM sandboxes WHERE id = 'sb-malformed'") == [(0,)],
        timeout=10,
        what="sb-malformed marked disconnected",
    )
    assert "Traceback" not in started.log_text()


async def test_a_flood_of_malformed_frames_costs_a_few_log_lines_and_is_counted(
    started: GatewayProcess,
) -> None:
    health = pb.DESCRIPTOR.services_by_name["OpenShell"].methods_by_name["Health"]
    async with aio.insecure_channel(started.address) as channel:
        codes = await asyncio.gather(*(_call(channel, health, MALFORMED) for _ in range(200)))
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    log = started.log_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "Health from" in line and "malformed" in line]
    assert 1 <= len(lines) <= 3, lines
    assert _metric(started, "openshell_gateway_malformed_frames_total", "Health") == 200
