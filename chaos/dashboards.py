"""Pictures of the chart's Grafana dashboards, drawn from Prometheus's answers to their queries.

What flows in: a dashboard's JSON (Grafana's model: ``panels`` with a ``gridPos`` on the 24-column
grid, a ``type`` of ``stat`` or ``timeseries``, ``targets`` with their ``legendFormat``, a unit in
``fieldConfig.defaults.unit``) and, for every panel, the answers Prometheus gave to each target's
query over a time range (``/api/v1/query_range``'s ``data.result``: series of ``metric`` labels and
``values`` pairs). What flows out: one PNG per dashboard, the panels laid out where Grafana lays
them, so docs/dashboards.md shows a reader what an operator sees, with real data
(tests/integration/test_dashboards.py collects the answers from a real Prometheus scraping real
gateways and supervisors, and calls :func:`render`).

This is not Grafana: no thresholds, overrides or transformations, only what the chart's dashboards
use. matplotlib is optional (the ``chaos`` extra, as for the chaos reports' plots).

    python -m chaos.dashboards ANSWERS.json --out docs/dashboards

reads what the test saved (``{"dashboards": [...], "answers": {uid: {panel id: [[series], ...]}}}``)
and draws it again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos.plotting import pyplot

#: Prometheus's answer for one target: its series, each ``{"metric": {...}, "values": [[t, "v"], ...]}``.
Series = Mapping[str, Any]
#: Per panel id, per target (in the panel's order), the series Prometheus answered.
PanelAnswers = Mapping[int, Sequence[Sequence[Series]]]

# Grafana's dark theme, roughly: the picture should look like the screen an operator has.
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9a"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a", "#96d98d")

#: Inches per grid column and per grid row (Grafana's rows are 30 px, its columns 1/24 of the width).
COLUMN_IN = 0.62
ROW_IN = 0.36

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def legend_of(template: str | None, labels: Mapping[str, str]) -> str:
    """A series' name as Grafana writes it from ``legendFormat`` (``{{label}}`` substituted)."""
    if not template:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return "{" + inner + "}" if inner else "value"
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), template)


def scaled(unit: str | None, values: Sequence[float]) -> tuple[list[float], str]:
    """``values`` in a unit a reader takes in at a glance, and that unit's name for the axis."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    if unit == "bytes":
        for factor, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if top >= factor:
                return [v / factor for v in values], name
        return list(values), "B"
    if unit == "Bps":
        for factor, name in ((2**20, "MiB/s"), (2**10, "KiB/s")):
            if top >= factor:
                return [v / factor for v in values], name
        return list(values), "B/s"
    if unit == "s":
        if 0 < top < 1:
            return [v * 1000 for v in values], "ms"
        return list(values), "s"
    if unit == "percentunit":
        return [v * 100 for v in values], "%"
    if unit == "percent":
        return list(values), "%"
    if unit == "reqps":
        return list(values), "/s"
    return list(values), ""


def _points(series: Series) -> tuple[list[datetime], list[float]]:
    """The series' samples, with a NaN where the answer has a hole (a target down, a series not
    yet there): matplotlib breaks the line there, as Grafana does, instead of bridging it."""
    pairs = [(float(t), float(v)) for t, v in series["values"]]
    steps = sorted(b[0] - a[0] for a, b in itertools.pairwise(pairs))
    step = steps[len(steps) // 2] if steps else 0.0
    times: list[datetime] = []
    values: list[float] = []
    for i, (t, v) in enumerate(pairs):
        if i and step and t - pairs[i - 1][0] > 1.5 * step:
            times.append(datetime.fromtimestamp(pairs[i - 1][0] + step, UTC))
            values.append(math.nan)
        times.append(datetime.fromtimestamp(t, UTC))
        values.append(v)
    return times, values


def _stat_text(value: float, unit: str | None) -> str:
    if not math.isfinite(value):
        return "NaN"
    (shown,), name = scaled(unit, [value])
    number = f"{shown:.0f}" if float(shown).is_integer() else f"{shown:.3g}"
    return f"{number} {name}".strip()


def _draw_stat(ax: Any, panel: Mapping[str, Any], answers: Sequence[Sequence[Series]]) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    series = [s for target in answers for s in target]
    ax.set_xticks([])
    ax.set_yticks([])
    if not series:
        ax.text(
            0.5, 0.45, "No data", color=MUTED, ha="center", va="center", fontsize=13, transform=ax.transAxes
        )
        return
    times, values = _points(series[0])
    finite = [v for v in values if math.isfinite(v)]
    ax.text(
        0.5,
        0.45,
        _stat_text(finite[-1] if finite else math.nan, unit),
        color=PALETTE[0],
        ha="center",
        va="center",
        fontsize=22,
        fontweight="bold",
        transform=ax.transAxes,
        zorder=3,
    )
    # The sparkline under the number, as Grafana's stat panel draws it (graphMode "area").
    spark = ax.inset_axes((0.0, 0.0, 1.0, 0.35))
    spark.set_axis_off()
    spark.fill_between(times, values, color=PALETTE[0], alpha=0.25, linewidth=0)
    spark.plot(times, values, color=PALETTE[0], linewidth=1)


def _draw_timeseries(
    ax: Any,
    panel: Mapping[str, Any],
    answers: Sequence[Sequence[Series]],
    plt: Any,
    span: tuple[datetime, datetime] | None,
) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    lines: list[tuple[str, list[datetime], list[float]]] = []
    for target, series in zip(panel["targets"], answers, strict=True):
        for one in series:
            times, values = _points(one)
            lines.append((legend_of(target.get("legendFormat"), one["metric"]), times, values))
    ax.tick_params(colors=MUTED, labelsize=6)
    ax.grid(color=BORDER, linewidth=0.5)
    if not lines:
        ax.text(
            0.5, 0.5, "No data", color=MUTED, ha="center", va="center", fontsize=11, transform=ax.transAxes
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    everything = [v for _, _, values in lines for v in values]
    # One scale for the whole panel: the one its largest value chose.
    _, axis_unit = scaled(unit, everything)
    factor = _factor(unit, everything)
    for i, (name, times, values) in enumerate(sorted(lines, key=lambda line: line[0])):
        shown = [v / factor for v in values]
        ax.plot(times, shown, color=PALETTE[i % len(PALETTE)], linewidth=1.2, label=name)
    if axis_unit:
        ax.set_ylabel(axis_unit, color=MUTED, fontsize=6)
    # Every panel on the dashboard's time range, as Grafana draws them (a series that starts late
    # starts late on the axis); plain numbers on the value axis, never "+1e1" offsets.
    if span is not None:
        ax.set_xlim(*span)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.xaxis.set_major_formatter(plt.matplotlib.dates.DateFormatter("%H:%M:%S"))
    ax.legend(
        loc="upper left",
        fontsize=5.5,
        frameon=False,
        labelcolor=TEXT,
        ncols=min(len(lines), 4),
        bbox_to_anchor=(0.0, -0.14),
        borderaxespad=0.0,
        handlelength=1.2,
    )


def _factor(unit: str | None, values: Sequence[float]) -> float:
    """What :func:`scaled` divides by (or multiplies by, below 1) for the panel's values."""
    probe = [v for v in values if math.isfinite(v) and v != 0]
    if not probe:
        return 1.0
    big = max(probe, key=abs)
    (shown,), _ = scaled(unit, [big])
    return big / shown if shown else 1.0


