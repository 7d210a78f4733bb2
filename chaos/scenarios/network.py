"""Network faults between a sandbox host and its gateway host, in network namespaces the run creates
(chaos/net.py): a blackhole (every packet dropped), resets, one-way cuts, delay (chaos/proxy.py),
random loss, and a link that flaps.

Every scenario runs the same frame (:func:`_network_trial`): a real gateway in the gateway host's
namespace, three real supervisors in the sandbox host's, each with a main process writing numbered
lines (chaos/common.py's gated writer):

- ``ends``: writes 40 lines, waits for the fault, then writes 200 more and exits 3 while the fault is
  in place: its last lines and its exit must still arrive after the heal (within the supervisor's
  exit-delivery window, 60 s by default, which bounds the full run's faults);
- ``keeps``: writes 40 lines, waits for the fault, writes at 20 lines a second through it, waits for
  the heal and writes 60 more, exits 0: lines journaled during the fault are replayed after it;
- ``backlog``: writes 20 lines, waits for the fault, then 2,000 at once and exits 0, with a journal
  bounded to 64 KiB of undelivered records: when the fault holds them back, the oldest give way to
  gap records that count them, and the replay after the heal carries the rest.

Then: the fault (marked), held for its duration (quick: 8 s; full: 45 s, past TCP's first
retransmission timeouts and SYN retries), healed (marked), every supervisor's exit awaited, and
chaos/common.py's ``check_all``: nothing lost unexplained, nothing doubled, every dropped line counted,
one start and the right exit code per sandbox, and for faults that break the session, a RECONNECTED
record within the resume bound of the heal. For faults that must *not* break a session (a delay whose
round trip stays below the stale bound) a RECONNECTED record is itself the violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from chaos.common import (
    WriterSandbox,
    check_after_error,
    check_all,
    gate_reached,
    hold,
    open_gate,
    require_netns,
    sqlite_url,
    start_gateway,
    stop_all,
    unix_ms,
    wait_exits,
    wait_for,
    wait_lines,
)
from chaos.invariants import stored_events
from chaos.net import CutDirection, NetPair
from chaos.proxy import DelayProxy
from chaos.suite import Trial, scenario
from tests.support.procs import GatewayProcess

#: The gateway's heartbeat interval and grace here (tests/support/procs.py's defaults): a session
#: the gateway hears nothing from for 1.5 s ends; the supervisor's own silence bound is 3 intervals.
HEARTBEAT_S = 0.5
GRACE_S = 1.0

#: The `backlog` supervisor's journal holds at most 64 KiB undelivered (the least allowed is 16 KiB):
#: its 2,000 lines written during a cut overflow it, so the oldest give way to gap records that
#: count them, and "every dropped line counted" is checked on real drops.
BACKLOG_JOURNAL = ("journal.max_bytes=65536", "journal.segment_bytes=16384")

#: The `keeps` supervisor's /status port in the sandbox's namespace (the delay scenario only).
STATUS_PORT = 9469

#: Seconds from the heal to each sandbox's RECONNECTED record: the supervisors here back off at most
#: 2 s with a 2 s connect timeout (tests/support/procs.py), so an attempt starts within ~4 s of the
#: heal; the rest is the hello on a loaded 2-core machine.
RESUME_BOUND_S = 12.0

#: Seconds the supervisors get to deliver everything and exit after the heal.
EXIT_WAIT_S = 90.0


@dataclass
class Link:
    """What a fault function acts on: the namespaces' pair, the proxy when the scenario has one, and
    what :meth:`hold` samples while the fault lasts."""

    net: NetPair
    proxy: DelayProxy | None
    database_url: str
    sandboxes: list[WriterSandbox]

    async def hold(self, trial: Trial, seconds: float) -> None:
        await hold(trial, seconds, database_url=self.database_url, sandboxes=self.sandboxes)

    async def rtt_ms(self) -> float | None:
        """The ``keeps`` supervisor's last heartbeat round trip (its /status, served on the sandbox's
        loopback in the delay scenario), or None when it has none or cannot be asked."""
        script = (
            "import json, urllib.request as u;"
            f"print(json.load(u.urlopen('http://127.0.0.1:{STATUS_PORT}/status', timeout=3))"
            "['session']['last_rtt_ms'])"
        )
        out = await asyncio.to_thread(self.net.sandbox_exec, sys.executable, "-c", script, check=False)
        try:
            return float(out.strip())
        except ValueError:
            return None


#: What the fault must do to the sessions: ``breaks`` them (each sandbox still running at the heal
#: must journal a RECONNECTED record within the resume bound), leave them up (``survives``: any
#: RECONNECTED record is a violation), or ``either`` (chance decides; only the invariants and the
#: delivered exits are checked).
SessionEffect = Literal["breaks", "survives", "either"]


#: A fault: put it in place (marking what it does) and keep it for ``seconds``; the frame heals.
Fault = Callable[[Trial, Link, float], Awaitable[None]]


async def _network_trial(
    trial: Trial,
    fault: Fault,
    *,
    fault_s: float,
    sessions: SessionEffect,
    proxy: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
    grace_s: float = GRACE_S,
) -> None:
    require_netns()
    net = await asyncio.to_thread(NetPair.create)
    trial.mark(f"namespaces {net.gateway_ns} ({net.gateway_ip}) and {net.sandbox_ns} ({net.sandbox_ip})")
    gateway = GatewayProcess(
        trial.workdir / "gateway",
        grpc_host=net.gateway_ip,
        netns=net.gateway_ns,
        heartbeat_interval_s=heartbeat_s,
        grace_s=grace_s,
    )
    delay_proxy = (
        DelayProxy(trial.workdir / "proxy", host=net.gateway_ip, target=gateway.address, netns=net.gateway_ns)
        if proxy
        else None
    )
    dial = delay_proxy.address if delay_proxy is not None else gateway.address
    fault_gate = trial.workdir / "fault.gate"
    heal_gate = trial.workdir / "heal.gate"
    keeps_during = int(fault_s * 20 * 0.8)
    # The delay scenario asks the `keeps` supervisor for its heartbeat round trips: proof that the
    # proxy delayed what it carried.
    status = [f"http.enabled={str(proxy).lower()}", f"http.listen=127.0.0.1:{STATUS_PORT}"]
    sandboxes = [
        WriterSandbox.create(
            trial, "ends", gateway_address=dial, lines=240, delay=0.005, exit_code=3,
            netns=net.sandbox_ns, pauses=[(40, fault_gate)],
        ),
        WriterSandbox.create(
            trial, "keeps", gateway_address=dial, lines=40 + keeps_during + 60, delay=0.05, exit_code=0,
            netns=net.sandbox_ns, pauses=[(40, fault_gate), (40 + keeps_during, heal_gate)],
            settings=status,
        ),
        WriterSandbox.create(
            trial, "backlog", gateway_address=dial, lines=2020, delay=0.0, exit_code=0,
            netns=net.sandbox_ns, pauses=[(20, fault_gate)], settings=BACKLOG_JOURNAL,
            # Its bounded journal may overflow, with the lines written after the fault gate only;
            # `ends` and `keeps` have the default journal, where any gap is a defect.
            gap_reasons=frozenset({"overflow"}), max_dropped=None, droppable=(20, 2020),
        ),
    ]  # fmt: skip
    url = sqlite_url(gateway)
    link = Link(net, delay_proxy, url, sandboxes)
    try:
        await start_gateway(trial, gateway)
        if delay_proxy is not None:
            await asyncio.to_thread(delay_proxy.start)
            trial.mark(f"delay proxy at {delay_proxy.address}")
        for sandbox in sandboxes:
            sandbox.start()
        await wait_lines(trial, url, sandboxes, at_least=20, within_s=90)
        await wait_lines(trial, url, sandboxes[:2], at_least=40, within_s=30, series=None)

        async def all_waiting() -> bool:
            return gate_reached(fault_gate)

        await wait_for(all_waiting, within_s=30, what="the writers at the fault gate")
        await fault(trial, link, fault_s)
        heal_ms, heal_at = unix_ms(), trial.now()
        running = [s.sandbox_id for s in sandboxes if s.running]
        await asyncio.to_thread(net.heal, check=False)
        if delay_proxy is not None:
            delay_proxy.set_delay(0)
        open_gate(heal_gate)
        trial.mark("healed")
        if gone := [s.sandbox_id for s in sandboxes if s.sandbox_id not in running]:
            trial.mark(f"supervisors that ended before the heal: {gone}")
        await wait_exits(trial, sandboxes, within_s=EXIT_WAIT_S, database_url=url)
        result = await check_all(
            trial,
            url,
            sandboxes,
            # Under `either` (loss) no session has to end, but one that did resume is bounded too.
            heal_unix_ms=heal_ms if sessions != "survives" else None,
            resume_bound_s=RESUME_BOUND_S,
            # One that delivered its exit and ended before the last heal (a flapping link's up
            # phases) has nothing left to resume.
            must_resume=running if sessions == "breaks" else [],
        )
        await _ended_during_fault(trial, url, sandboxes[0], heal_ms)
        began = next((at for at, what in trial.marks if what.startswith("fault:")), None)
        if began is not None:
            trial.figure("fault_s", round(heal_at - began, 1))
        if sessions == "survives" and result.reconnects:
            trial.violate(
                f"{result.reconnects} reconnections under a fault that must not end a session "
                f"(heartbeat {heartbeat_s}s, grace {grace_s}s)"
            )
    except Exception:
        # The report should say what was lost, not only which wait timed out.
        await check_after_error(trial, url, sandboxes)
        raise
    finally:
        # Whatever happened: no fault left, no process, no namespace.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(net.heal, check=False)
        for gate in (fault_gate, heal_gate):
            open_gate(gate)
        await stop_all(*(s.process for s in sandboxes))
        if delay_proxy is not None:
            await asyncio.to_thread(delay_proxy.stop)
        await stop_all(gateway)
        await asyncio.to_thread(net.destroy)


async def _ended_during_fault(trial: Trial, url: str, ends: WriterSandbox, heal_ms: int) -> None:
    """`ends`' main process must have exited during the fault (journaled before the heal): else its
    exit was never held by the journal through an outage, which is what the sandbox is for."""
    events = (await stored_events(url, [ends.sandbox_id]))[ends.sandbox_id]
    exits = [e for e in events if e.kind == "lifecycle" and (e.data or {}).get("kind") == "exited"]
    if exits and exits[0].timestamp_ms >= heal_ms:
        trial.violate(
            f"{ends.sandbox_id}: its main process exited {(exits[0].timestamp_ms - heal_ms) / 1000:.1f}s "
            "after the heal, not during the fault"
        )


def _fault_s(trial: Trial) -> float:
    return 8.0 if trial.quick else 45.0


async def _start_fault(trial: Trial, what: str) -> None:
    """Mark the fault in place and let the writers waiting for it go on."""
    trial.mark(what)
    open_gate(trial.workdir / "fault.gate")


# -- blackhole and reset -----------------------------------------------------------------------------


async def _blackhole(trial: Trial, link: Link, seconds: float) -> None:
    await asyncio.to_thread(link.net.cut, "both")
    await _start_fault(trial, "fault: blackhole (every packet dropped both ways)")
    await link.hold(trial, seconds)


@scenario(
    "blackhole",
    summary="every packet between sandbox and gateway dropped (a dead link, no reset) for 8 s quick / "
    f"45 s full: the supervisors notice by silence, journal meanwhile, and resume within "
    f"{RESUME_BOUND_S:.0f}s of the heal; nothing lost or doubled, the exit during the cut delivered",
    needs=("netns",),
    ci=True,
)
async def blackhole(trial: Trial) -> None:
    await _network_trial(trial, _blackhole, fault_s=_fault_s(trial), sessions="breaks")


async def _reset(trial: Trial, link: Link, seconds: float) -> None:
    await asyncio.to_thread(link.net.reset, "both")
    await _start_fault(trial, "fault: reset (every TCP packet answered with a RST both ways)")
    await link.hold(trial, seconds)


@scenario(
    "reset",
    summary="every TCP packet between sandbox and gateway answered with a reset (both ends see the "
    "connection die at once, reconnections refused) for 8 s quick / 45 s full: resumed within "
    f"{RESUME_BOUND_S:.0f}s of the heal, nothing lost or doubled",
    needs=("netns",),
    ci=True,
)
async def reset(trial: Trial) -> None:
    await _network_trial(trial, _reset, fault_s=_fault_s(trial), sessions="breaks")


# -- one-way cuts --------------------------------------------------------------------------------------


def _one_way(direction: CutDirection) -> Fault:
    async def fault(trial: Trial, link: Link, seconds: float) -> None:
        await asyncio.to_thread(link.net.cut, direction)
        await _start_fault(trial, f"fault: one-way cut, {direction} dropped")
        await link.hold(trial, seconds)

    return fault


@scenario(
    "asymmetric-to-gateway",
    summary="only the sandbox's packets to the gateway dropped (the gateway's still arrive): the "
    "gateway ends the silent session, the supervisor notices and resumes after the heal, nothing "
    "lost or doubled",
    needs=("netns",),
)
async def asymmetric_to_gateway(trial: Trial) -> None:
    await _network_trial(trial, _one_way("to_gateway"), fault_s=_fault_s(trial), sessions="breaks")


@scenario(
    "asymmetric-from-gateway",
    summary="only the gateway's packets to the sandbox dropped (the sandbox's still arrive): the "
    "supervisor notices the silence and resumes after the heal, nothing lost or doubled",
    needs=("netns",),
)
async def asymmetric_from_gateway(trial: Trial) -> None:
    await _network_trial(trial, _one_way("from_gateway"), fault_s=_fault_s(trial), sessions="breaks")


# -- delay -------------------------------------------------------------------------------------------

#: The proxy's delay each way: 200 ms plus up to 300 ms of jitter (a round trip of 0.4-1.0 s). The
#: gateway's heartbeat is 1 s with a 2 s grace here: its stale bound (3 s) and the supervisor's (3
#: intervals, 3 s) are above the round trip plus the jitter a chunk can add to a gap (0.3 s).
DELAY_MS, JITTER_MS = 200.0, 300.0


async def _sample_rtt(trial: Trial, link: Link, seconds: float) -> list[float]:
    """Hold ``seconds`` while sampling the heartbeat round trip every 2 s; the samples."""
    samples: list[float] = []
    deadline = trial.now() + seconds
    while (left := deadline - trial.now()) > 0:
        if (rtt := await link.rtt_ms()) is not None:
            samples.append(rtt)
            trial.sample("heartbeat RTT (ms)", rtt)
        await link.hold(trial, min(2.0, left))
    return samples


async def _delay(trial: Trial, link: Link, seconds: float) -> None:
    assert link.proxy is not None
    before = await _sample_rtt(trial, link, 3.0)
    link.proxy.set_delay(DELAY_MS, jitter_ms=JITTER_MS)
    await _start_fault(
        trial, f"fault: delay {DELAY_MS:.0f}+{JITTER_MS:.0f} ms each way (round trip up to 1 s)"
    )
    during = await _sample_rtt(trial, link, seconds)
    # A heartbeat answered within the first 1-2 s may still be an undelayed one; the later ones
    # must all carry twice the delay, or the proxy did not delay and the scenario proved nothing.
    if not during or max(during) < 2 * DELAY_MS:
        trial.violate(f"heartbeat round trips {during} ms under a delay of {DELAY_MS:.0f} ms each way")
    if during:
        trial.figure("rtt_delayed_max_ms", round(max(during)))
    if before:
        trial.figure("rtt_before_max_ms", round(max(before)))


@scenario(
    "delay",
    summary=f"{DELAY_MS:.0f}-{DELAY_MS + JITTER_MS:.0f} ms each way through a delaying proxy, then none: "
    "no session declared dead while the round trip stays below the stale bound (no reconnection at "
    "all), every line arrives, nothing doubled",
    needs=("netns",),
)
async def delay(trial: Trial) -> None:
    await _network_trial(
        trial, _delay, fault_s=_fault_s(trial), sessions="survives", proxy=True, heartbeat_s=1.0, grace_s=2.0
    )


# -- loss --------------------------------------------------------------------------------------------

LOSS_PERCENT = 20


async def _loss(trial: Trial, link: Link, seconds: float) -> None:
    await asyncio.to_thread(link.net.loss, LOSS_PERCENT, "both")
    await _start_fault(trial, f"fault: {LOSS_PERCENT} % of packets dropped at random, both ways")
    await link.hold(trial, seconds)
    # The rules' counters, read before the heal removes them: a rule that dropped nothing (broken,
    # or matching no packet) would let the scenario pass having tested nothing.
    dropped = await asyncio.to_thread(link.net.dropped_packets)
    trial.figure("loss_dropped_packets", dropped if dropped is not None else 0)
    if not dropped:
        trial.violate(
            f"the loss rules dropped no packet in {seconds:.0f}s ({dropped}): no fault was in place"
        )


@scenario(
    "loss",
    summary=f"{LOSS_PERCENT} % of packets dropped at random both ways for 8 s quick / 45 s full: TCP "
    "retransmits; a session may or may not end (a retransmission timeout can outlast the stale bound), "
    "but nothing is lost or doubled and every exit arrives",
    needs=("netns",),
)
async def loss(trial: Trial) -> None:
    # Whether a session ends under loss is chance, so no RECONNECTED record is required after the
    # heal; the invariants and every supervisor's delivered exit are.
    await _network_trial(trial, _loss, fault_s=_fault_s(trial), sessions="either")


# -- a flapping link ---------------------------------------------------------------------------------


#: The flapping link's last cut: longer than either side's stale bound (1.5 s), so every session
#: still up notices it and the resumption after the final heal is measured.
LAST_CUT_S = 5.0


async def _flapping(trial: Trial, link: Link, seconds: float) -> None:
    """Cut (blackhole) and heal every 1-4 s (drawn from the trial's seed) for ``seconds``, ending
    with a cut of :data:`LAST_CUT_S`: the frame's heal is the last one, the resume bound counts
    from it."""
    rng = random.Random(trial.options.seed)
    deadline = trial.now() + seconds
    flips = 0
    while True:
        await asyncio.to_thread(link.net.cut, "both")
        flips += 1
        if flips == 1:
            # The writers go on once the first cut is in place, as under every other fault.
            await _start_fault(trial, "fault: flapping link (blackhole on and off every 1-4 s)")
        trial.sample("link up", 0)
        if trial.now() + 4.0 >= deadline:
            await link.hold(trial, LAST_CUT_S)
            break
        await link.hold(trial, rng.uniform(1.0, 4.0))
        await asyncio.to_thread(link.net.heal)
        trial.sample("link up", 1)
        await link.hold(trial, rng.uniform(1.0, 4.0))
    trial.figure("cuts", flips)
    trial.mark(f"{flips} cuts")
    trial.sample("link up", 1)


@scenario(
    "flapping",
    summary="the link cut and healed every 1-4 s for 8 s quick / 45 s full (many short cuts, some "
    "shorter than the stale bound, some catching a reconnect midway): after the last heal every "
    f"session resumes within {RESUME_BOUND_S:.0f}s, nothing lost or doubled",
    needs=("netns",),
)
async def flapping(trial: Trial) -> None:
    await _network_trial(trial, _flapping, fault_s=_fault_s(trial), sessions="breaks")
