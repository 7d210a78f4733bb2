"""Issue 22 point 2 at full size: three gateway replicas on one PostgreSQL, N Go-simulated supervisors
(chaos/sim) all on replica A at first, B and C started later; how long until each holds a third
+/- the tolerance, and whether any event was lost or doubled.

The simulator picks each attempt's replica at random from its ``-addr-file`` (a Service's endpoints:
re-read when it changes), which names A alone until B and C are ready, then all three: every session
lands on A, and once all are up there B and C start together and join the endpoints (as a Service
adds a pod when its readiness probe passes). Each replica's live sessions are read once a second from its
``openshell_gateway_sessions`` metric. Converged: the first second from which every replica stays
within fair share x (1 +/- tolerance) until the end of the hold. Then the simulator stops (its
journals checked on every acknowledgement) and the store is checked against them (``stored_problems``:
every acknowledged sequence stored once with its text, none above what was written). Results:
``rebalance.json``, ``rebalance.md`` and ``rebalance.png`` (sessions per replica over time, with the
optional ``chaos`` extra).

    python -m chaos rebalance --sessions 3000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chaos.plotting import pyplot
from chaos.scale import Server, SimRun, SimulatorUnavailable, build_simulator, sim_args, stored_problems
from tests.support.postgres import PostgresUnavailable, running_postgres

SESSIONS_METRIC = "openshell_gateway_sessions"
REPLICAS = ("a", "b", "c")


async def _create_database(admin_url: str, name: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()


def converged_at(
    samples: list[dict[str, Any]], *, n: int, replicas: int, tolerance: float, since_s: float
) -> float | None:
    """The first sample time (>= since_s) from which every replica stays within n / replicas x
    (1 +/- tolerance) to the last sample; None if the last sample is not within it."""
    fair = n / replicas
    low, high = fair * (1 - tolerance), fair * (1 + tolerance)
    at: float | None = None
    for s in samples:
        if s["t"] < since_s:
            continue
        counts = [s["sessions"].get(name) for name in REPLICAS[:replicas]]
        within = all(c is not None and low <= c <= high for c in counts)
        if within and at is None:
            at = s["t"]
        elif not within:
            at = None
    return at


def _write_endpoints(path: Path, servers: list[Server]) -> None:
    """The simulator's endpoints file, replaced atomically (it re-reads it when it changes)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(",".join(s.address for s in servers) + "\n")
    tmp.replace(path)


def _sample(servers: dict[str, Server], started: float) -> dict[str, Any]:
    counts: dict[str, int | None] = {}
    for name, server in servers.items():
        value = server.metric(SESSIONS_METRIC, timeout_s=2.0) if server.proc is not None else None
        counts[name] = int(value) if value is not None else None
    return {"t": round(time.monotonic() - started, 2), "sessions": counts}


