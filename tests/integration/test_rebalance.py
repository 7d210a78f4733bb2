"""Rebalancing (issue 22 point 2), with real parts: three gateway processes on one real PostgreSQL
database, simulated supervisors speaking the real protocol (tests/support/simsup.py: a channel
each, an in-memory journal checked against every answer), each dialling one of the replicas ready
at the time, at random, as a Service routes.

All of them connect to A while it is alone; B and C start later. Within a bounded time each
replica holds a third of them, plus or minus 10 % (its ``openshell_gateway_sessions``), with at
most 1.5 x the excess asked to move (no ping-pong between replicas), no hint at all for three
intervals once even, and every event stored exactly once (no loss, no double).

The issue's 3,000-supervisor version runs with the Go simulator (chaos/); ``SUPERVISORS`` here can
be raised for a run by hand.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.test_replicas import database_url, pg_server  # noqa: F401 (fixtures)
from tests.support.postgres import pg_bindir
from tests.support.procs import GatewayProcess
from tests.support.simsup import SimSupervisor, stored_problems

pytestmark = pytest.mark.skipif(
    pg_bindir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
)

#: Simulated supervisors (the issue's figure is 3,000, run with chaos/'s Go simulator).
SUPERVISORS = 300
REPLICAS = 3
RENEW_S = 1.0
INTERVAL_S = 1.0
MOVES_PER_S = 100.0
#: Each replica ends within this fraction of its third.
WITHIN = 0.10
#: The excess to move at most this many times over (moved sessions that land back on A, ...).
MOVES_OVER_EXCESS = 1.5
#: After the others start, even within the design's bound: the excess at the rate bound, twice, and
#: the starts and renewals around it.
CONVERGE_S = SUPERVISORS * (REPLICAS - 1) / REPLICAS / MOVES_PER_S * 2 + 30


def _replica(workdir: Path, replica_id: str, url: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        heartbeat_interval_s=2.0,
        database_url=url,
        extra=[
            "--set", f"ha.replica_id={replica_id}",
            "--set", f"ha.renew_interval_s={RENEW_S}",
            "--set", f"ha.lease_s={4 * RENEW_S}",
            "--set", f"rebalance.interval_s={INTERVAL_S}",
            "--set", f"rebalance.max_moves_per_s={MOVES_PER_S}",
            "--set", "rebalance.hint_spread_s=1.0",
            "--log-level", "info",
        ],
    )  # fmt: skip


def _sessions(gateway: GatewayProcess) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops_port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == "openshell_gateway_sessions":
                return int(float(value))
    raise AssertionError("no openshell_gateway_sessions in the metrics")


def _moves(sims: list[SimSupervisor]) -> int:
    return sum(1 for sim in sims for hint in sim.hints if hint[1] in ("rebalance", "max_age"))


async def test_sessions_all_on_one_replica_even_out_over_three_without_loss(
    tmp_path: Path,
    database_url: str,  # noqa: F811 (the fixture)
) -> None:
    gateways = [_replica(tmp_path / name, f"gw-{name}", database_url) for name in ("a", "b", "c")]
    a, b, c = gateways
    ready: list[str] = []
    stop = asyncio.Event()
    sims = [
        SimSupervisor(f"rb-{i:04d}", addresses=lambda: ready, write_every_s=1.0, backoff_max_s=2.0)
        for i in range(SUPERVISORS)
    ]
    runs: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(a.start)
        ready.append(a.address)
        # They come over a few seconds (pods starting), not all in one instant: the storm is
        # admission's test, not this one's.
        for i in range(0, SUPERVISORS, 25):
            runs.extend(asyncio.create_task(sim.run(stop)) for sim in sims[i : i + 25])
            await asyncio.sleep(0.25)
        deadline = time.monotonic() + 60
        while sum(sim.connected for sim in sims) < SUPERVISORS:
            assert time.monotonic() < deadline, f"{sum(s.connected for s in sims)} of {SUPERVISORS} on A"
            await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_sessions, a) == SUPERVISORS
        assert _moves(sims) == 0, "A alone moves nothing"

        await asyncio.gather(asyncio.to_thread(b.start), asyncio.to_thread(c.start))
        ready.extend([b.address, c.address])
        started = time.monotonic()
        share = SUPERVISORS / REPLICAS
        low, high = share * (1 - WITHIN), share * (1 + WITHIN)

        async def counts() -> list[int]:
            return list(await asyncio.gather(*(asyncio.to_thread(_sessions, g) for g in gateways)))

        # Even: every replica within 10 % of a third, twice in a row a second apart (not a
        # moment between a batch of hints and their reconnections).
        even_in_a_row = 0
        held: list[int] = []
        while even_in_a_row < 2:
            assert time.monotonic() - started < CONVERGE_S, (
                f"not even after {CONVERGE_S:.0f}s: {held} (by the supervisors: "
                f"{Counter(s.current_address for s in sims)})"
            )
            await asyncio.sleep(1.0)
            held = await counts()
            even_in_a_row = even_in_a_row + 1 if all(low <= n <= high for n in held) else 0
        converged_after = time.monotonic() - started
        moved = _moves(sims)

        # Stable: no hint for three intervals (and a renewal) once even.
        await asyncio.sleep(3 * INTERVAL_S + RENEW_S)
        assert _moves(sims) == moved, f"{_moves(sims) - moved} more moves after converging to {held}"
        held = await counts()
        assert all(low <= n <= high for n in held), held
        excess = SUPERVISORS - share
        figures = (
            f"{moved} asked to move for an excess of {excess:.0f}, even after {converged_after:.1f}s: {held}"
        )
        print(figures)  # shown with -s: what a run by hand with more SUPERVISORS reports
        assert moved <= MOVES_OVER_EXCESS * excess, figures
        assert sum(held) == SUPERVISORS
    finally:
        stop.set()
        if runs:
            await asyncio.wait(runs, timeout=30)
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)
    problems = await stored_problems(database_url, sims)
    assert not problems, problems[:10]
    assert sum(sim.acked for sim in sims) > SUPERVISORS, "events were written and acknowledged"
