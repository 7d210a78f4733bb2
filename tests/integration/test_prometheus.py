"""A real Prometheus scrapes the supervisor's /metrics, and we read the numbers back through its API.

Prometheus (Debian's ``prometheus`` package; installed with apt-get when missing, skipped with the
reason when that is impossible) runs as a subprocess on 127.0.0.1 with a free port, a temporary
TSDB and a config that scrapes the supervisor's endpoint every second. One endpoint is the real
:class:`supervisor.http.HttpServer` served in this test's event loop over a fake supervisor view,
so the test can change the state and watch the change arrive in Prometheus; another is a real
``python -m supervisor run`` process with its endpoints on, connected to a real gateway. What
this proves beyond the unit tests: Prometheus accepts our
exposition (content negotiation, OpenMetrics, names, types) and the series carry the values.
``promtool check metrics`` also lints the exposition the way Prometheus's own tooling does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from supervisor.http import HttpServer, HttpSettings
from tests.support.procs import free_port
from tests.support.supervisor_view import FakeView, journal_stats

SCRAPE_INTERVAL = "1s"


def _find_or_install(binary: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is missing and cannot be installed here (needs root and apt-get)")
    try:
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get install prometheus timed out")
    found = shutil.which(binary)
    if not found:
        pytest.skip(f"apt-get install prometheus failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return found


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return _find_or_install("prometheus")


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        # scrape_timeout defaults to 10s, which must not exceed the interval.
        self.config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: supervisor\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own group, so the teardown can reach anything it might start.
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
async def supervisor_view() -> FakeView:
    view = FakeView(sandbox_id="prom-sbx", instance_id="prom-inst")
    view.start_main(os.getpid())
    view.connect("sess-1")
    return view


@pytest.fixture
async def metrics_server(supervisor_view: FakeView) -> AsyncIterator[HttpServer]:
    server = HttpServer(HttpSettings(enabled=True, listen="127.0.0.1:0"), supervisor_view)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path, metrics_server: HttpServer) -> Iterator[Prometheus]:
    prom = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{metrics_server.port}")
    try:
        yield prom
    finally:
        prom.stop()
    assert prom.proc.returncode is not None


async def query(http: aiohttp.ClientSession, prom: Prometheus, promql: str) -> list[dict[str, Any]]:
    async with http.get(f"{prom.url}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def wait_for_value(
    http: aiohttp.ClientSession, prom: Prometheus, promql: str, expected: str, within: float = 60.0
) -> dict[str, Any]:
    """Poll the query API until ``promql`` returns one series with value ``expected``."""
    deadline = time.monotonic() + within
    last: object = None
    while True:
        if prom.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {prom.proc.returncode}:\n{prom.log_text()}")
        try:
            result = await query(http, prom, promql)
        except aiohttp.ClientError as exc:  # not listening yet
            last = exc
        else:
            last = result
            if len(result) == 1 and result[0]["value"][1] == expected:
                return result[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{promql} never returned {expected} within {within:.0f}s; last answer: {last}\n"
                f"prometheus log:\n{prom.log_text()}"
            )
        await asyncio.sleep(0.25)


async def test_prometheus_scrapes_and_serves_the_supervisor_metrics(
    prometheus: Prometheus, supervisor_view: FakeView, metrics_server: HttpServer
) -> None:
    view = supervisor_view
    metrics_server.metrics.observe_rtt(0.002)
    metrics_server.metrics.observe_rtt(0.04)
    view.journal_stats = journal_stats(dropped_records_total=5, bytes_on_disk=123456)

    async with aiohttp.ClientSession() as http:
        series = await wait_for_value(http, prometheus, "openshell_supervisor_session_connected", "1")
        assert series["metric"]["job"] == "supervisor"
        assert series["metric"]["instance"] == f"127.0.0.1:{metrics_server.port}"

        # The target is healthy: Prometheus accepted the exposition as a whole.
        async with http.get(f"{prometheus.url}/api/v1/targets") as resp:
            targets = (await resp.json())["data"]["activeTargets"]
        assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]

        await wait_for_value(http, prometheus, "openshell_supervisor_main_process_up", "1")
        await wait_for_value(http, prometheus, "openshell_supervisor_journal_bytes", "123456")
        await wait_for_value(http, prometheus, "openshell_supervisor_journal_dropped_records_total", "5")
        await wait_for_value(http, prometheus, "openshell_supervisor_heartbeat_rtt_seconds_count", "2")
        await wait_for_value(
            http, prometheus, 'openshell_supervisor_heartbeat_rtt_seconds_bucket{le="0.005"}', "1"
        )
        info = await wait_for_value(http, prometheus, "openshell_supervisor_info", "1")
        assert info["metric"]["sandbox_id"] == "prom-sbx"
        # The supervisor's own process metrics come through the same registry.
        rss = await query(http, prometheus, "process_resident_memory_bytes")
        assert len(rss) == 1
        assert float(rss[0]["value"][1]) > 0

        # A cut: the next scrapes see the session down and a reconnect counted once it is back.
        view.session_status.state = "backoff"
        view.session_status.connected_since = None
        await wait_for_value(http, prometheus, "openshell_supervisor_session_connected", "0")
        await wait_for_value(http, prometheus, 'openshell_supervisor_session_state{state="backoff"}', "1")
        view.connect("sess-2")
        await wait_for_value(http, prometheus, "openshell_supervisor_session_connected", "1")
        await wait_for_value(http, prometheus, "openshell_supervisor_session_reconnects_total", "1")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        _find_or_install("prometheus")
        promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return promtool


async def assert_promtool_accepts(exposition: bytes) -> None:
    """``promtool check metrics`` lints the exposition the way Prometheus's own tooling does."""
    proc = await asyncio.create_subprocess_exec(
        _promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(exposition), 30)
    assert proc.returncode == 0, out.decode()


