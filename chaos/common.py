"""What the chaos scenarios share: real gateways and writer sandboxes started off the event loop, waits
that poll the store, and the closing check every scenario with real supervisors runs.

A :class:`WriterSandbox` is a real supervisor (``python -m supervisor run``) whose main process prints
``line 0`` .. ``line n-1`` and exits with a chosen code (tests/support/procs.py ``writer_command``),
together with the :class:`~chaos.invariants.Expect` its stored events must satisfy once it ended. A
scenario starts a few of them (one that ends during the fault, so its exit must still arrive after the
heal, one that keeps writing through it), injects its fault, heals, waits with :func:`wait_exits`, and
ends with :func:`check_all`: every invariant on every sandbox plus the resume bound.

Starting and stopping processes blocks (``Popen.wait``, polling a log file), so those calls run in a
thread (:func:`asyncio.to_thread`): the scenario's own loop keeps sampling and marking meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chaos.invariants import Expect, check_sandbox, resumed_after, stored_events, tail_problems
from chaos.net import netns_unavailable
from chaos.suite import Trial, Unavailable
from supervisor.journal.state import StateFileError, load_state
from tests.support.procs import GatewayProcess, SupervisorProcess, writer_command


def unix_ms() -> int:
    """Wall clock in ms since the epoch: what stored events' timestamps are compared with."""
    return int(time.time() * 1000)


def require_netns() -> None:
    """Raise :class:`Unavailable` when this machine cannot create network namespaces (no root, no nft)."""
    reason = netns_unavailable()
    if reason is not None:
        raise Unavailable(reason)


def sqlite_url(gateway: GatewayProcess) -> str:
    """The database URL of a gateway on its workdir's SQLite file (what the invariants read)."""
    return gateway.database_url or f"sqlite+aiosqlite:///{gateway.db_path}"


