"""A real highly available PostgreSQL for tests: Debian's Patroni managing a primary and a streaming
replica, with a one-member etcd (the binary tests/cluster builds) as its distributed store.

``ensure_patroni`` installs the package with apt when it is missing and we are root, and otherwise
skips the test with the reason. ``running_patroni`` starts etcd, bootstraps node ``pg0`` (the first
primary), then ``pg1`` (a replica cloned from it), waits until pg1 is the *synchronous* standby, and
stops everything on exit. Patroni and PostgreSQL run as the ``postgres`` user (PostgreSQL refuses
root), each node in a process group of its own so ``kill_node`` can kill a node's Patroni and its
postgres processes with SIGKILL at once, as a crashed machine would.

The DCS settings are the ones the failover test measures: ``ttl`` 10 s, ``loop_wait`` 2 s,
``retry_timeout`` 5 s, and ``synchronous_mode: true``: a commit returns only once the standby has
it, and Patroni promotes only that standby, so a transaction the gateway saw committed (and
acknowledged to a supervisor) survives the primary's loss. Authentication is ``trust`` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.support.kubecluster import BuildError, build
from tests.support.postgres import pg_bindir
from tests.support.procs import free_port, wait_until

SCOPE = "openshell-test"
TTL_S, LOOP_WAIT_S, RETRY_TIMEOUT_S = 10, 2, 5


def ensure_patroni() -> str:
    """The path of the patroni program, installed with apt if needed; skips the test otherwise."""
    found = shutil.which("patroni")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("patroni missing and not root with apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", "patroni"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    found = shutil.which("patroni")
    if found is None:
        pytest.skip(f"could not apt-get install patroni: {done.stderr.strip()[-500:]}")
    return found


def etcd_binary() -> Path:
    """The etcd that tests/cluster/build.sh builds (found in its cache, or built)."""
    try:
        return build(target="plane") / "etcd"
    except BuildError as exc:
        pytest.skip(f"no etcd for Patroni: {exc.reason}")


@dataclass
class Node:
    name: str
    pg_port: int
    rest_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def rest(self, path: str) -> tuple[int, dict[str, Any]]:
        """Patroni's REST answer for ``path`` (status, JSON body); (0, {}) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}{path}", timeout=2) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return int(exc.code), json.loads(body or b"{}")
            except ValueError:
                return int(exc.code), {}
        except (OSError, ValueError):
            return 0, {}

    def is_primary(self) -> bool:
        return self.rest("/primary")[0] == 200

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class PatroniCluster:
    root: Path
    nodes: list[Node]
    run_as: str
    etcd: subprocess.Popen[bytes] | None = None
    killed: list[str] = field(default_factory=list)

    @property
    def user(self) -> str:
        return "postgres"

    def url(self, database: str = "postgres") -> str:
        """The gateway's multi-host URL: every node, only the primary taken (read-write)."""
        hosts = "&".join(f"host=127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql+asyncpg://{self.user}@/{database}?{hosts}&target_session_attrs=read-write"

    def primary(self) -> Node | None:
        return next((n for n in self.nodes if n.name not in self.killed and n.is_primary()), None)

    def sync_standby(self) -> str | None:
        for node in self.nodes:
            if node.name in self.killed:
                continue
            status, body = node.rest("/cluster")
            if status == 200:
                for member in body.get("members", []):
                    if member.get("role") == "sync_standby" and member.get("state") in (
                        "running",
                        "streaming",
                    ):
                        return str(member["name"])
        return None

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's Patroni and its postgres (the postmaster and every backend), at once (no
        shutdown). Patroni starts the postmaster detached (it is not Patroni's child): it is found by
        its data directory. A postmaster left running would stay a primary beside the promoted one,
        its commits waiting forever for the synchronous standby it lost."""
        assert node.proc is not None
        procs = _tree(node.proc.pid)
        data_dir = str(self.root / node.name)
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "postgres" and data_dir in (proc.info["cmdline"] or []):
                procs.extend(_tree(proc.pid))
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        self.killed.append(node.name)

    def walreceiver(self, node: Node) -> psutil.Process:
        """The standby ``node``'s WAL receiver (the process streaming the primary's WAL to it), found
        under the postmaster of its data directory (waited for: it starts after the standby)."""
        data_dir = str(self.root / node.name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for proc in psutil.process_iter(["name", "cmdline"]):
                if proc.info["name"] == "postgres" and data_dir in (proc.info["cmdline"] or []):
                    for child in proc.children():
                        with contextlib.suppress(psutil.NoSuchProcess):
                            if "walreceiver" in " ".join(child.cmdline()):
                                return child
            time.sleep(0.2)
        raise AssertionError(f"no WAL receiver on {node.name}\n{self.logs()}")

    @contextlib.contextmanager
    def replication_cut(self, standby: Node, primary: Node) -> Iterator[None]:
        """Drop what ``primary`` sends on ``standby``'s replication connection (an nft rule on the
        loopback for that connection's ports only), its connection left up: the standby falls
        behind the primary's commits and, if the primary dies meanwhile, never gets them. (A
        frozen WAL receiver would not do: its kernel still buffers the WAL, read once it wakes.)"""
        receiver = self.walreceiver(standby)
        ports = sorted(
            c.laddr.port
            for c in receiver.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == primary.pg_port
        )
        assert ports, f"{standby.name}'s WAL receiver is not connected to {primary.name}"
        table = f"openshell_replication_cut_{os.getpid()}"
        rules = (
            f"table inet {table} {{\n chain input {{\n"
            "  type filter hook input priority 0; policy accept;\n"
            f"  tcp sport {primary.pg_port} tcp dport {{ {', '.join(map(str, ports))} }} drop\n }}\n}}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False, capture_output=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log_text()[-3000:]}" for n in self.nodes)


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    return []


def _config(root: Path, node: Node, *, etcd_port: int, bindir: Path) -> dict[str, Any]:
    data = root / node.name
    return {
        "scope": SCOPE,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"127.0.0.1:{node.rest_port}",
            "connect_address": f"127.0.0.1:{node.rest_port}",
        },
        "etcd3": {"hosts": [f"127.0.0.1:{etcd_port}"]},
        "bootstrap": {
            "dcs": {
                "ttl": TTL_S,
                "loop_wait": LOOP_WAIT_S,
                "retry_timeout": RETRY_TIMEOUT_S,
                "maximum_lag_on_failover": 1024 * 1024,
                "synchronous_mode": True,
                "postgresql": {
                    "use_pg_rewind": False,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "max_wal_senders": 5,
                        "max_replication_slots": 5,
                        "wal_keep_size": "64MB",
                        # Throwaway data: a process kill keeps the OS's page cache, which is what is tested.
                        "fsync": "off",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}, "no-sync"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.pg_port}",
            "connect_address": f"127.0.0.1:{node.pg_port}",
            "data_dir": str(data),
            "bin_dir": str(bindir),
            "pgpass": str(root / f"pgpass-{node.name}"),
            "authentication": {
                "superuser": {"username": "postgres", "password": "postgres"},
                "replication": {"username": "replicator", "password": "replicator"},
            },
            "pg_hba": [
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "host replication replicator 127.0.0.1/32 trust",
            ],
            "parameters": {"unix_socket_directories": str(root)},
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


def _start_etcd(root: Path, binary: Path) -> tuple[subprocess.Popen[bytes], int]:
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    out = (root / "etcd.log").open("ab")
    proc = subprocess.Popen(
        [
            str(binary),
            "--name=default",
            f"--data-dir={root / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited:\n{(root / 'etcd.log').read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    wait_until(healthy, timeout=30, what="etcd healthy")
    return proc, client


def _start_node(node: Node, *, patroni: str, run_as: str) -> None:
    out = node.log.open("ab")
    node.proc = subprocess.Popen(
        ["runuser", "-u", run_as, "--", patroni, str(node.config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=node.config.parent,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    procs: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(proc.pid)
        procs = [top, *top.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@contextlib.contextmanager
def running_patroni() -> Iterator[PatroniCluster]:
    """A primary and a synchronous standby under Patroni (see the module docstring)."""
    patroni = ensure_patroni()
    bindir = pg_bindir()
    if bindir is not None:
        # Patroni needs the whole set (pg_controldata, pg_basebackup...), not a symlinked pg_ctl.
        bindir = Path(os.path.realpath(bindir / "pg_ctl")).parent
    if bindir is None or not (bindir / "pg_controldata").is_file():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    if os.geteuid() != 0:
        pytest.skip("running Patroni as the postgres user needs root (runuser)")
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user to run Patroni and PostgreSQL as")
    etcd = etcd_binary()
    root = Path(tempfile.mkdtemp(prefix="openshell-patroni-"))
    os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = PatroniCluster(root=root, nodes=[], run_as="postgres")
    try:
        cluster.etcd, etcd_port = _start_etcd(root, etcd)
        for name in ("pg0", "pg1"):
            node = Node(
                name=name,
                pg_port=free_port(),
                rest_port=free_port(),
                config=root / f"{name}.yml",
                log=root / f"{name}.log",
            )
            node.config.write_text(yaml.safe_dump(_config(root, node, etcd_port=etcd_port, bindir=bindir)))
            os.chown(node.config, entry.pw_uid, entry.pw_gid)
            cluster.nodes.append(node)
        first, second = cluster.nodes
        try:
            _start_node(first, patroni=patroni, run_as="postgres")
            wait_until(first.is_primary, timeout=60, what="pg0 primary", interval=0.3)
            _start_node(second, patroni=patroni, run_as="postgres")
            wait_until(
                lambda: cluster.sync_standby() == "pg1",
                timeout=60,
                what="pg1 the synchronous standby",
                interval=0.3,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()}") from None
        yield cluster
    finally:
        for node in cluster.nodes:
            _stop(node.proc)
        _stop(cluster.etcd)
        # Postgres processes left by a Patroni killed first (its postmaster exits on its own too).
        for proc in psutil.process_iter(["username", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["username"] == "postgres" and str(root) in cmdline:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
