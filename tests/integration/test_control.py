"""Control and visibility of a real supervisor: commands through the gateway's API, and the
supervisor's own HTTP endpoints, with real processes on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import GatewayProcess, SupervisorProcess, free_port, wait_until

AGENT = textwrap.dedent(
    """
    import signal, sys, time
    def usr1(signum, frame):
        print("got USR1", flush=True)
    def term(signum, frame):
        print("bye", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGUSR1, usr1)
    signal.signal(signal.SIGTERM, term)
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
    """
)


def _http(method: str, url: str, body: object | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def test_signal_and_stop_commands_reach_the_main_process(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = SupervisorProcess(tmp_path / "ctl", "ctl", gateway.address, [sys.executable, "-u", "-c", AGENT])
    supervisors.append(sv)
    sv.start()
    wait_until(lambda: "ready" in gateway.log_lines("ctl"), timeout=30, what="the agent is up")
    api = f"http://127.0.0.1:{gateway.http_port}/api/v1"

    status, created = _http("POST", f"{api}/sandboxes/ctl/commands", {"kind": "signal", "signal": "SIGUSR1"})
    assert status == 201, created
    wait_until(lambda: "got USR1" in gateway.log_lines("ctl"), timeout=30, what="SIGUSR1 at the agent")
    wait_until(
        lambda: _http("GET", f"{api}/commands/{created['id']}")[1]["state"] == "applied",
        timeout=30,
        what="the signal command answered",
    )

    status, stop = _http("POST", f"{api}/sandboxes/ctl/commands", {"kind": "stop", "grace_ms": 5000})
    assert status == 201, stop
    assert sv.wait(timeout=60) == 0, sv.log_text()[-2000:]
    assert gateway.log_lines("ctl")[-1] == "bye"
    assert _http("GET", f"{api}/commands/{stop['id']}")[1]["state"] == "applied"
    audit = [e["message"] for e in gateway.events("ctl", "log") if e["stream"] == "supervisor"]
    assert any(created["id"] in line and "applied" in line for line in audit), audit


def test_a_real_supervisor_serves_health_readiness_metrics_and_status(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    port = free_port()
    sv = SupervisorProcess(
        tmp_path / "web",
        "web",
        gateway.address,
        [sys.executable, "-u", "-c", AGENT],
        settings=["http.enabled=true", f"http.listen=127.0.0.1:{port}"],
    )
    supervisors.append(sv)
    sv.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: "ready" in gateway.log_lines("web"), timeout=30, what="the agent is up")
    assert _http("GET", f"{base}/healthz")[0] == 200
    wait_until(lambda: _http("GET", f"{base}/readyz")[0] == 200, timeout=30, what="ready")
    wait_until(
        lambda: _http("GET", f"{base}/status")[1]["session"]["state"] == "connected",
        timeout=30,
        what="connected",
    )
    status = _http("GET", f"{base}/status")[1]
    assert status["sandbox_id"] == "web"
    assert status["main_process"]["running"] is True
    metrics = _http("GET", f"{base}/metrics")[1]
    assert "openshell_supervisor_session_connected 1.0" in metrics
    assert "openshell_supervisor_main_process_up 1.0" in metrics
    assert sv.proc is not None
    sv.proc.terminate()  # SIGTERM to the supervisor: forwarded, the agent says bye
    assert sv.wait(timeout=60) == 0
