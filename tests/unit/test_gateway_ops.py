"""The gateway's operations listener (gateway/ops.py): /healthz, /readyz and /metrics, served on a
port of their own, and the HTTP API no longer serving them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import text

import gateway.metrics
from gateway.app import Gateway, GatewayStartError
from gateway.config import SessionSettings
from gateway.metrics import GatewayMetrics
from gateway.ops import Readiness, build_ops
from gateway.sandbox_state import Liveness
from gateway.sessions import SessionRegistry
from gateway.store import Database, SandboxStore
from tests.support.gateway import gateway_config

T0 = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)
LIVENESS = Liveness.from_settings(SessionSettings(lost_after_s=60.0))


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(gateway_config(tmp_path))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def test_probes_and_metrics_are_on_the_ops_port_and_not_on_the_api(running: Gateway) -> None:
    assert running.ops_port not in (0, running.http_port)
    status, body = await _get(f"{running.ops_url}/healthz")
    assert (status, body) == (200, '{"status": "ok"}')
    status, body = await _get(f"{running.ops_url}/readyz")
    assert status == 200, body
    status, body = await _get(f"{running.ops_url}/metrics")
    assert status == 200 and "openshell_gateway_sessions 0.0" in body
    # Auth covers the whole API listener: nothing unauthenticated is left on it.
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _ = await _get(f"{running.http_url}{path}")
        assert status == 404, path
    # Nothing else on the ops listener.
    status, _ = await _get(f"{running.ops_url}/api/v1/sandboxes")
    assert status == 404


async def test_readyz_fails_while_shutting_down(running: Gateway) -> None:
    running.registry.close_all("test")
    running._grpc_serving = False  # what stop() does first
    async with aiohttp.ClientSession() as http, http.get(f"{running.ops_url}/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["ready"] is False
    assert body["checks"]["grpc"] == {"ok": False, "reason": "gRPC server not serving"}
    assert body["checks"]["database"]["ok"] is True


@pytest.fixture
async def ops_client(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Database]]:
    db = await Database.open(f"sqlite:///{tmp_path}/ops.db")
    metrics = GatewayMetrics(SessionRegistry())
    readiness = Readiness(db, grpc_serving=lambda: True)
    app = build_ops(
        metrics=metrics, sandboxes=SandboxStore(db), readiness=readiness, liveness=LIVENESS, now=lambda: T0
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield client, db
    finally:
        await readiness.close()
        await metrics.close()
        await db.close()


async def test_readyz_checks_the_database_and_its_schema(
    ops_client: tuple[TestClient[Any, Any], Database],
) -> None:
    client, db = ops_client
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"]["database"] == {"ok": True, "reason": "reachable, schema at head"}

    # A schema this gateway does not know (a newer version's, migrated by a rollout's hook while
    # this replica runs): served on, said so (a restart of this version is refused instead).
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'fffffffffff'"))
    resp = await client.get("/readyz")
    assert resp.status == 200
    reason = (await resp.json())["checks"]["database"]["reason"]
    assert reason.startswith("reachable, schema at fffffffffff, newer than this gateway's "), reason

    async with db.engine.begin() as conn:  # an older schema: not ready until migrated
        await conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    resp = await client.get("/readyz")
    assert resp.status == 503
    reason = (await resp.json())["checks"]["database"]["reason"]
    assert reason.startswith("database schema at revision 0001, older than this gateway's "), reason

    async with db.engine.begin() as conn:  # no schema at all
        await conn.execute(text("DROP TABLE alembic_version"))
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "database schema missing" in (await resp.json())["checks"]["database"]["reason"]


async def test_a_taken_ops_port_is_a_clear_start_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Gateway(gateway_config(tmp_path, {"ops": {"listen": f"127.0.0.1:{port}"}}))
        with pytest.raises(
            GatewayStartError, match=rf"cannot listen for the ops listener on 127.0.0.1:{port}"
        ):
            await gw.start()
    assert gw.db is None  # everything that started was stopped


async def _scrape(client: TestClient[Any, Any]) -> dict[str, float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples = {}
    for line in (await resp.text()).splitlines():
        if line.startswith("openshell_gateway_sandboxes"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_count_sandboxes_and_drop_the_counts_when_the_store_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandboxes gauge is counted by the API's rule; a count that fails leaves the series out
    (no stale counts passed off as current), and says when the last good count was."""
    monkeypatch.setattr(gateway.metrics, "SANDBOX_COUNT_TTL_S", 0.0)  # every scrape counts again
    db = await Database.open(f"sqlite:///{tmp_path}/metrics.db")
    sandboxes = SandboxStore(db)
    metrics = GatewayMetrics(SessionRegistry())
    readiness = Readiness(db, grpc_serving=lambda: True)
    app = build_ops(
        metrics=metrics, sandboxes=sandboxes, readiness=readiness, liveness=LIVENESS, now=lambda: T0
    )
    try:
        async with TestClient(TestServer(app)) as client:
            for sid in ("a", "b", "c"):
                await sandboxes.ensure(sid, spec={"image": "x"})
            await sandboxes.mark_connected(
                "a", instance_id="i1", session_id="s1", journal_epoch="e1", owner="gw", at=T0
            )
            samples = await _scrape(client)
            assert samples['openshell_gateway_sandboxes{state="connected"}'] == 1
            assert samples['openshell_gateway_sandboxes{state="pending"}'] == 2
            counted = samples["openshell_gateway_sandboxes_counted_timestamp_seconds"]
            assert counted > 0

            async with db.engine.begin() as conn:  # the table is gone: every read fails
                await conn.execute(text("ALTER TABLE sandboxes RENAME TO sandboxes_away"))
            samples = await _scrape(client)
            assert not any(name.startswith("openshell_gateway_sandboxes{") for name in samples), samples
            assert samples["openshell_gateway_sandboxes_counted_timestamp_seconds"] == counted

            async with db.engine.begin() as conn:
                await conn.execute(text("ALTER TABLE sandboxes_away RENAME TO sandboxes"))
            samples = await _scrape(client)
            assert samples['openshell_gateway_sandboxes{state="connected"}'] == 1
        await metrics.close()
        await readiness.close()
    finally:
        await db.close()
