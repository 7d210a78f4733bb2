"""gRPC health says what /readyz says at the edges of a gateway's life (review of issue 20, finding
6): NOT_SERVING from the moment the gRPC server listens until the first readiness verdict passes
(never SERVING on a schema not yet migrated), and NOT_SERVING as soon as shutdown begins, not at
the health follower's next tick (2 s later). A real gateway in this process, on SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import Gateway
from tests.support.gateway import gateway_config
from tests.support.procs import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: aio.Channel) -> int | None:
    """The overall ("") status, or None while nothing answers."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1
        )
    except aio.AioRpcError:
        return None
    return int(reply.status)


async def test_health_is_never_serving_before_a_verdict_on_a_schema_not_migrated(tmp_path: Path) -> None:
    """migrate_on_start=false on an empty database: /readyz says not ready throughout; gRPC health,
    asked again and again while the gateway starts, must never have said SERVING."""
    port = free_port()
    config = gateway_config(
        tmp_path, {"grpc": {"listen": f"127.0.0.1:{port}"}, "database": {"migrate_on_start": False}}
    )
    gw = Gateway(config)
    seen: list[int | None] = []

    async def ask() -> None:
        # A Watch queued before the port is open (wait_for_ready), reconnecting at once: it is
        # served as soon as the listener starts, and is told every status from then on.
        options = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                   ("grpc.max_reconnect_backoff_ms", 10)]  # fmt: skip
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=True
            )
            async for reply in call:
                seen.append(int(reply.status))

    asking = asyncio.create_task(ask())
    try:
        await gw.start()
        await asyncio.sleep(1.0)  # the follower's first verdicts reach the watch
    finally:
        asking.cancel()
        await gw.stop()
    assert NOT_SERVING in seen, seen
    assert SERVING not in seen, seen


async def test_health_turns_not_serving_as_soon_as_shutdown_begins(tmp_path: Path) -> None:
    """Shutdown held in its first phase (marking the replica draining waits for SQLite's write lock,
    held by the test): gRPC health must already say NOT_SERVING, as /readyz does."""
    gw = Gateway(gateway_config(tmp_path))
    await gw.start()
    stopping: asyncio.Task[None] | None = None
    # check_same_thread=False: the lock is taken off the event loop (below) and released on it.
    holder = sqlite3.connect(tmp_path / "gw.db", timeout=10, check_same_thread=False)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
            for _ in range(100):
                if await _status(channel) == SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await _status(channel) == SERVING
            # Off the loop: the gateway runs on this loop, and a write transaction of its own (a lease
            # renewal) can only commit while the loop runs; waiting on the lock here would block it.
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
            stopping = asyncio.create_task(gw.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done()
            assert await _status(channel) in (NOT_SERVING, None)
    finally:
        holder.rollback()
        holder.close()
        if stopping is not None:
            await asyncio.wait_for(stopping, 30)
        else:
            await gw.stop()
