"""Where a server's memory per session goes: ``python -m chaos.memprobe`` (issue 22 point 7's memory).

The scale benchmark gives RSS per 1,000 sessions, the gateway's beside echo's; this says what the
difference is made of. It starts the gateway (or the echo baseline) under ``tracemalloc`` through
its own ``traced`` entry point, which dumps, on SIGUSR2, a tracemalloc snapshot, the live objects
counted by type and the asyncio tasks counted by name (less the sandbox id), each after a full
collection. The Go simulator (chaos/sim) then opens ``--sessions`` sessions; a dump is taken before
the first hello and another once all are up and settled. The report, per session: RSS growth,
what Python allocated (tracemalloc: the difference is gRPC's C core, which tracemalloc does not
see, and the allocator's slack), the biggest growths by source line, by object type and tasks.

    python -m chaos.memprobe --sessions 1000 [--server gateway|echo|both] [--set KEY=VALUE]

Nothing here is on the serving path: ``gateway serve`` does not trace. The figures are for
comparing before and after a change in back-to-back runs; tracemalloc's own bookkeeping inflates
the RSS of the traced process (read the RSS figures from ``chaos bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any

from chaos.scale import Server, SimRun, build_simulator, proc_cpu_rss, sim_args

#: Frames kept per allocation: enough to see which of our lines a gRPC or asyncio allocation serves.
TRACE_FRAMES = 6


def _dump(path: Path) -> None:
    """The snapshot, type counts and task names of this process, to ``path``.{snap,json}; the first
    dump starts tracing (the snapshot is empty): tracing the server from its start slowed its
    hellos below the simulator's connect timeout."""
    gc.collect()
    if os.environ.get("OPENSHELL_MEMPROBE_TRACE", "1") == "1":
        if not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
        tracemalloc.take_snapshot().dump(str(path.with_suffix(".snap")))
    types: collections.Counter[str] = collections.Counter()
    tasks: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        types[f"{kind.__module__}.{kind.__qualname__}"] += 1
        if isinstance(obj, asyncio.Task):
            name = obj.get_name()
            tasks[name.split("-")[0] if "-" in name else name] += 1
    path.with_suffix(".json").write_text(json.dumps({"types": types, "tasks": tasks}))
    path.with_suffix(".done").touch()


def traced(argv: list[str]) -> int:
    """Run ``gateway serve ARGS`` or ``echo ADDRESS ARGS`` with tracemalloc, dumping on SIGUSR2 into
    the directory named by OPENSHELL_MEMPROBE_DIR (dump-0, dump-1, ...)."""
    out = Path(os.environ["OPENSHELL_MEMPROBE_DIR"])
    dumps = 0

    def on_usr2(_signum: int, _frame: FrameType | None) -> None:
        nonlocal dumps
        _dump(out / f"dump-{dumps}")
        dumps += 1

    signal.signal(signal.SIGUSR2, on_usr2)
    if argv[0] == "echo":
        from chaos import echo_server  # noqa: PLC0415 - only the probed server is imported

        echo_server.main(argv[1:])
        return 0
    from gateway.cli import main  # noqa: PLC0415

    return main(argv[1:])


class TracedServer(Server):
    """A bench Server started through :func:`traced`."""

    def argv(self) -> list[str]:
        plain = super().argv()
        # [python, -m, gateway|chaos.echo_server, ...] -> [python, -m, chaos.memprobe, traced, ...]
        head = ["gateway"] if self.kind == "gateway" else ["echo"]
        return [sys.executable, "-m", "chaos.memprobe", "traced", *head, *plain[3:]]


def _take(server: Server, out: Path, index: int, *, timeout_s: float = 120.0) -> float:
    """Dump ``index`` of ``server``; its RSS (MiB) just before."""
    _, rss = proc_cpu_rss(server.pid)
    os.kill(server.pid, signal.SIGUSR2)
    done = out / f"dump-{index}.done"
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no dump {index} from the {server.kind} within {timeout_s:.0f} s")
        time.sleep(0.2)
    return rss


