"""Debian's haproxy in front of several gateways, standing in for a Kubernetes Service: TCP mode
(layer 4, as a Service's kube-proxy rules are), one frontend for gRPC and one for the HTTP API,
each balancing new connections round robin over the gateways that pass their health check.

The check is each gateway's ``/readyz`` on its ops port (the chart's readiness probe), every
``check_interval_ms``: a killed gateway fails it at once (connection refused) and one shutting down
says not ready before its sessions end, so it is taken out after ``fall`` failed checks. A
connection that still reaches a dead gateway in between is redispatched to another one.

``ensure_haproxy`` installs the package with apt when it is missing and we are root, and otherwise
skips the test with the reason. ``running_haproxy`` writes the configuration, starts haproxy in the
foreground (its own process group) and stops it on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import free_port, wait_until


def ensure_haproxy() -> str:
    """The path of the haproxy binary, installed with apt if needed; skips the test otherwise."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("haproxy missing and not root with apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            "haproxy",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if found is None:
        pytest.skip(f"could not apt-get install haproxy: {done.stderr.strip()[-500:]}")
    return found


@dataclass(frozen=True)
class Backend:
    """One gateway as haproxy sees it: its gRPC and HTTP API ports, and the ops port it is checked on."""

    name: str
    grpc_port: int
    http_port: int
    ops_port: int


@dataclass(frozen=True)
class HAProxy:
    grpc_port: int
    http_port: int
    #: The admin socket: ``server_states()`` reads each gateway's UP/DOWN through it.
    stats_socket: Path
    log: Path

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self, line: str) -> str:
        """One command on the admin socket (e.g. ``show servers state``), its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self, backend: str = "grpc") -> dict[str, bool]:
        """Each server of ``backend``: True while haproxy has it UP (its check passes)."""
        states: dict[str, bool] = {}
        for line in self.command(f"show servers state {backend}").splitlines():
            fields = line.split()
            # be_id be_name srv_id srv_name srv_addr srv_op_state ...; op state 2 is running
            if len(fields) > 5 and fields[1] == backend and fields[0].isdigit():
                states[fields[3]] = fields[5] == "2"
        return states


def _config(
    backends: Sequence[Backend],
    *,
    grpc_port: int,
    http_port: int,
    stats_socket: Path,
    balance: str,
    check_interval_ms: int,
    fall: int,
    rise: int,
) -> str:
    def servers(port_of: str) -> list[str]:
        return [
            f"    server {b.name} 127.0.0.1:{getattr(b, port_of)} check port {b.ops_port}"
            f" inter {check_interval_ms} fall {fall} rise {rise}"
            for b in backends
        ]

    # Sessions are long-lived streams with heartbeats every few seconds: the client and server
    # timeouts only bound a connection that went silent, as the supervisor's own stale bound does.
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    maxconn 2000",
        "defaults",
        "    mode tcp",
        "    timeout connect 1s",
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 1s",
        # A new connection that finds its gateway dead (not yet marked down) goes to another.
        "    retries 2",
        "    option redispatch",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        "frontend grpc_in",
        f"    bind 127.0.0.1:{grpc_port}",
        "    default_backend grpc",
        "frontend api_in",
        f"    bind 127.0.0.1:{http_port}",
        "    default_backend api",
        "backend grpc",
        f"    balance {balance}",
        *servers("grpc_port"),
        "backend api",
        f"    balance {balance}",
        *servers("http_port"),
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_haproxy(
    workdir: Path,
    backends: Sequence[Backend],
    *,
    balance: str = "roundrobin",
    check_interval_ms: int = 300,
    fall: int = 2,
    rise: int = 2,
) -> Iterator[HAProxy]:
    """haproxy in front of ``backends`` until the block ends; every backend UP before it starts."""
    binary = ensure_haproxy()
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = HAProxy(
        grpc_port=free_port(),
        http_port=free_port(),
        stats_socket=workdir / "haproxy.sock",
        log=workdir / "haproxy.log",
    )
    config = workdir / "haproxy.cfg"
    config.write_text(
        _config(
            backends,
            grpc_port=proxy.grpc_port,
            http_port=proxy.http_port,
            stats_socket=proxy.stats_socket,
            balance=balance,
            check_interval_ms=check_interval_ms,
            fall=fall,
            rise=rise,
        )
    )
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, f"haproxy refused its configuration:\n{check.stdout}{check.stderr}"
    with proxy.log.open("ab") as out:
        # -db: foreground, so it is our child and dies with its process group.
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(
            lambda: (
                proc.poll() is not None or (proxy.stats_socket.exists() and _all_up(proxy, len(backends)))
            ),
            timeout=30,
            what=f"haproxy up with every gateway passing its check (see {proxy.log})",
        )
        assert proc.poll() is None, f"haproxy exited with {proc.returncode}:\n{proxy.log.read_text()}"
        yield proxy
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _all_up(proxy: HAProxy, count: int) -> bool:
    try:
        states = [*proxy.server_states("grpc").values(), *proxy.server_states("api").values()]
    except OSError:
        return False
    return len(states) == 2 * count and all(states)