def markdown(results: dict[str, Any]) -> str:
    p = results["parameters"]
    f = results["figures"]
    fair = p["sessions"] / len(REPLICAS)
    final = f.get("final_sessions") or {}
    load = ", ".join(f"{x:.2f}" for x in results["load_before"])
    lines = [
        f"Rebalancing run, {results['date']} on {results['machine']} (load average before: {load}): "
        f"{p['sessions']} simulated supervisors (events every {p['event_every_s']} s) on replica A of three "
        f"on one PostgreSQL, B and C started {p['others_after_s']} s after all were up on A; "
        f"gateway settings: {' '.join(p['gateway_settings']) or 'defaults'}.",
        "",
        "| | target | measured | verdict |",
        "|---|---|---|---|",
        f"| all {p['sessions']} up on A | | {f.get('all_on_a_s')} s after the first start | |",
        f"| each replica within a third +/- {round(100 * p['tolerance'])} % "
        f"({round(fair * (1 - p['tolerance']))}-{round(fair * (1 + p['tolerance']))}) | within "
        f"{p['within_s']:.0f} s | {f.get('converged_s')} s after B and C were started; final "
        f"{', '.join(f'{k.upper()} {v}' for k, v in final.items())} | "
        f"{'met' if f.get('converged_s') is not None and f['converged_s'] <= p['within_s'] else 'MISSED'} |",
        f"| stays within it | to the end of the hold ({p['hold_s']:.0f} s after convergence) | "
        f"{'yes' if f.get('converged_s') is not None else 'no'} | |",
        f"| events lost or doubled (simulator's checks, store check) | 0 | {f['violations']} violations, "
        f"{len(f['store_problems'])} store problems ({f['events_acked']} of {f['events_written']} events "
        f"acknowledged, {f['checks']} acknowledgements checked) | "
        f"{'met' if not f['violations'] and not f['store_problems'] else 'MISSED'} |",
        f"| sessions moved | | {f['hints']} reconnect hints received, {f['attempts']} attempts, "
        f"rejected {f['rejected'] or 0}, {f['connect_timeouts']} connect timeouts | |",
    ]
    if f["store_problems"]:
        lines += ["", "Store problems: " + "; ".join(f["store_problems"])]
    lines += ["", results["plot"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "No plot: matplotlib is not installed (pip install -e '.[chaos]')."
    samples = results["samples"]
    started = results["figures"].get("others_started_s") or 0.0
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in REPLICAS:
        t = [s["t"] - started for s in samples]
        ax.step(
            t, [s["sessions"].get(name) or 0 for s in samples], where="post", label=f"replica {name.upper()}"
        )
    fair = results["parameters"]["sessions"] / len(REPLICAS)
    tol = results["parameters"]["tolerance"]
    ax.axhspan(fair * (1 - tol), fair * (1 + tol), color="grey", alpha=0.2, label="a third +/- tolerance")
    if results["figures"].get("converged_s") is not None:
        ax.axvline(results["figures"]["converged_s"], color="black", linestyle=":", label="converged")
    ax.set_xlabel("s after B and C were started")
    ax.set_ylabel("live sessions")
    ax.legend()
    fig.savefig(out / "rebalance.png", dpi=100)
    plt.close("all")
    return "Plot: rebalance.png."


def rebalance(args: argparse.Namespace) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.sessions + 200 > soft:
        print(
            f"rebalance: {args.sessions} sessions need more descriptors than {soft} (ulimit -n)",
            file=sys.stderr,
        )
        return 2
    try:
        sim = build_simulator()
    except SimulatorUnavailable as exc:
        print(f"rebalance: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chaos-rebalance-"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}",
        "load_before": os.getloadavg(),
        "parameters": {
            "sessions": args.sessions, "rate": args.rate, "event_every_s": args.event_every,
            "others_after_s": args.others_after, "within_s": args.within, "hold_s": args.hold,
            "tolerance": args.tolerance, "gateway_settings": args.set or [],
        },
    }  # fmt: skip
    try:
        with running_postgres() as pg:
            asyncio.run(_create_database(pg.url("postgres"), "rebalance"))
            url = pg.url("rebalance")
            return _run(args, sim=sim, url=url, work=work, out=out, results=results)
    except PostgresUnavailable as exc:
        print(f"rebalance: PostgreSQL cannot run here: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    args: argparse.Namespace, *, sim: Path, url: str, work: Path, out: Path, results: dict[str, Any]
) -> int:
    settings = [f"--set={s}" for s in args.set or []]
    servers = {
        name: Server(
            "gateway", work / name, database_url=url, settings=settings, replica_id=f"replica-{name}"
        )
        for name in REPLICAS
    }
    samples: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    run: SimRun | None = None
    started = time.monotonic()
    endpoints = work / "endpoints"
    _write_endpoints(endpoints, [servers["a"]])
    try:
        servers["a"].start()
        run = SimRun(
            sim,
            sim_args(
                servers["a"].address,
                watch_pid=servers["a"].pid,
                n=args.sessions,
                prefix="rb",
                rate=args.rate,
                duration_s=0,
                event_every_s=args.event_every,
                extra=["-addr-file", str(endpoints)],
            ),
            work / "sim.json",
        )
        print(f"rebalance: {args.sessions} supervisors onto replica A ...", file=sys.stderr, flush=True)
        run.start()
        started = time.monotonic()
        deadline = started + args.sessions / max(args.rate, 1) + args.up_timeout
        while time.monotonic() < deadline:
            samples.append(_sample(servers, started))
            if samples[-1]["sessions"]["a"] == args.sessions:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"only {samples[-1]['sessions']['a']} of {args.sessions} sessions up on A")
        figures["all_on_a_s"] = samples[-1]["t"]
        end_wait = time.monotonic() + args.others_after
        while time.monotonic() < end_wait:
            samples.append(_sample(servers, started))
            time.sleep(1)
        print("rebalance: starting replicas B and C ...", file=sys.stderr, flush=True)
        figures["others_started_s"] = round(time.monotonic() - started, 2)
        servers["b"].start()
        servers["c"].start()
        _write_endpoints(endpoints, list(servers.values()))
        since = figures["others_started_s"]
        deadline = time.monotonic() + args.within + args.hold
        while time.monotonic() < deadline:
            samples.append(_sample(servers, started))
            at = converged_at(
                samples, n=args.sessions, replicas=len(REPLICAS), tolerance=args.tolerance, since_s=since
            )
            if at is not None and samples[-1]["t"] - at >= args.hold:
                break
            time.sleep(1)
        at = converged_at(
            samples, n=args.sessions, replicas=len(REPLICAS), tolerance=args.tolerance, since_s=since
        )
        figures["converged_s"] = round(at - since, 1) if at is not None else None
        figures["final_sessions"] = samples[-1]["sessions"]
        print("rebalance: stopping the simulator and checking the store ...", file=sys.stderr, flush=True)
        result = run.finish()
        figures.update(
            violations=result["violations"],
            hints=result["hints"],
            attempts=result["attempts"],
            rejected=result["rejected_by_code"],
            events_written=result["events_written"],
            events_acked=result["events_acked"],
            checks=result["checks"],
            connect_timeouts=result["connect_timeouts"],
            errors=result["errors"],
            store_problems=stored_problems(url, result),
        )
    except RuntimeError as exc:
        print(f"rebalance: {exc}", file=sys.stderr)
        figures.setdefault("error", str(exc))
    finally:
        if run is not None:
            run.kill()
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
    results["figures"] = figures
    results["samples"] = samples
    if "error" in figures:
        (out / "rebalance.json").write_text(json.dumps(results, indent=1) + "\n")
        return 1
    results["plot"] = plot(results, out)
    (out / "rebalance.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results)
    (out / "rebalance.md").write_text(report)
    print(report)
    ok = (
        figures["converged_s"] is not None
        and figures["converged_s"] <= args.within
        and not figures["violations"]
        and not figures["store_problems"]
    )
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=3000, help="simulated supervisors")
    parser.add_argument("--rate", type=float, default=200, help="sessions started per second onto A")
    parser.add_argument(
        "--event-every", type=float, default=10, help="each supervisor writes a line this often (s)"
    )
    parser.add_argument(
        "--others-after", type=float, default=10, help="B and C start this long after all are on A"
    )
    parser.add_argument(
        "--within", type=float, default=180, help="the bound on convergence (s after B and C start)"
    )
    parser.add_argument("--hold", type=float, default=30, help="seconds it must stay balanced once converged")
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="each replica within a third x (1 +/- this)"
    )
    parser.add_argument(
        "--up-timeout", type=float, default=120, help="give up if not all are on A after this"
    )
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a setting of every replica (repeatable)"
    )
    parser.add_argument(
        "--out", default="benchmarks/results/rebalance", help="directory for rebalance.json/.md/.png"
    )
