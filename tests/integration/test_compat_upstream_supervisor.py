"""An upstream supervisor in its NORMAL mode against our gateway, with its real authentication.

The peer (tests/compat/upstream_supervisor_peer.py) makes the calls upstream's openshell-sandbox
makes outside its developer mode, in its order and with its exits (GetSandboxConfig first, policy
sync, provider environment, inference bundle, the poll loop and ReportPolicyStatus, token refresh,
ConnectSupervisor with connection_epoch and upstream's 5 s heartbeat floor, ReportMainProcessExit);
so its exit 0 here means an upstream supervisor runs against this gateway (issue 21 points 1, 3, 5,
6). The gateway requires supervisor credentials; the sandboxes are created through its API, with a
stand-in for our supervisor as the local driver's supervisor command (it holds the sandbox's
"pod" and leaves the session to the peer), and the peer presents a token the gateway minted.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.auth.sandbox_tokens import LEEWAY_S
from tests.support.procs import PYTHON, REPO, GatewayProcess, wait_until

PEER = REPO / "tests" / "compat" / "upstream_supervisor_peer.py"
#: The local driver's supervisor command: a stand-in that runs until the gateway that started
#: it is gone (its parent changes), so no test leaves it behind, and never connects.
STAND_IN = [
    PYTHON,
    "-c",
    "import os, time\np = os.getppid()\nwhile os.getppid() == p:\n    time.sleep(0.5)\n",
]


def _http(method: str, url: str, body: object | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.status, json.loads(resp.read() or b"null")


class Env:
    def __init__(self, gateway: GatewayProcess, tmp: Path) -> None:
        self.gateway = gateway
        self.tmp = tmp
        self.api = f"http://127.0.0.1:{gateway.http_port}/api/v1"

    def create(self, sandbox_id: str) -> int:
        status, body = _http("POST", f"{self.api}/sandboxes", {"id": sandbox_id, "command": ["agent"]})
        assert status == 201, body
        return int(body["generation"])

    def sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return _http("GET", f"{self.api}/sandboxes/{sandbox_id}")[1]  # type: ignore[no-any-return]

    def logs(self, sandbox_id: str) -> list[dict[str, Any]]:
        return _http("GET", f"{self.api}/sandboxes/{sandbox_id}/logs?tail=1000")[1]["events"]  # type: ignore[no-any-return]

    def token_file(self, sandbox_id: str, *, ttl_s: int | None = None, generation: int = 1) -> Path:
        """The gateway's minted token for the sandbox; with ``ttl_s``, one signed by the gateway's
        key that expires sooner than any it mints (>= 60 s), so the peer refreshes it in the run."""
        minted = self.gateway.workdir / "var/openshell/sandboxes" / sandbox_id / "gateway-token"
        if ttl_s is None:
            return minted
        with sqlite3.connect(self.gateway.db_path) as db:
            kid, pem = db.execute(
                "SELECT kid, private_pem FROM signing_keys ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
        now = int(time.time())
        claims = {
            "iss": "openshell-gateway",
            "aud": "openshell-sandbox",
            "sub": f"spiffe://openshell/sandbox/{sandbox_id}",
            "sandbox_id": sandbox_id,
            "gen": generation,
            "iat": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        path = self.tmp / f"{sandbox_id}-short-token"
        path.write_text(jwt.encode(claims, pem, algorithm="EdDSA", headers={"kid": kid}))
        return path

    def peer_argv(self, sandbox_id: str, token: Path, *extra: str) -> list[str]:
        return [
            PYTHON,
            str(PEER),
            "--stubs-dir",
            str(self.tmp / f"stubs-{sandbox_id}"),
            "--gateway",
            self.gateway.address,
            "--sandbox-id",
            sandbox_id,
            "--sandbox",
            sandbox_id,
            "--token-file",
            str(token),
            "--poll-interval-s",
            "1",
            *extra,
        ]

    def run_peer(
        self, sandbox_id: str, token: Path, *extra: str, timeout: float = 60
    ) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            self.peer_argv(sandbox_id, token, *extra), capture_output=True, timeout=timeout, check=False
        )
        return done.returncode, summary_of(done.stdout.decode(), done.stderr.decode())


def summary_of(stdout: str, stderr: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{"summary"'):
            return json.loads(line)["summary"]  # type: ignore[no-any-return]
    raise AssertionError(f"the peer printed no summary:\n{stdout}\n{stderr}")


def _codes(summary: dict[str, Any], method: str) -> dict[str, int]:
    return summary["calls"].get(method, {})  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("upstream-normal")
    gateway = GatewayProcess(
        tmp / "gateway",
        auth=True,
        # Our shortest interval and a small grace: upstream's 5 s floor must still keep its session.
        heartbeat_interval_s=1,
        grace_s=1,
        extra=["--set", f"drivers.local.supervisor_command={json.dumps(STAND_IN)}"],
    )
    gateway.start()
    try:
        yield Env(gateway, tmp)
    finally:
        gateway.stop()


def test_an_upstream_supervisor_in_normal_mode_runs_to_completion(env: Env) -> None:
    generation = env.create("norm")
    code, summary = env.run_peer(
        "norm",
        env.token_file("norm", ttl_s=6, generation=generation),
        "--lines",
        "120",
        "--ocsf-lines",
        "3",
        "--exit-code",
        "7",
        "--run-s",
        "7",
    )
    assert (code, summary["reason"]) == (0, None), summary
    # Configuration: no policy at first, so the peer synced upstream's restrictive default, and
    # the gateway hands it back as the sandbox's policy, version 1 with its hash.
    assert _codes(summary, "UpdateConfig") == {"OK": 1}, summary
    config = summary["config"]
    assert config["has_policy"] and config["version"] == 1 and config["policy_hash"], config
    assert config["policy"] == summary["policy_updates"][0]
    # Upstream's restrictive default leaves the process identity to the runtime.
    assert "process" not in config["policy"], config["policy"]
    assert config["policy_source"] == "POLICY_SOURCE_SANDBOX"
    stored = env.gateway.query("SELECT policy_version, policy_hash FROM sandboxes WHERE id = 'norm'")
    assert stored == [(1, config["policy_hash"])]
    assert set(_codes(summary, "GetSandboxConfig")) == {"OK"}
    # LOADED reported once for version 1, answered OK.
    assert summary["policy_status_reported"] == [1]
    assert _codes(summary, "ReportPolicyStatus") == {"OK": 1}
    # Provider environment and inference answered (routing stays on).
    assert _codes(summary, "GetSandboxProviderEnvironment") == {"OK": 1}
    assert summary["inference_routing"] is True
    assert set(_codes(summary, "GetInferenceBundle")) == {"OK"}
    # The session: accepted at once and kept to the end (no reconnection).
    [session] = summary["sessions"]
    assert session["accepted"] and session["epoch"] == 1 and "end" not in session, session
    # The token was refreshed and the refreshed one accepted by the calls after it.
    assert summary["tokens_refreshed"] >= 1 and _codes(summary, "RefreshSandboxToken").get("OK"), summary
    assert summary["calls_ok_with_refreshed_token"] > 0
    assert _codes(summary, "ReportMainProcessExit") == {"OK": 1}
    # The lines came over the run, several requests on the one stream it held open.
    assert _codes(summary, "PushSandboxLogs") == {"OK": 1}
    assert summary["log_streams_opened"] == 1 and summary["log_requests_sent"] > 1, summary
    assert summary["log_lines_sent"] == 123

    events = env.logs("norm")
    lines = [e for e in events if e["kind"] == "log"]
    plain = [e for e in lines if e["message"].startswith("upstream normal-mode line ")]
    assert len(plain) == 120, [e["message"] for e in lines][:5]
    for e in plain:
        i = int(e["message"].rsplit(" ", 1)[1])
        data = e["data"] or {}
        # The level is kept as a name, matched case-insensitively (the gateway stores it lower case).
        assert str(data.get("level")).upper() == ("INFO", "WARN", "ERROR")[i % 3], e
        assert data.get("target") == "openshell_sandbox::peer", e
        assert data.get("fields") == {"line": str(i), "peer": '"upstream"'}, e
    ocsf = [e for e in lines if e["message"].startswith("NET:OPEN [INFO] ALLOWED python3(")]
    assert len(ocsf) == 3 and {e["stream"] for e in ocsf} == {"ocsf"}, ocsf
    # The sync and the supervisor's LOADED report are recorded in the sandbox's logs.
    policy_events = [e["message"] for e in lines if (e["data"] or {}).get("target") == "openshell.policy"]
    assert "policy version 1 loaded by the sandbox's supervisor" in policy_events, policy_events
    assert any(m.startswith("policy version 1 synced by the sandbox's supervisor") for m in policy_events)
    # The exit code is stored.
    exits = [e for e in events if e["kind"] == "lifecycle" and (e["data"] or {}).get("exit_code") == 7]
    assert exits, [e for e in events if e["kind"] == "lifecycle"]


def test_an_upstream_supervisor_s_log_stream_keeps_delivering_after_the_token_it_opened_with_expired(
    env: Env,
) -> None:
    """Upstream's supervisor holds one PushSandboxLogs stream for its life, with the token it
    opened with, and turns its log push off for good when the stream ends UNAUTHENTICATED: the
    gateway must not refuse an open stream's later requests once that token has expired (its
    supervisor has renewed it for later calls)."""
    generation = env.create("late")
    token = env.token_file("late", ttl_s=6, generation=generation)
    expires = jwt.decode(token.read_text(), options={"verify_signature": False})["exp"]
    # 40 lines, one about every second: the last ones are written after exp + the leeway.
    code, summary = env.run_peer("late", token, "--lines", "40", "--run-s", "42", timeout=90)
    assert (code, summary["reason"]) == (0, None), summary
    # The premise: the stream opened with the 6 s token (renewed meanwhile) was still written to
    # after the gateway would accept that token no more.
    assert summary["tokens_refreshed"] >= 1, summary
    assert summary["last_log_write_at"] > expires + LEEWAY_S, (summary["last_log_write_at"], expires)
    assert summary["log_streams_opened"] == 1 and not summary["log_push_disabled"], summary
    refused = {m: c for m, c in summary["calls"].items() if "UNAUTHENTICATED" in c}
    assert not refused, refused
    assert _codes(summary, "PushSandboxLogs") == {"OK": 1}, summary
    stored = [e for e in env.logs("late") if e["message"].startswith("upstream normal-mode line ")]
    assert sorted(int(e["message"].rsplit(" ", 1)[1]) for e in stored) == list(range(40))


def test_upstream_s_five_second_heartbeats_keep_its_session_at_a_one_second_interval(env: Env) -> None:
    env.create("beats")
    code, summary = env.run_peer("beats", env.token_file("beats"), "--run-s", "11.5")
    assert (code, summary["reason"]) == (0, None), summary
    # Told 1 s, it beat every 5 s (twice in the run), and the gateway kept the one session.
    sessions = summary["sessions"]
    assert len(sessions) == 1, f"the gateway ended its session between two 5 s beats: {sessions}"
    [session] = sessions
    assert session["accepted"] and session["heartbeat_interval_secs"] == 1, session
    assert session.get("heartbeats") == 2 and "end" not in session, session


def test_the_connection_epoch_rises_across_reconnects_and_the_newest_connection_owns_the_sandbox(
    tmp_path: Path,
) -> None:
    gateway = GatewayProcess(
        tmp_path / "gateway",
        auth=True,
        extra=["--set", f"drivers.local.supervisor_command={json.dumps(STAND_IN)}"],
    )
    peer: subprocess.Popen[bytes] | None = None
    try:
        gateway.start()
        env = Env(gateway, tmp_path)
        env.create("epoch")
        out, err = tmp_path / "peer.out", tmp_path / "peer.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            peer = subprocess.Popen(
                env.peer_argv("epoch", env.token_file("epoch"), "--run-s", "14"), stdout=stdout, stderr=stderr
            )
        wait_until(
            lambda: env.sandbox("epoch").get("state") == "connected",
            timeout=20,
            what="the peer's first session",
        )
        assert gateway.query("SELECT connection_epoch FROM sandboxes WHERE id = 'epoch'") == [(1,)]
        # Killed, so its claim is still fresh in the database when the peer comes back: the newer
        # epoch of the same instance must win it.
        gateway.kill()
        gateway.start()
        wait_until(
            lambda: env.sandbox("epoch").get("state") == "connected",
            timeout=20,
            what="the peer's session after the gateway's restart",
        )
        [(stored,)] = gateway.query("SELECT connection_epoch FROM sandboxes WHERE id = 'epoch'")
        assert peer.wait(40) == 0, err.read_text()
        summary = summary_of(out.read_text(), err.read_text())
        accepted = [s for s in summary["sessions"] if s.get("accepted")]
        epochs = [s["epoch"] for s in summary["sessions"]]
        assert epochs == list(range(1, len(epochs) + 1)) and len(accepted) == 2, summary["sessions"]
        # The sandbox is the newest connection's: its epoch is the one the gateway recorded.
        assert stored == accepted[-1]["epoch"] > 1, (stored, summary["sessions"])
        assert "end" not in accepted[-1], accepted[-1]
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait(10)
        gateway.stop()


def test_a_refused_credential_ends_the_upstream_supervisor_after_five_tries_as_upstream_s_does(
    env: Env,
) -> None:
    env.create("owner")
    env.create("victim")
    # Upstream's binary retries its startup GetSandboxConfig on every error, PERMISSION_DENIED
    # too (1, 2, 4, 4 s; a quarter of that here), then exits 1. Its 5 lines are logged meanwhile.
    code, summary = env.run_peer(
        "victim",
        env.token_file("owner"),
        "--lines",
        "5",
        "--run-s",
        "2",
        "--retry-delay-scale",
        "0.25",
        timeout=30,
    )
    assert code == 1, summary
    assert _codes(summary, "GetSandboxConfig") == {"PERMISSION_DENIED": 5}, summary
    assert summary["reason"].startswith("Policy fetch failed after 5 attempts: PERMISSION_DENIED"), summary
    assert summary["sessions"] == []
    # Its log stream was refused too, and nothing of it was stored.
    assert set(_codes(summary, "PushSandboxLogs")) == {"PERMISSION_DENIED"}, summary
    assert not [e for e in env.logs("victim") if e["message"].startswith("upstream normal-mode line")]
