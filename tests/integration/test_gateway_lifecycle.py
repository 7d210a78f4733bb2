"""The gateway process as a whole: it stops promptly and cleanly, whoever is still attached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from gateway.app import Gateway
from tests.support.gateway import gateway_config


async def test_a_log_follower_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    gateway = Gateway(gateway_config(tmp_path))
    await gateway.start()
    await gateway.sandboxes.ensure("followed")
    lines: list[bytes] = []

    async def follow() -> None:
        async with aiohttp.ClientSession() as http:
            url = f"{gateway.http_url}/api/v1/sandboxes/followed/logs?follow=1"
            async with http.get(url) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    lines.append(line)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.5)  # the follower is attached and waiting for events
    await gateway.stop()
    # The stream ended cleanly (a complete chunked response), not cut off by the server's
    # shutdown timeout, which would raise ClientPayloadError here.
    await asyncio.wait_for(follower, 10)


async def test_standard_grpc_health_service_reports_serving(tmp_path: Path) -> None:
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gateway = Gateway(gateway_config(tmp_path))
    await gateway.start()
    try:
        async with aio.insecure_channel(gateway.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "openshell.v1.OpenShell"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gateway.stop()
