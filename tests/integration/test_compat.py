"""Wire compatibility, both ways, with peers that speak only the upstream protocol.

The peers (tests/compat/upstream_peer.py) run as their own processes with stubs compiled from
tests/compat/upstream_openshell.proto, the upstream subset of WIRE.md: our extension fields
reach them as real unknown fields (the tests check that some did arrive, and were skipped),
and they never send any of ours.

* Our supervisor against an upstream gateway: SessionAccepted without capabilities puts it in
  upstream mode, so the main process's lines go through PushSandboxLogs and the exit through
  ReportMainProcessExit.
* An upstream supervisor against our gateway: it is accepted, heartbeats come back, and its
  lines and exit are stored like anyone's.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import (
    PYTHON,
    REPO,
    GatewayProcess,
    SupervisorProcess,
    free_port,
    wait_until,
    writer_command,
)

PEER = REPO / "tests" / "compat" / "upstream_peer.py"
#: Our SupervisorHello extension fields (capabilities, journal epoch/first/last, version).
HELLO_EXTENSIONS = {100, 101, 102, 103, 104}
#: The SandboxLogLine.target our supervisor gives the main process's stdout in upstream mode.
STDOUT = "stdout"


@dataclass
class UpstreamGateway:
    """The upstream-only gateway peer; restartable on the same port and out file."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def out_path(self) -> Path:
        return self.workdir / "received.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "upstream-gateway.log"

    def start(self, *extra: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Stubs under the test's directory: a killed peer cannot clean up a temporary one.
        stubs = ["--stubs-dir", str(self.workdir / "stubs")]
        argv = [
            PYTHON,
            str(PEER),
            *stubs,
            "gateway",
            "--listen",
            self.address,
            "--out",
            str(self.out_path),
            *extra,
        ]
        marker = f"--- start {self.starts}"
        with self.log_path.open("ab") as out:
            out.write(f"{marker}\n".encode())
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.starts += 1
        wait_until(
            lambda: (
                "upstream gateway ready" in self.log_text().split(marker)[-1] or self.proc.poll() is not None
            ),  # type: ignore[union-attr]
            timeout=60,
            what=f"upstream gateway ready (see {self.log_path})",
        )
        assert self.proc.poll() is None, self.log_text()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def records(self) -> list[dict[str, Any]]:
        if not self.out_path.exists():
            return []
        return [json.loads(line) for line in self.out_path.read_text().splitlines()]


def _is_log_line(record: dict[str, Any]) -> bool:
    return "message" in record


def _stdout(records: list[dict[str, Any]]) -> list[str]:
    return [r["message"] for r in records if _is_log_line(r) and r.get("target") == STDOUT]


def _segments(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The log lines each run of the upstream gateway received, in order."""
    runs: list[list[dict[str, Any]]] = []
    for r in records:
        if "gateway_started" in r:
            runs.append([])
        elif _is_log_line(r):
            runs[-1].append(r)
    return runs


def _check_replays_only_the_unacknowledged_tail(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assert at-least-once, in order, duplicates only as a replayed tail; return the replayed lines.

    Our supervisor numbers every line (``fields["sequence"]``). Within one run of the gateway
    the sequences must strictly ascend. Across a restart, what the new run receives first may
    repeat the end of what the old run received (a PushSandboxLogs that was stored, but whose
    answer never came back), and nothing else may repeat.
    """
    replayed: list[dict[str, Any]] = []
    seen: dict[int, dict[str, Any]] = {}
    previous: list[int] = []
    for run in _segments(records):
        seqs = [int(r["fields"]["sequence"]) for r in run]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), f"out of order within a run: {seqs}"
        overlap = [s for s in seqs if s in seen]
        assert overlap == seqs[: len(overlap)], "only the start of a run may repeat earlier lines"
        assert overlap == previous[len(previous) - len(overlap) :], "only the old run's tail may be replayed"
        for r in run:
            s = int(r["fields"]["sequence"])
            if s in seen:
                assert r == seen[s], f"a replayed line differs from the original: {r} vs {seen[s]}"
                replayed.append(r)
            seen[s] = r
        previous = seqs or previous
    # A fresh journal numbers from 1; only EXITED (reported by ReportMainProcessExit) is not a line.
    assert sorted(seen) == list(range(1, len(seen) + 1)), "a sequence is missing"
    return replayed


@pytest.fixture
def upstream_gateway(tmp_path: Path) -> Iterator[UpstreamGateway]:
    gw = UpstreamGateway(tmp_path / "upstream-gateway")
    try:
        yield gw
    finally:
        gw.stop()


def _supervisor(tmp_path: Path, address: str, sandbox_id: str, command: list[str]) -> SupervisorProcess:
    return SupervisorProcess(tmp_path / sandbox_id, sandbox_id, address, command)


# -- our supervisor, upstream gateway ---------------------------------------------------------


def test_our_supervisor_uses_the_upstream_paths_against_an_upstream_gateway(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess]
) -> None:
    upstream_gateway.start()
    n, code = 200, 5
    # About 3 s of output: long enough for heartbeats both ways at the peer's 1 s interval.
    command = writer_command(n, delay=0.015, exit_code=code)
    sv = _supervisor(tmp_path, upstream_gateway.address, "compat-a", command)
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == code, sv.log_text()[-3000:]

    # The stream ends when the supervisor goes; its end is recorded a moment later.
    wait_until(
        lambda: any("session_end" in r for r in upstream_gateway.records()),
        timeout=15,
        what="session end recorded",
    )
    records = upstream_gateway.records()
    hellos = [r for r in records if "hello" in r]
    assert len(hellos) == 1, hellos
    hello = hellos[0]
    assert hello["hello"]["sandbox_id"] == "compat-a"
    instance_id = hello["hello"]["instance_id"]
    assert instance_id
    # Our extension fields did cross the wire, and the upstream stubs skipped them.
    assert set(hello["unknown_fields"]) >= HELLO_EXTENSIONS, hello

    assert _stdout(records) == [f"line {i}" for i in range(n)]
    lines = [r for r in records if _is_log_line(r)]
    assert all(r["sandbox_id"] == "compat-a" and r["source"] == "sandbox" for r in lines)
    lifecycle = [r["message"] for r in lines if r.get("target") == "openshell.supervisor.lifecycle"]
    assert any(m.startswith("supervisor started") for m in lifecycle), lifecycle
    assert any(m.startswith("main process started") for m in lifecycle), lifecycle
    _check_replays_only_the_unacknowledged_tail(records)

    exits = [(i, r) for i, r in enumerate(records) if "exit" in r]
    assert [r for _, r in exits] == [{"exit": code, "instance_id": instance_id, "sandbox_id": "compat-a"}]
    last_stdout = max(i for i, r in enumerate(records) if _is_log_line(r) and r.get("target") == STDOUT)
    assert exits[0][0] > last_stdout, "the exit is reported after every line was pushed"

    ends = [r for r in records if "session_end" in r]
    assert ends[0]["unknown_messages"] == 0, "no extension-only message may be sent to an upstream gateway"
    assert ends[0]["heartbeats"] >= 1, ends
    # SupervisorHeartbeat.sent_unix_ms (ours) arrived as an unknown field and was skipped.
    assert ends[0]["heartbeat_unknown_fields"] == [100], ends