def report(out: Path, *, kind: str, n: int, rss: tuple[float, float], top: int = 25) -> dict[str, Any]:
    rss_kb = (rss[1] - rss[0]) * 1024
    if not (out / "dump-1.snap").exists():
        return {"server": kind, "sessions": n, "rss_kb_per_session": round(rss_kb / n, 2)}
    before = tracemalloc.Snapshot.load(str(out / "dump-0.snap"))
    after = tracemalloc.Snapshot.load(str(out / "dump-1.snap"))
    traced_kb = (
        sum(s.size for s in after.statistics("filename")) - sum(s.size for s in before.statistics("filename"))
    ) / 1024
    by_line = [
        {
            "where": str(stat.traceback[0]),
            "bytes_per_session": round(stat.size_diff / n),
            "blocks_per_session": round(stat.count_diff / n, 2),
        }
        for stat in after.compare_to(before, "lineno")[:top]
    ]
    counts = [json.loads((out / f"dump-{i}.json").read_text()) for i in (0, 1)]
    types = collections.Counter(counts[1]["types"])
    types.subtract(counts[0]["types"])
    tasks = collections.Counter(counts[1]["tasks"])
    tasks.subtract(counts[0]["tasks"])
    return {
        "server": kind,
        "sessions": n,
        "rss_kb_per_session": round(rss_kb / n, 2),
        "traced_kb_per_session": round(traced_kb / n, 2),
        "untraced_kb_per_session": round((rss_kb - traced_kb) / n, 2),
        "top_lines": by_line,
        "objects_per_session": {k: round(v / n, 2) for k, v in types.most_common(top) if v > 0},
        "tasks_per_session": {k: round(v / n, 2) for k, v in tasks.items() if v},
    }


def probe(
    sim: Path, kind: str, *, n: int, rate: float, settle_s: float, settings: list[str], work: Path
) -> dict[str, Any]:
    out = work / kind
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OPENSHELL_MEMPROBE_DIR"] = str(out)
    server = TracedServer(kind, out, settings=settings)
    server.start()
    try:
        time.sleep(settle_s)
        rss0 = _take(server, out, 0)
        run = SimRun(
            sim,
            sim_args(server.address, n=n, prefix=f"{kind[0]}m", rate=rate, duration_s=0),
            out / "sim.json",
        )
        run.start()
        try:
            if not run.wait_up(n, timeout_s=n / rate + 180):
                raise RuntimeError(f"only {run.up} of {n} sessions came up on the {kind}")
            time.sleep(settle_s)
            rss1 = _take(server, out, 1)
            run.finish()
        finally:
            run.kill()
    finally:
        server.stop()
    return report(out, kind=kind, n=n, rss=(rss0, rss1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "traced":
        return traced(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m chaos.memprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="sessions opened per second")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before each dump")
    parser.add_argument("--server", choices=("gateway", "echo", "both"), default="both")
    parser.add_argument("--set", action="append", default=[], help="a gateway setting (repeatable)")
    parser.add_argument(
        "--rss-only", action="store_true", help="no tracing: RSS per session without tracemalloc's own"
    )
    parser.add_argument("--out", help="where the JSON report goes (default: stdout only)")
    args = parser.parse_args(argv)
    sim = build_simulator()
    os.environ["OPENSHELL_MEMPROBE_TRACE"] = "0" if args.rss_only else "1"
    work = Path(tempfile.mkdtemp(prefix="chaos-memprobe-"))
    kinds = ["gateway", "echo"] if args.server == "both" else [args.server]
    results = [
        probe(
            sim,
            kind,
            n=args.sessions,
            rate=args.rate,
            settle_s=args.settle,
            settings=[f"--set={s}" for s in args.set] if kind == "gateway" else [],
            work=work,
        )
        for kind in kinds
    ]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
