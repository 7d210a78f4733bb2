"""The scale benchmark (issue 22 point 5): one gateway process and the bare echo baseline, driven by the
same Go simulator (chaos/sim) in the same run.

Per server it reports sessions held, heartbeat RTT p50/p99 in the steady window, CPU and RSS per
1,000 sessions and CPU per heartbeat (the gateway's beside echo's); then a reconnect storm against
the gateway (kill -9 with every session up, start it again at once): time until 50/90/99/100 % of
the sessions resumed and the reconnect rate (peak and mean per second) with the real supervisor's
jittered backoff and, in the same run, with upstream's unjittered one. The gateway-side check runs
after every gateway phase: every acknowledged sequence stored once with its text, none above what
was written. Results: ``scale.json``, ``scale.md`` and PNG plots (with the optional ``chaos``
extra's matplotlib; without it the markdown says why there are none).

Servers are pinned to core 0 and the simulator to core 1 where the machine has two or more cores
(taskset), so neither steals the other's CPU and the server's CPU per heartbeat is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chaos.plotting import pyplot

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "chaos" / "build.sh"
#: Source addresses the simulated supervisors connect from (all of 127/8 is on lo): 8 of them give
#: each (source, server) pair its own ephemeral port range, so a storm's TIME_WAITs do not run out.
SOURCE_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 10))


class SimulatorUnavailable(RuntimeError):
    """The simulator cannot be built here (no Go, say): the reason, one line."""


def build_simulator() -> Path:
    """Build (or find cached) the simulator binary; its path."""
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SH)], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SimulatorUnavailable(f"chaos/build.sh could not run: {exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise SimulatorUnavailable(lines[-1] if lines else f"chaos/build.sh exited {done.returncode}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pin_prefix(core: int) -> list[str]:
    """taskset -c CORE where pinning makes sense (two cores or more, taskset present)."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


def proc_cpu_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user+system) and RSS (MiB) of a process, from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows (accept queue full: SYNs dropped), machine-wide."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            pairs = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(pairs.get("ListenOverflows", 0))
    return 0


