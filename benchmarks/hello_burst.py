"""A burst of supervisors dialling one gateway at once, with admission control on or off.

One gateway process on SQLite (tests/support/procs.py GatewayProcess) and ``--clients`` simulated
supervisors (tests/support/simsup.py: the real protocol, a channel each, a 5 s connect timeout,
obeying retry_after_ms) started together in this process. It prints, after at most ``--seconds``:
how many were up, when all were (if they were), the attempts, those without an answer before
their timeout, the refusals by reason, and the spread of the retry hints. Extra ``--set KEY=VALUE``
go to the gateway. The gateway is stopped at the end; its log stays in the printed directory.

Usage: ``python benchmarks/hello_burst.py [--clients N] [--seconds S] [--off] [--set KEY=VALUE ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.procs import GatewayProcess
from tests.support.simsup import SimSupervisor


async def burst(address: str, n: int, seconds: float) -> None:
    sims = [
        SimSupervisor(sandbox_id=f"b-{i:05d}", addresses=lambda: [address], connect_timeout_s=5.0)
        for i in range(n)
    ]
    stop = asyncio.Event()
    started = time.monotonic()
    runs = [asyncio.create_task(sim.run(stop)) for sim in sims]
    all_up: float | None = None
    while time.monotonic() - started < seconds:
        if all(sim.connected for sim in sims):
            all_up = time.monotonic() - started
            break
        await asyncio.sleep(0.5)
    up = sum(1 for sim in sims if sim.connected)
    stop.set()
    await asyncio.wait(runs, timeout=20)
    for run in runs:
        run.cancel()
    attempts = sum(len(sim.attempts) for sim in sims)
    answered = sum(len(sim.sessions) + len(sim.rejections) for sim in sims)
    reasons = Counter(r[3] for sim in sims for r in sim.rejections)
    hints = sorted(r[2] for sim in sims for r in sim.rejections)
    print(f"clients {n}: up {up} after {time.monotonic() - started:.0f}s; all up after {all_up}")
    print(f"attempts {attempts}, unanswered before the 5 s timeout {attempts - answered}")
    print(f"sessions accepted {sum(len(sim.sessions) for sim in sims)}; refusals {dict(reasons)}")
    if hints:
        p50, p90 = hints[len(hints) // 2], hints[len(hints) * 9 // 10]
        print(f"retry_after_ms p50 {p50} p90 {p90} max {hints[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--off", action="store_true", help="admission.enabled=false")
    parser.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hello_burst_"))
    extra = ["--set", f"admission.enabled={'false' if args.off else 'true'}"]
    for item in args.settings:
        extra += ["--set", item]
    # 10 s heartbeats with a 3 s grace: the simulated supervisors beat up to 20 % late.
    gateway = GatewayProcess(
        workdir, heartbeat_interval_s=10.0, grace_s=3.0, extra=[*extra, "--log-level", "info"]
    )
    gateway.start()
    try:
        asyncio.run(burst(gateway.address, args.clients, args.seconds))
    finally:
        gateway.stop()
    closed = gateway.log_text().count("stream closed before hello")
    print(f"gateway log {gateway.log_path}: 'stream closed before hello' {closed}")


if __name__ == "__main__":
    main()