def test_our_supervisor_resumes_the_upstream_paths_after_the_gateway_restarts(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess]
) -> None:
    """Killed mid-run and restarted (same port, same out file): no line lost, all in order.

    What the upstream log path can and cannot guarantee: PushSandboxLogs carries no sequence
    and has no per-line acknowledgement; the call's success is the acknowledgement, and the
    supervisor trims its journal only then. So nothing is lost, and order holds. But a call
    that the gateway stored and then died (or lost the connection) before answering is sent
    again after the reconnect: those lines arrive twice. Exactly-once needs the ``events``
    capability. This test does not control where the kill lands, so it asserts the exact
    guarantee: every line at least once, in order, and a repeat only as a replay of the tail
    the old gateway received last (``test_..._replays_a_push_stored_but_unanswered`` makes that
    window happen on purpose).
    """
    upstream_gateway.start()
    n, code = 300, 7
    sv = _supervisor(
        tmp_path, upstream_gateway.address, "compat-kill", writer_command(n, delay=0.02, exit_code=code)
    )
    supervisors.append(sv)
    sv.start()
    wait_until(
        lambda: len(_stdout(upstream_gateway.records())) >= 40, timeout=30, what="first lines received"
    )

    upstream_gateway.kill()
    time.sleep(2.0)  # the main process keeps writing into the journal meanwhile
    received_while_down = len(_stdout(upstream_gateway.records()))
    upstream_gateway.start()

    assert sv.wait(timeout=90) == code, sv.log_text()[-3000:]
    assert received_while_down < n, "the outage should have happened while lines were still being written"
    records = upstream_gateway.records()
    replayed = _check_replays_only_the_unacknowledged_tail(records)
    stdout = _stdout(records)
    replayed_stdout = [r["message"] for r in replayed if r.get("target") == STDOUT]
    deduplicated = list(dict.fromkeys(stdout))
    assert deduplicated == [f"line {i}" for i in range(n)]
    assert len(stdout) == n + len(replayed_stdout)

    hellos = [r["hello"] for r in records if "hello" in r]
    assert len(hellos) >= 2, "the supervisor must have connected again after the restart"
    assert len({h["instance_id"] for h in hellos}) == 1, "one supervisor process, one instance id"
    exits = [r for r in records if "exit" in r]
    assert [r["exit"] for r in exits] == [code]


