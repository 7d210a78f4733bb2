"""The supervisor as the sandbox's init: reaping, signal forwarding, exit codes, stop, restarts.

Real processes throughout: the gateway (SQLite), the supervisor (a child subreaper, as it is
when it is not PID 1), and main processes written for each duty. What the gateway stored is read
back from its database file; what the kernel shows is read from /proc.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import PYTHON, GatewayProcess, SupervisorProcess, wait_until, writer_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")


def _python(script: str, *args: str) -> list[str]:
    return [PYTHON, "-u", "-c", textwrap.dedent(script), *args]


def _supervisor(
    tmp_path: Path, gw: GatewayProcess, sandbox_id: str, command: list[str], settings: list[str] | None = None
) -> SupervisorProcess:
    return SupervisorProcess(
        tmp_path / sandbox_id,
        sandbox_id,
        gw.address,
        command,
        settings=["session.exit_flush_timeout_s=20", *(settings or [])],
    )


def _lifecycle(gw: GatewayProcess, sandbox_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The lifecycle records' data of a sandbox, in order; only those of ``kind`` if given."""
    found = [e["data"] for e in gw.events(sandbox_id, "lifecycle")]
    return [d for d in found if kind is None or d["kind"] == kind]


def _proc_status(pid: int) -> tuple[str, int] | None:
    """(State letter, PPid) of ``pid`` from /proc, or None once it is gone (reaped)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields["State"].strip()[0], int(fields["PPid"])


def _zombies_of(parent: int) -> list[int]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if _proc_status(pid) == ("Z", parent)]


def _line_with(gw: GatewayProcess, sandbox_id: str, prefix: str) -> str | None:
    return next((line for line in gw.log_lines(sandbox_id) if line.startswith(prefix)), None)


# -- reaping -------------------------------------------------------------------------------------

# The main process forks a child that forks a grandchild and exits at once (a double fork, as a
# daemon does). The grandchild waits until it is re-parented, says to whom, and exits: it is a
# zombie of its new parent until that parent waits for it. The main process lives on until told.
DOUBLE_FORK = """
import os, sys, time
done = sys.argv[1]
child = os.fork()
if child == 0:
    me = os.getpid()
    if os.fork() == 0:
        os.setsid()
        while os.getppid() == me:
            time.sleep(0.01)
        print(f"grandchild {os.getpid()} reparented to {os.getppid()}", flush=True)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
while not os.path.exists(done):
    time.sleep(0.05)
print("main done", flush=True)
"""


def test_an_orphaned_grandchild_is_reaped_by_the_supervisor(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    done = tmp_path / "done"
    sv = _supervisor(tmp_path, gateway, "reap", _python(DOUBLE_FORK, str(done)))
    supervisors.append(sv)
    sv.start()
    assert sv.proc is not None
    line = wait_until(
        lambda: _line_with(gateway, "reap", "grandchild "), timeout=30, what="the grandchild's report"
    )
    _, grandchild, _, _, parent = line.split()
    assert int(parent) == sv.proc.pid, "the supervisor (a subreaper) adopts orphans"

    # The grandchild has exited by now; the supervisor waited for it, so no zombie is left.
    wait_until(lambda: _proc_status(int(grandchild)) is None, timeout=15, what="the grandchild reaped")
    assert _zombies_of(sv.proc.pid) == []
    wait_until(
        lambda: "reaped orphaned process" in sv.log_text() and f"pid={grandchild}" in sv.log_text(),
        timeout=15,
        what="the reap logged",
    )

    done.touch()
    assert sv.wait(timeout=60) == 0, sv.log_text()[-3000:]
    assert "reaped 1 orphaned processes" in sv.log_text()
    assert gateway.log_lines("reap")[-1] == "main done"
    assert [d["exit_code"] for d in _lifecycle(gateway, "reap", "exited")] == [0]


# -- signals -------------------------------------------------------------------------------------

SIGNAL_REPORTER = """
import signal, sys, time
def report(sig, frame):
    print(f"got {signal.Signals(sig).name}", flush=True)