async def test_promtool_accepts_the_exposition(metrics_server: HttpServer) -> None:
    metrics_server.metrics.observe_rtt(0.01)
    async with aiohttp.ClientSession() as http, http.get(f"{metrics_server.url}/metrics") as resp:
        text = await resp.read()
    await assert_promtool_accepts(text)


async def test_prometheus_scrapes_a_real_supervisor_process(prometheus_binary: str, tmp_path: Path) -> None:
    """The same, end to end: ``python -m supervisor run`` with its endpoints on, a real gateway."""
    import sys

    from tests.support.procs import GatewayProcess, SupervisorProcess

    gateway = GatewayProcess(tmp_path / "gw")
    port = free_port()
    sv = SupervisorProcess(
        tmp_path / "sv",
        "prom-real",
        gateway.address,
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        settings=["http.enabled=true", f"http.listen=127.0.0.1:{port}"],
    )
    prom: Prometheus | None = None
    try:
        gateway.start()
        sv.start()
        prom = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            await wait_for_value(http, prom, "openshell_supervisor_session_connected", "1")
            await wait_for_value(http, prom, "openshell_supervisor_main_process_up", "1")
            info = await query(http, prom, "openshell_supervisor_info")
            assert info and info[0]["metric"]["sandbox_id"] == "prom-real", info
            # The supervisor heartbeats every 0.5 s here (the test gateway's interval): round trips
            # are observed into the histogram.
            await wait_for_value(http, prom, "openshell_supervisor_heartbeat_rtt_seconds_count > bool 0", "1")
        assert sv.proc is not None
        sv.proc.terminate()
        assert sv.wait(timeout=30) == 143
    finally:
        if prom is not None:
            prom.stop()
        sv.stop()
        gateway.stop()


async def test_prometheus_scrapes_the_gateway(prometheus_binary: str, tmp_path: Path) -> None:
    """The gateway's /metrics (what the chart's ServiceMonitor scrapes), read back through Prometheus."""
    import sys

    from tests.support.procs import GatewayProcess, SupervisorProcess

    gateway = GatewayProcess(tmp_path / "gw")
    sv = SupervisorProcess(
        tmp_path / "sv",
        "prom-gw",
        gateway.address,
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
    )
    prom: Prometheus | None = None
    try:
        gateway.start()
        prom = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{gateway.ops_port}")
        async with aiohttp.ClientSession() as http:
            await wait_for_value(http, prom, "openshell_gateway_sessions", "0")
            sv.start()
            await wait_for_value(http, prom, "openshell_gateway_sessions", "1")
            await wait_for_value(http, prom, "openshell_gateway_sessions_accepted_total", "1")
            await wait_for_value(http, prom, "openshell_gateway_events_received_total > bool 0", "1")
            await wait_for_value(
                http, prom, "openshell_gateway_event_batch_store_seconds_count > bool 0", "1"
            )
            build = await query(http, prom, "openshell_gateway_build_info")
            assert build and build[0]["metric"]["version"], build
            async with http.get(f"http://127.0.0.1:{gateway.ops_port}/metrics") as resp:
                exposition = await resp.read()
            assert sv.proc is not None
            sv.proc.terminate()
            assert sv.wait(timeout=30) == 143
            await wait_for_value(http, prom, "openshell_gateway_sessions", "0")
    finally:
        if prom is not None:
            prom.stop()
        sv.stop()
        gateway.stop()
    await assert_promtool_accepts(exposition)


def test_promtool_accepts_the_charts_alert_rules(tmp_path: Path) -> None:
    """The PrometheusRule the chart renders holds rules Prometheus loads, on metrics that exist."""
    import re

    import helm_python
    import yaml
    from prometheus_client import generate_latest

    from gateway.metrics import GatewayMetrics, note_leader
    from gateway.sessions import SessionRegistry
    from tests.support.procs import REPO

    rendered = helm_python.Chart.load(str(REPO / "helm" / "openshell")).render(
        {"monitoring": {"prometheusRule": {"enabled": True}}}, name="openshell", namespace="openshell"
    )
    texts = [text for path, text in rendered.items() if path.endswith(".yaml")]
    docs = [d for text in texts for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    (rule,) = [d for d in docs if d.get("kind") == "PrometheusRule"]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run([_promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every gateway series an alert reads, or the Grafana dashboard charts, is one the gateway
    # exposes: a rule on a misspelt name would load fine and never fire.
    metrics = GatewayMetrics(SessionRegistry())
    metrics.sessions_rejected.labels("REJECT_CODE_PROTOCOL_ERROR").inc()
    # The leader gauge is exported only while an election runs: as a replica that leads.
    metrics.replica_id = "rules-test"
    note_leader("rules-test", True)
    try:
        exposition = generate_latest(metrics.registry).decode()
        families = list(metrics.registry.collect())
    finally:
        note_leader("rules-test", None)
    exposed = set(re.findall(r"^(openshell_gateway_\w+)", exposition, re.M))
    # A labelled counter with no child yet (admission refusals, database errors) has no sample
    # line: its samples' names are the family's name and its type's suffixes.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in families:
        exposed |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    used = set(re.findall(r"openshell_gateway_\w+", exprs))
    assert used, "the rules alert on the gateway's own metrics"
    assert used <= exposed, used - exposed
    for path in sorted((REPO / "helm" / "openshell" / "dashboards").glob("*.json")):
        charted = set(re.findall(r"openshell_gateway_\w+", path.read_text()))
        assert charted <= exposed, (path.name, charted - exposed)
