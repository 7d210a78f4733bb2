"""Start and stop real gateway and supervisor processes for tests, and read what the gateway stored.

Everything runs as separate programs (``python -m gateway``, ``python -m supervisor``), the way
operators run them; the store is read back straight from the gateway's SQLite file.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]


#: Ports this process handed out lately: the kernel may give a port that was just released again at
#: once, so two ports of one GatewayProcess came out equal (its gRPC and HTTP listeners on one port:
#: the gateway refused to start, exit 78, in a CI run).
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=2048)


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise RuntimeError("no free port that was not handed out lately")


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_exit(
    proc: subprocess.Popen[bytes] | None, timeout: float, *, what: str, log: Callable[[], str]
) -> int:
    """``proc``'s exit code; an AssertionError with the tail of its ``log`` if it is still running."""
    assert proc is not None, f"{what} was never started"
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} still running after {timeout}s:\n{log()[-4000:]}") from None


def writer_command(
    n: int, *, prefix: str = "line", delay: float = 0.0, exit_code: int = 0, width: int = 0
) -> list[str]:
    """A main process that prints ``{prefix} {i}`` for i in 0..n-1 (padded to ``width``), then exits."""
    script = textwrap.dedent(
        """
        import sys, time
        n, prefix, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
        code, width = int(sys.argv[4]), int(sys.argv[5])
        for i in range(n):
            line = f"{prefix} {i}"
            print(line.ljust(width, "."), flush=True)
            if delay:
                time.sleep(delay)
        sys.exit(code)
        """
    )
    return [PYTHON, "-u", "-c", script, str(n), prefix, str(delay), str(exit_code), str(width)]


@dataclass
class GatewayProcess:
    workdir: Path
    grpc_host: str = "127.0.0.1"
    heartbeat_interval_s: float = 0.5
    grace_s: float = 1.0
    netns: str | None = None
    extra: Sequence[str] = ()
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    #: Parallel gateways must not share the default ops port (127.0.0.1:7090).
    ops_port: int = field(default_factory=free_port)
    #: Supervisor auth required (auth.supervisors.required), sessions.register_unknown left off
    #: and short-lived tokens: for tests whose supervisors are created through the API. Off, the
    #: gateway takes supervisors without credentials for any id, as most tests need.
    auth: bool = False
    #: Another database than the workdir's SQLite file (e.g. two gateways sharing one).
    database_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def db_path(self) -> Path:
        return self.workdir / "gateway.db"

    @property
    def address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "gateway.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            PYTHON, "-m", "gateway", "serve",
            "--grpc-listen", self.address,
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--ops-listen", f"127.0.0.1:{self.ops_port}",
            "--database-url", self.database_url or f"sqlite+aiosqlite:///{self.db_path}",
            "--set", f"sessions.heartbeat_interval_s={self.heartbeat_interval_s}",
            "--set", f"sessions.grace_s={self.grace_s}",
            "--set", "sessions.heartbeat_flush_interval_s=0.5",
            # No balancer to wait for on SIGTERM: the drain's hints go out at once (extra may
            # set it, as tests/integration/test_drain.py does).
            "--set", "drain.settle_s=0",
            # A replica id of its own (stable across restarts): gateways of one test share a host
            # name, the default id, and would take each other's lease row (extra may override it).
            "--set", f"ha.replica_id=gateway-{self.grpc_port}",
            *(
                ["--set", "auth.supervisors.required=true", "--set", "auth.supervisors.token_ttl_s=60"]
                if self.auth
                # Most tests start supervisors of sandboxes they never created through the API,
                # without credentials.
                else ["--set", "sessions.register_unknown=true", "--set", "auth.supervisors.required=false"]
            ),
            "--log-level", "debug",
            *self.extra,
        ]  # fmt: skip
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.starts += 1
        proc = self.proc
        # A gateway that exits (its port taken meanwhile by another test's process, say) is told
        # at once with its log, not after the whole wait.
        wait_until(
            lambda: (
                proc.poll() is not None
                or b"gateway ready" in self.log_path.read_bytes().split(b"--- start")[-1]
            ),
            timeout=60,
            what=f"gateway ready (see {self.log_path})",
        )
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}:\n{self.log_text()}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- reading what was stored ---------------------------------------------------------

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if not self.db_path.exists():
            return []
        with contextlib.closing(
            sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        ) as conn:
            try:
                return list(conn.execute(sql, params))
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def events(self, sandbox_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT journal_epoch, sequence, kind, stream, message, data FROM events WHERE sandbox_id = ?"
        params: list[object] = [sandbox_id]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY id"
        rows = self.query(sql, params)
        return [
            {"epoch": r[0], "sequence": r[1], "kind": r[2], "stream": r[3], "message": r[4],
             "data": json.loads(r[5]) if r[5] else None}
            for r in rows
        ]  # fmt: skip

    def log_lines(self, sandbox_id: str) -> list[str]:
        return [e["message"] for e in self.events(sandbox_id, "log") if e["stream"] in ("stdout", "stderr")]


@dataclass
class SupervisorProcess:
    workdir: Path
    sandbox_id: str
    gateway_address: str
    command: Sequence[str]
    netns: str | None = None
    settings: Sequence[str] = ()
    #: A command the supervisor runs under (e.g. strace injecting faults), before its argv.
    wrapper: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def journal_dir(self) -> Path:
        return self.workdir / "journal"

    @property
    def log_path(self) -> Path:
        return self.workdir / "supervisor.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            PYTHON, "-m", "supervisor", "run",
            "--sandbox-id", self.sandbox_id,
            "--gateway", self.gateway_address,
            "--journal-dir", str(self.journal_dir),
            "--log-level", "debug",
            "--set", "capture.echo=false",
            "--set", "session.reconnect_initial_s=0.2",
            "--set", "session.reconnect_max_s=2",
            "--set", "gateway.connect_timeout_s=2",
        ]  # fmt: skip
        for item in self.settings:
            argv += ["--set", item]
        argv += ["--", *self.command]
        argv = [*self.wrapper, *argv]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        return wait_for_exit(self.proc, timeout, what="supervisor", log=self.log_text)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