async def start_gateway(trial: Trial, gateway: GatewayProcess, *, what: str = "gateway") -> GatewayProcess:
    """Start ``gateway`` (waits for its "gateway ready") off the loop, and mark it."""
    await asyncio.to_thread(gateway.start)
    trial.mark(f"{what} ready at {gateway.address}")
    return gateway


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (none once it is gone), from /proc."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def _stop_supervisor(process: SupervisorProcess) -> None:
    """Kill the supervisor and its main process's group. The main process runs in a session of its
    own (supervisor/process.py), so the supervisor's -9 leaves it behind; a gated writer waiting on
    a gate nobody opens never writes, never meets a closed pipe, and would sleep on for ever."""
    proc = process.proc
    children = children_of(proc.pid) if proc is not None and proc.poll() is None else []
    process.stop()
    for child in children:
        with contextlib.suppress(OSError):  # gone already, or not a group leader: its pid is enough
            os.killpg(child, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


async def stop_all(*processes: GatewayProcess | SupervisorProcess | None) -> None:
    """Stop whatever was started (supervisors killed with their main processes' groups, gateways
    terminated), ignoring what never ran; for a scenario's ``finally``."""
    for proc in processes:
        if isinstance(proc, SupervisorProcess):
            await asyncio.to_thread(_stop_supervisor, proc)
        elif proc is not None:
            await asyncio.to_thread(proc.stop)


#: A main process that prints ``{prefix} {i}`` for i in 0..n-1, ``delay`` seconds apart, and exits with
#: ``exit_code``; before line k of each ``k:path`` pause it creates ``path + ".reached"`` and waits until
#: ``path`` exists (the scenario opens the gate once its fault is in place, or healed).
GATED_WRITER = """
import os, sys, time
prefix, n, delay, code = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
pauses = dict((int(k), p) for k, _, p in (a.partition(":") for a in sys.argv[5:]))
for i in range(n):
    if i in pauses:
        open(pauses[i] + ".reached", "w").close()
        while not os.path.exists(pauses[i]):
            time.sleep(0.05)
    print(f"{prefix} {i}", flush=True)
    if delay:
        time.sleep(delay)
sys.exit(code)
"""


def gated_writer(
    n: int, *, delay: float, exit_code: int, prefix: str = "line", pauses: Sequence[tuple[int, Path]] = ()
) -> list[str]:
    """The :data:`GATED_WRITER` command line."""
    return [
        sys.executable, "-u", "-c", GATED_WRITER, prefix, str(n), str(delay), str(exit_code),
        *(f"{k}:{path}" for k, path in pauses),
    ]  # fmt: skip


def open_gate(gate: Path) -> None:
    """Let a gated writer waiting on ``gate`` go on."""
    gate.touch()


def open_gates(*gates: Path) -> None:
    """Open every gate, for a scenario's ``finally``: a writer still waiting on one goes on to its end
    (and to a closed pipe once its supervisor is stopped) instead of waiting for ever."""
    for gate in gates:
        with contextlib.suppress(OSError):
            gate.touch()


def gate_reached(gate: Path) -> bool:
    """A gated writer is waiting on ``gate`` (or went past it)."""
    return gate.with_name(gate.name + ".reached").exists()


@dataclass
class WriterSandbox:
    """A real supervisor whose main process writes ``lines`` numbered lines, ``delay`` s apart, then
    exits with ``exit_code``; :attr:`expect` is what its store must show once it ended."""

    process: SupervisorProcess
    lines: int
    exit_code: int = 0
    #: The gaps its journal may write (see :class:`~chaos.invariants.Expect`): none by default.
    gap_reasons: frozenset[str] = frozenset()
    max_dropped: int | None = 0
    droppable: tuple[int, int] | None = None

    @property
    def sandbox_id(self) -> str:
        return self.process.sandbox_id

    @property
    def expect(self) -> Expect:
        return Expect(
            self.sandbox_id,
            lines=self.lines,
            exit_code=self.exit_code,
            gap_reasons=self.gap_reasons,
            max_dropped=self.max_dropped,
            droppable=self.droppable,
        )

    def last_journaled(self) -> tuple[str, int] | None:
        """The supervisor's journal epoch and last sequence from the state file it left in its workdir,
        once it exited as expected (what the store must reach: :func:`~chaos.invariants.tail_problems`);
        None while it runs, after another exit (a kill may leave the state behind), or without one."""
        proc = self.process.proc
        if proc is None or proc.poll() is None or proc.returncode != self.exit_code:
            return None
        try:
            state = load_state(self.process.journal_dir)
        except StateFileError:
            return None
        return (state.epoch, state.last_sequence) if state is not None else None

    @classmethod
    def create(
        cls,
        trial: Trial,
        name: str,
        *,
        gateway_address: str,
        lines: int,
        delay: float,
        exit_code: int = 0,
        netns: str | None = None,
        settings: Sequence[str] = (),
        pauses: Sequence[tuple[int, Path]] = (),
        gap_reasons: frozenset[str] = frozenset(),
        max_dropped: int | None = 0,
        droppable: tuple[int, int] | None = None,
    ) -> WriterSandbox:
        """A sandbox ``{scenario}-{name}-{repeat}`` (ids differ across repeats sharing a database),
        its supervisor's files under the trial's workdir; not started yet. With ``pauses`` its
        writer is the gated one (:func:`gated_writer`)."""
        sandbox_id = f"{trial.scenario}-{name}-{trial.repeat}"
        command = (
            gated_writer(lines, delay=delay, exit_code=exit_code, pauses=pauses)
            if pauses
            else writer_command(lines, delay=delay, exit_code=exit_code)
        )
        process = SupervisorProcess(
            trial.workdir / name,
            sandbox_id,
            gateway_address,
            command,
            netns=netns,
            settings=settings,
        )
        return cls(
            process=process,
            lines=lines,
            exit_code=exit_code,
            gap_reasons=gap_reasons,
            max_dropped=max_dropped,
            droppable=droppable,
        )

    def start(self) -> None:
        self.process.start()

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc is not None else None


async def wait_for(
    predicate: Callable[[], Awaitable[object]], *, within_s: float, what: str, interval: float = 0.2
) -> object:
    """Poll the async ``predicate`` until it returns something true; its value. A TimeoutError naming
    ``what`` when ``within_s`` passes first (a scenario's failure, recorded by the runner)."""
    deadline = time.monotonic() + within_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def stored_line_counts(database_url: str, sandbox_ids: Sequence[str]) -> dict[str, int] | None:
    """How many output lines the gateway stored per sandbox (cheap: one COUNT per call); None when the
    store does not answer (its database down, no table before the first hello): never zeros, which
    a caller comparing counts would take for a measurement."""
    counts = dict.fromkeys(sandbox_ids, 0)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            for sandbox_id in sandbox_ids:
                row = await conn.execute(
                    text(
                        "SELECT COUNT(*) FROM events WHERE sandbox_id = :sid AND kind = 'log' "
                        "AND stream IN ('stdout', 'stderr')"
                    ),
                    {"sid": sandbox_id},
                )
                counts[sandbox_id] = int(row.scalar_one())
    except Exception:  # any failure of the store's answer means "no figure", whatever its class
        return None
    finally:
        await engine.dispose()
    return counts


def _sample_total(trial: Trial, series: str, counts: dict[str, int] | None) -> None:
    """Sample the stored lines' total; nothing while the store does not answer (a plot must not show
    zeros it never measured)."""
    if counts is not None:
        trial.sample(series, sum(counts.values()))


async def wait_lines(
    trial: Trial,
    database_url: str,
    sandboxes: Sequence[WriterSandbox],
    *,
    at_least: int,
    within_s: float,
    series: str | None = "lines stored",
) -> None:
    """Wait until every sandbox has ``at_least`` lines stored (the sessions settled), sampling the
    total as ``series`` (None: no sample, for a wait on some of the sandboxes only, whose total
    would dip the plot of all of them)."""
    ids = [s.sandbox_id for s in sandboxes]

    async def settled() -> bool:
        counts = await stored_line_counts(database_url, ids)
        if series is not None:
            _sample_total(trial, series, counts)
        if counts is None:
            return False
        return all(counts[i] >= min(at_least, s.lines) for i, s in zip(ids, sandboxes, strict=True))

    await wait_for(settled, within_s=within_s, what=f"{at_least} lines stored for each of {ids}")
    trial.mark(f"sessions settled ({at_least}+ lines stored each)")


async def hold(
    trial: Trial,
    seconds: float,
    *,
    database_url: str | None = None,
    sandboxes: Sequence[WriterSandbox] = (),
    every_s: float = 0.5,
) -> None:
    """Sleep ``seconds`` (a fault's duration), sampling the stored lines' total meanwhile when given a
    database: the plot shows the store flat during a cut and catching up after."""
    deadline = time.monotonic() + seconds
    ids = [s.sandbox_id for s in sandboxes]
    while (left := deadline - time.monotonic()) > 0:
        if database_url is not None and ids:
            _sample_total(trial, "lines stored", await stored_line_counts(database_url, ids))
        await asyncio.sleep(min(every_s, max(left, 0.0)))


async def wait_exits(
    trial: Trial,
    sandboxes: Sequence[WriterSandbox],
    *,
    within_s: float,
    database_url: str | None = None,
) -> dict[str, int | None]:
    """Wait for every supervisor to exit (it exits once its main process ended and its journal was
    delivered); each one's exit code, None for one still running at the deadline (a violation, not an
    exception: the checks still run). Exit codes other than the expected one are violations too."""
    deadline = time.monotonic() + within_s
    codes: dict[str, int | None] = {}
    ids = [s.sandbox_id for s in sandboxes]
    while True:
        for sandbox in sandboxes:
            proc = sandbox.process.proc
            if sandbox.sandbox_id not in codes and proc is not None and proc.poll() is not None:
                codes[sandbox.sandbox_id] = proc.returncode
                trial.mark(f"{sandbox.sandbox_id}: supervisor exited {proc.returncode}")
        if len(codes) == len(sandboxes) or time.monotonic() > deadline:
            break
        if database_url is not None:
            _sample_total(trial, "lines stored", await stored_line_counts(database_url, ids))
        await asyncio.sleep(0.3)
    for sandbox in sandboxes:
        code = codes.setdefault(sandbox.sandbox_id, None)
        if code is None:
            trial.violate(f"{sandbox.sandbox_id}: supervisor still running {within_s:.0f}s after the heal")
        elif code != sandbox.exit_code:
            trial.violate(f"{sandbox.sandbox_id}: supervisor exited {code}, expected {sandbox.exit_code}")
    return codes


@dataclass
class CheckResult:
    """What :func:`check_all` found, for figures a scenario adds of its own."""

    #: Seconds from the heal to the first RECONNECTED record, per sandbox (None: none stored).
    resumed_s: dict[str, float | None] = field(default_factory=dict)
    gaps: int = 0
    dropped: int = 0
    reconnects: int = 0


async def check_all(
    trial: Trial,
    database_url: str,
    expects: Sequence[Expect | WriterSandbox],
    *,
    heal_unix_ms: int | None,
    resume_bound_s: float,
    must_resume: Sequence[str] | None = None,
) -> CheckResult:
    """Every invariant on every sandbox's stored events (violations recorded on the trial) and the
    resume bound: each sandbox in ``must_resume`` (default: all) must have a RECONNECTED record within
    ``resume_bound_s`` of ``heal_unix_ms``, and any other that has one must have it within the bound.
    A writer sandbox whose supervisor exited as expected is also checked for a lost tail against its
    journal's state file. Records the figures
    ``resume_max_s``, ``gaps``, ``dropped_lines`` and ``reconnects``, and ``gaps.<name>`` and
    ``dropped_lines.<name>`` per sandbox that has gaps (which one dropped shows in the report).
    With ``heal_unix_ms`` None (no outage) only the invariants."""
    wanted = [e.expect if isinstance(e, WriterSandbox) else e for e in expects]
    events = await stored_events(database_url, [e.sandbox_id for e in wanted])
    result = CheckResult()
    for item, expect in zip(expects, wanted, strict=True):
        mine = events[expect.sandbox_id]
        trial.check(check_sandbox(mine, expect))
        if isinstance(item, WriterSandbox) and (journaled := item.last_journaled()) is not None:
            epoch, last = journaled
            trial.check(tail_problems(mine, expect.sandbox_id, epoch=epoch, last_sequence=last))
        gaps = [e for e in mine if e.kind == "gap"]
        dropped = sum(int((e.data or {}).get("dropped_records", 0)) for e in gaps)
        if gaps:
            name = _short_name(trial, expect.sandbox_id)
            trial.figure(f"gaps.{name}", len(gaps))
            trial.figure(f"dropped_lines.{name}", dropped)
        result.gaps += len(gaps)
        result.dropped += dropped
        result.reconnects += sum(
            1 for e in mine if e.kind == "lifecycle" and (e.data or {}).get("kind") == "reconnected"
        )
        if heal_unix_ms is not None:
            result.resumed_s[expect.sandbox_id] = resumed_after(mine, heal_unix_ms)
    trial.figure("gaps", result.gaps)
    trial.figure("dropped_lines", result.dropped)
    trial.figure("reconnects", result.reconnects)
    if heal_unix_ms is not None:
        required = set(must_resume if must_resume is not None else [e.sandbox_id for e in wanted])
        for sandbox_id, took in result.resumed_s.items():
            # One not required to resume (its session may have survived) is still bounded if it did.
            if took is None:
                if sandbox_id in required:
                    trial.violate(f"{sandbox_id}: no RECONNECTED record after the heal")
            elif took > resume_bound_s:
                trial.violate(
                    f"{sandbox_id}: resumed {took:.1f}s after the heal, bound {resume_bound_s:.0f}s"
                )
        times = [t for t in result.resumed_s.values() if t is not None]
        if times:
            trial.figure("resume_max_s", round(max(times), 3))
    trial.mark(f"checked {len(wanted)} sandboxes: {len(trial.violations)} violations")
    return result


def _short_name(trial: Trial, sandbox_id: str) -> str:
    """``ends`` for ``blackhole-ends-1``: the same figure name across repeats."""
    name = sandbox_id.removeprefix(f"{trial.scenario}-")
    return name.removesuffix(f"-{trial.repeat}")


async def check_after_error(trial: Trial, database_url: str, sandboxes: Sequence[WriterSandbox]) -> None:
    """Best effort, for a scenario that failed before its checks (a timeout waiting for lines, say):
    what the store shows so far, each violation marked "after an error" (the writers had not ended,
    so only what holds at any moment is checked), so the report says what was lost, not only that
    a wait timed out. Nothing is raised: the scenario's own error stays the trial's."""
    try:
        events = await stored_events(database_url, [s.sandbox_id for s in sandboxes])
    except Exception as exc:  # the store may be gone or never made: the error says enough then
        trial.mark(f"no check after the error: the store did not answer ({type(exc).__name__})")
        return
    for sandbox in sandboxes:
        expect = replace(sandbox.expect, complete=False)
        problems = check_sandbox(events[sandbox.sandbox_id], expect, settled=False)
        trial.check(f"after an error: {p}" for p in problems if not p.endswith(": nothing stored"))
    trial.mark(f"checked {len(sandboxes)} sandboxes after the error: {len(trial.violations)} violations")


def with_lines(expect: Expect, lines: int) -> Expect:
    """``expect`` with another line count (a writer stopped early by the scenario)."""
    return replace(expect, lines=lines)


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
