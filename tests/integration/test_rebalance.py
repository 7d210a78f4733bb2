"""Rebalancing (issue 22 point 2), with real parts: three gateway processes on one real PostgreSQL
database, simulated supervisors speaking the real protocol (tests/support/simsup.py: a channel
each, an in-memory journal checked against every answer), each dialling one of the replicas ready
at the time, at random, as a Service routes.

All of them connect to A while it is alone; B and C start later. Within a bounded time each
replica holds a third of them, plus or minus 10 % (its ``openshell_gateway_sessions``), with at
most 1.5 x the excess asked to move (no ping-pong between replicas), no hint at all for three
intervals once even, and every event stored exactly once (no loss, no double). Then C is killed:
its supervisors land on A and B, which end even at a half each and stop moving sessions (C's row
counts its sessions until it lapses: a few moves meanwhile, at most what C held), refusing at most
a tenth of them over share (C stops being a receiver two renewals after its last one).

Then the review's two other cases: a storm over three empty replicas at once is not refused over
share (each replica judged by its row, like the others), and a replica whose row renews but that
no supervisor reaches takes nothing from the other (moves that do not land stop the moves and the
refusals).

The issue's 3,000-supervisor version runs with the Go simulator (chaos/); ``SUPERVISORS`` here can
be raised for a run by hand.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

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
LEASE_S = 4 * RENEW_S
INTERVAL_S = 1.0
MOVES_PER_S = 100.0
HINT_SPREAD_S = 1.0
#: Settled: even, and no move asked for this many polls a second apart, longer than a move counts
#: in flight at the replica that asked it (gateway.rebalance.Rebalancer.settle_s) and an interval.
QUIET_POLLS = math.ceil(HINT_SPREAD_S + 2.5 * RENEW_S + INTERVAL_S) + 1
#: Each replica ends within this fraction of its third.
WITHIN = 0.10
#: The excess to move at most this many times over (moved sessions that land back on A, ...).
MOVES_OVER_EXCESS = 1.5
#: After the others start, even within the design's bound: the excess at the rate bound, twice, and
#: the starts and renewals around it.
CONVERGE_S = SUPERVISORS * (REPLICAS - 1) / REPLICAS / MOVES_PER_S * 2 + 30 + QUIET_POLLS


def _replica(workdir: Path, replica_id: str, url: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        heartbeat_interval_s=2.0,
        database_url=url,
        extra=[
            "--set", f"ha.replica_id={replica_id}",
            "--set", f"ha.renew_interval_s={RENEW_S}",
            "--set", f"ha.lease_s={LEASE_S}",
            "--set", f"rebalance.interval_s={INTERVAL_S}",
            "--set", f"rebalance.max_moves_per_s={MOVES_PER_S}",
            "--set", f"rebalance.hint_spread_s={HINT_SPREAD_S}",
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


def _over_share(sims: list[SimSupervisor]) -> int:
    """Hellos refused because the replica was above its share."""
    return sum(1 for sim in sims for r in sim.rejections if "over_share" in r[3])


async def test_sessions_all_on_one_replica_even_out_over_three_without_loss(
    tmp_path: Path,
    database_url: str,
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

        async def settled(replicas: list[GatewayProcess], *, since: float, share: float) -> list[int]:
            """Wait until every one of ``replicas`` holds ``share`` within 10 % and no move was
            asked, for longer than a move is counted in flight (not a moment between a batch of
            hints and the next, once those have landed); what they hold then."""
            low, high = share * (1 - WITHIN), share * (1 + WITHIN)
            in_a_row, held, seen = 0, list[int](), _moves(sims)
            while in_a_row < QUIET_POLLS:
                assert time.monotonic() - since < CONVERGE_S, (
                    f"not even after {CONVERGE_S:.0f}s: {held} (by the supervisors: "
                    f"{Counter(s.current_address for s in sims)})"
                )
                await asyncio.sleep(1.0)
                held = list(await asyncio.gather(*(asyncio.to_thread(_sessions, g) for g in replicas)))
                quiet, seen = _moves(sims) == seen, _moves(sims)
                even = sum(held) == SUPERVISORS and all(low <= n <= high for n in held)
                in_a_row = in_a_row + 1 if quiet and even else 0
            return held

        share = SUPERVISORS / REPLICAS
        held = await settled(gateways, since=started, share=share)
        converged_after = time.monotonic() - started
        moved = _moves(sims)
        # Stable: no move for three intervals (and a renewal) once even.
        await asyncio.sleep(3 * INTERVAL_S + RENEW_S)
        assert _moves(sims) == moved, f"{_moves(sims) - moved} more moves after converging to {held}"
        excess = SUPERVISORS - share
        figures = (
            f"{moved} asked to move for an excess of {excess:.0f}, even after {converged_after:.1f}s: {held}"
        )
        print(figures)  # shown with -s: what a run by hand with more SUPERVISORS reports
        assert moved <= MOVES_OVER_EXCESS * excess, figures

        # C killed: its supervisors land on A and B (the Service routes to the ready ones), and
        # the two end even at a half each. C's row still counts its sessions until it lapses
        # (ha.lease_s), so A and B may move a few meanwhile; not back and forth without end.
        ready.remove(c.address)
        await asyncio.to_thread(c.kill)
        killed = time.monotonic()
        before_kill = _moves(sims)
        refused_before_kill = _over_share(sims)
        await asyncio.sleep(LEASE_S + RENEW_S)  # judged once C's row has lapsed, and read so
        held = await settled([a, b], since=killed, share=SUPERVISORS / 2)
        after_kill = _moves(sims) - before_kill
        await asyncio.sleep(3 * INTERVAL_S + RENEW_S)
        print(
            f"after C's kill: {after_kill} asked to move, even after {time.monotonic() - killed:.1f}s: {held}"
        )
        assert _moves(sims) - before_kill == after_kill, "moves again after A and B were even"
        assert after_kill <= share, f"{after_kill} moves after C's kill, which held {share:.0f}"
        # Review finding 3: C's row, alive until it lapses, counted as a receiver with room, and
        # A and B refused C's supervisors for share meanwhile (1,966 refusals for 150 of them).
        refused = _over_share(sims) - refused_before_kill
        assert refused <= share / 10, f"{refused} hellos refused over share after C's kill"
    finally:
        stop.set()
        if runs:
            await asyncio.wait(runs, timeout=30)
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)
    problems = await stored_problems(database_url, sims)
    assert not problems, problems[:10]
    assert sum(sim.acked for sim in sims) > SUPERVISORS, "events were written and acknowledged"


#: Supervisors of the two tests below (a storm at once, one replica's load).
STORM = 200


async def _run_all(sims: list[SimSupervisor], stop: asyncio.Event) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(sim.run(stop)) for sim in sims]


async def _all_connected(sims: list[SimSupervisor], *, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while sum(sim.connected for sim in sims) < len(sims):
        assert time.monotonic() < deadline, (
            f"{what}: {sum(s.connected for s in sims)} of {len(sims)} connected; refused: "
            f"{Counter(r[3].split(',')[0] for s in sims for r in s.rejections)}; moves {_moves(sims)}"
        )
        await asyncio.sleep(0.5)


async def test_a_storm_over_three_empty_replicas_is_not_refused_for_share(
    tmp_path: Path,
    database_url: str,
) -> None:
    """Review finding 1: every replica compared its live count with the others' older rows, so in
    a storm over several replicas growing together each one was above the others and refused
    (17,440 refusals for 600 supervisors over three). Judged by its row, like the others, none is."""
    gateways = [_replica(tmp_path / name, f"gw-{name}", database_url) for name in ("a", "b", "c")]
    addresses: list[str] = []
    stop = asyncio.Event()
    sims = [
        SimSupervisor(f"st-{i:04d}", addresses=lambda: addresses, write_every_s=2.0, backoff_max_s=2.0)
        for i in range(STORM)
    ]
    runs: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(g.start) for g in gateways))
        addresses.extend(g.address for g in gateways)
        await asyncio.sleep(2 * RENEW_S + INTERVAL_S)  # every row renewed, every rebalancer read them
        runs = await _run_all(sims, stop)
        for _ in range(300):  # up to 150 s, not a speed bound: a loaded machine's storm takes long
            if sum(sim.connected for sim in sims) == STORM:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2 * RENEW_S + INTERVAL_S)  # and the rows renewed with it
        refused = _over_share(sims)
        print(f"storm of {STORM} over three: {refused} refused over share, {_moves(sims)} moves")
        assert refused <= STORM / 30, f"{refused} hellos refused over share in a storm spread evenly"
        await _all_connected(sims, within_s=30, what="the storm")
    finally:
        stop.set()
        if runs:
            await asyncio.wait(runs, timeout=30)
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)
    problems = await stored_problems(database_url, sims)
    assert not problems, problems[:10]


async def test_a_replica_no_supervisor_reaches_takes_nothing_from_the_others(
    tmp_path: Path,
    database_url: str,
) -> None:
    """Review finding 2: B's row renews, but no supervisor can reach B (not routed to yet, a
    NetworkPolicy, a wrong port): A shed toward it and refused every hello for share, its moved
    supervisors refused everywhere (A went from 300 to 35 in 15 s). The loop is closed now: moves
    that do not land stop the moves and the refusals, and the supervisors come back to A."""
    a = _replica(tmp_path / "a", "gw-a", database_url)
    b = _replica(tmp_path / "b", "gw-b", database_url)
    ready: list[str] = []
    stop = asyncio.Event()
    sims = [
        SimSupervisor(f"nr-{i:04d}", addresses=lambda: ready, write_every_s=2.0, backoff_max_s=2.0)
        for i in range(STORM)
    ]
    runs: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(a.start)
        ready.append(a.address)
        runs = await _run_all(sims, stop)
        await _all_connected(sims, within_s=60, what="on A alone")
        moved_before = _moves(sims)
        await asyncio.to_thread(b.start)  # its row renews; nobody dials it
        started = time.monotonic()
        fewest = STORM
        while time.monotonic() - started < 12:
            await asyncio.sleep(0.5)
            fewest = min(fewest, sum(sim.connected for sim in sims))
        await _all_connected(sims, within_s=10, what="back on A")
        refused, moved = _over_share(sims), _moves(sims) - moved_before
        print(f"B unreachable: {refused} refused over share, {moved} moved, fewest connected {fewest}")
        assert refused == 0, f"{refused} hellos refused over share with nowhere else to go"
        # One batch into the void (half the excess), then a hold; never a collapse.
        assert moved <= STORM / 2, f"{moved} moved toward a replica nobody reaches"
        assert fewest >= STORM * 3 / 4, f"only {fewest} of {STORM} connected at the worst"
        assert await asyncio.to_thread(_sessions, a) == STORM
    finally:
        stop.set()
        if runs:
            await asyncio.wait(runs, timeout=30)
        for gateway in (a, b):
            await asyncio.to_thread(gateway.stop)
    problems = await stored_problems(database_url, sims)
    assert not problems, problems[:10]
