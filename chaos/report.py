"""The chaos run's markdown report and plots, from the run's JSON document (chaos/run.py writes both).

The table has a row per scenario: its repeats, how many passed, were skipped (with the reason) or
failed (with the first violations or the error), and each figure the trials recorded as
min / median / max across the passed repeats that recorded it (a failed trial's figures would widen
a range it does not stand for: they are shown only where no repeat passed, marked so). The plots
(one PNG per scenario, a panel per series, every repeat a line, the fault and the heal as vertical
lines) need matplotlib, the optional ``chaos`` extra; without it the report says so instead.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from chaos.plotting import pyplot

#: Marks drawn as vertical lines on the plots: the fault's start and its heal.
_FAULT_WORDS = ("fault", "cut", "heal", "reset", "loss", "delay", "kill", "restart")


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


def _figures(trials: list[dict[str, Any]]) -> str:
    names: list[str] = []
    for t in trials:
        names += [n for n in t["figures"] if n not in names]
    parts = []
    for name in names:
        values = sorted(float(t["figures"][name]) for t in trials if name in t["figures"])
        if len(values) == 1:
            parts.append(f"{name} {_fmt(values[0])}")
        else:
            parts.append(f"{name} {_fmt(values[0])} / {_fmt(statistics.median(values))} / {_fmt(values[-1])}")
    return "; ".join(parts) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict[str, Any], out: Path) -> str:
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for trial in doc["trials"]:
        by_scenario.setdefault(trial["scenario"], []).append(trial)
    m = doc["machine"]
    lines = [
        "# Chaos run",
        "",
        f"Command: `{doc['command']}` (seed {doc['seed']}), {doc['duration_s']} s.",
        f"Machine: {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, git {m['git_head']}.",
        *(["", "**Interrupted**: only the trials that ended are listed."] if doc.get("interrupted") else []),
        "",
        "| scenario | repeats | passed | skipped | failed | figures of the passed (min / median / max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, trials in by_scenario.items():
        passed = sum(1 for t in trials if t["passed"])
        skipped = [t for t in trials if t["skipped"] is not None]
        failed = [t for t in trials if not t["passed"] and t["skipped"] is None]
        skip_cell = f"{len(skipped)}: {skipped[0]['skipped']}" if skipped else "0"
        fail_cell = "0"
        if failed:
            first = failed[0]
            why = first["error"] or "; ".join(first["violations"][:3])
            fail_cell = f"{len(failed)}: #{first['repeat']}: {why}"
        good = [t for t in trials if t["passed"]]
        figures = _figures(good)
        if not good and (theirs := _figures(failed)) != "-":
            figures = f"failed trials only: {theirs}"
        lines.append(
            f"| {name} | {len(trials)} | {passed} | {_cell(skip_cell)} | {_cell(fail_cell)} "
            f"| {_cell(figures)} |"
        )
    lines += ["", plots(doc, out)]
    return "\n".join(lines) + "\n"


def plots(doc: dict[str, Any], out: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "No plots: matplotlib is not installed (pip install -e '.[chaos]')."
    written = []
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for trial in doc["trials"]:
        if trial["series"]:
            by_scenario.setdefault(trial["scenario"], []).append(trial)
    for name, trials in by_scenario.items():
        series = sorted({s for t in trials for s in t["series"]})
        fig, axes = plt.subplots(
            len(series), 1, figsize=(9, 2.6 * len(series) + 0.6), sharex=True, squeeze=False
        )
        for ax, what in zip(axes[:, 0], series, strict=True):
            for t in trials:
                points = t["series"].get(what, [])
                if points:
                    # Steps: a sample holds until the next (a link up or down, a count).
                    xs, ys = [p[0] for p in points], [p[1] for p in points]
                    ax.plot(xs, ys, drawstyle="steps-post", label=f"#{t['repeat']}")
            for at, mark in trials[0]["marks"]:
                if any(word in mark.lower() for word in _FAULT_WORDS) and "VIOLATION" not in mark:
                    ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
            ax.set_ylabel(what)
            if len(trials) > 1:
                ax.legend(fontsize="small")
        axes[-1, 0].set_xlabel("s since the trial began (dotted: fault and heal marks of #1)")
        axes[0, 0].set_title(name)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
        written.append(f"{name}.png")
    if not written:
        return "No plots: no trial recorded a series."
    return "Plots: " + ", ".join(f"![{w}]({w})" for w in written) + "."
