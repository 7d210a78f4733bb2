"""The chaos runner's verdicts (chaos/run.py) with scenarios of its own: a violation or an exception fails
the trial and the run (the exception as one line, its traceback in the trial's error.log, the run going
on), Unavailable is a skip that does not fail the run, a trial past its timeout is cancelled (its
cleanup runs) and failed, and the JSON and markdown say all of it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from chaos import run
from chaos.suite import SCENARIOS, Scenario, Trial, Unavailable

cleaned: list[str] = []


async def _passes(trial: Trial) -> None:
    trial.mark("fault: nothing")
    trial.sample("lines stored", 1)
    trial.sample("lines stored", 2)
    trial.figure("resume_max_s", 1.5 + trial.repeat)


async def _violates(trial: Trial) -> None:
    trial.violate("sb: 3 events lost (no gap record covers them), first [4, 5, 6]")


async def _signalled_twice(trial: Trial) -> None:
    # SIGTERM once (the run stops), then again and a Ctrl-C while the cleanup runs: both ignored.
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.3)
        cleaned.append(trial.scenario)


async def _flaky(trial: Trial) -> None:
    # The first repeat fails with a figure far off the passed one's.
    trial.figure("resume_max_s", 90.0 if trial.repeat == 1 else 1.0)
    if trial.repeat == 1:
        trial.violate("sb: no RECONNECTED record after the heal")


async def _raises(trial: Trial) -> None:
    raise RuntimeError("the gateway exited with 1:\nlong log text")


async def _unavailable(trial: Trial) -> None:
    raise Unavailable("needs root to create network namespaces")


async def _hangs(trial: Trial) -> None:
    try:
        await asyncio.sleep(60)
    finally:
        cleaned.append(trial.scenario)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    run._load()  # the real ones first, so _load() inside run() adds nothing after the fakes
    for name, fn in [
        ("t-passes", _passes),
        ("t-violates", _violates),
        ("t-raises", _raises),
        ("t-unavailable", _unavailable),
        ("t-hangs", _hangs),
        ("t-flaky", _flaky),
        ("t-signalled-twice", _signalled_twice),
    ]:
        monkeypatch.setitem(SCENARIOS, name, Scenario(name=name, summary=name, fn=fn))


def _args(out: Path, *names: str, repeat: int = 1, trial_timeout: float = 30.0) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args(
        [
            *names,
            "--out",
            str(out),
            "--repeat",
            str(repeat),
            "--seed",
            "7",
            "--trial-timeout",
            str(trial_timeout),
        ]
    )


@pytest.mark.usefixtures("fake")
def test_failures_and_skips_are_recorded_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run.run(_args(tmp_path, "t-raises", "t-violates", "t-unavailable", "t-passes", repeat=2))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "[t-raises #1] FAIL" in err and "RuntimeError: the gateway exited with 1:" in err
    assert "long log text" not in err, "one line of the error on the terminal"
    assert "[t-passes #2] PASS" in err and "[t-unavailable #1] SKIP" in err
    doc = json.loads((tmp_path / "chaos.json").read_text())
    by = {(t["scenario"], t["repeat"]): t for t in doc["trials"]}
    assert len(by) == 8, "every repeat of every scenario ran after the first failure"
    raised = by[("t-raises", 1)]
    assert not raised["passed"] and raised["error"] == "RuntimeError: the gateway exited with 1:"
    assert "long log text" in (tmp_path / "t-raises" / "1" / "error.log").read_text()
    assert by[("t-violates", 2)]["violations"] and not by[("t-violates", 2)]["passed"]
    skipped = by[("t-unavailable", 1)]
    assert skipped["skipped"] == "needs root to create network namespaces" and not skipped["passed"]
    assert by[("t-passes", 2)]["passed"] and by[("t-passes", 2)]["figures"] == {"resume_max_s": 3.5}
    assert doc["seed"] == 7 and doc["machine"]["cores"]
    md = (tmp_path / "chaos.md").read_text()
    assert "| t-passes | 2 | 2 | 0 | 0 | resume_max_s 2.5 / 3 / 3.5 |" in md
    assert "| t-unavailable | 2 | 0 | 2: needs root to create network namespaces | 0 |" in md
    assert "| t-violates | 2 | 0 | 0 | 2: #1: sb: 3 events lost" in md


@pytest.mark.usefixtures("fake")
def test_the_figures_are_the_passed_trials_or_marked_as_the_failed_ones(tmp_path: Path) -> None:
    assert run.run(_args(tmp_path, "t-flaky", "t-violates", repeat=2)) == 1
    md = (tmp_path / "chaos.md").read_text()
    assert (
        "| t-flaky | 2 | 1 | 0 | 1: #1: sb: no RECONNECTED record after the heal | resume_max_s 1 |" in md
    ), md
    assert "| t-violates | 2 | 0 | 0 | 2: #1: sb: 3 events lost" in md and md.count("failed trials only") == 0
    doc = json.loads((tmp_path / "chaos.json").read_text())
    # The machine line says whether the tree had uncommitted changes (git describe --dirty).
    assert doc["machine"]["git_head"] != "" and "rev-parse" not in doc["machine"]["git_head"]


@pytest.mark.usefixtures("fake")
def test_only_failed_trials_figures_are_marked(tmp_path: Path) -> None:
    assert run.run(_args(tmp_path, "t-flaky", repeat=1)) == 1
    assert "| failed trials only: resume_max_s 90 |" in (tmp_path / "chaos.md").read_text()


@pytest.mark.usefixtures("fake")
def test_skipped_scenarios_do_not_fail_the_run(tmp_path: Path) -> None:
    assert run.run(_args(tmp_path, "t-passes", "t-unavailable")) == 0


@pytest.mark.usefixtures("fake")
def test_a_trial_past_its_timeout_is_cancelled_cleaned_up_and_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cleaned.clear()
    assert run.run(_args(tmp_path, "t-hangs", "t-passes", trial_timeout=0.5)) == 1
    assert cleaned == ["t-hangs"]
    doc = json.loads((tmp_path / "chaos.json").read_text())
    by = {t["scenario"]: t for t in doc["trials"]}
    assert by["t-hangs"]["error"] == "cancelled after the trial timeout of 0.5s"
    assert by["t-passes"]["passed"]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.usefixtures("fake")
def test_signals_during_a_cancelled_trials_cleanup_are_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cleaned.clear()
    assert run.run(_args(tmp_path, "t-signalled-twice", "t-passes")) == 130
    assert cleaned == ["t-signalled-twice"], "the cleanup ran to its end"
    err = capsys.readouterr().err
    assert err.count("already stopping") == 2 and "interrupted" in err, err
    # Only the trials that ended are reported (t-passes runs first: the registry's order).
    trials = json.loads((tmp_path / "chaos.json").read_text())["trials"]
    assert [t["scenario"] for t in trials] == ["t-passes"]


@pytest.mark.usefixtures("fake")
def test_bad_command_lines_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.run(_args(tmp_path / "a", "t-passes", "nope")) == 2
    assert run.run(_args(tmp_path / "b")) == 2
    assert run.run(_args(tmp_path / "c", "t-passes", repeat=0)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("python -m chaos run: ") for line in err), err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_ci_and_all_select_the_registered_scenarios() -> None:
    run._load()
    ci = [s.name for s in run.select(["ci"])]
    assert {"blackhole", "reset"} <= set(ci)
    assert all(SCENARIOS[n].ci for n in ci)
    assert [s.name for s in run.select(["all", "blackhole"])] == list(SCENARIOS)