@dataclass
class Server:
    """A gateway (``python -m gateway serve``) or the echo baseline, started detached and pinned."""

    kind: str  # "gateway" | "echo"
    workdir: Path
    database_url: str | None = None
    core: int = 0
    grpc_port: int = field(default_factory=free_port)
    settings: Sequence[str] = ()
    ops_port: int = field(default_factory=free_port)
    #: The echo server's heartbeat interval (ms): the gateway's at the same size, for a fair comparison.
    interval_ms: int = 10_000
    #: The gateway's replica id (ha.replica_id); default bench-<grpc port>.
    replica_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.workdir / 'gateway.db'}"

    def argv(self) -> list[str]:
        if self.kind == "echo":
            return [
                sys.executable,
                "-m",
                "chaos.echo_server",
                self.address,
                "--interval-ms",
                str(self.interval_ms),
            ]
        return [
            sys.executable, "-m", "gateway", "serve",
            "--grpc-listen", self.address,
            "--http-listen", f"127.0.0.1:{free_port()}",
            "--ops-listen", f"127.0.0.1:{self.ops_port}",
            "--database-url", self.url,
            # Simulated supervisors have no credentials and were never created through the API.
            "--set", "sessions.register_unknown=true",
            "--set", "auth.supervisors.required=false",
            "--set", f"ha.replica_id={self.replica_id or f'bench-{self.grpc_port}'}",
            *self.settings,
            "--log-level", "info",
        ]  # fmt: skip

    def start(self, *, timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = b"echo ready" if self.kind == "echo" else b"gateway ready"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                [*_pin_prefix(self.core), *self.argv()],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while ready not in self.log_path.read_bytes().split(b"--- start")[-1]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"the {self.kind} was not ready within {timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def metric(self, name: str, *, timeout_s: float = 5.0) -> float | None:
        """A gateway's unlabelled metric from its ops listener's /metrics; None if absent or unreachable."""
        if self.kind != "gateway":
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/metrics", timeout=timeout_s) as r:
                body = r.read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                with contextlib.suppress(ValueError):
                    return float(value)
        return None

    def stop(self, *, timeout_s: float = 30.0) -> bool:
        """SIGTERM, SIGKILL after timeout_s: whether it exited by itself (a hung shutdown is a finding)."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return False


@dataclass
class SimRun:
    """One simulator process: its per-second JSON lines as they come, its final JSON at the end."""

    binary: Path
    args: Sequence[str]
    out: Path
    core: int = 1
    proc: subprocess.Popen[str] | None = None
    series: list[dict[str, Any]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*_pin_prefix(self.core), str(self.binary), *self.args, "-out", str(self.out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(target=self._read, args=(stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            with contextlib.suppress(ValueError):
                self.series.append(json.loads(line))

    @property
    def up(self) -> int:
        return int(self.series[-1]["up"]) if self.series else 0

    def wait_up(self, n: int, *, timeout_s: float, since: int = 0) -> bool:
        """Until n sessions are up (in a sample at index >= since) or timeout; whether they were."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.series) > since and self.up >= n:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def finish(self, *, timeout_s: float = 120.0) -> dict[str, Any]:
        """SIGTERM (stop, drain, write the result) and read the final JSON."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.result(timeout_s=timeout_s)

    def result(self, *, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"the simulator did not finish within {timeout_s:.0f} s") from None
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        if self.proc.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"the simulator exited with {self.proc.returncode}: {stderr.strip()[-2000:]}")
        if self._reader is not None:
            self._reader.join(5)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sim_args(
    address: str,
    *,
    watch_pid: int | None = None,
    n: int,
    prefix: str,
    rate: float,
    duration_s: float,
    event_every_s: float = 0.0,
    unjittered: bool = False,
    sources: Sequence[str] = SOURCE_ADDRESSES,
    extra: Sequence[str] = (),
) -> list[str]:
    args = [
        "-addr", address, "-n", str(n), "-prefix", prefix, "-rate", str(rate),
        "-duration", f"{duration_s}s", "-src", ",".join(sources),
    ]  # fmt: skip
    if watch_pid is not None:
        args += ["-watch-pid", str(watch_pid)]
    if event_every_s > 0:
        args += ["-event-every", f"{event_every_s}s"]
    if unjittered:
        args.append("-unjittered")
    return [*args, *extra]


# -- the gateway-side check --------------------------------------------------------------------


async def _stored(database_url: str, prefixes: set[str]) -> dict[tuple[str, str], list[tuple[int, str]]]:
    engine = create_async_engine(database_url)
    stored: dict[tuple[str, str], list[tuple[int, str]]] = {}
    try:
        async with engine.connect() as conn:
            for prefix in prefixes:
                rows = await conn.execute(
                    text(
                        "SELECT sandbox_id, journal_epoch, sequence, message FROM events "
                        "WHERE kind = 'log' AND sandbox_id LIKE :p"
                    ),
                    {"p": f"{prefix}-%"},
                )
                for sandbox_id, epoch, sequence, message in rows:
                    stored.setdefault((sandbox_id, epoch), []).append((int(sequence), message))
    finally:
        await engine.dispose()
    return stored


def stored_problems(database_url: str, result: dict[str, Any], *, limit: int = 20) -> list[str]:
    """The store against the simulator's journals: per sandbox and journal epoch every sequence of
    1..acknowledged stored exactly once with the text written, nothing above what was written."""
    prefixes = {s["id"].rsplit("-", 1)[0] for s in result["supervisors"]}
    stored = asyncio.run(_stored(database_url, prefixes))
    problems: list[str] = [f"simulator: {v}" for v in result.get("violation_samples") or []]
    for s in result["supervisors"]:
        got = stored.get((s["id"], s["epoch"]), [])
        sequences = [q for q, _ in got]
        if len(sequences) != len(set(sequences)):
            problems.append(f"{s['id']}: a sequence stored twice")
        missing = set(range(1, s["acked"] + 1)) - set(sequences)
        if missing:
            problems.append(f"{s['id']}: {len(missing)} acknowledged sequences missing, first {min(missing)}")
        above = [q for q in sequences if q > s["written"]]
        if above:
            problems.append(f"{s['id']}: sequences above written {s['written']}: {sorted(above)[:3]}")
        if any(m != f"{s['id']} line {q}" for q, m in got):
            problems.append(f"{s['id']}: stored text differs from what was written")
    return problems[:limit]


# -- figures -----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def steady_figures(
    result: dict[str, Any], *, rss_before_mib: float, steady_after_s: float = 15.0
) -> dict[str, Any]:
    """Figures of a ramp-and-hold run over its steady window only: from steady_after_s after all were
    up (the hellos over, and every supervisor beating at the interval it was last given), to the end.
    CPU and heartbeats are both counted in that window, so the hellos' work is not in the CPU per
    heartbeat; ``hellos_in_window`` says whether any session came or went in it."""
    series = result["series"]
    n = result["n"]
    all_up = result["all_up_at_s"]
    start = (all_up if all_up >= 0 else series[-1]["t"] / 2) + steady_after_s
    window = [s for s in series if s["t"] >= start] or series[-3:]
    first, last = window[0], window[-1]
    seconds = max(last["t"] - first["t"], 1e-9)
    beats = sum(s["heartbeats_echoed"] for s in window[1:])
    cpu = last["watch_cpu_s"][0] - first["watch_cpu_s"][0]
    rss = last["watch_rss_mib"][0]
    held = max(s["up"] for s in series)
    return {
        "sessions": n,
        "held": held,
        "all_up_at_s": all_up,
        "window_s": round(seconds, 1),
        "window_from_s": round(first["t"], 1),
        "hellos_in_window": sum(s["accepts"] for s in window[1:]),
        "heartbeats_per_s": round(beats / seconds, 1),
        "rtt_p50_ms": round(_median([s["rtt_p50_ms"] for s in window if s["heartbeats_echoed"]]), 2),
        "rtt_p99_ms": round(_median([s["rtt_p99_ms"] for s in window if s["heartbeats_echoed"]]), 2),
        "rtt_p99_worst_second_ms": round(max((s["rtt_p99_ms"] for s in window), default=0.0), 1),
        "rtt_run_ms": result["rtt_ms"],
        "cpu_percent": round(100 * cpu / seconds, 1),
        "cpu_percent_per_1000": round(100 * cpu / seconds / max(held, 1) * 1000, 2),
        "cpu_us_per_heartbeat": round(1e6 * cpu / beats, 0) if beats else None,
        "rss_before_mib": round(rss_before_mib, 1),
        "rss_mib": round(rss, 1),
        "rss_mib_per_1000": round((rss - rss_before_mib) / max(held, 1) * 1000, 1),
        "sim_cpu_percent": round(100 * (last["self_cpu_s"] - first["self_cpu_s"]) / seconds, 1),
        "sim_rss_mib": round(last["self_rss_mib"], 1),
        "rejected": result["rejected_by_code"],
        "connect_timeouts": result["connect_timeouts"],
        "violations": result["violations"],
    }


def storm_figures(result: dict[str, Any], *, killed_unix_ms: int, restarted_unix_ms: int) -> dict[str, Any]:
    """Time from the kill until 50/90/99/100 % of the supervisors resumed; reconnects per second."""
    n = result["n"]
    resumed = sorted(
        (s["last_accept_unix_ms"] - killed_unix_ms) / 1000
        for s in result["supervisors"]
        if s["last_accept_unix_ms"] > killed_unix_ms
    )

    def at(fraction: float) -> float | None:
        k = max(1, round(fraction * n))
        return round(resumed[k - 1], 2) if len(resumed) >= k else None

    last = resumed[-1] if resumed else 0.0
    per_second = [
        s["accepts"]
        for s in result["series"]
        if killed_unix_ms / 1000 < s["unix_ms"] / 1000 <= killed_unix_ms / 1000 + last + 1
    ]
    return {
        "sessions": n,
        "backoff": "upstream (1 s doubling, no jitter)"
        if result["upstream_backoff"]
        else "full jitter (ours)",
        "restart_s": round((restarted_unix_ms - killed_unix_ms) / 1000, 2),
        "resumed": len(resumed),
        "resumed_50_s": at(0.5),
        "resumed_90_s": at(0.9),
        "resumed_99_s": at(0.99),
        "resumed_100_s": at(1.0),
        "reconnects_per_s_peak": max(per_second, default=0),
        "reconnects_per_s_mean": round(statistics.mean(per_second), 1) if per_second else 0,
        "attempts": result["attempts"],
        "rejected": result["rejected_by_code"],
        "connect_timeouts": result["connect_timeouts"],
        "violations": result["violations"],
    }


# -- the phases --------------------------------------------------------------------------------


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and not server.stop():
            print(f"bench: the {server.kind} did not exit within 30 s of SIGTERM (killed)", file=sys.stderr)


def steady_phase(
    sim: Path,
    server: Server,
    *,
    n: int,
    rate: float,
    hold_s: float,
    settle_s: float,
    steady_after_s: float,
    event_every_s: float,
    out: Path,
    up_timeout_s: float = 180.0,
) -> dict[str, Any]:
    with running(server):
        time.sleep(settle_s)
        _, rss_before = proc_cpu_rss(server.pid)
        run = SimRun(
            sim,
            sim_args(
                server.address,
                watch_pid=server.pid,
                n=n,
                prefix=f"{server.kind[0]}s",
                rate=rate,
                duration_s=0,
                event_every_s=event_every_s,
            ),
            out,
        )
        run.start()
        try:
            # Held for steady_after_s + hold_s from the moment all are up (not from the last start: a
            # server that refuses hellos for a while must not get a shorter window), or from the
            # give-up time if they never all come up (then the figures say how many were held).
            run.wait_up(n, timeout_s=n / max(rate, 1) + up_timeout_s)
            time.sleep(steady_after_s + hold_s)
            result = run.finish()
        finally:
            run.kill()
        figures = steady_figures(result, rss_before_mib=rss_before, steady_after_s=steady_after_s)
        # The interval the server handed out at the end: the gateway's adaptive one (read from it,
        # hysteresis and all), echo's the one it was told (the gateway's, for the same beats).
        interval = server.metric("openshell_gateway_heartbeat_interval_seconds")
        figures["interval_s"] = interval if interval is not None else server.interval_ms / 1000
        if server.kind == "gateway":
            figures["store_problems"] = stored_problems(server.url, result)
    figures["series"] = result["series"]
    return figures


def hello_figures(result: dict[str, Any]) -> dict[str, Any]:
    """Sessions opened per second at saturation: n over the time from the first start to the last
    session's accept (each supervisor's accept time, to the millisecond), and the best second."""
    start = result["start_unix_ms"]
    accepted = sorted(
        (s["last_accept_unix_ms"] - start) / 1000
        for s in result["supervisors"]
        if s["last_accept_unix_ms"] > 0
    )
    n = result["n"]
    last = accepted[-1] if len(accepted) == n else None
    return {
        "sessions": n,
        "held": len(accepted),
        "all_up_s": round(last, 2) if last is not None else None,
        "half_up_s": round(accepted[n // 2 - 1], 2) if len(accepted) >= n // 2 > 0 else None,
        "hellos_per_s": round(n / last, 1) if last else None,
        "accepts_per_s_peak": max((s["accepts"] for s in result["series"]), default=0),
        "attempts": result["attempts"],
        "rejected": result["rejected_by_code"],
        "connect_timeouts": result["connect_timeouts"],
        "violations": result["violations"],
    }


def hello_phase(
    sim: Path, server: Server, *, n: int, rate: float, settle_s: float, timeout_s: float, out: Path
) -> dict[str, Any]:
    """A burst of n hellos (at ``rate`` per second, 0: all at once) until all are up or timeout_s."""
    with running(server):
        time.sleep(settle_s)
        run = SimRun(
            sim,
            sim_args(
                server.address,
                watch_pid=server.pid,
                n=n,
                prefix=f"{server.kind[0]}h",
                rate=rate,
                duration_s=0,
            ),
            out,
        )
        run.start()
        try:
            run.wait_up(n, timeout_s=timeout_s)
            time.sleep(1.5)
            result = run.finish()
        finally:
            run.kill()
        figures = hello_figures(result)
        if server.kind == "gateway":
            figures["store_problems"] = stored_problems(server.url, result)
    figures["series"] = result["series"]
    return figures


def storm_phase(
    sim: Path,
    server: Server,
    *,
    n: int,
    rate: float,
    unjittered: bool,
    settle_s: float,
    out: Path,
    timeout_s: float,
    up_timeout_s: float = 180.0,
) -> dict[str, Any]:
    with running(server):
        time.sleep(settle_s)
        run = SimRun(
            sim,
            sim_args(
                server.address,
                watch_pid=server.pid,
                n=n,
                prefix="su" if unjittered else "sj",
                rate=rate,
                duration_s=0,
                unjittered=unjittered,
            ),
            out,
        )
        run.start()
        try:
            if not run.wait_up(n, timeout_s=n / max(rate, 1) + up_timeout_s):
                raise RuntimeError(f"storm: only {run.up} of {n} sessions came up before the kill")
            time.sleep(3)
            killed = int(time.time() * 1000)
            server.kill()
            server.start()
            restarted = int(time.time() * 1000)
            mark = len(run.series)
            run.wait_up(n, timeout_s=timeout_s, since=mark + 1)
            time.sleep(2)
            result = run.finish()
        finally:
            run.kill()
        figures = storm_figures(result, killed_unix_ms=killed, restarted_unix_ms=restarted)
        if server.kind == "gateway":
            figures["store_problems"] = stored_problems(server.url, result)
    figures["series"] = [dict(s, t=(s["unix_ms"] - killed) / 1000) for s in result["series"]]
    return figures


# -- the report --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    p = results["parameters"]
    load = ", ".join(f"{x:.2f}" for x in results.get("load_before", ()))
    lines = [
        f"Scale benchmark, {results['date']} on {results['machine']} (load average before: {load}); "
        f"server pinned to core 0, simulator to core 1 ({'pinned' if results['pinned'] else 'NOT pinned'}); "
        f"gateway settings: {' '.join(p.get('gateway_settings') or []) or 'defaults'}.",
    ]
    if results.get("hellos"):
        lines += [
            "",
            f"Burst: {p['hello_sessions']} hellos started "
            f"{'at once' if not p['hello_rate'] else 'at ' + str(p['hello_rate']) + '/s'}.",
            "",
            "| server | held | half up / all up (s) | hellos / s (all over all-up time) | best second "
            "| attempts | connect timeouts | rejected |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, f in results["hellos"].items():
            if "error" in f:
                lines.append(f"| {name} | failed: {f['error']} | | | | | | |")
                continue
            lines.append(
                f"| {name} | {f['held']} of {f['sessions']} | {f['half_up_s']} / {f['all_up_s']} | "
                f"{f['hellos_per_s']} | {f['accepts_per_s_peak']} | {f['attempts']} | "
                f"{f['connect_timeouts']} | {f['rejected'] or 0} |"
            )
    if results["steady"]:
        lines += [
            "",
            f"Steady: {p['sessions']} sessions opened at {p['rate']}/s, "
            f"{'events every ' + str(p['event_every_s']) + ' s' if p['event_every_s'] else 'no events'}; "
            f"figures over a window of {p['hold_s']} s from {p.get('steady_after_s')} s after all were up.",
            "",
            "| server | held | interval s | window s (hellos in it) | RTT p50 / p99 ms (worst second) "
            "| CPU % / 1,000 sessions | CPU us / heartbeat | RSS MiB / 1,000 | sim CPU % | rejected |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for name, f in results["steady"].items():
        if "error" in f:
            lines.append(f"| {name} | failed: {f['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {f['held']} of {f['sessions']} | {f.get('interval_s')} | {f['window_s']} "
            f"({f['hellos_in_window']}) | {f['rtt_p50_ms']} / {f['rtt_p99_ms']} "
            f"({f['rtt_p99_worst_second_ms']}) | {f['cpu_percent_per_1000']} | {f['cpu_us_per_heartbeat']} | "
            f"{f['rss_mib_per_1000']} | {f['sim_cpu_percent']} | {f['rejected'] or 0} |"
        )
    gw, echo = results["steady"].get("gateway"), results["steady"].get("echo")
    if (
        gw
        and echo
        and gw.get("cpu_us_per_heartbeat")
        and echo.get("cpu_us_per_heartbeat")
        and echo["cpu_us_per_heartbeat"]
    ):
        lines += [
            "",
            f"Gateway CPU per heartbeat: "
            f"{gw['cpu_us_per_heartbeat'] / echo['cpu_us_per_heartbeat']:.2f}x echo's.",
        ]
    if results["storms"]:
        lines += [
            "",
            f"Reconnect storm: kill -9 of the gateway with all {p['storm_sessions']} sessions up, "
            "started again at once.",
            "",
            "| backoff | restart s | resumed 50 / 90 / 99 / 100 % (s after kill) | reconnects/s peak / mean"
            " | attempts | rejected |",
            "|---|---|---|---|---|---|",
        ]
        for name, f in results["storms"].items():
            if "error" in f:
                lines.append(f"| {name} | failed: {f['error']} | | | | |")
                continue
            lines.append(
                f"| {f['backoff']} | {f['restart_s']} | {f['resumed_50_s']} / {f['resumed_90_s']} / "
                f"{f['resumed_99_s']} / {f['resumed_100_s']} ({f['resumed']} of {f['sessions']}) | "
                f"{f['reconnects_per_s_peak']} / {f['reconnects_per_s_mean']} | {f['attempts']} | "
                f"{f['rejected'] or 0} |"
            )
    problems = [
        (k, f["store_problems"])
        for k, f in [*results["hellos"].items(), *results["steady"].items(), *results["storms"].items()]
        if f.get("store_problems")
    ]
    lines += [
        "",
        "Gateway-side check: " + ("passed in every phase." if not problems else f"FAILED: {problems}"),
    ]
    lines += ["", f"TcpExt ListenOverflows during the run: {results['listen_overflows']}."]
    lines += ["", results["plots"]]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "No plots: matplotlib is not installed (pip install -e '.[chaos]')."
    written = []
    if results["steady"]:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for name, f in results["steady"].items():
            if "series" not in f:
                continue
            t = [s["t"] for s in f["series"]]
            ax1.plot(t, [s["up"] for s in f["series"]], label=name)
            ax2.semilogy(t, [max(s["rtt_p99_ms"], 0.01) for s in f["series"]], label=f"{name} p99")
        ax1.set_ylabel("sessions up")
        ax2.set_ylabel("heartbeat RTT p99 (ms)")
        ax2.set_xlabel("s")
        ax1.legend()
        ax2.legend()
        fig.savefig(out / "scale_steady.png", dpi=100)
        written.append("scale_steady.png")
    if results["hellos"]:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for name, f in results["hellos"].items():
            if "series" not in f:
                continue
            t = [s["t"] for s in f["series"]]
            ax1.plot(t, [s["up"] for s in f["series"]], label=name)
            ax2.plot(t, [s["accepts"] for s in f["series"]], label=name)
        ax1.set_ylabel("sessions up")
        ax2.set_ylabel("sessions opened / s")
        ax2.set_xlabel("s after the burst's start")
        ax1.legend()
        fig.savefig(out / "scale_hellos.png", dpi=100)
        written.append("scale_hellos.png")
    if results["storms"]:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for f in results["storms"].values():
            if "series" not in f:
                continue
            t = [s["t"] for s in f["series"]]
            ax1.plot(t, [s["up"] for s in f["series"]], label=f["backoff"])
            ax2.plot(t, [s["accepts"] for s in f["series"]], label=f["backoff"])
        ax1.set_ylabel("sessions up")
        ax2.set_ylabel("reconnects / s")
        ax2.set_xlabel("s after the kill -9")
        ax1.legend()
        fig.savefig(out / "scale_storm.png", dpi=100)
        written.append("scale_storm.png")
    plt.close("all")
    return "Plots: " + ", ".join(written) + "."


def bench(args: argparse.Namespace) -> int:
    try:
        sim = build_simulator()
    except SimulatorUnavailable as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    biggest = max(args.sessions, args.storm_sessions, args.hello_sessions)
    if biggest + 200 > soft:
        print(
            f"bench: {biggest} sessions need as many descriptors in the "
            f"server and in the simulator; the limit is {soft} (ulimit -n)",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    gateway_settings = [f"--set={s}" for s in args.set or []]
    overflows = listen_overflows()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "pinned": bool(_pin_prefix(0)),
        "parameters": {
            "sessions": args.sessions, "rate": args.rate, "hold_s": args.hold,
            "event_every_s": args.event_every, "storm_sessions": args.storm_sessions,
            "steady_after_s": args.steady_after, "hello_sessions": args.hello_sessions,
            "hello_rate": args.hello_rate, "gateway_settings": args.set or [],
            "database": "postgresql" if args.database_url else "sqlite",
        },
        "load_before": os.getloadavg(),
        "hellos": {},
        "steady": {},
        "storms": {},
    }  # fmt: skip

    def gateway(tag: str) -> Server:
        return Server("gateway", work / tag, database_url=args.database_url, settings=gateway_settings)

    phases: list[tuple[str, str, Server]] = []
    if args.hello_sessions:
        phases += [
            ("hellos", "gateway", gateway("hellos")),
            ("hellos", "echo", Server("echo", work / "echo-h")),
        ]
    if args.sessions:
        phases += [
            ("steady", "gateway", gateway("steady")),
            ("steady", "echo", Server("echo", work / "echo")),
        ]
    if args.storm_sessions:
        phases += [("storm", "jittered", gateway("storm-j")), ("storm", "upstream", gateway("storm-u"))]

    def run_phase(kind: str, name: str, server: Server) -> None:
        if kind == "hellos":
            results["hellos"][name] = hello_phase(
                sim, server, n=args.hello_sessions, rate=args.hello_rate, settle_s=args.settle,
                timeout_s=args.hello_timeout, out=work / f"{kind}-{name}.json",
            )  # fmt: skip
        elif kind == "steady":
            if server.kind == "echo":
                # Echo hands out the interval the gateway ended its steady phase with (adaptive at this
                # size), so both answer the same heartbeats per second per session.
                interval = results["steady"].get("gateway", {}).get("interval_s")
                if interval:
                    server.interval_ms = round(interval * 1000)
            results["steady"][name] = steady_phase(
                sim, server, n=args.sessions, rate=args.rate, hold_s=args.hold, settle_s=args.settle,
                steady_after_s=args.steady_after, event_every_s=args.event_every,
                out=work / f"{kind}-{name}.json", up_timeout_s=args.up_timeout,
            )  # fmt: skip
        else:
            results["storms"][name] = storm_phase(
                sim, server, n=args.storm_sessions, rate=args.rate, unjittered=name == "upstream",
                settle_s=args.settle, out=work / f"{kind}-{name}.json", timeout_s=args.storm_timeout,
                up_timeout_s=args.up_timeout,
            )  # fmt: skip

    for kind, name, server in phases:
        print(f"bench: {kind} {name} ...", file=sys.stderr, flush=True)
        try:
            run_phase(kind, name, server)
        except RuntimeError as exc:
            # A phase that breaks (a gateway that never holds its sessions) is a result, not a crash.
            print(f"bench: {kind} {name}: {exc}", file=sys.stderr)
            results["storms" if kind == "storm" else kind][name] = {"error": str(exc)}
    results["listen_overflows"] = listen_overflows() - overflows
    results["plots"] = plots(results, out)
    (out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results)
    (out / "scale.md").write_text(report)
    print(report)
    shutil.rmtree(work, ignore_errors=True)
    failed = any(
        f.get("store_problems") or f.get("violations")
        for f in [*results["hellos"].values(), *results["steady"].values(), *results["storms"].values()]
    )
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sessions", type=int, default=3000, help="simulated supervisors in the steady phases (0: none)"
    )
    parser.add_argument(
        "--steady-after",
        type=float,
        default=15,
        help="the steady window starts this long after all sessions are up (hellos over, intervals applied)",
    )
    parser.add_argument(
        "--hello-sessions",
        type=int,
        default=0,
        help="a burst of this many hellos, gateway then echo (0: none)",
    )
    parser.add_argument(
        "--hello-rate", type=float, default=0, help="the burst's starts per second (0: all at once)"
    )
    parser.add_argument("--hello-timeout", type=float, default=180, help="give up on a burst after this")
    parser.add_argument("--rate", type=float, default=100, help="sessions opened per second")
    parser.add_argument(
        "--hold",
        type=float,
        default=40,
        help="seconds of the steady window (from --steady-after after all are up)",
    )
    parser.add_argument("--settle", type=float, default=5, help="seconds between 'ready' and the first hello")
    parser.add_argument(
        "--event-every", type=float, default=0, help="each supervisor writes a log line this often (s)"
    )
    parser.add_argument(
        "--storm-sessions", type=int, default=1000, help="sessions in each storm (0: no storm)"
    )
    parser.add_argument(
        "--up-timeout",
        type=float,
        default=180,
        help="wait this long past the ramp (sessions / rate) for all up before a hold or a kill",
    )
    parser.add_argument(
        "--storm-timeout", type=float, default=120, help="give up on a storm's recovery after this"
    )
    parser.add_argument(
        "--database-url", help="an empty PostgreSQL database (default: a fresh SQLite file per phase)"
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a gateway setting (repeatable)")
    parser.add_argument("--out", default="benchmarks/results/scale", help="directory for scale.json/.md/.png")