def test_our_supervisor_replays_a_push_stored_but_unanswered(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess]
) -> None:
    """The at-least-once window of the upstream path, made to happen.

    The gateway dies right after storing the PushSandboxLogs request that brings it to 30
    lines, before answering. The supervisor cannot tell that apart from a request that never
    arrived, so it sends those lines again to the restarted gateway: exactly that request's
    lines arrive twice, nothing else repeats, nothing is lost, order holds.
    """
    upstream_gateway.start("--crash-after-lines", "30")
    n, code = 150, 3
    sv = _supervisor(
        tmp_path, upstream_gateway.address, "compat-crash", writer_command(n, delay=0.02, exit_code=code)
    )
    supervisors.append(sv)
    sv.start()
    proc = upstream_gateway.proc
    assert proc is not None
    wait_until(lambda: proc.poll() is not None, timeout=30, what="the gateway's deliberate crash")
    assert proc.returncode == 137, upstream_gateway.log_text()
    upstream_gateway.start()

    assert sv.wait(timeout=90) == code, sv.log_text()[-3000:]
    records = upstream_gateway.records()
    crashes = [r for r in records if "crash" in r]
    assert len(crashes) == 1
    replayed = _check_replays_only_the_unacknowledged_tail(records)
    assert len(replayed) == crashes[0]["request_lines"] >= 1
    assert list(dict.fromkeys(_stdout(records))) == [f"line {i}" for i in range(n)]
    assert [r["exit"] for r in records if "exit" in r] == [code]


def test_our_supervisor_sends_no_more_lines_per_request_than_an_upstream_gateway_keeps(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess]
) -> None:
    """Upstream's gateway keeps the first 100 lines of each PushSandboxLogsRequest and answers OK
    (the peer does the same and records what it drops): 600 lines written at once, so batches are
    large, all arrive exactly once (a gateway that keeps everything would see no replay here)."""
    upstream_gateway.start()
    n, code = 600, 4
    sv = _supervisor(tmp_path, upstream_gateway.address, "compat-keep", writer_command(n, exit_code=code))
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == code, sv.log_text()[-3000:]
    records = upstream_gateway.records()
    dropped = [r for r in records if "dropped" in r]
    assert dropped == [], f"the gateway dropped {sum(r['dropped'] for r in dropped)} lines"
    assert _stdout(records) == [f"line {i}" for i in range(n)]
    assert _check_replays_only_the_unacknowledged_tail(records) == []
    assert [r["exit"] for r in records if "exit" in r] == [code]


#: "gateway unreachable" but for gRPC's own "INTERNAL: Internal error from Core", a client-side race
#: of grpc aio when a call is ended while the client still writes (see test_session_reconnect).
_UNREACHABLE_NOT_CORE = r"gateway unreachable \((?!INTERNAL: Internal error from Core\))"


