"""The process and storage scenarios' own pieces (chaos/scenarios/processes.py): what is registered and
what CI runs, the gated writer the scenarios time their faults with, and how a simulated sandbox's
time without a session is measured. The scenarios themselves run real processes (python -m chaos run)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from chaos.common import gated_writer
from chaos.scenarios import processes
from chaos.suite import SCENARIOS
from tests.support.simsup import SessionRecord, SimSupervisor

NAMES = (
    "gateway-kill",
    "supervisor-kill",
    "journal-disk-full",
    "postgres-restart",
    "storm",
    "rolling-restart",
    "postgres-failover",
)


def test_every_process_fault_of_issue_22_is_registered_and_only_gateway_kill_is_in_ci() -> None:
    for name in NAMES:
        assert name in SCENARIOS, name
        assert SCENARIOS[name].fn.__module__ == processes.__name__
    assert [name for name in NAMES if SCENARIOS[name].ci] == ["gateway-kill"]


def test_the_gated_writer_stops_before_the_gated_line_until_the_gate_opens(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    command = gated_writer(5, delay=0.0, exit_code=3, prefix="run1", pauses=[(2, gate)])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not Path(f"{gate}.reached").exists():
            assert time.monotonic() < deadline, "the writer never reached its gate"
            time.sleep(0.02)
        time.sleep(0.2)
        assert proc.poll() is None, "it waits at the gate"
        gate.touch()
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 3
    assert out.decode().splitlines() == [f"run1 {i}" for i in range(5)]


def test_a_simulated_sandbox_outage_is_the_time_between_one_session_and_the_next() -> None:
    sim = SimSupervisor("s", lambda: [])
    sim.sessions = [
        SessionRecord(address="a", accepted_at=10.0, ended_at=20.0, end="hint"),
        SessionRecord(address="b", accepted_at=20.5, ended_at=30.0, end="eof"),
        SessionRecord(address="c", accepted_at=33.0),
    ]
    assert processes._sim_outages(sim) == [0.5, 3.0]