def stop(sig, frame):
    print("got SIGTERM", flush=True)
    sys.exit(0)
def quit_(sig, frame):
    print("got SIGQUIT", flush=True)
    sys.exit(0)
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGWINCH):
    signal.signal(s, report)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGQUIT, quit_)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_signals_are_forwarded_to_the_main_process(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = _supervisor(tmp_path, gateway, "signals", _python(SIGNAL_REPORTER), ["process.restart=on-failure"])
    supervisors.append(sv)
    sv.start()
    assert sv.proc is not None
    wait_until(lambda: "ready" in gateway.log_lines("signals"), timeout=30, what="main process ready")
    for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH):
        sv.proc.send_signal(sig)
        wait_until(
            lambda sig=sig: f"got {sig.name}" in gateway.log_lines("signals"),  # type: ignore[misc]
            timeout=15,
            what=f"{sig.name} forwarded",
        )
    assert sv.proc.poll() is None, "a forwarded signal does not stop the supervisor"

    sv.proc.send_signal(signal.SIGTERM)
    assert sv.wait(timeout=60) == 0, sv.log_text()[-3000:]
    assert gateway.log_lines("signals") == [
        "ready",
        "got SIGUSR1",
        "got SIGHUP",
        "got SIGUSR2",
        "got SIGWINCH",
        "got SIGTERM",
    ]
    # It exited within the grace period, by its own hand: no kill, and a stop is never restarted.
    assert len(_lifecycle(gateway, "signals", "started")) == 1
    (exited,) = _lifecycle(gateway, "signals", "exited")
    assert (exited["exit_code"], exited["signal"], exited["detail"]) == (0, 0, "")


def test_sigquit_stops_the_sandbox_and_reaches_the_main_process_as_sigquit(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    """An image's STOPSIGNAL may be SIGQUIT (nginx): the runtime sends it to PID 1, the supervisor."""
    gateway.start()
    sv = _supervisor(tmp_path, gateway, "quit", _python(SIGNAL_REPORTER), ["process.restart=on-failure"])
    supervisors.append(sv)
    sv.start()
    assert sv.proc is not None
    wait_until(lambda: "ready" in gateway.log_lines("quit"), timeout=30, what="main process ready")
    sv.proc.send_signal(signal.SIGQUIT)
    assert sv.wait(timeout=60) == 0, sv.log_text()[-3000:]
    assert gateway.log_lines("quit") == ["ready", "got SIGQUIT"]
    assert len(_lifecycle(gateway, "quit", "started")) == 1, "a stop is never restarted"


# -- exit codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("import sys; print('bye', flush=True); sys.exit(5)", 5, 0),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137, 9),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143, 15),
    ],
    ids=["code", "sigkill", "sigterm"],
)
def test_the_supervisor_exits_with_the_main_process_code(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess], case: tuple[str, int, int]
) -> None:
    script, code, sig = case
    gateway.start()
    sv = _supervisor(tmp_path, gateway, "codes", _python(script))
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == code, sv.log_text()[-3000:]
    (exited,) = _lifecycle(gateway, "codes", "exited")
    assert (exited["exit_code"], exited["signal"], exited["detail"]) == (code, sig, "")
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'codes'") == [(code,)]


# -- stop: grace, then kill ----------------------------------------------------------------------

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda sig, frame: print("ignoring SIGTERM", flush=True))
# A child in the same process group that ignores SIGTERM as well.
deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
child = subprocess.Popen([sys.executable, "-c", deaf])
print(f"child {child.pid}", flush=True)
while True:
    time.sleep(0.05)
