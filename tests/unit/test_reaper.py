"""The reaper and the main process, in this process: real children, real signals, real zombies.

The reaper makes this (pytest) process a child subreaper while it is installed and leaves it as it
was afterwards; every test installs and uninstalls it around its own children only.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from openshell_wire.records import LogRecord, LogStream
from supervisor.agent import restart_delay
from supervisor.process import MainProcess, StartFailed
from supervisor.reaper import Reaper

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.install()
    try:
        yield r
    finally:
        r.uninstall()


def _state(pid: int) -> tuple[str, int] | None:
    """(State letter, PPid) of ``pid``, or None once it is gone (reaped)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields["State"].strip()[0], int(fields["PPid"])


def _zombies_of(parent: int) -> list[int]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if _state(pid) == ("Z", parent)]


async def _until(predicate: Callable[[], object], limit_s: float = 20.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - polling /proc, nothing to wait on
            await asyncio.sleep(0.02)


def test_restart_delay_is_full_jitter_below_the_capped_exponential() -> None:
    rng = random.Random(7)
    for n in range(1, 40):
        high = min(30.0, 1.0 * 2 ** (n - 1))
        delays = [restart_delay(n, 1.0, 30.0, rng) for _ in range(50)]
        assert all(0.0 <= d <= high for d in delays)
    late = [restart_delay(10, 1.0, 30.0, rng) for _ in range(200)]
    assert max(late) > 15, "the cap, not the first step, bounds later restarts"


async def test_a_watched_child_reports_its_code_and_its_signal(reaper: Reaper) -> None:
    done = subprocess.Popen(  # noqa: ASYNC220 - the reaper waits, not Popen
        [sys.executable, "-c", "raise SystemExit(3)"]
    )
    code = reaper.watch(done.pid)
    killed = subprocess.Popen(  # noqa: ASYNC220 - the reaper waits, not Popen
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    death = reaper.watch(killed.pid)
    killed.kill()
    async with asyncio.timeout(20):
        assert await code == 3
        assert await death == -signal.SIGKILL
    done.returncode = killed.returncode = 0  # the reaper waited; Popen must not
    assert reaper.orphans_reaped == 0


async def test_an_orphaned_grandchild_is_reparented_to_us_and_reaped(reaper: Reaper) -> None:
    # The child forks a grandchild and exits at once; the grandchild, re-parented to us (we are
    # a subreaper), exits a moment later and would stay a zombie if nobody waited for it.
    script = textwrap.dedent(
        """
        import os, sys, time
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(0)
        sys.stdout.write("ok")
        """
    )
    child = subprocess.Popen(  # noqa: ASYNC220 - the reaper waits, not Popen
        [sys.executable, "-c", script]
    )
    exited = reaper.watch(child.pid)
    async with asyncio.timeout(20):
        assert await exited == 0
    child.returncode = 0
    assert reaper.subreaper or os.getpid() == 1
    await _until(lambda: reaper.orphans_reaped == 1)
    assert _zombies_of(os.getpid()) == []


async def test_asyncio_subprocesses_keep_their_exit_status_while_the_reaper_runs(reaper: Reaper) -> None:
    # The reaper stands in as asyncio's child watcher: nothing is stolen, nothing is an orphan.
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", f"raise SystemExit({i})") for i in range(5)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 20)
    assert results == [0, 1, 2, 3, 4]
    assert reaper.orphans_reaped == 0


async def test_uninstall_leaves_the_process_as_it_was() -> None:
    r = Reaper()
    r.install()
    r.uninstall()
    assert not r.subreaper
    # asyncio has its own watcher again: a subprocess still works without the reaper.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(4)")
    assert await asyncio.wait_for(proc.wait(), 20) == 4


def _main(reaper: Reaper, argv: list[str], sink: list[LogRecord], max_line: int = 64) -> MainProcess:
    return MainProcess(
        argv, reaper=reaper, sink=sink.append, max_line_bytes=max_line, echo_stdout=None, echo_stderr=None
    )


async def test_main_process_capture_is_unchanged(reaper: Reaper) -> None:
    lines: list[LogRecord] = []
    script = "import sys; print('a'); print('x' * 150); sys.stderr.write('err\\n'); print('tail', end='')"
    main = _main(reaper, [sys.executable, "-c", script], lines)
    await main.start()
    status = await asyncio.wait_for(main.wait(), 20)
    assert (status.exit_code, status.signal, status.detail) == (0, 0, "")
    out = [(r.message, r.continued) for r in lines if r.stream is LogStream.STDOUT]
    assert out == [("a", False), ("x" * 64, True), ("x" * 64, True), ("x" * 22, False), ("tail", False)]
    assert [r.message for r in lines if r.stream is LogStream.STDERR] == ["err"]


async def test_lines_wait_in_the_pipe_until_capture_starts(reaper: Reaper) -> None:
    """The agent journals STARTED between start() and start_capture(): no line may reach the sink
    before, however fast the main process writes (here it has written and exited before)."""
    lines: list[LogRecord] = []
    main = _main(reaper, ["/bin/sh", "-c", "echo first"], lines)
    await main.start()
    await _until(lambda: not main.running)  # it wrote, exited and was reaped
    await asyncio.sleep(0.2)  # and the event loop had every chance to read the pipe
    assert lines == [], "a line reached the sink before start_capture()"
    main.start_capture()
    status = await asyncio.wait_for(main.wait(), 20)
    assert status.exit_code == 0
    assert [r.message for r in lines] == ["first"]


async def test_main_process_signal_exit_codes(reaper: Reaper) -> None:
    lines: list[LogRecord] = []
    main = _main(
        reaper, [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], lines
    )
    await main.start()
    status = await asyncio.wait_for(main.wait(), 20)
    assert (status.exit_code, status.signal, status.detail) == (143, 15, "")


async def test_kill_after_grace_kills_the_whole_group(reaper: Reaper) -> None:
    # The main process and its child both ignore SIGTERM; only the group SIGKILL ends them.
    script = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # SIG_IGN survives exec: the child ignores SIGTERM too.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    lines: list[LogRecord] = []
    main = _main(reaper, [sys.executable, "-c", script], lines)
    await main.start()
    main.start_capture()
    await _until(lambda: lines)
    grandchild = int(lines[0].message)
    main.send_signal(signal.SIGTERM)
    main.kill_after(0.3)
    main.kill_after(30)  # armed once: a second stop request does not move the deadline
    status = await asyncio.wait_for(main.wait(), 20)
    assert (status.exit_code, status.signal, status.detail) == (137, 9, "killed after 0.3s grace")
    await _until(lambda: _state(grandchild) is None)  # killed, re-parented to us, reaped


async def test_a_missing_command_fails_to_start(reaper: Reaper) -> None:
    main = _main(reaper, ["/nonexistent/agent"], [])
    with pytest.raises(StartFailed) as info:
        await main.start()
    assert info.value.exit_code == 127
    assert reaper.orphans_reaped == 0
