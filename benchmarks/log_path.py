"""Log lines per second from one supervisor into the gateway's store, end to end, with real processes.

A gateway (``python -m gateway serve``, SQLite file in a temp dir, log level warning) and one
supervisor (``python -m supervisor run ... -- python -c WRITER N``) run as separate programs, the
way operators run them. The main process writes N lines of 80 bytes (79 characters and a newline)
to stdout as fast as it can, in large buffered writes, and exits; the supervisor journals them,
streams them to the gateway, and exits only once the gateway has acknowledged every record, which
happens only after the transaction that stored them has committed.

While that runs, the SQLite file is polled read-only (``SELECT max(id) FROM events``: cheap, and
the events of this single sandbox are stored in order) to time how the store fills up. Reported:

* ``e2e total``: supervisor start to supervisor exit (startup, connect, capture, delivery, acks);
* ``e2e stored``: the first log line stored to the last one stored;
* ``e2e steady``: 10% to 90% of the lines stored (crossing times interpolated between polls).

Baseline, in the same run: the same N rows inserted into a fresh SQLite file with the identical
schema (made by ``python -m gateway migrate``) through the stdlib ``sqlite3``: ``executemany`` of
a plain INSERT in transactions of 500 rows, with the PRAGMAs of ``gateway/store/db.py`` (WAL,
synchronous=NORMAL, foreign keys on). Rows are built before the clock starts. DESIGN's target:
at least 50,000 lines/s, and at least half of the baseline.

CPU seconds (user+sys) of the gateway (its delta over the run), of the supervisor and of the
writer (from ``wait4``'s rusage and the supervisor's children times) tell which side is the
bottleneck: on a 2-core machine a process near 1.0 core is the limit.

Usage: ``python benchmarks/log_path.py [--lines N] [--rounds R] [--out PATH]
[--set KEY=VALUE ...] [--gateway-set KEY=VALUE ...] [--profile DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from _procs import PYTHON, REPO, child_env, free_port, wait_http

SANDBOX_ID = "bench-log-path"
BASELINE_BATCH = 500
POLL_INTERVAL_S = 0.01
LINE_BYTES = 80
_RESULT = "log_path.json"
# Lifecycle records stored before the first log line: SUPERVISOR_STARTED, STARTED.
_LEADING_RECORDS = 2

_WRITER = textwrap.dedent(
    """
    import sys
    n = int(sys.argv[1])
    pad = ("log path benchmark line payload " * 3)[:70]
    out = sys.stdout.buffer
    step = 4096
    for start in range(0, n, step):
        out.write("".join([f"{i:08d} {pad}\\n" for i in range(start, min(n, start + step))]).encode())
    out.flush()
    """
)


def _message(i: int) -> str:
    return f"{i:08d} " + ("log path benchmark line payload " * 3)[:70]


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


# -- baseline ------------------------------------------------------------------------------


def migrate(db_path: Path, log_path: Path) -> None:
    with log_path.open("ab") as out:
        subprocess.run(
            [PYTHON, "-m", "gateway", "migrate", "--database-url", f"sqlite+aiosqlite:///{db_path}",
             "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO, check=True,
        )  # fmt: skip


def baseline(db_path: Path, log_path: Path, n: int) -> float:
    """Seconds to insert n log rows with plain sqlite3 executemany, 500 per transaction."""
    migrate(db_path, log_path)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for pragma in ("busy_timeout=10000", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            conn.execute(f"PRAGMA {pragma}")
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        conn.execute(
            "INSERT INTO sandboxes (id, driver, created_at) VALUES (?, 'external', ?)", (SANDBOX_ID, now)
        )
        ts = int(time.time() * 1000)
        rows = [(SANDBOX_ID, "epoch", i + 1, ts, "log", "stdout", _message(i), None, now) for i in range(n)]
        sql = (
            "INSERT INTO events (sandbox_id, journal_epoch, sequence, timestamp_ms, kind, stream, message, "
            "data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        start = time.perf_counter()
        for begin in range(0, n, BASELINE_BATCH):
            conn.execute("BEGIN")
            conn.executemany(sql, rows[begin : begin + BASELINE_BATCH])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        (stored,) = conn.execute("SELECT count(*) FROM events WHERE kind = 'log'").fetchone()
        if stored != n:
            raise RuntimeError(f"baseline stored {stored} rows, expected {n}")
        return elapsed
    finally:
        conn.close()


# -- end to end ----------------------------------------------------------------------------


@dataclass
class EndToEnd:
    lines: int
    total_s: float
    first_stored_s: float
    all_stored_s: float
    p10_s: float
    p90_s: float
    exit_code: int
    gateway_cpu_s: float
    supervisor_cpu_s: float
    writer_cpu_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def stored_s(self) -> float:
        return self.all_stored_s - self.first_stored_s

    @property
    def steady_s(self) -> float:
        return self.p90_s - self.p10_s


def _crossing(samples: list[tuple[float, int]], target: float) -> float:
    """The time at which the stored count reached ``target``, linearly interpolated between polls."""
    prev_t, prev_c = 0.0, 0
    for t, c in samples:
        if c >= target:
            if c == prev_c:
                return t
            return prev_t + (t - prev_t) * (target - prev_c) / (c - prev_c)
        prev_t, prev_c = t, c
    raise RuntimeError(f"the store never reached {target:.0f} lines")


def end_to_end(
    workdir: Path,
    n: int,
    *,
    supervisor_settings: list[str],
    gateway_settings: list[str],
    profile_dir: Path | None,
    timeout: float,
) -> EndToEnd:
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "gateway.db"
    grpc_address = f"127.0.0.1:{free_port()}"
    http_port = free_port()
    ops_port = free_port()

    def profile(name: str) -> list[str]:
        return ["-m", "cProfile", "-o", str(profile_dir / name)] if profile_dir is not None else []

    gateway_argv = [
        PYTHON, *profile("gateway.prof"), "-m", "gateway", "serve",
        "--grpc-listen", grpc_address,
        "--http-listen", f"127.0.0.1:{http_port}",
        "--ops-listen", f"127.0.0.1:{ops_port}",
        "--database-url", f"sqlite+aiosqlite:///{db_path}",
        "--log-level", "warning",
        # The supervisor is started by hand here, without a credential (the data path is what is
        # measured): a development gateway that takes credential-less supervisors.
        "--set", "auth.supervisors.required=false",
        "--set", "sessions.register_unknown=true",
    ]  # fmt: skip
    for item in gateway_settings:
        gateway_argv += ["--set", item]
    supervisor_argv = [
        PYTHON, *profile("supervisor.prof"), "-m", "supervisor", "run",
        "--sandbox-id", SANDBOX_ID,
        "--gateway", grpc_address,
        "--journal-dir", str(workdir / "journal"),
        "--log-level", "warning",
        "--set", "capture.echo=false",
    ]  # fmt: skip
    for item in supervisor_settings:
        supervisor_argv += ["--set", item]
    supervisor_argv += ["--", PYTHON, "-c", _WRITER, str(n)]

    env = child_env()
    gateway_log = workdir / "gateway.log"
    supervisor_log = workdir / "supervisor.log"
    with gateway_log.open("ab") as out:
        gateway = subprocess.Popen(gateway_argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    supervisor: subprocess.Popen[bytes] | None = None
    try:
        wait_http(f"http://127.0.0.1:{ops_port}/healthz", gateway, gateway_log)
        gateway_ps = psutil.Process(gateway.pid)
        gateway_cpu_before = _cpu(gateway_ps.cpu_times())
        reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10, isolation_level=None)
        samples: list[tuple[float, int]] = []
        exit_status: int | None = None
        rusage: Any = None
        last_sup_times: Any = None
        try:
            with supervisor_log.open("ab") as out:
                start = time.perf_counter()
                supervisor = subprocess.Popen(
                    supervisor_argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir
                )
            supervisor_ps = psutil.Process(supervisor.pid)
            deadline = start + timeout
            while True:
                now = time.perf_counter()
                (top,) = reader.execute("SELECT max(id) FROM events").fetchone()
                stored = max(0, min(n, (top or 0) - _LEADING_RECORDS))
                samples.append((now - start, stored))
                if exit_status is None:
                    with contextlib.suppress(psutil.Error):
                        last_sup_times = supervisor_ps.cpu_times()
                    pid, status, usage = os.wait4(supervisor.pid, os.WNOHANG)
                    if pid:
                        exit_status = os.waitstatus_to_exitcode(status)
                        supervisor.returncode = exit_status
                        rusage = usage
                        total_s = time.perf_counter() - start
                if exit_status is not None and stored >= n:
                    break
                if exit_status is not None and exit_status != 0:
                    break
                if now > deadline:
                    raise RuntimeError(f"timed out after {timeout:.0f}s with {stored}/{n} lines stored")
                time.sleep(POLL_INTERVAL_S)
            gateway_cpu = _cpu(gateway_ps.cpu_times()) - gateway_cpu_before
            (logs,) = reader.execute(
                "SELECT count(*) FROM events WHERE kind = 'log' AND sandbox_id = ?", (SANDBOX_ID,)
            ).fetchone()
        finally:
            reader.close()
        if exit_status != 0 or logs != n:
            raise RuntimeError(
                f"supervisor exited with {exit_status}, {logs}/{n} lines stored:\n"
                + supervisor_log.read_text(errors="replace")[-4000:]
            )
        writer_cpu = 0.0
        if last_sup_times is not None:
            writer_cpu = float(last_sup_times.children_user + last_sup_times.children_system)
        # wait4's rusage covers the supervisor and the children it reaped (the writer).
        supervisor_cpu = float(rusage.ru_utime + rusage.ru_stime) - writer_cpu
        return EndToEnd(
            lines=n,
            total_s=total_s,
            first_stored_s=_crossing(samples, 1),
            all_stored_s=_crossing(samples, n),
            p10_s=_crossing(samples, 0.1 * n),
            p90_s=_crossing(samples, 0.9 * n),
            exit_code=exit_status,
            gateway_cpu_s=gateway_cpu,
            supervisor_cpu_s=supervisor_cpu,
            writer_cpu_s=writer_cpu,
            samples=samples,
        )
    finally:
        if supervisor is not None and supervisor.returncode is None and supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        if gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(10)


# -- report --------------------------------------------------------------------------------


def _row(path: str, lines: int, seconds: float, base_rate: float) -> dict[str, Any]:
    rate = lines / seconds if seconds > 0 else float("inf")
    return {
        "path": path,
        "lines": lines,
        "seconds": round(seconds, 3),
        "lines_per_s": round(rate),
        "ratio": round(rate / base_rate, 3),
    }


def _rows(e2e: EndToEnd, base_s: float) -> list[dict[str, Any]]:
    n = e2e.lines
    base_rate = n / base_s
    return [
        _row("raw sqlite3 executemany x500", n, base_s, base_rate),
        _row("e2e total (supervisor start->exit)", n, e2e.total_s, base_rate),
        _row("e2e stored (first->last line)", n, e2e.stored_s, base_rate),
        _row("e2e steady (10%->90% stored)", round(0.8 * n), e2e.steady_s, base_rate),
    ]


def _cpu_report(e2e: EndToEnd) -> dict[str, Any]:
    wall = e2e.total_s
    return {
        "wall_s": round(wall, 3),
        "gateway_cpu_s": round(e2e.gateway_cpu_s, 3),
        "supervisor_cpu_s": round(e2e.supervisor_cpu_s, 3),
        "writer_cpu_s": round(e2e.writer_cpu_s, 3),
        "gateway_cores": round(e2e.gateway_cpu_s / wall, 2),
        "supervisor_cores": round(e2e.supervisor_cpu_s / wall, 2),
        "gateway_cpu_us_per_line": round(e2e.gateway_cpu_s / e2e.lines * 1e6, 2),
        "supervisor_cpu_us_per_line": round(e2e.supervisor_cpu_s / e2e.lines * 1e6, 2),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"  {'path':<36} {'lines':>8} {'seconds':>8} {'lines/s':>10} {'ratio':>6}")
    for r in rows:
        path, lines, secs, rate, ratio = r["path"], r["lines"], r["seconds"], r["lines_per_s"], r["ratio"]
        print(f"  {path:<36} {lines:>8} {secs:>8.3f} {rate:>10,} {ratio:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=200_000, help="log lines written by the main process")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (baseline + end to end each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / _RESULT)
    parser.add_argument(
        "--set",
        dest="supervisor_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="supervisor setting, e.g. session.batch_max_records=2000 (repeatable)",
    )
    parser.add_argument(
        "--gateway-set",
        dest="gateway_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gateway setting (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run gateway and supervisor under cProfile, writing *.prof here (slows both)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a round after this long")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temp dir")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="log-path-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        for i in range(args.rounds):
            base_s = baseline(root / f"baseline-{i}.db", root / "migrate.log", args.lines)
            e2e = end_to_end(
                root / f"e2e-{i}",
                args.lines,
                supervisor_settings=args.supervisor_settings,
                gateway_settings=args.gateway_settings,
                profile_dir=args.profile,
                timeout=args.timeout,
            )
            rows = _rows(e2e, base_s)
            cpu = _cpu_report(e2e)
            print(f"round {i + 1}/{args.rounds}")
            _print_table(rows)
            print(
                f"  cpu: gateway {cpu['gateway_cpu_s']:.2f}s ({cpu['gateway_cores']:.2f} core, "
                f"{cpu['gateway_cpu_us_per_line']:.1f} us/line), supervisor {cpu['supervisor_cpu_s']:.2f}s "
                f"({cpu['supervisor_cores']:.2f} core, {cpu['supervisor_cpu_us_per_line']:.1f} us/line), "
                f"writer {cpu['writer_cpu_s']:.2f}s, over {cpu['wall_s']:.2f}s wall"
            )
            rounds.append({"rows": rows, "cpu": cpu, "first_stored_s": round(e2e.first_stored_s, 3)})

    def median_rate(path: str) -> float:
        rates = [next(r for r in rd["rows"] if r["path"] == path)["lines_per_s"] for rd in rounds]
        return float(statistics.median(rates))

    base_rate = median_rate("raw sqlite3 executemany x500")
    steady_rate = median_rate("e2e steady (10%->90% stored)")
    total_rate = median_rate("e2e total (supervisor start->exit)")
    summary = {
        "baseline_lines_per_s": round(base_rate),
        "total_lines_per_s": round(total_rate),
        "steady_lines_per_s": round(steady_rate),
        "steady_ratio": round(steady_rate / base_rate, 3),
        "total_ratio": round(total_rate / base_rate, 3),
        "meets_50k": steady_rate >= 50_000,
        "meets_half_baseline": steady_rate >= 0.5 * base_rate,
    }
    if args.rounds > 1:
        print(
            f"median of {args.rounds}: baseline {base_rate:,.0f}/s, total {total_rate:,.0f}/s, "
            f"steady {steady_rate:,.0f}/s (ratio {summary['steady_ratio']:.2f})"
        )
    verdict = "meets" if summary["meets_50k"] and summary["meets_half_baseline"] else "MISSES"
    print(f"target (>= 50,000 lines/s and >= 0.5 x baseline, steady state): {verdict}")
    report = {
        "benchmark": "log_path",
        "target": "steady lines/s >= 50,000 and >= 0.5 x raw sqlite3 bulk insert",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "lines": args.lines,
        "line_bytes": LINE_BYTES,
        "supervisor_settings": args.supervisor_settings,
        "gateway_settings": args.gateway_settings,
        "profiled": args.profile is not None,
        "rounds": rounds,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
