"""OpenTelemetry export, received by a real OTLP/gRPC receiver (tests/support/otlp_receiver.py).

The receiver runs in this test's event loop; the supervisor runs as its own process
(``python -m supervisor run``) against a real gateway, with telemetry pointed at the receiver and a
one-second metric interval. What is proven: the main process's lines arrive as OTel log records
(body, severity by stream, journal sequence, the sandbox in the resource), the supervisor's state
arrives as OTLP metrics under the openshell names (session connected, main process up, its last
exit code after the exit), and an endpoint that is down changes neither the exit code nor how
quickly the supervisor exits, and costs one warning line, no traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.telemetry import INSTRUMENTS, METRIC_PREFIX, Telemetry, TelemetrySettings
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import GatewayProcess, SupervisorProcess, free_port
from tests.support.supervisor_view import FakeView, journal_stats

SESSION_CONNECTED = METRIC_PREFIX + "session_connected"


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    rx = OtlpReceiver()
    await rx.start()
    try:
        yield rx
    finally:
        await rx.stop()


def gated_writer(release: Path, exit_code: int) -> list[str]:
    """Prints known lines on both streams, waits for ``release`` to exist, exits with ``exit_code``."""
    script = textwrap.dedent(
        """
        import os, sys, time
        release, code = sys.argv[1], int(sys.argv[2])
        print("otlp hello from stdout", flush=True)
        print("otlp second line", flush=True)
        print("otlp oops on stderr", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("otlp last words", flush=True)
        sys.exit(code)
        """
    )
    return [sys.executable, "-u", "-c", script, str(release), str(exit_code)]


def telemetry_settings(endpoint: str) -> list[str]:
    return [
        "telemetry.enabled=true",
        f"telemetry.endpoint={endpoint}",
        "telemetry.export_interval_s=1",
    ]


async def test_logs_and_metrics_reach_a_real_otlp_receiver(
    tmp_path: Path, receiver: OtlpReceiver, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    await asyncio.to_thread(gateway.start)
    release = tmp_path / "release"
    sv = SupervisorProcess(
        tmp_path / "sv",
        "otlp-sbx",
        gateway.address,
        gated_writer(release, 3),
        settings=[*telemetry_settings(receiver.endpoint), "instance_id=otlp-inst"],
    )
    supervisors.append(sv)
    sv.start()

    def bodies() -> set[str]:
        return {str(r.body) for r in receiver.logs()}

    expected = {"otlp hello from stdout", "otlp second line", "otlp oops on stderr"}
    await receiver.wait_for(lambda: expected <= bodies(), within=60, what="the main process's lines")
    await receiver.wait_for(
        lambda: receiver.last_value(SESSION_CONNECTED) == 1.0, within=60, what="session_connected == 1"
    )
    assert receiver.last_value(METRIC_PREFIX + "main_process_up") == 1.0
    assert receiver.last_value(METRIC_PREFIX + "session_state", state="connected") == 1.0
    assert receiver.last_value(METRIC_PREFIX + "session_state", state="backoff") == 0.0

    records = {str(r.body): r for r in receiver.logs()}
    h, o = records["otlp hello from stdout"], records["otlp oops on stderr"]
    for r in (h, o):
        assert r.resource["service.name"] == "openshell-supervisor"
        assert r.resource["service.instance.id"] == "otlp-inst"
        assert r.resource["openshell.sandbox_id"] == "otlp-sbx"
        assert r.time_unix_nano > 0
    # SeverityNumber INFO is 9, WARN 13.
    assert (h.severity_number, h.severity_text, h.attributes["log.iostream"]) == (9, "INFO", "stdout")
    assert (o.severity_number, o.severity_text, o.attributes["log.iostream"]) == (13, "WARN", "stderr")
    # The journal sequence the line was journaled under: the gateway stored it under the same one.
    seq = h.attributes["openshell.sequence"]
    assert isinstance(seq, int)
    assert seq > 0
    assert records["otlp second line"].attributes["openshell.sequence"] == seq + 1

    point = receiver.points(SESSION_CONNECTED)[-1]
    assert point.kind == "gauge"
    assert point.resource["openshell.sandbox_id"] == "otlp-sbx"
    attempts = receiver.points(METRIC_PREFIX + "session_connect_attempts")[-1]
    assert (attempts.kind, attempts.monotonic) == ("sum", True)
    assert attempts.value >= 1

    release.touch()
    code = await asyncio.to_thread(sv.wait, 60)
    assert code == 3, sv.log_text()[-4000:]
    # Shutdown flushed the last line and exported the final state once more.
    assert "otlp last words" in bodies()
    assert receiver.last_value(METRIC_PREFIX + "main_process_up") == 0.0
    assert receiver.last_value(METRIC_PREFIX + "main_process_last_exit_code") == 3.0
    log_text = sv.log_text()
    assert "telemetry export started" in log_text
    assert "telemetry: exporting" not in log_text, log_text[-4000:]
    assert "Traceback" not in log_text
    # Telemetry is a side channel: the gateway has the same lines through the session.
    stored = await asyncio.to_thread(gateway.log_lines, "otlp-sbx")
    assert expected <= set(stored)


def quick_writer(exit_code: int) -> list[str]:
    script = "import sys\nfor i in range(50): print('closed-port line', i)\nsys.exit(int(sys.argv[1]))"
    return [sys.executable, "-u", "-c", script, str(exit_code)]


async def run_alone(tmp_path: Path, name: str, settings: list[str]) -> tuple[int, float, str]:
    """A supervisor with no gateway to reach; its exit code, how long it ran, its log."""
    sv = SupervisorProcess(
        tmp_path / name,
        f"otlp-{name}",
        f"127.0.0.1:{free_port()}",
        quick_writer(7),
        settings=["session.exit_flush_timeout_s=0", *settings],
    )
    started = time.monotonic()
    sv.start()
    try:
        code = await asyncio.to_thread(sv.wait, 60)
    finally:
        sv.stop()
    return code, time.monotonic() - started, sv.log_text()


async def test_a_dead_endpoint_changes_neither_the_exit_code_nor_the_exit(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    baseline_code, baseline_s, _ = await run_alone(tmp_path, "baseline", [])
    code, elapsed_s, log_text = await run_alone(tmp_path, "dead", telemetry_settings(closed))
    assert baseline_code == 7
    assert code == 7, log_text[-4000:]
    # Generous: the shutdown may wait at most SHUTDOWN_TIMEOUT_S (3 s), and a dead endpoint is
    # skipped rather than waited on, so this is far below the bound in practice.
    assert elapsed_s < baseline_s + 8, (elapsed_s, baseline_s, log_text[-4000:])
    assert "telemetry export started" in log_text
    assert "Traceback" not in log_text, log_text[-4000:]
    warnings = [line for line in log_text.splitlines() if "telemetry: exporting" in line and "failed" in line]
    assert len(warnings) <= 1, warnings


async def test_a_dead_endpoint_is_reported_once_while_the_supervisor_runs(
    tmp_path: Path, supervisors: list[SupervisorProcess]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    release = tmp_path / "release"
    sv = SupervisorProcess(
        tmp_path / "sv",
        "otlp-dead-running",
        f"127.0.0.1:{free_port()}",
        gated_writer(release, 0),
        settings=[*telemetry_settings(closed), "session.exit_flush_timeout_s=0"],
    )
    supervisors.append(sv)
    sv.start()
    deadline = time.monotonic() + 60
    while "telemetry: exporting" not in sv.log_text():
        assert time.monotonic() < deadline, sv.log_text()[-4000:]
        assert sv.proc is not None
        assert sv.proc.poll() is None, sv.log_text()[-4000:]
        await asyncio.sleep(0.2)
    await asyncio.sleep(3)  # a few more failed exports: still one warning
    release.touch()
    assert await asyncio.to_thread(sv.wait, 60) == 0
    text = sv.log_text()
    warnings = [line for line in text.splitlines() if "telemetry: exporting" in line]
    assert len(warnings) == 1, warnings
    assert "127.0.0.1" in warnings[0]
    assert "Traceback" not in text


# -- in process: every instrument, and the settings ------------------------------------------


async def test_every_instrument_is_exported_from_the_view(receiver: OtlpReceiver) -> None:
    view = FakeView(sandbox_id="view-sbx", instance_id="view-inst")
    view.start_main(os.getpid())
    view.connect("s-1")
    view.session_status.last_rtt_ms = 2.5
    view.last_exit_code = 0
    view.journal_stats = journal_stats(dropped_records_total=5, bytes_on_disk=123456)
    telemetry = Telemetry(
        TelemetrySettings(enabled=True, endpoint=receiver.endpoint, export_interval_s=0.5, logs=False), view
    )
    telemetry.start()
    try:
        names = {METRIC_PREFIX + i.name for i in INSTRUMENTS}
        await receiver.wait_for(
            lambda: names <= {p.name for p in receiver.points()}, within=30, what="every instrument"
        )
    finally:
        await telemetry.stop()
    assert receiver.last_value(METRIC_PREFIX + "journal_bytes") == 123456
    assert receiver.last_value(METRIC_PREFIX + "journal_dropped_records") == 5
    assert receiver.last_value(METRIC_PREFIX + "journal_unacked_records") == 2
    assert receiver.last_value(METRIC_PREFIX + "heartbeat_rtt") == pytest.approx(0.0025)
    kinds = {p.name: (p.kind, p.monotonic) for p in receiver.points()}
    for instrument in INSTRUMENTS:
        expected = ("gauge", False) if instrument.kind == "gauge" else ("sum", True)
        assert kinds[METRIC_PREFIX + instrument.name] == expected, instrument.name
    assert not telemetry.running
    assert telemetry.health.failures == 0


def test_settings_are_checked() -> None:
    assert TelemetrySettings().enabled is False
    for good in ("http://collector:4317", "https://otel.example.com:443", "collector.monitoring:4317"):
        assert TelemetrySettings(endpoint=good).endpoint == good
    for bad in ("ftp://x:1", "http://collector", "collector", "http://:4317"):
        with pytest.raises(ValidationError):
            TelemetrySettings(endpoint=bad)
    with pytest.raises(ValidationError):
        TelemetrySettings(headers={"Authorization": "Bearer x"})
    with pytest.raises(ValidationError):
        TelemetrySettings.model_validate({"unknown": 1})
