"""The scale figures' arithmetic (chaos/scale.py, chaos/rebalance.py) on synthetic simulator output:
the steady window leaves the hellos' work out, echo is told the gateway's interval, hellos per second
come from the accept times, and convergence means staying within the band to the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chaos.rebalance import converged_at
from chaos.scale import Server, hello_figures, steady_figures


def _second(t: float, *, up: int, accepts: int, beats: int, cpu: float) -> dict[str, Any]:
    return {
        "t": t, "unix_ms": int(t * 1000), "up": up, "accepts": accepts, "attempts": accepts,
        "heartbeats_echoed": beats, "rtt_p50_ms": 1.0, "rtt_p99_ms": 2.0,
        "watch_cpu_s": [cpu], "watch_rss_mib": [100.0], "self_cpu_s": 0.0, "self_rss_mib": 10.0,
    }  # fmt: skip


def _ramp_then_steady(*, hello_cpu_s: float, beat_cpu_s: float) -> dict[str, Any]:
    """1,000 sessions: 100 hellos a second for 10 s, then the stragglers' hellos (retried after a
    refusal) up to t=20 while all beat 100 times a second, then 40 s of beats alone."""
    series, cpu = [], 0.0
    for t in range(1, 61):
        accepts = 100 if t <= 10 else (5 if t <= 20 else 0)
        beats = 0 if t <= 10 else 100
        cpu += accepts * hello_cpu_s + beats * beat_cpu_s
        series.append(_second(t, up=min(1000, 100 * t), accepts=accepts, beats=beats, cpu=cpu))
    return {
        "n": 1000, "all_up_at_s": 10.0, "series": series, "rtt_ms": {}, "rejected_by_code": {},
        "connect_timeouts": 0, "violations": 0,
    }  # fmt: skip


def test_the_steady_window_leaves_the_hellos_work_out() -> None:
    # A hello costing 100 heartbeats' CPU must not show in the CPU per heartbeat: the window starts
    # after the last straggler's hello.
    result = _ramp_then_steady(hello_cpu_s=0.05, beat_cpu_s=0.0005)
    figures = steady_figures(result, rss_before_mib=50.0, steady_after_s=15.0)
    assert figures["hellos_in_window"] == 0
    assert figures["cpu_us_per_heartbeat"] == 500


def test_echo_is_told_the_interval_to_hand_out(tmp_path: Path) -> None:
    argv = Server("echo", tmp_path, interval_ms=15_000).argv()
    assert argv[argv.index("--interval-ms") + 1] == "15000"


def test_hellos_per_second_come_from_the_accept_times() -> None:
    start = 1_000_000
    result = {
        "n": 4, "start_unix_ms": start, "attempts": 6, "rejected_by_code": {"REJECT_CODE_OVERLOADED": 2},
        "connect_timeouts": 0, "violations": 0, "series": [{"accepts": 3}, {"accepts": 1}],
        "supervisors": [{"last_accept_unix_ms": start + ms} for ms in (100, 300, 500, 2000)],
    }  # fmt: skip
    figures = hello_figures(result)
    assert figures["hellos_per_s"] == 2.0
    assert figures["all_up_s"] == 2.0
    assert figures["half_up_s"] == 0.3
    assert figures["accepts_per_s_peak"] == 3
    # One never accepted: no all-up time and no rate, never a division by a partial time.
    result["supervisors"][-1]["last_accept_unix_ms"] = 0
    assert hello_figures(result)["hellos_per_s"] is None


def _counts(t: float, a: int, b: int | None, c: int | None) -> dict[str, Any]:
    return {"t": t, "sessions": {"a": a, "b": b, "c": c}}


def test_convergence_is_staying_within_the_band_to_the_end() -> None:
    samples = [
        _counts(0, 300, None, None),
        _counts(1, 200, 50, 50),
        _counts(2, 105, 100, 95),  # within 90-110
        _counts(3, 112, 94, 94),  # out again: a pass through the band is not convergence
        _counts(4, 104, 98, 98),
        _counts(5, 100, 100, 100),
    ]
    assert converged_at(samples, n=300, replicas=3, tolerance=0.1, since_s=0) == 4
    assert (
        converged_at([*samples, _counts(6, 89, 105, 106)], n=300, replicas=3, tolerance=0.1, since_s=0)
        is None
    )
    # A replica not answering its metrics is not within the band.
    assert converged_at([_counts(0, 100, 100, None)], n=300, replicas=3, tolerance=0.1, since_s=0) is None
