"""The supervisor's idle footprint and its time to connect, against baselines in the same run.

A gateway (``python -m gateway serve``, SQLite file in a temp dir, the default 10 s heartbeat)
and three idle processes, side by side over the same window of N seconds:

* **supervisor**: ``python -m supervisor run ... -- sleep N+30``, default settings (capture echo
  on, fsync interval, HTTP endpoints off), connected to the gateway;
* **bare grpc.aio client** (baseline): a few lines of ``grpc.aio`` that open one
  ConnectSupervisor stream with a valid hello (capability ``events``), read the answers and send
  a heartbeat every 10 s: the least any supervisor that holds a session must pay;
* **bare python** (baseline): ``python -c "import time; time.sleep(N+30)"``.

Time to connect: from just before ``Popen`` to the moment the gateway's ``sandboxes`` row says
connected (the gateway writes it before it sends SessionAccepted), polled read-only every 5 ms,
for the supervisor and the bare client (a bare python does not connect).

Over the window each process is sampled once a second with psutil: RSS (max and at the end), USS
at the end (memory no other process shares; needs /proc/<pid>/smaps) and its own CPU seconds
(user+system, children excluded) over the window, reported as a share of one core.

What the RSS is made of: a separate ``python`` imports the supervisor's dependencies one after
the other and reports its RSS (and the import's wall time) after each, so the growth is
attributed to the module that caused it (cumulative, in about the order the supervisor's own
imports load them).

DESIGN's targets: supervisor under 40 MiB RSS and under 0.5% of a core idle, connected within
1 s of its start.

Usage: ``python benchmarks/supervisor_idle.py [--seconds 60] [--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _procs import PYTHON, REPO, child_env, free_port, wait_http

MIB = 1024 * 1024
SUPERVISOR_ID = "bench-idle-supervisor"
BUNDLE_ID = "bench-idle-image-tree"
DEFAULT_TREE = REPO / "build" / "bundle" / "tree"
CLIENT_ID = "bench-idle-bare-client"
HEARTBEAT_S = 10.0
CONNECT_POLL_S = 0.005
_RESULT = "supervisor_idle.json"
TARGET_RSS_MIB = 40.0
TARGET_CPU_PERCENT = 0.5
TARGET_CONNECT_MS = 1000.0

_BARE_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, time, uuid
    from grpc import aio
    from openshell_wire.v1 import openshell_pb2 as pb
    from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc

    async def main(address, sandbox_id, interval):
        async with aio.insecure_channel(address) as channel:
            call = pb_grpc.OpenShellStub(channel).ConnectSupervisor()
            hello = pb.SupervisorMessage()
            hello.hello.sandbox_id = sandbox_id
            hello.hello.instance_id = uuid.uuid4().hex
            hello.hello.capabilities.append("events")
            hello.hello.journal_epoch = uuid.uuid4().hex
            await call.write(hello)
            first = await call.read()
            assert first.WhichOneof("payload") == "session_accepted", first

            async def drain():
                while await call.read() is not aio.EOF:
                    pass

            reader = asyncio.create_task(drain())
            while not reader.done():
                await asyncio.sleep(interval)
                beat = pb.SupervisorMessage()
                beat.heartbeat.sent_unix_ms = int(time.time() * 1000)
                await call.write(beat)

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)

#: What the supervisor loads, in about the order its imports load it; the RSS after each line
#: is measured cumulatively. The last one is everything ``supervisor run`` imports.
_IMPORT_STEPS = [
    ("python itself", ""),
    ("asyncio, logging, json (stdlib)", "import asyncio, logging, json, subprocess, signal"),
    ("yaml", "import yaml"),
    ("pydantic", "import pydantic"),
    ("pydantic_settings", "import pydantic_settings"),
    ("aiohttp (supervisor.http, readiness)", "import aiohttp, aiohttp.web"),
    ("prometheus_client (supervisor.metrics)", "import prometheus_client"),
    ("protobuf + generated stubs", "import openshell_wire.v1.openshell_pb2"),
    ("grpc, grpc.aio", "import grpc, grpc.aio, openshell_wire.v1.openshell_pb2_grpc"),
    ("tenacity", "import tenacity"),
    ("supervisor.config (models built)", "import supervisor.config"),
    ("supervisor.agent (everything else)", "import supervisor.agent, supervisor.cli"),
]

_IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys, time
    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    out = []
    for name, code in json.loads(sys.argv[1]):
        start = time.perf_counter()
        exec(code)
        out.append([name, rss(), time.perf_counter() - start])
    print(json.dumps(out))
    """
)


