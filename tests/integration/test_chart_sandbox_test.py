"""The chart's opt-in `helm test` script (helm/openshell/files/sandbox-test.py, tests.sandbox) against
a real gateway: a gateway process on SQLite with the local driver, whose sandbox runs a real
supervisor that dials it. The script, run with the environment the chart's test pod gets, creates
the sandbox, sees it connect, deletes it and exits 0; against a sandbox whose command exits before
its supervisor can connect, or an API that refuses, it fails with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from tests.support.procs import REPO, GatewayProcess

CHART = REPO / "helm" / "openshell"
SCRIPT = CHART / "files" / "sandbox-test.py"


def _test_pod_env() -> dict[str, str]:
    """The environment the chart gives its sandbox test pod (tests.sandbox.enabled)."""
    values = {"tests": {"sandbox": {"enabled": True}}, "auth": {"allowUnauthenticatedApi": True}}
    rendered = helm.Chart.load(CHART).render(values, name="openshell", namespace="openshell")
    docs = list(yaml.safe_load_all(rendered["openshell/templates/tests/test-sandbox.yaml"]))
    (pod,) = [d for d in docs if d and d["kind"] == "Pod"]
    (configmap,) = [d for d in docs if d and d["kind"] == "ConfigMap"]
    assert configmap["data"]["sandbox-test.py"] == SCRIPT.read_text()  # the file, unchanged
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python3", "/etc/openshell-test/sandbox-test.py"]
    return {e["name"]: e["value"] for e in container["env"]}


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _sandboxes(gateway: GatewayProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/api/v1/sandboxes", timeout=5) as r:
        listed: list[dict[str, Any]] = json.loads(r.read())["sandboxes"]
    return listed


def test_the_sandbox_test_creates_a_sandbox_sees_it_connect_and_deletes_it(tmp_path: Path) -> None:
    chart_env = _test_pod_env()
    assert chart_env["OPENSHELL_TEST_API"] == "http://openshell-gateway.openshell.svc:7080"
    gateway = GatewayProcess(tmp_path / "gw", extra=["--set", f"drivers.local.work_dir={tmp_path / 'sb'}"])
    gateway.start()
    try:
        env = {
            **chart_env,
            "OPENSHELL_TEST_API": f"http://127.0.0.1:{gateway.http_port}",
            "OPENSHELL_TEST_IMAGE": "",  # the local driver runs commands here: it takes no image
            "OPENSHELL_TEST_SANDBOX_ID": "helm-test-1-ok",
        }
        done = _run(env)
        assert done.returncode == 0, done.stdout + done.stderr + gateway.log_text()[-3000:]
        assert "helm-test-1-ok connected (session " in done.stdout
        assert "deleted helm-test-1-ok" in done.stdout
        shown = {s["id"]: s for s in _sandboxes(gateway)}
        assert "helm-test-1-ok" not in shown or shown["helm-test-1-ok"]["state"] in {"deleted", "exited"}

        # A sandbox that never connects: its command is not there, the supervisor exits at once.
        never = {**env, "OPENSHELL_TEST_SANDBOX_ID": "helm-test-1-never", "OPENSHELL_TEST_TIMEOUT_S": "10"}
        never["OPENSHELL_TEST_COMMAND"] = json.dumps(["/nonexistent/command"])
        failed = _run(never)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "helm-test-1-never" in failed.stderr
        assert "deleted helm-test-1-never" in failed.stdout

        # The API refuses (an id that is not a name): exit 2 with the API's answer.
        refused = _run({**env, "OPENSHELL_TEST_SANDBOX_ID": "Not_A_Name"})
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "HTTP 400" in refused.stderr and "not a valid name" in refused.stderr
    finally:
        gateway.stop()
