"""``python -m chaos run NAME [NAME ...] | all | ci``: the chaos suite's runner.

Each named scenario runs ``--repeat`` times, one trial after the other (the machine is small and the
faults are on shared namespaces' links: never two at once), each in a fresh workdir
``OUT/<scenario>/<repeat>`` and with its own seed (``--seed`` + the repeat). Progress goes to stderr
as it happens: every mark of the trial, then one line with PASS, FAIL or SKIP and the duration.

A trial is **failed** when the scenario recorded a violation or raised: the exception's one-line
summary is the trial's error (the traceback goes to the trial's ``error.log``, never the terminal),
and the run goes on with the next. A scenario that raised :class:`~chaos.suite.Unavailable` is
**skipped** with its reason: listed, never counted as passed, and it does not fail the run. A trial
that outlives ``--trial-timeout`` is cancelled (its ``finally`` cleans up) and failed.

At the end the runner writes ``OUT/chaos.json`` (every trial's record, the command, the machine),
``OUT/chaos.md`` (chaos/report.py) and the plots, and exits 0 only if nothing failed. An unknown name
is a one-line error and exit status 2 before anything runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaos import report
from chaos.net import sweep_leftovers
from chaos.suite import SCENARIOS, Options, Scenario, Trial, Unavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="scenarios to run: their names, 'all' (every one) or 'ci' (CI's short subset)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario (default 1)")
    parser.add_argument("--quick", action="store_true", help="CI's short form: short faults, few lines")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default: a new one in /tmp)"
    )
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: drawn, and reported)")
    parser.add_argument(
        "--trial-timeout",
        type=float,
        default=900.0,
        help="seconds before a trial is cancelled and failed (default 900)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")


class UsageError(ValueError):
    """A bad command line: one line for the terminal, exit status 2."""


def _load() -> None:
    # The scenario modules register at import; imported here, not at the top, so `python -m chaos
    # bench` does not pay for them.
    import chaos.scenarios  # noqa: F401, PLC0415


def select(names: Sequence[str]) -> list[Scenario]:
    """The scenarios ``names`` stand for, in registration order, each once."""
    if not names:
        raise UsageError("name at least one scenario, 'all' or 'ci' (see --list)")
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(SCENARIOS)
        elif name == "ci":
            chosen.update(n for n, s in SCENARIOS.items() if s.ci)
        elif name in SCENARIOS:
            chosen.add(name)
        else:
            raise UsageError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)}, all, ci)")
    return [s for n, s in SCENARIOS.items() if n in chosen]


def listing() -> str:
    width = max((len(n) for n in SCENARIOS), default=4)
    lines = []
    for name, s in SCENARIOS.items():
        needs = ",".join(s.needs) or "-"
        lines.append(f"{name:<{width}}  {'ci' if s.ci else '  '}  needs {needs:<16} {s.summary}")
    return "\n".join(lines)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _git(*argv: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *argv],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_head() -> str:
    """The commit the run's code came from, ``-dirty`` with the number of changed files when the tree
    had uncommitted changes (then the figures are not the commit's alone)."""
    head = (_git("describe", "--always", "--dirty") or "").strip()
    if not head:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = len(status.splitlines()) if status is not None else 0
    return f"{head} ({changed} files changed)" if changed else head


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_head": _git_head(),
    }


async def _run_trial(scenario: Scenario, trial: Trial, *, timeout_s: float) -> None:
    # SIGTERM ends the run as Ctrl-C does: the trial is cancelled (its finally stops what it started
    # and removes its namespaces), then the trials that ended are reported. asyncio.run does this for
    # SIGINT only.
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        if terminated:
            # A second Ctrl-C or SIGTERM while the cancelled trial's finally runs would cut its
            # cleanup short and leave processes, namespaces and mounts behind: ignored.
            _say("chaos: already stopping: the trial under way is being cleaned up")
            return
        terminated = True
        task.cancel()

    loop = asyncio.get_running_loop()
    # SIGINT too (instead of asyncio.run's own handler, whose second Ctrl-C raises at once).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate)
    try:
        async with asyncio.timeout(timeout_s):
            await scenario.fn(trial)
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise


