"""The chaos scenarios' shared pieces (chaos/common.py) that a verdict rests on: a store that does not
answer gives no line counts (not zeros a scenario would take for a measurement), stopping a writer
sandbox leaves no main process behind, even one waiting on a gate nobody opened, and the sweep at a
run's start removes the namespaces a hard-stopped run left (chaos/net.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from chaos.common import children_of, gated_writer, stop_all, stored_line_counts
from chaos.net import netns_unavailable, sweep_leftovers
from tests.support.procs import SupervisorProcess, free_port


def test_stored_line_counts_is_none_when_the_store_does_not_answer(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    url = f"sqlite+aiosqlite:///{db}"
    # No events table yet (before the first hello), as good as a database that is down.
    sqlite3.connect(db).close()
    assert asyncio.run(stored_line_counts(url, ["a"])) is None
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (sandbox_id TEXT, kind TEXT, stream TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, 'log', 'stdout')", [("a",), ("a",)])
    assert asyncio.run(stored_line_counts(url, ["a", "b"])) == {"a": 2, "b": 0}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_stop_all_ends_a_gated_main_process_its_supervisor_leaves_behind(tmp_path: Path) -> None:
    # The main process runs in a session of its own: the supervisor's -9 alone leaves it waiting on
    # its gate for ever (the review's SIGTERM reproduction). No gateway needed: the supervisor
    # starts its main process and journals while it tries to connect.
    gate = tmp_path / "gate"
    process = SupervisorProcess(
        tmp_path / "sb",
        "sb",
        f"127.0.0.1:{free_port()}",
        gated_writer(10, delay=0.0, exit_code=0, pauses=[(1, gate)]),
    )
    process.start()
    assert process.proc is not None
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{gate}.reached").exists():
            assert time.monotonic() < deadline, process.log_text()[-2000:]
            time.sleep(0.05)
        children = children_of(process.proc.pid)
        assert children, "the main process is the supervisor's child"
        asyncio.run(stop_all(process))
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in children), f"left running: {children}"
    finally:
        process.stop()
        for pid in children:  # whatever the verdict, nothing of this test left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_the_sweep_removes_an_empty_namespace_of_ours_and_leaves_one_in_use() -> None:
    if (reason := netns_unavailable()) is not None:
        pytest.skip(reason)
    empty, used = f"osgw-{secrets.token_hex(3)}", f"ossb-{secrets.token_hex(3)}"
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        for name in (empty, used):
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", used, "sleep", "30"])
        deadline = time.monotonic() + 10
        while not subprocess.run(
            ["ip", "netns", "pids", used], capture_output=True, text=True
        ).stdout.strip():
            assert time.monotonic() < deadline, "the sleeper never entered its namespace"
            time.sleep(0.05)
        # As a SIGKILLed run leaves them (the age bound at 0: /run/netns's times cannot be set back;
        # these two only, so that nobody else's namespace is touched).
        lines = sweep_leftovers(min_age_s=0, only={empty, used})
        assert any(f"removed the leftover namespace {empty}" in line for line in lines), lines
        assert any(f"namespace {used}" in line and "left alone" in line for line in lines), lines
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert empty not in listed and used in listed
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait(10)
        for name in (empty, used):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