@dataclass
class Sampled:
    what: str
    proc: subprocess.Popen[bytes]
    connect_ms: float | None = None
    rss: list[int] = field(default_factory=list)
    uss_end: int | None = None
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    window_s: float = 0.0

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def sample(self) -> None:
        self.rss.append(int(self.ps.memory_info().rss))

    def finish(self) -> None:
        self.sample()
        with contextlib.suppress(psutil.AccessDenied, AttributeError):
            self.uss_end = int(self.ps.memory_full_info().uss)

    def row(self) -> dict[str, Any]:
        cpu_s = self.cpu_end - self.cpu_start
        return {
            "what": self.what,
            "pid": self.proc.pid,
            "rss_end_mib": round(self.rss[-1] / MIB, 1),
            "rss_max_mib": round(max(self.rss) / MIB, 1),
            "uss_end_mib": round(self.uss_end / MIB, 1) if self.uss_end is not None else None,
            "cpu_s": round(cpu_s, 3),
            "cpu_percent_of_core": round(100 * cpu_s / self.window_s, 3),
            "connect_ms": round(self.connect_ms, 1) if self.connect_ms is not None else None,
        }


def _connected(db: sqlite3.Connection | None, sandbox_id: str) -> bool:
    if db is None:
        return False
    try:
        row = db.execute("SELECT connected FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    except sqlite3.OperationalError:  # locked for a moment by the gateway's write
        return False
    return bool(row and row[0])


def _start_and_connect(
    what: str, argv: list[str], *, sandbox_id: str, db_path: Path, log_path: Path, cwd: Path
) -> Sampled:
    """Start ``argv`` and return once the gateway's row for ``sandbox_id`` says connected."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1, isolation_level=None)
    try:
        with log_path.open("ab") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd)
        deadline = start + 30
        while not _connected(db, sandbox_id):
            if proc.poll() is not None or time.perf_counter() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"{what} did not connect (exit {proc.poll()}):\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(CONNECT_POLL_S)
        return Sampled(what, proc, connect_ms=(time.perf_counter() - start) * 1000)
    finally:
        db.close()


def import_breakdown() -> list[dict[str, Any]]:
    """RSS after each step of the supervisor's imports, in a fresh interpreter."""
    done = subprocess.run(
        [PYTHON, "-c", _IMPORT_PROBE, json.dumps(_IMPORT_STEPS)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        check=True,
    )
    rows, previous = [], 0
    for name, rss, seconds in json.loads(done.stdout):
        rows.append(
            {
                "step": name,
                "rss_mib": round(rss / MIB, 1),
                "added_mib": round((rss - previous) / MIB, 1),
                "import_ms": round(seconds * 1000, 1),
            }
        )
        previous = rss
    return rows


def _tree_launcher(tree: Path) -> list[str]:
    import sys

    sys.path.insert(0, str(REPO))
    from imagevolume.bundle import launcher

    return launcher(str(tree))


def measure(root: Path, seconds: float, bundle: Path | None = None) -> list[Sampled]:
    db_path = root / "gateway.db"
    grpc_address = f"127.0.0.1:{free_port()}"
    http_port = free_port()
    ops_port = free_port()
    gateway_log = root / "gateway.log"
    gateway_argv = [
        PYTHON, "-m", "gateway", "serve",
        "--grpc-listen", grpc_address,
        "--http-listen", f"127.0.0.1:{http_port}",
        "--ops-listen", f"127.0.0.1:{ops_port}",
        "--database-url", f"sqlite+aiosqlite:///{db_path}",
        "--log-level", "info",
        # The supervisor is started by hand here, without a credential (the data path is what is
        # measured): a development gateway that takes credential-less supervisors.
        "--set", "auth.supervisors.required=false",
        "--set", "sessions.register_unknown=true",
    ]  # fmt: skip
    with gateway_log.open("ab") as out:
        gateway = subprocess.Popen(
            gateway_argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=root
        )
    started: list[Sampled] = []
    try:
        wait_http(f"http://127.0.0.1:{ops_port}/healthz", gateway, gateway_log)
        linger = str(int(seconds + 30))
        supervisor_argv = [
            PYTHON, "-m", "supervisor", "run",
            "--sandbox-id", SUPERVISOR_ID,
            "--gateway", grpc_address,
            "--journal-dir", str(root / "journal"),
            "--log-level", "info",
            "--", "sleep", linger,
        ]  # fmt: skip
        started.append(
            _start_and_connect(
                "supervisor",
                supervisor_argv,
                sandbox_id=SUPERVISOR_ID,
                db_path=db_path,
                log_path=root / "supervisor.log",
                cwd=root,
            )
        )
        if bundle is not None:
            # The shipped form: the image volume's tree, started the way the pod's command starts it.
            started.append(
                _start_and_connect(
                    "supervisor (image tree)",
                    [
                        *_tree_launcher(bundle),
                        "run",
                        "--sandbox-id",
                        BUNDLE_ID,
                        "--gateway",
                        grpc_address,
                        "--journal-dir",
                        str(root / "bundle-journal"),
                        "--log-level",
                        "info",
                        "--",
                        "sleep",
                        linger,
                    ],
                    sandbox_id=BUNDLE_ID,
                    db_path=db_path,
                    log_path=root / "bundle.log",
                    cwd=root,
                )
            )
        client_argv = [PYTHON, "-c", _BARE_CLIENT, grpc_address, CLIENT_ID, str(HEARTBEAT_S)]
        started.append(
            _start_and_connect(
                "bare grpc.aio client",
                client_argv,
                sandbox_id=CLIENT_ID,
                db_path=db_path,
                log_path=root / "client.log",
                cwd=root,
            )
        )
        with (root / "python.log").open("ab") as out:
            bare = subprocess.Popen(
                [PYTHON, "-c", f"import time; time.sleep({linger})"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        started.append(Sampled("bare python (sleep)", bare))
        time.sleep(1.0)  # let start-up settle before the window opens
        window_start = time.perf_counter()
        for s in started:
            s.cpu_start = s.cpu()
            s.sample()
        while (left := window_start + seconds - time.perf_counter()) > 0:
            time.sleep(min(1.0, left))
            for s in started:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"{s.what} exited with {s.proc.returncode} during the window")
                s.sample()
        window = time.perf_counter() - window_start
        for s in started:
            s.cpu_end = s.cpu()
            s.window_s = window
            s.finish()
        return started
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.terminate()
                try:
                    s.proc.wait(30)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(10)
        if gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(10)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / _RESULT)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_TREE if DEFAULT_TREE.is_dir() else None,
        help=f"the supervisor tree (imagevolume/bundle.py) to measure too; default {DEFAULT_TREE} if built",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="supervisor-idle-bench-", dir=args.dir) as tmp:
        rows = [s.row() for s in measure(Path(tmp), args.seconds, args.bundle)]
    imports = import_breakdown()

    print(f"idle window {args.seconds:.0f}s, gateway heartbeat {HEARTBEAT_S:.0f}s")
    header = ("what", "RSS MiB", "max", "USS MiB", "CPU s", "CPU %", "connect ms")
    print("  {:<24} {:>8} {:>6} {:>8} {:>7} {:>7} {:>11}".format(*header))
    for r in rows:
        print(
            f"  {r['what']:<24} {r['rss_end_mib']:>8.1f} {r['rss_max_mib']:>6.1f} "
            f"{_fmt(r['uss_end_mib'], '.1f'):>8} {r['cpu_s']:>7.3f} {r['cpu_percent_of_core']:>7.3f} "
            f"{_fmt(r['connect_ms'], '.0f'):>11}"
        )
    print("what the supervisor's RSS is made of (cumulative imports in a fresh interpreter):")
    for step in imports:
        print(
            f"  {step['step']:<40} {step['rss_mib']:>6.1f} MiB  (+{step['added_mib']:.1f})"
            f"  {step['import_ms']:>6.1f} ms"
        )

    sup = next(r for r in rows if r["what"] == "supervisor")
    verdicts = {
        "rss_under_40_mib": sup["rss_max_mib"] < TARGET_RSS_MIB,
        "cpu_under_half_percent": sup["cpu_percent_of_core"] < TARGET_CPU_PERCENT,
        "connected_within_1_s": sup["connect_ms"] is not None and sup["connect_ms"] < TARGET_CONNECT_MS,
    }
    for name, ok in verdicts.items():
        print(f"target {name}: {'meets' if ok else 'MISSES'}")
    report = {
        "benchmark": "supervisor_idle",
        "target": "supervisor RSS < 40 MiB, CPU < 0.5% of a core idle, connected < 1 s after start",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "heartbeat_s": HEARTBEAT_S,
        "rows": rows,
        "imports": imports,
        "verdicts": verdicts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