def render(dashboard: Mapping[str, Any], answers: PanelAnswers, out: Path) -> Path:
    """Draw ``dashboard``'s panels with ``answers`` into the PNG ``out``; returns ``out``.

    Raises RuntimeError when matplotlib is not installed (``pip install -e '.[chaos]'``).
    """
    plt = pyplot()
    if plt is None:
        raise RuntimeError("matplotlib is not installed: pip install -e '.[chaos]'")
    panels = dashboard["panels"]
    moments = [
        float(t)
        for targets in answers.values()
        for series in targets
        for one in series
        for t, _ in one["values"]
    ]
    span = (
        (datetime.fromtimestamp(min(moments), UTC), datetime.fromtimestamp(max(moments), UTC))
        if moments
        else None
    )
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    header = 1.6  # grid rows for the title above the panels
    width, height = 24 * COLUMN_IN, (rows + header) * ROW_IN
    fig = plt.figure(figsize=(width, height), dpi=110, facecolor=BACKGROUND)
    try:
        fig.text(
            0.01,
            1 - 0.5 * header / (rows + header),
            dashboard["title"],
            color=TEXT,
            fontsize=14,
            fontweight="bold",
            va="center",
        )
        for panel in panels:
            pos = panel["gridPos"]
            # Figure coordinates of the panel's cell, less a margin; the title sits in the top strip.
            left, right = pos["x"] / 24, (pos["x"] + pos["w"]) / 24
            top = 1 - (pos["y"] + header) / (rows + header)
            bottom = 1 - (pos["y"] + pos["h"] + header) / (rows + header)
            margin_x, margin_y = 0.004, 0.004
            frame = fig.add_axes(
                (left + margin_x, bottom + margin_y, right - left - 2 * margin_x, top - bottom - 2 * margin_y)
            )
            frame.set_facecolor(PANEL)
            frame.set_xticks([])
            frame.set_yticks([])
            for spine in frame.spines.values():
                spine.set_color(BORDER)
            frame.text(
                0.015, 0.97, panel["title"], color=TEXT, fontsize=8, va="top", transform=frame.transAxes
            )
            panel_answers = answers.get(panel["id"], [[] for _ in panel["targets"]])
            cell_h = top - bottom
            title_strip = 1.1 / (rows + header)  # 1.1 grid rows, in figure coordinates
            if panel["type"] == "stat":
                ax = fig.add_axes(
                    (left + 2 * margin_x, bottom + 2 * margin_y, right - left - 4 * margin_x, cell_h * 0.7)
                )
                ax.set_facecolor(PANEL)
                ax.set_axis_off()
                _draw_stat(ax, panel, panel_answers)
            else:
                # Room for the axis labels on the left and the legend under the plot.
                legend_h = cell_h * 0.26
                ax = fig.add_axes(
                    (
                        left + 0.03,
                        bottom + legend_h,
                        right - left - 0.04,
                        cell_h - legend_h - title_strip,
                    )
                )
                ax.set_facecolor(PANEL)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                _draw_timeseries(ax, panel, panel_answers, plt, span)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, facecolor=BACKGROUND)
    finally:
        plt.close(fig)
    return out


def render_saved(saved: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Every dashboard of a saved answers file (what the test writes) into ``out_dir``/<uid>.png."""
    written = []
    for dashboard in saved["dashboards"]:
        by_panel = {int(k): v for k, v in saved["answers"][dashboard["uid"]].items()}
        written.append(render(dashboard, by_panel, out_dir / f"{dashboard['uid']}.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("answers", type=Path, help="the JSON file tests/integration/test_dashboards.py saved")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"), help="where the PNGs go")
    args = parser.parse_args(argv)
    try:
        saved = json.loads(args.answers.read_text())
        for path in render_saved(saved, args.out):
            print(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"chaos.dashboards: {args.answers}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
