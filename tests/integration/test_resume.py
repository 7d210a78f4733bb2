"""The session survives a gateway that dies, freezes, or comes back later: nothing lost, nothing doubled.

Real processes throughout: the gateway (SQLite), the supervisor, and a main process that
writes numbered lines. What the gateway stored is read back from its database file.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until, writer_command


def _supervisor(
    tmp_path: Path, gw: GatewayProcess, sandbox_id: str, command: list[str], **kw: object
) -> SupervisorProcess:
    return SupervisorProcess(tmp_path / sandbox_id, sandbox_id, gw.address, command, **kw)  # type: ignore[arg-type]


def _exits(gw: GatewayProcess, sandbox_id: str) -> list[dict[str, object]]:
    return [e for e in gw.events(sandbox_id, "lifecycle") if (e["data"] or {}).get("kind") == "exited"]


def test_gateway_killed_and_restarted_loses_and_doubles_nothing(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    n = 400
    sv = _supervisor(tmp_path, gateway, "kill-gw", writer_command(n, delay=0.02, exit_code=7))
    supervisors.append(sv)
    sv.start()
    wait_until(lambda: len(gateway.log_lines("kill-gw")) >= 40, timeout=30, what="first lines stored")

    gateway.kill()
    time.sleep(2.0)  # the main process keeps writing into the journal meanwhile
    stored_while_down = len(gateway.log_lines("kill-gw"))
    gateway.start()

    assert sv.wait(timeout=90) == 7, sv.log_text()[-3000:]
    lines = gateway.log_lines("kill-gw")
    assert stored_while_down < n, "the outage should have happened while lines were still being written"
    assert lines == [f"line {i}" for i in range(n)]
    seqs = [e["sequence"] for e in gateway.events("kill-gw")]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    exits = _exits(gateway, "kill-gw")
    assert len(exits) == 1 and exits[0]["data"]["exit_code"] == 7  # type: ignore[index]
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'kill-gw'") == [(7,)]
    # The outage is on record, with its length (the gateway was down for two seconds at least).
    outages = [
        e["data"] for e in gateway.events("kill-gw", "lifecycle") if e["data"]["kind"] == "reconnected"
    ]
    assert len(outages) == 1 and outages[0]["duration_ms"] >= 1500


def test_frozen_gateway_overflows_the_journal_and_the_gap_counts_exactly(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    n = 3000
    sv = _supervisor(
        tmp_path,
        gateway,
        "overflow",
        writer_command(n, width=60, exit_code=3),
        settings=[
            "journal.segment_bytes=4096",
            "journal.max_bytes=16384",
            "session.exit_flush_timeout_s=120",
        ],
    )
    supervisors.append(sv)
    # Freeze the gateway once the session is up: its socket stays open and silent, like a blackhole.
    sv.start()
    wait_until(lambda: "session accepted" in sv.log_text(), timeout=30, what="session accepted")
    gateway.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: "main process exited" in sv.log_text(), timeout=60, what="main process exit")
        time.sleep(1.0)
    finally:
        gateway.signal(signal.SIGCONT)

    assert sv.wait(timeout=90) == 3, sv.log_text()[-3000:]
    lines = gateway.log_lines("overflow")
    gaps = [e for e in gateway.events("overflow", "gap")]
    dropped = sum(g["data"]["dropped_records"] for g in gaps)
    assert gaps, "a 16 KiB bound cannot hold 3000 lines of 60 bytes: a gap record must say what was dropped"
    assert all(g["data"]["reason"] == "overflow" for g in gaps)
    numbers = [int(line.rstrip(".").split()[1]) for line in lines]
    assert numbers == sorted(set(numbers)), "delivered lines are in order, each once"
    assert len(lines) + dropped == n
    assert len(_exits(gateway, "overflow")) == 1


def test_supervisor_restarted_over_its_journal_delivers_what_the_first_run_kept(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    # First run: the gateway is not there at all; the main process finishes; the supervisor gives
    # up waiting for acknowledgements and exits, leaving everything in its journal.
    first = _supervisor(
        tmp_path,
        gateway,
        "restart",
        writer_command(200, prefix="first"),
        settings=["session.exit_flush_timeout_s=2"],
    )
    supervisors.append(first)
    first.start()
    assert first.wait(timeout=60) == 0
    assert "stay in" in first.log_text()

    gateway.start()
    second = _supervisor(tmp_path, gateway, "restart", writer_command(20, prefix="second", exit_code=4))
    supervisors.append(second)
    second.start()
    assert second.wait(timeout=60) == 4, second.log_text()[-3000:]

    lines = gateway.log_lines("restart")
    assert lines == [f"first {i}" for i in range(200)] + [f"second {i}" for i in range(20)]
    exits = _exits(gateway, "restart")
    assert [e["data"]["exit_code"] for e in exits] == [0, 4]  # type: ignore[index]
    assert len({e["epoch"] for e in gateway.events("restart")}) == 1, "one journal, one epoch"


def test_flipped_bit_in_the_journal_costs_exactly_the_damaged_line(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    first = _supervisor(
        tmp_path,
        gateway,
        "bitrot",
        writer_command(200, prefix="first"),
        settings=["session.exit_flush_timeout_s=1"],
    )
    supervisors.append(first)
    first.start()
    assert first.wait(timeout=60) == 0

    # Flip one bit inside the text of line 100 on disk, as a failing disk would.
    (segment,) = [p for p in first.journal_dir.iterdir() if p.name.startswith("seg-")]
    data = bytearray(segment.read_bytes())
    at = data.index(b"first 100\n"[:-1]) + 2
    data[at] ^= 0x04
    segment.write_bytes(bytes(data))

    gateway.start()
    second = _supervisor(tmp_path, gateway, "bitrot", writer_command(1, prefix="second"))
    supervisors.append(second)
    second.start()
    assert second.wait(timeout=60) == 0, second.log_text()[-3000:]

    lines = gateway.log_lines("bitrot")
    assert lines == [f"first {i}" for i in range(200) if i != 100] + ["second 0"]
    (gap,) = gateway.events("bitrot", "gap")
    assert gap["data"]["reason"] == "corrupt"
    assert gap["data"]["dropped_records"] == 1
    seqs = [e["sequence"] for e in gateway.events("bitrot")]
    assert seqs == sorted(seqs), "the gap stands where the damaged line was"


def test_sigterm_during_the_exit_flush_keeps_the_main_exit_code_and_the_journal(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    # No gateway: the supervisor would wait a minute for acknowledgements; the kubelet's SIGTERM
    # must cut that short without turning the sandbox's exit code into a signal death.
    sv = _supervisor(
        tmp_path,
        gateway,
        "sigflush",
        writer_command(5, exit_code=3),
        settings=["session.exit_flush_timeout_s=60"],
    )
    supervisors.append(sv)
    sv.start()
    wait_until(lambda: "main process exited" in sv.log_text(), timeout=30, what="main process exit")
    assert sv.proc is not None
    sv.proc.send_signal(signal.SIGTERM)
    assert sv.wait(timeout=15) == 3, sv.log_text()[-2000:]
    assert "stay in" in sv.log_text()

    gateway.start()
    again = _supervisor(tmp_path, gateway, "sigflush", writer_command(0))
    supervisors.append(again)
    again.start()
    assert again.wait(timeout=60) == 0
    assert gateway.log_lines("sigflush") == [f"line {i}" for i in range(5)]
    assert [e["data"]["exit_code"] for e in _exits(gateway, "sigflush")] == [3, 0]  # type: ignore[index]