@pytest.mark.parametrize("stream_open", [False, True], ids=["all-calls", "calls-only"])
def test_our_supervisor_waits_out_a_refused_credential_on_an_upstream_gateway(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess], stream_open: bool
) -> None:
    """An upstream gateway that refuses our token (UNAUTHENTICATED, as upstream's answers a sandbox
    JWT that does not verify): on every call, or (``calls-only``) on the calls but not on a stream
    it lets open, as when a token expires under an open session. The refusal is logged once, is
    not an outage ("gateway unreachable"), is retried at the backoff's cap and not sooner; once the
    credential file holds the right token, everything arrives, once."""
    extra = ["--require-token", "right-token"] + (["--stream-open"] if stream_open else [])
    upstream_gateway.start(*extra)
    credential = tmp_path / "credential"
    credential.write_text("wrong-token\n")
    n, code = 50, 6
    # The main process lives until the test lets it go: its exit would cut the refused wait short
    # once (exit delivery is urgent), which is right but would make the count below a race.
    release = tmp_path / "release"
    sv = SupervisorProcess(
        tmp_path / "compat-refused",
        "compat-refused",
        upstream_gateway.address,
        [
            "/bin/sh",
            "-c",
            f"for i in $(seq 0 {n - 1}); do echo line $i; done; "
            f"while [ ! -e {release} ]; do sleep 0.1; done; exit {code}",
        ],
        # A short cap: the wait after a refusal is the cap, so "slowly" fits in a few seconds.
        settings=[f"gateway.credential_file={credential}", "session.reconnect_max_s=3"],
    )
    supervisors.append(sv)
    sv.start()
    wait_until(
        lambda: sum("refused" in r for r in upstream_gateway.records()) >= 1, timeout=30, what="a refusal"
    )
    time.sleep(4.5)
    refused = [r["refused"] for r in upstream_gateway.records() if "refused" in r]
    # At the 3 s cap (spread 0.8-1.0) 4.5 s hold at most two more; the normal backoff from
    # 0.2 s would have made several.
    assert 1 <= len(refused) <= 3, refused
    assert set(refused) == ({"PushSandboxLogs"} if stream_open else {"ConnectSupervisor"}), refused
    log_text = sv.log_text()
    assert log_text.count("gateway refused our credential: UNAUTHENTICATED") == 1, log_text[-3000:]
    # A refusal is never taken for unreachability. One transport failure of the test's peer
    # ("INTERNAL: Internal error from Core", seen once serially in a full CI run and often under
    # xdist, cause not yet found) is the peer's, not a refusal: left out here.
    unreachable = re.findall(_UNREACHABLE_NOT_CORE, log_text)
    assert not unreachable, log_text[-3000:]
    assert _stdout(upstream_gateway.records()) == []

    credential.write_text("right-token\n")
    wait_until(
        lambda: _stdout(upstream_gateway.records()) == [f"line {i}" for i in range(n)],
        timeout=30,
        what="every line once the credential file holds the right token",
    )
    release.touch()
    assert sv.wait(timeout=60) == code, sv.log_text()[-3000:]
    records = upstream_gateway.records()
    assert _stdout(records) == [f"line {i}" for i in range(n)]
    assert [r["exit"] for r in records if "exit" in r] == [code]
    # The same rule over the whole run (that peer's transport failure once failed CI here).
    assert not re.findall(_UNREACHABLE_NOT_CORE, sv.log_text()), sv.log_text()[-3000:]