"""


def test_a_main_process_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = _supervisor(
        tmp_path,
        gateway,
        "stubborn",
        _python(STUBBORN),
        # A stop is never restarted, whatever the policy.
        ["process.stop_grace_s=1", "process.restart=on-failure"],
    )
    supervisors.append(sv)
    sv.start()
    assert sv.proc is not None
    line = wait_until(
        lambda: _line_with(gateway, "stubborn", "child "), timeout=30, what="main process ready"
    )
    child = int(line.split()[1])

    sv.proc.send_signal(signal.SIGTERM)
    assert sv.wait(timeout=60) == 137, sv.log_text()[-3000:]
    assert "ignoring SIGTERM" in gateway.log_lines("stubborn"), "SIGTERM came first"
    assert "killing its process group" in sv.log_text()
    assert len(_lifecycle(gateway, "stubborn", "started")) == 1
    (exited,) = _lifecycle(gateway, "stubborn", "exited")
    assert (exited["exit_code"], exited["signal"], exited["detail"]) == (137, 9, "killed after 1s grace")
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'stubborn'") == [(137,)]
    # The whole group was killed: the child that ignored SIGTERM too is dead (or a zombie of
    # whoever adopted it after the supervisor exited), not running on.
    wait_until(
        lambda: _proc_status(child) is None or _proc_status(child)[0] in "ZX",  # type: ignore[index]
        timeout=15,
        what="the main process's child killed",
    )


# -- restart policy ------------------------------------------------------------------------------


def test_on_failure_restarts_up_to_the_limit_and_exits_with_the_last_code(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = _supervisor(
        tmp_path,
        gateway,
        "restarts",
        writer_command(1, exit_code=3),
        [
            "process.restart=on-failure",
            "process.restart_limit=2",
            "process.restart_backoff_initial_s=0.05",
            "process.restart_backoff_max_s=0.2",
        ],
    )
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == 3, sv.log_text()[-3000:]

    runs = [(d["kind"], d["exit_code"], d["detail"]) for d in _lifecycle(gateway, "restarts")]
    assert runs == [
        ("supervisor_started", 0, ""),
        ("started", 0, ""),
        ("exited", 3, ""),
        ("started", 0, "restart 1/2 after exit code 3"),
        ("exited", 3, ""),
        ("started", 0, "restart 2/2 after exit code 3"),
        ("exited", 3, ""),
    ]
    pids = [d["pid"] for d in _lifecycle(gateway, "restarts", "started")]
    assert len(set(pids)) == 3 and all(pids), "each run is a new process"
    assert gateway.log_lines("restarts") == ["line 0"] * 3
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'restarts'") == [(3,)]


FAILS_TWICE = """
import sys
from pathlib import Path
counter = Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
print(f"run {n}", flush=True)
sys.exit(0 if n == 3 else 4)
"""


def test_on_failure_stops_restarting_once_the_main_process_succeeds(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = _supervisor(
        tmp_path,
        gateway,
        "recovers",
        _python(FAILS_TWICE, str(tmp_path / "counter")),
        ["process.restart=on-failure", "process.restart_backoff_initial_s=0.05"],
    )
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == 0, sv.log_text()[-3000:]
    assert gateway.log_lines("recovers") == ["run 1", "run 2", "run 3"]
    assert [d["exit_code"] for d in _lifecycle(gateway, "recovers", "exited")] == [4, 4, 0]
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'recovers'") == [(0,)]


def test_the_default_policy_never_restarts(
    tmp_path: Path, gateway: GatewayProcess, supervisors: list[SupervisorProcess]
) -> None:
    gateway.start()
    sv = _supervisor(tmp_path, gateway, "once", writer_command(1, exit_code=3))
    supervisors.append(sv)
    sv.start()
    assert sv.wait(timeout=60) == 3, sv.log_text()[-3000:]
    assert len(_lifecycle(gateway, "once", "started")) == 1
    assert [d["exit_code"] for d in _lifecycle(gateway, "once", "exited")] == [3]
    assert gateway.log_lines("once") == ["line 0"]
