"""The supervisor's /healthz, /readyz, /metrics and /status, and its readiness checks.

The endpoints are served by aiohttp's real test server over a fake supervisor view; the checks
run against real things: commands, a listening (or closed) port on 127.0.0.1, a tiny aiohttp
server answering 200 or 500.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from supervisor.http import HttpServer, HttpSettings, HttpStartError, build_app
from supervisor.metrics import SupervisorMetrics
from supervisor.readiness import (
    ReadinessProbe,
    ReadinessSettings,
    check_command,
    check_http,
    check_tcp,
)
from tests.support.supervisor_view import FakeView, journal_stats

Client = TestClient[Any, Any]
PROBE = web.AppKey("probe", ReadinessProbe)
METRICS = web.AppKey("metrics", SupervisorMetrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def make_client(view: FakeView, readiness: ReadinessSettings | None = None, stale_s: float = 10.0) -> Client:
    metrics = SupervisorMetrics(view)
    probe = ReadinessProbe(
        readiness or ReadinessSettings(), lambda: view.main_pid if view.main_running else None
    )
    metrics.set_ready_source(lambda: probe.verdict(view.main_running).ready)
    app = build_app(view, metrics, probe, healthz_stale_after_s=stale_s)
    app[PROBE] = probe
    app[METRICS] = metrics
    return TestClient(TestServer(app))


def app_of(client: Client) -> web.Application:
    assert isinstance(client.server, TestServer)
    return client.server.app


@pytest.fixture
async def view() -> FakeView:
    return FakeView()


@pytest.fixture
async def client(view: FakeView) -> AsyncIterator[Client]:
    async with make_client(view) as c:
        yield c


async def get(client: Client, path: str, status: int) -> dict[str, Any]:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    return body


# -- /healthz ------------------------------------------------------------------------------


async def test_healthz_follows_the_loop_heartbeat(view: FakeView) -> None:
    async with make_client(view, stale_s=5.0) as c:
        body = await get(c, "/healthz", 200)
        assert body["alive"] is True
        view.loop_heartbeat = time.monotonic() - 6.0
        body = await get(c, "/healthz", 503)
        assert body["alive"] is False
        assert "silent for 6" in body["reason"]
        view.loop_heartbeat = time.monotonic()
        await get(c, "/healthz", 200)


async def test_healthz_ignores_main_process_and_session(client: Client, view: FakeView) -> None:
    # A sandbox whose agent exited, cut off from its gateway, still has a live supervisor: the
    # kubelet must not kill the pod for it.
    view.exit_main(1)
    view.session_status.state = "backoff"
    await get(client, "/healthz", 200)


# -- /readyz transitions -------------------------------------------------------------------


async def test_readyz_without_check_follows_the_main_process(client: Client, view: FakeView) -> None:
    body = await get(client, "/readyz", 503)
    assert body == {"ready": False, "reason": "main process not running"}
    view.start_main(4242)
    assert (await get(client, "/readyz", 200))["ready"] is True
    view.exit_main(0)
    assert (await get(client, "/readyz", 503))["reason"] == "main process not running"


async def test_readyz_transitions_with_a_command_check(view: FakeView, tmp_path: Any) -> None:
    flag = tmp_path / "ready"
    settings = ReadinessSettings(kind="command", command=["test", "-e", str(flag)], timeout_s=5)
    async with make_client(view, settings) as c:
        probe = app_of(c)[PROBE]
        # Not running: not ready, whatever the check would say.
        assert (await get(c, "/readyz", 503))["reason"] == "main process not running"

        view.start_main(1000)
        body = await get(c, "/readyz", 503)
        assert body["reason"] == "command check has not run yet for this main process"

        await probe.check_once()
        body = await get(c, "/readyz", 503)
        assert body["reason"].startswith("command check failing: exit 1")

        flag.touch()
        await probe.check_once()
        body = await get(c, "/readyz", 200)
        assert body == {"ready": True, "reason": "command check passing: exit 0"}

        # A restarted main process is not ready on its predecessor's result.
        view.exit_main(137)
        view.start_main(1001)
        assert "not run yet" in (await get(c, "/readyz", 503))["reason"]
        await probe.check_once()
        await get(c, "/readyz", 200)


async def test_probe_task_drives_readyz_through_tcp_transitions(view: FakeView) -> None:
    """The real probe task, on its own period, against a port that opens and closes."""
    port = free_port()
    settings = ReadinessSettings(kind="tcp", address=f"127.0.0.1:{port}", period_s=0.05, timeout_s=1)
    server = HttpServer(HttpSettings(enabled=True, listen="127.0.0.1:0"), view, readiness=settings)
    await server.start()
    listener: asyncio.Server | None = None
    try:
        async with aiohttp.ClientSession() as http:

            async def readyz() -> tuple[int, dict[str, Any]]:
                async with http.get(f"{server.url}/readyz") as resp:
                    return resp.status, await resp.json()

            view.start_main(os.getpid())

            async def failing() -> bool:
                status, body = await readyz()
                return status == 503 and body["reason"].startswith("tcp check failing: connect to")

            await eventually(failing, "readyz 503 with the tcp failure")

            async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.close()

            listener = await asyncio.start_server(on_connect, "127.0.0.1", port)

            async def passing() -> bool:
                status, body = await readyz()
                return status == 200 and body["reason"] == "tcp check passing: connected"

            await eventually(passing, "readyz 200 once the port listens")

            listener.close()
            await listener.wait_closed()
            listener = None
            await eventually(failing, "readyz 503 again once the port closed")

            view.exit_main(0)
            status, body = await readyz()
            assert (status, body["reason"]) == (503, "main process not running")
    finally:
        if listener is not None:
            listener.close()
        await server.stop()


# -- the checks themselves -----------------------------------------------------------------


async def test_command_check_passes_on_exit_zero_and_reports_failures() -> None:
    assert await check_command(["true"], 5) == (True, "exit 0")
    assert await check_command(["false"], 5) == (False, "exit 1")
    ok, detail = await check_command(["sh", "-c", "echo warming up; echo not yet >&2; exit 3"], 5)
    assert not ok
    assert detail == "exit 3: warming up\nnot yet"
    ok, detail = await check_command(["/nonexistent/check"], 5)
    assert not ok
    assert detail.startswith("cannot run '/nonexistent/check'")


async def test_command_check_timeout_kills_the_whole_group(tmp_path: Any) -> None:
    pidfile = tmp_path / "child.pid"
    began = time.monotonic()
    # The check leaves a grandchild behind; the timeout must take it too.
    ok, detail = await check_command(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], 0.3)
    assert not ok
    assert detail == "timed out after 0.3s"
    assert time.monotonic() - began < 5
    grandchild = int(pidfile.read_text())
    for _ in range(100):
        # Gone, or a zombie waiting for whoever inherited it: either way no longer running.
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the check's grandchild survived its timeout")


async def test_tcp_check_against_listening_and_closed_ports() -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await check_tcp(f"127.0.0.1:{port}", 2) == (True, "connected")
    finally:
        server.close()
        await server.wait_closed()
    ok, detail = await check_tcp(f"127.0.0.1:{port}", 2)
    assert not ok
    assert detail.startswith(f"connect to 127.0.0.1:{port}")


async def test_http_check_against_200_500_redirect_and_refused() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="no")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/moved", moved)
    app.router.add_get("/slow", slow)
    async with TestServer(app) as srv, aiohttp.ClientSession() as http:
        base = str(srv.make_url("")).rstrip("/")
        assert await check_http(http, f"{base}/ok", 2) == (True, "HTTP 200")
        assert await check_http(http, f"{base}/broken", 2) == (False, f"GET {base}/broken: HTTP 500")
        assert await check_http(http, f"{base}/moved", 2) == (False, f"GET {base}/moved: HTTP 302")
        assert await check_http(http, f"{base}/slow", 0.2) == (
            False,
            f"GET {base}/slow timed out after 0.2s",
        )
        port = free_port()
        refused, detail = await check_http(http, f"http://127.0.0.1:{port}/", 2)
        assert not refused
        assert detail.startswith(f"GET http://127.0.0.1:{port}/:")


async def test_http_probe_reports_through_readyz(view: FakeView) -> None:
    healthy = True

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy else 500)

    app = web.Application()
    app.router.add_get("/ready", ready)
    async with TestServer(app) as srv:
        settings = ReadinessSettings(kind="http", url=str(srv.make_url("/ready")))
        async with make_client(view, settings) as c:
            probe = app_of(c)[PROBE]
            view.start_main(77)
            await probe.check_once()
            await get(c, "/readyz", 200)
            healthy = False
            await probe.check_once()
            assert (await get(c, "/readyz", 503))["reason"].endswith("HTTP 500")


def test_readiness_settings_are_validated() -> None:
    assert ReadinessSettings().kind == "none"
    with pytest.raises(ValidationError, match="kind=command needs"):
        ReadinessSettings(kind="command")
    with pytest.raises(ValidationError, match="kind=tcp needs"):
        ReadinessSettings(kind="tcp", address="localhost")
    with pytest.raises(ValidationError, match="kind=http needs"):
        ReadinessSettings(kind="http", url="localhost:80/ready")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ReadinessSettings.model_validate({"kind": "none", "port": 80})
    with pytest.raises(ValidationError, match="Extra inputs"):
        HttpSettings.model_validate({"listen": "127.0.0.1:0", "tls": True})


# -- /metrics ------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_read_the_current_state(client: Client, view: FakeView) -> None:
    metrics = app_of(client)[METRICS]
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    got = samples(await resp.text())
    p = "openshell_supervisor_"
    assert got[(p + "session_connected", ())] == 0
    assert got[(p + "main_process_up", ())] == 0
    assert got[(p + "ready", ())] == 0
    assert got[(p + "journal_bytes", ())] == 4096
    assert got[(p + "journal_unacked_records", ())] == 2
    assert got[
        (p + "info", (("instance_id", "inst-1"), ("sandbox_id", "sbx-1"), ("version", got_version(got))))
    ]
    # The supervisor's own process metrics; the main process's are absent while there is none.
    assert got[("process_resident_memory_bytes", ())] > 0
    assert not any(name.startswith(p + "main_process_cpu") for name, _ in got)

    # Two sessions (one reconnect) out of three attempts, drops and corruption counted, the main
    # process (this test process, for real /proc numbers) restarted once.
    view.connect("s-1")
    view.session_status.attempts += 1
    view.connect("s-2")
    view.session_status.auth_refusals = 2
    view.session_status.auth_refusal_codes = {"UNAUTHENTICATED": 2}
    view.journal_stats = journal_stats(
        dropped_records_total=7,
        corrupt_records_total=2,
        records=40,
        write_failed_records_total=5,
        write_errors_total=3,
    )
    view.start_main(os.getpid())
    view.exit_main(1)
    view.start_main(os.getpid())
    for rtt in (0.0004, 0.003, 0.2):
        metrics.observe_rtt(rtt)

    got = samples(await (await client.get("/metrics")).text())
    assert got[(p + "session_connected", ())] == 1
    assert got[(p + "session_state", (("state", "connected"),))] == 1
    assert got[(p + "session_state", (("state", "backoff"),))] == 0
    assert got[(p + "session_reconnects_total", ())] == 1
    assert got[(p + "session_connect_attempts_total", ())] == 3
    assert got[(p + "auth_refusals_total", (("code", "UNAUTHENTICATED"),))] == 2
    assert got[(p + "auth_refusals_total", (("code", "PERMISSION_DENIED"),))] == 0
    assert got[(p + "journal_records", ())] == 40
    assert got[(p + "journal_dropped_records_total", ())] == 7
    assert got[(p + "journal_corrupt_records_total", ())] == 2
    assert got[(p + "journal_write_failed_records_total", ())] == 5
    assert got[(p + "journal_write_errors_total", ())] == 3
    assert got[(p + "main_process_up", ())] == 1
    assert got[(p + "main_process_restarts_total", ())] == 1
    assert got[(p + "main_process_last_exit_code", ())] == 1
    assert got[(p + "ready", ())] == 1
    assert got[(p + "main_process_resident_memory_bytes", ())] > 0
    assert got[(p + "heartbeat_rtt_seconds_count", ())] == 3
    assert got[(p + "heartbeat_rtt_seconds_bucket", (("le", "0.001"),))] == 1
    assert got[(p + "heartbeat_rtt_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[(p + "heartbeat_rtt_seconds_bucket", (("le", "+Inf"),))] == 3


def got_version(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    for name, labels in got:
        if name == "openshell_supervisor_info":
            return dict(labels)["version"]
    raise AssertionError("no openshell_supervisor_info")


async def test_metrics_speak_openmetrics_when_asked(client: Client) -> None:
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await resp.text()
    assert text.rstrip().endswith("# EOF")
    assert "openshell_supervisor_session_connected 0" in text


def test_each_supervisor_has_its_own_registry() -> None:
    # The global registry would refuse the second set of names.
    a, b = SupervisorMetrics(FakeView()), SupervisorMetrics(FakeView())
    a.observe_rtt(0.01)
    assert a.registry.get_sample_value("openshell_supervisor_heartbeat_rtt_seconds_count") == 1
    assert b.registry.get_sample_value("openshell_supervisor_heartbeat_rtt_seconds_count") == 0


# -- /status -------------------------------------------------------------------------------


async def test_status_is_the_whole_picture(client: Client, view: FakeView) -> None:
    view.start_main(4321)
    view.connect("sess-9")
    view.session_status.last_rtt_ms = 3.5
    doc = await get(client, "/status", 200)
    assert doc["sandbox_id"] == "sbx-1"
    assert doc["instance_id"] == "inst-1"
    assert doc["supervisor"]["alive"] is True
    main = doc["main_process"]
    assert main["pid"] == 4321
    assert main["running"] is True
    assert main["restarts"] == 0
    assert main["last_exit_code"] is None
    assert abs(main["started_at"] - time.time()) < 60
    s = doc["session"]
    assert s["state"] == "connected"
    assert s["connected"] is True
    assert s["mode"] == "events"
    assert s["session_id"] == "sess-9"
    assert (s["attempts"], s["sessions"], s["reconnects"]) == (1, 1, 0)
    assert s["last_rtt_ms"] == 3.5
    assert abs(s["connected_since"] - time.time()) < 60
    assert s["connected_for_s"] >= 0
    j = doc["journal"]
    assert j["bytes_on_disk"] == 4096
    assert j["unacked_records"] == 2
    assert j["dropped_records_total"] == 0
    r = doc["readiness"]
    assert r == {"ready": True, "reason": "main process running", "kind": "none", "last_check": None}


async def test_unknown_paths_and_methods_answer_json(client: Client) -> None:
    body = await get(client, "/nope", 404)
    assert body == {"error": "Not Found"}
    resp = await client.post("/status")
    assert resp.status == 405
    assert (await resp.json()) == {"error": "Method Not Allowed"}
    assert "GET" in resp.headers["Allow"]


# -- the server ----------------------------------------------------------------------------


async def test_server_starts_on_a_free_port_and_stops(view: FakeView) -> None:
    server = HttpServer(HttpSettings(enabled=True, listen="127.0.0.1:0"), view)
    await server.start()
    try:
        assert server.port > 0
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        # A second server on the same port reports the address instead of crashing.
        taken = HttpServer(HttpSettings(enabled=True, listen=f"127.0.0.1:{server.port}"), view)
        with pytest.raises(HttpStartError, match=f"cannot listen for HTTP on 127.0.0.1:{server.port}"):
            await taken.start()
    finally:
        await server.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    with pytest.raises(HttpStartError, match="is not host:port"):
        await HttpServer(HttpSettings(listen="nowhere"), view).start()
