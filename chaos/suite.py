"""The chaos suite's frame (issue 22 point 6): what a scenario is, what one run of it records, and the
registry ``python -m chaos run NAME|all`` draws from.

A scenario is an async function taking a :class:`Trial`. It starts the real processes it needs (a
gateway, supervisors with a main process that writes numbered lines, PostgreSQL, haproxy, in network
namespaces it creates), injects its fault, heals it, checks the invariants (chaos/invariants.py) and
records what it saw on the trial: marks for the timeline, figures for the report, series for the
plots, violations for the verdict. It cleans up whatever it started, also when it fails. A scenario
that cannot run here (no root for namespaces, no PostgreSQL) raises :class:`Unavailable` with the
reason; the runner reports it as skipped, never as passed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Unavailable(RuntimeError):
    """The scenario cannot run on this machine; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Options:
    """How the suite runs: ``quick`` is CI's short form (shorter cuts and phases, fewer lines),
    the full run is what docs/chaos-report.md reports."""

    workdir: Path
    quick: bool = False
    seed: int = 0


@dataclass
class Trial:
    """One run (one repeat) of one scenario: what it saw, filled in by the scenario."""

    scenario: str
    repeat: int
    options: Options
    workdir: Path
    #: Called with every mark (the runner prints them as progress).
    progress: Callable[[str], None] = lambda _line: None
    violations: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    #: (seconds since the trial began, what happened): the fault, the heal, the checks.
    marks: list[tuple[float, str]] = field(default_factory=list)
    #: name -> [(seconds since the trial began, value)]: what the plots draw (e.g. sessions up).
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: Set by the runner: the trial ended in an exception (the scenario's own failure) or was skipped.
    error: str | None = None
    skipped: str | None = None
    began: float = field(default_factory=time.monotonic)
    #: Wall clock at the start, in ms since the epoch (the stored events' timestamps are wall clock).
    began_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    duration_s: float = 0.0

    @property
    def quick(self) -> bool:
        return self.options.quick

    def now(self) -> float:
        """Seconds since the trial began."""
        return time.monotonic() - self.began

    def mark(self, what: str) -> None:
        self.marks.append((round(self.now(), 3), what))
        self.progress(f"[{self.scenario} #{self.repeat}] {self.now():7.1f}s {what}")

    def figure(self, name: str, value: float) -> None:
        self.figures[name] = value

    def sample(self, series: str, value: float) -> None:
        self.series.setdefault(series, []).append((round(self.now(), 3), value))

    def violate(self, what: str) -> None:
        self.violations.append(what)
        self.mark(f"VIOLATION: {what}")

    def check(self, violations: Iterable[str]) -> None:
        """Record every violation an invariant check returned."""
        for what in violations:
            self.violate(what)

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.error is None and not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "repeat": self.repeat,
            "passed": self.passed,
            "skipped": self.skipped,
            "error": self.error,
            "duration_s": round(self.duration_s, 3),
            "violations": self.violations,
            "figures": self.figures,
            "marks": self.marks,
            "series": self.series,
        }


ScenarioFn = Callable[[Trial], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    #: One line: the fault and what must hold.
    summary: str
    fn: ScenarioFn
    #: What it needs beyond the gateway and the supervisor: "netns", "postgres", "patroni",
    #: "haproxy", "go" (for the runner's listing; the scenario itself raises Unavailable).
    needs: tuple[str, ...] = ()
    #: Part of CI's short subset (``python -m chaos run --quick ci``).
    ci: bool = False


#: Every scenario, by name, in the order they were registered (the order ``all`` runs them).
SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, *, summary: str, needs: tuple[str, ...] = (), ci: bool = False
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register the decorated async function as the scenario ``name``."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"chaos scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name=name, summary=summary, fn=fn, needs=needs, ci=ci)
        return fn

    return register