def test_our_supervisor_does_not_renew_an_upstream_never_expiring_token(
    tmp_path: Path, upstream_gateway: UpstreamGateway, supervisors: list[SupervisorProcess]
) -> None:
    """Upstream's gateway mints sandbox JWTs with ``exp: 0`` by default ("never expires", handcheck
    2.2): our supervisor sends it as it is, never calls RefreshSandboxToken and logs no warning or
    error about renewing it (it renewed at once, got another exp-0 token and logged an ERROR)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "compat-exp0", "iat": int(time.time()), "exp": 0}).encode())
    token = f"{header}.{payload}.c2ln"
    upstream_gateway.start("--require-token", token)
    credential = tmp_path / "credential"
    credential.write_text(token + "\n")
    n, code = 20, 3
    sv = SupervisorProcess(
        tmp_path / "compat-exp0",
        "compat-exp0",
        upstream_gateway.address,
        # Alive a few seconds: a renewal would be due at once.
        ["/bin/sh", "-c", f"sleep 3; for i in $(seq 0 {n - 1}); do echo line $i; done; exit {code}"],
        settings=[f"gateway.credential_file={credential}", "gateway.credential_refresh=true"],
    )
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == code, sv.log_text()[-3000:]
    records = upstream_gateway.records()
    assert [r for r in records if "refresh" in r or "refused" in r] == []
    assert _stdout(records) == [f"line {i}" for i in range(n)]
    log_text = sv.log_text()
    for complaint in (
        "no newer token",
        "expires before it could be renewed",
        "renewing the gateway credential",
    ):
        assert complaint not in log_text, log_text[-3000:]


# -- upstream supervisor, our gateway ---------------------------------------------------------


def _run_peer_supervisor(
    workdir: Path, gw: GatewayProcess, sandbox_id: str, lines: int, exit_code: int
) -> dict[str, Any]:
    argv = [PYTHON, str(PEER), "--stubs-dir", str(workdir / "stubs"), "supervisor"]
    argv += ["--gateway", gw.address, "--sandbox-id", sandbox_id]
    argv += ["--lines", str(lines), "--exit-code", str(exit_code), "--chunk", "64"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    context = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\ngateway log:\n{gw.log_text()[-3000:]}"
    assert done.returncode == 0, context
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    first = next(p for p in printed if "first_reply" in p)
    summary = next(p["summary"] for p in printed if "summary" in p)
    return {"first": first, "summary": summary, "context": context}


def test_upstream_supervisor_against_our_gateway(tmp_path: Path, gateway: GatewayProcess) -> None:
    # One-second heartbeats: the only interval an upstream supervisor can be told exactly
    # (heartbeat_interval_secs is whole seconds).
    gateway.heartbeat_interval_s = 1.0
    gateway.grace_s = 1.0
    gateway.start()
    n, code = 250, 9
    out = _run_peer_supervisor(tmp_path / "upstream-supervisor", gateway, "compat-b", n, code)
    first, summary = out["first"], out["summary"]

    accepted = first["first_reply"]["session_accepted"]
    assert accepted["session_id"]
    assert accepted["heartbeat_interval_secs"] > 0
    assert set(accepted) == {"session_id", "heartbeat_interval_secs"}, (
        "the upstream stubs see only upstream fields"
    )
    # Our extensions (heartbeat_interval_ms, stale_after_ms, ...) arrived and were skipped.
    assert first["unknown_fields"] and all(f >= 100 for f in first["unknown_fields"]), first
    assert summary["session_id"] == accepted["session_id"]
    assert (
        summary["heartbeats_sent"] >= 3 and summary["heartbeats_received"] >= summary["heartbeats_sent"] - 1
    )
    assert summary["unknown_messages"] == 0, (
        "our gateway sent an extension-only message to an upstream supervisor"
    )
    assert summary["health"] == "SERVICE_STATUS_HEALTHY"

    logs = gateway.events("compat-b", "log")
    assert [e["message"] for e in logs] == [f"upstream line {i}" for i in range(n)], out["context"]
    seqs = [e["sequence"] for e in logs]
    assert seqs == sorted(seqs) and len(set(seqs)) == n
    exits = [e for e in gateway.events("compat-b", "lifecycle") if (e["data"] or {}).get("kind") == "exited"]
    assert len(exits) == 1, exits
    assert exits[0]["data"]["exit_code"] == code
    assert exits[0]["data"]["instance_id"] == summary["instance_id"]
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'compat-b'") == [(code,)]


def test_upstream_gateway_peer_stops_on_sigterm(upstream_gateway: UpstreamGateway) -> None:
    upstream_gateway.start()
    assert upstream_gateway.proc is not None
    upstream_gateway.proc.send_signal(signal.SIGTERM)
    assert upstream_gateway.proc.wait(15) == 0, upstream_gateway.log_text()