def run_trial(scenario: Scenario, *, repeat: int, options: Options, timeout_s: float) -> Trial:
    """One trial, its outcome recorded on it whatever the scenario did."""
    workdir = options.workdir / scenario.name / str(repeat)
    workdir.mkdir(parents=True, exist_ok=True)
    trial = Trial(scenario=scenario.name, repeat=repeat, options=options, workdir=workdir, progress=_say)
    random.seed(options.seed)
    try:
        asyncio.run(_run_trial(scenario, trial, timeout_s=timeout_s))
    except Unavailable as exc:
        trial.skipped = str(exc) or "unavailable here"
    except TimeoutError as exc:
        trial.error = (
            f"TimeoutError: {exc}" if str(exc) else f"cancelled after the trial timeout of {timeout_s:g}s"
        )
        (workdir / "error.log").write_text(traceback.format_exc())
    except Exception as exc:  # the scenario's own failure: recorded, and the run goes on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        trial.error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        (workdir / "error.log").write_text(traceback.format_exc())
    trial.duration_s = trial.now()
    return trial


def _terminated(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def verdict(trial: Trial) -> str:
    if trial.skipped is not None:
        return "SKIP"
    return "PASS" if trial.passed else "FAIL"


def run(args: argparse.Namespace) -> int:
    _load()
    if args.list:
        print(listing())
        return 0
    try:
        chosen = select(args.names)
        if args.repeat < 1:
            raise UsageError(f"--repeat must be at least 1, not {args.repeat}")
    except UsageError as exc:
        print(f"python -m chaos run: {exc}", file=sys.stderr)
        return 2
    # What an earlier run stopped hard (SIGKILL) left behind: namespaces and mounts nobody removes.
    for line in sweep_leftovers():
        _say(f"chaos: warning: {line}")
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    command = ["python", "-m", "chaos", "run", *sys.argv[2:]] if sys.argv[1:2] == ["run"] else sys.argv
    _say(
        f"chaos: {len(chosen)} scenarios x {args.repeat}{' (quick)' if args.quick else ''}, "
        f"seed {seed}, results in {out}"
    )
    trials: list[Trial] = []
    began = time.monotonic()
    interrupted = False
    # Between trials too (the loop's handler is gone once its trial ended).
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for scenario in chosen:
            for repeat in range(1, args.repeat + 1):
                options = Options(workdir=out, quick=args.quick, seed=seed + repeat)
                _say(f"[{scenario.name} #{repeat}] start")
                trial = run_trial(scenario, repeat=repeat, options=options, timeout_s=args.trial_timeout)
                signal.signal(signal.SIGTERM, _terminated)
                trials.append(trial)
                why = trial.skipped or trial.error or "; ".join(trial.violations[:3])
                _say(
                    f"[{scenario.name} #{repeat}] {verdict(trial)} in {trial.duration_s:.1f}s"
                    + (f": {why}" if why else "")
                )
    except KeyboardInterrupt:
        # asyncio.run cancelled the trial (its finally cleaned up); what ran so far is still reported.
        interrupted = True
        _say("chaos: interrupted (the trial under way was cleaned up); reporting the trials that ended")
    finally:
        signal.signal(signal.SIGTERM, previous)
    doc = {
        "command": " ".join(command),
        "seed": seed,
        "quick": args.quick,
        "repeat": args.repeat,
        "machine": machine(),
        "duration_s": round(time.monotonic() - began, 1),
        "interrupted": interrupted,
        "trials": [t.to_json() for t in trials],
    }
    (out / "chaos.json").write_text(json.dumps(doc, indent=2))
    (out / "chaos.md").write_text(report.markdown(doc, out))
    failed = [t for t in trials if verdict(t) == "FAIL"]
    skipped = [t for t in trials if verdict(t) == "SKIP"]
    _say(
        f"chaos: {len(trials) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped; report {out / 'chaos.md'}"
    )
    if interrupted:
        return 130
    return 1 if failed else 0
