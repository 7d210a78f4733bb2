"""Health: threshold evaluation, cgroup v2 parsing, psutil sampling, journaling of changes and samples."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.store.events import _row
from openshell_wire.convert import decode_event, describe, encode_event, event_to_log_line
from openshell_wire.records import (
    DiskUsage,
    Event,
    GapRecord,
    HealthRecord,
    HealthState,
    LogRecord,
    LogStream,
    Payload,
)
from supervisor.health import (
    CgroupSample,
    HealthMonitor,
    HealthSettings,
    Sample,
    TreeReader,
    TreeSample,
    _descendants,
    cpu_percent,
    evaluate,
    find_cgroup_dir,
    read_cgroup,
)
from supervisor.journal import Journal, JournalOptions
from supervisor.journal.frames import Kind, kind_of

T = HealthSettings()


def _sample(at: float = 0.0, **cg: int | None) -> Sample:
    return Sample(at=at, cgroup=CgroupSample(**cg))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- evaluation


def test_no_numbers_is_healthy() -> None:
    assert evaluate(Sample(at=0.0), None, T) == (HealthState.HEALTHY, ())


@pytest.mark.parametrize(
    ("current", "inactive", "state", "reason"),
    [
        (80, None, HealthState.HEALTHY, None),
        (85, None, HealthState.DEGRADED, "memory 85% of limit"),
        (91, None, HealthState.DEGRADED, "memory 91% of limit"),
        (95, None, HealthState.UNHEALTHY, "memory 95% of limit"),
        (100, None, HealthState.UNHEALTHY, "memory 100% of limit"),
        # Page cache that can be dropped (inactive_file) does not count, as for the kubelet.
        (99, 20, HealthState.HEALTHY, None),
    ],
)
def test_memory_thresholds(
    current: int, inactive: int | None, state: HealthState, reason: str | None
) -> None:
    got = evaluate(_sample(memory_current=current, memory_max=100, inactive_file=inactive), None, T)
    assert got == (state, (reason,) if reason else ())


def test_unlimited_memory_is_not_judged() -> None:
    assert evaluate(_sample(memory_current=10**12, memory_max=None), None, T)[0] is HealthState.HEALTHY


def test_a_new_oom_kill_is_unhealthy_for_that_sample_only() -> None:
    first = _sample(oom_kills=2)
    # The first sample is the baseline: kills before the supervisor looked are not news.
    assert evaluate(first, None, T) == (HealthState.HEALTHY, ())
    second = _sample(1, oom_kills=3)
    assert evaluate(second, first, T) == (HealthState.UNHEALTHY, ("OOM kill",))
    third = _sample(2, oom_kills=5)
    assert evaluate(third, second, T) == (HealthState.UNHEALTHY, ("2 OOM kills",))
    assert evaluate(_sample(3, oom_kills=5), third, T) == (HealthState.HEALTHY, ())


def test_pids_thresholds() -> None:
    assert evaluate(_sample(pids_current=89, pids_max=100), None, T)[0] is HealthState.HEALTHY
    assert evaluate(_sample(pids_current=90, pids_max=100), None, T) == (
        HealthState.DEGRADED,
        ("pids 90% of limit",),
    )
    assert evaluate(_sample(pids_current=100, pids_max=100), None, T) == (
        HealthState.UNHEALTHY,
        ("pids at limit (100/100)",),
    )
    assert evaluate(_sample(pids_current=5000, pids_max=None), None, T)[0] is HealthState.HEALTHY


def test_cpu_throttling_is_judged_over_the_last_interval() -> None:
    before = _sample(nr_periods=1000, nr_throttled=900)
    calm = _sample(1, nr_periods=1100, nr_throttled=949)
    assert evaluate(calm, before, T)[0] is HealthState.HEALTHY  # 49 of 100 periods
    busy = _sample(2, nr_periods=1200, nr_throttled=1009)
    assert evaluate(busy, calm, T) == (HealthState.DEGRADED, ("CPU throttled in 60% of periods",))
    # No periods elapsed (an idle cgroup): nothing to judge.
    assert evaluate(_sample(3, nr_periods=1200, nr_throttled=1009), busy, T)[0] is HealthState.HEALTHY


def test_disks_and_the_worst_state_wins_with_every_reason() -> None:
    disks = (DiskUsage("/a", 90, 100), DiskUsage("/b", 97, 100), DiskUsage("/c", 1, 100))
    sample = Sample(
        at=0.0,
        cgroup=CgroupSample(memory_current=86, memory_max=100),
        disks=disks,
        disk_ratios=(0.9, 0.97, 0.01),
    )
    state, reasons = evaluate(sample, None, T)
    assert state is HealthState.UNHEALTHY
    # Unhealthy reasons first, then the degraded ones.
    assert reasons == ("disk /b 97% full", "memory 86% of limit", "disk /a 90% full")


def test_thresholds_are_configurable_and_checked() -> None:
    strict = HealthSettings(memory_degraded_ratio=0.5, memory_unhealthy_ratio=0.6)
    assert evaluate(_sample(memory_current=55, memory_max=100), None, strict)[0] is HealthState.DEGRADED
    with pytest.raises(ValidationError, match="memory_degraded_ratio"):
        HealthSettings(memory_degraded_ratio=0.9, memory_unhealthy_ratio=0.8)
    with pytest.raises(ValidationError):
        HealthSettings(disk_degraded_ratio=1.5)
    with pytest.raises(ValidationError):
        HealthSettings.model_validate({"bogus": 1})


def test_cpu_percent_between_samples() -> None:
    a = Sample(at=10.0, tree=TreeSample(cpu_seconds=5.0), main_pid=7)
    b = Sample(at=12.0, tree=TreeSample(cpu_seconds=6.0), main_pid=7)
    assert cpu_percent(b, a) == 50.0
    assert cpu_percent(b, None) == 0.0
    # A new main process (a restart) starts a new baseline.
    assert cpu_percent(Sample(at=12.0, tree=TreeSample(cpu_seconds=6.0), main_pid=8), a) == 0.0


# ------------------------------------------------------------------------- cgroup v2 files


def _cgroup(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


FULL = {
    "cgroup.controllers": "cpu memory pids\n",
    "memory.current": "123456789\n",
    "memory.max": "max\n",
    "memory.stat": "anon 1000\nfile 2000\ninactive_file 4096\nactive_file 10\n",
    "memory.events": "low 0\nhigh 0\nmax 14\noom 3\noom_kill 2\noom_group_kill 0\n",
    "cpu.stat": "usage_usec 9000\nuser_usec 6000\nsystem_usec 3000\n"
    "nr_periods 50\nnr_throttled 7\nthrottled_usec 123456\nnr_bursts 0\nburst_usec 0\n",
    "pids.current": "12\n",
    "pids.max": "max\n",
}


def test_cgroup_files_are_parsed(tmp_path: Path) -> None:
    cg = read_cgroup(_cgroup(tmp_path / "cg", FULL))
    assert cg == CgroupSample(
        memory_current=123456789,
        memory_max=None,
        inactive_file=4096,
        oom_kills=2,
        nr_periods=50,
        nr_throttled=7,
        throttled_usec=123456,
        pids_current=12,
        pids_max=None,
    )
    assert cg.readable
    limited = read_cgroup(_cgroup(tmp_path / "cg2", {"memory.max": "67108864\n", "pids.max": "64\n"}))
    assert (limited.memory_max, limited.pids_max, limited.memory_current) == (67108864, 64, None)


def test_missing_or_garbled_cgroup_files_are_unknown_never_errors(tmp_path: Path) -> None:
    assert read_cgroup(None) == CgroupSample()
    assert not read_cgroup(tmp_path / "absent").readable
    garbled = read_cgroup(
        _cgroup(tmp_path / "g", {"memory.current": "lots\n", "memory.events": "oom_kill\n"})
    )
    assert garbled == CgroupSample()
    unreadable = _cgroup(tmp_path / "u", {})
    (unreadable / "memory.current").mkdir()  # reading a directory fails like an unreadable file
    assert read_cgroup(unreadable).memory_current is None


def test_own_cgroup_is_found_below_the_mount(tmp_path: Path) -> None:
    mount = _cgroup(tmp_path / "mnt", {"cgroup.controllers": "memory\n"})
    _cgroup(mount / "kubepods" / "pod1", FULL)
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert find_cgroup_dir(mount, proc) == mount / "kubepods" / "pod1"
    # A cgroup namespace: the process is at "/", which is the mount itself.
    proc.write_text("0::/\n")
    assert find_cgroup_dir(mount, proc) == mount
    # No namespace, but the container's own cgroup mounted at the root: the path is not below it.
    proc.write_text("0::/docker/abc\n")
    assert find_cgroup_dir(mount, proc) == mount


def test_hybrid_layout_is_found_under_unified(tmp_path: Path) -> None:
    root = tmp_path / "sysfs"
    (root / "memory").mkdir(parents=True)  # a v1 hierarchy beside it
    unified = _cgroup(root / "unified", {"cgroup.controllers": "\n"})
    proc = tmp_path / "self-cgroup"
    proc.write_text("4:memory:/x\n1:name=systemd:/\n0::/\n")
    assert find_cgroup_dir(root, proc) == unified
    assert find_cgroup_dir(tmp_path / "nothing", proc) is None
    proc.write_text("4:memory:/x\n")  # v1 only: no 0:: line
    assert find_cgroup_dir(root, proc) == unified


# ------------------------------------------------------------------------- psutil sampling


TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    blob = b"x" * (32 << 20)
    print("up", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    yield proc
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_the_main_process_tree_is_summed(tree: subprocess.Popen[str], tmp_path: Path) -> None:
    reader = TreeReader()
    deadline = time.monotonic() + 10
    while True:
        sample = reader.read(tree.pid)
        if sample.processes == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sample.processes == 3
    import psutil

    found = _descendants(tree.pid)
    assert found is not None, "this kernel offers /proc/<pid>/task/<tid>/children"
    assert sorted(found) == sorted(c.pid for c in psutil.Process(tree.pid).children(recursive=True))
    assert _descendants(tree.pid, tmp_path) is None, "no such file: psutil's scan takes over"
    assert sample.rss_bytes > 32 << 20
    assert sample.threads >= 3
    assert sample.open_files >= 3 * 3  # stdin, stdout, stderr at least
    assert sample.cpu_seconds > 0
    assert reader.read(None) == TreeSample()
    assert reader.read(2**22 + 12345) == TreeSample()  # no such process


# ------------------------------------------------------------------------- journaling


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _monitor(
    tmp_path: Path, sink: list[Payload], clock: Clock, *, ok: bool = True, **settings: object
) -> tuple[HealthMonitor, Path]:
    cg = _cgroup(tmp_path / "cg", {"cgroup.controllers": "memory\n", "memory.max": "1000\n"})
    (cg / "memory.current").write_text("100\n")
    (cg / "memory.events").write_text("oom_kill 0\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/\n")

    def record(payload: Payload) -> bool:
        if ok:
            sink.append(payload)
        return ok

    monitor = HealthMonitor(
        HealthSettings(cgroup_root=cg, interval_s=30, **settings),  # type: ignore[arg-type]
        main_pid=lambda: None,
        record=record,
        extra_disk_paths=[tmp_path],
        proc_cgroup=proc,
        clock=clock,
    )
    return monitor, cg


def test_changes_are_journaled_at_once_and_samples_every_interval(tmp_path: Path) -> None:
    sink: list[Payload] = []
    clock = Clock()
    monitor, cg = _monitor(tmp_path, sink, clock)

    monitor.check()
    assert sink == [], "a healthy start journals nothing until the first interval"
    assert monitor.state is HealthState.HEALTHY and monitor.last is not None
    assert monitor.last.memory_current == 100 and monitor.last.memory_max == 1000
    assert monitor.last.disks and monitor.last.disks[0].path == str(tmp_path)

    clock.now += 10
    (cg / "memory.current").write_text("900\n")
    monitor.check()
    assert len(sink) == 1
    change = sink[0]
    assert isinstance(change, HealthRecord)
    assert change.change and change.state is HealthState.DEGRADED
    assert change.reasons == ("memory 90% of limit",)
    assert describe(Event(1, 0, change)) == "health degraded: memory 90% of limit"

    clock.now += 10
    monitor.check()
    assert len(sink) == 1, "the same state is no change"
    clock.now += 25
    monitor.check()
    assert len(sink) == 2
    sample = sink[1]
    assert isinstance(sample, HealthRecord) and not sample.change and sample.state is HealthState.DEGRADED

    clock.now += 1
    (cg / "memory.events").write_text("oom_kill 1\n")
    monitor.check()
    clock.now += 1
    (cg / "memory.current").write_text("100\n")
    monitor.check()
    states = [(p.state, p.change, p.reasons) for p in sink[2:] if isinstance(p, HealthRecord)]
    assert states == [
        (HealthState.UNHEALTHY, True, ("OOM kill", "memory 90% of limit")),
        (HealthState.HEALTHY, True, ()),
    ]
    assert monitor.changes == 3
    doc = monitor.to_json()
    assert doc["state"] == "healthy" and doc["sample"]["oom_kills"] == 1
    assert json.loads(json.dumps(doc)) == doc


def test_an_oom_kill_is_journaled_at_once_even_when_already_unhealthy(tmp_path: Path) -> None:
    sink: list[Payload] = []
    clock = Clock()
    monitor, cg = _monitor(tmp_path, sink, clock)
    (cg / "memory.current").write_text("990\n")
    monitor.check()
    (cg / "memory.events").write_text("oom_kill 1\n")
    clock.now += 1
    monitor.check()
    assert [(p.state, p.change, p.reasons) for p in sink if isinstance(p, HealthRecord)] == [
        (HealthState.UNHEALTHY, True, ("memory 99% of limit",)),
        (HealthState.UNHEALTHY, True, ("OOM kill", "memory 99% of limit")),
    ]


def test_a_change_that_could_not_be_journaled_is_tried_again(tmp_path: Path) -> None:
    sink: list[Payload] = []
    clock = Clock()
    monitor, cg = _monitor(tmp_path, sink, clock, ok=False)
    monitor.check()
    (cg / "memory.current").write_text("990\n")
    monitor.check()
    assert monitor.state is HealthState.UNHEALTHY and monitor.changes == 0
    sink_ok: list[Payload] = []
    monitor._record = lambda p: sink_ok.append(p) is None  # the disk has room again
    monitor.check()
    assert [(p.state, p.change) for p in sink_ok if isinstance(p, HealthRecord)] == [
        (HealthState.UNHEALTHY, True)
    ]


def test_monitor_never_raises_without_cgroup_or_disks(tmp_path: Path) -> None:
    monitor = HealthMonitor(
        HealthSettings(cgroup_root=tmp_path / "none", disk_paths=[tmp_path / "missing"]),
        main_pid=lambda: 2**22 + 54321,
        record=lambda p: True,
    )
    record = monitor.check()
    assert record.state is HealthState.HEALTHY and record.disks == () and record.processes == 0
    assert monitor.to_json()["cgroup"] is None and not monitor.last_cgroup_readable


# ------------------------------------------------------------------------- wire, journal, store


RECORD = HealthRecord(
    state=HealthState.DEGRADED,
    reasons=("memory 91% of limit", "disk /j 88% full"),
    change=True,
    cpu_percent=12.5,
    rss_bytes=52 << 20,
    threads=9,
    open_files=17,
    processes=3,
    memory_current=91 << 20,
    memory_max=100 << 20,
    oom_kills=1,
    cpu_throttled_usec=4242,
    pids_current=12,
    pids_max=100,
    disks=(DiskUsage("/j", 88, 100), DiskUsage("/data", 1, 2)),
)


def test_health_record_round_trips_the_wire() -> None:
    event = Event(5, 1234, RECORD)
    assert decode_event(encode_event(event)) == event
    sample = Event(6, 1235, HealthRecord(HealthState.HEALTHY, rss_bytes=1 << 20, processes=1))
    assert decode_event(encode_event(sample)) == sample
    assert describe(sample) == "health sample: healthy (rss 1.0 MiB, cpu 0%, 1 processes)"
    line = event_to_log_line("sb", event)
    assert line.target == "openshell.supervisor.health" and line.level == "WARN"
    assert line.message == "health degraded: memory 91% of limit; disk /j 88% full"


def test_changes_are_never_evicted_and_samples_give_way_like_logs(tmp_path: Path) -> None:
    assert kind_of(RECORD) is Kind.LIFECYCLE
    assert kind_of(HealthRecord(HealthState.HEALTHY)) is Kind.LOG
    journal = Journal.open(JournalOptions(directory=tmp_path / "j", segment_bytes=4096, max_bytes=16 * 1024))
    changes = []
    written_samples = 0
    for i in range(2000):
        if i % 100 == 0:
            changes.append(journal.append(RECORD))
        else:
            journal.append(HealthRecord(HealthState.HEALTHY, rss_bytes=i, processes=1))
            written_samples += 1
    events = []
    after = 0
    while batch := journal.read_after(after):
        events.extend(batch)
        after = batch[-1].sequence
    journal.close()
    kept_changes = [e.sequence for e in events if isinstance(e.payload, HealthRecord) and e.payload.change]
    assert kept_changes == changes
    samples = [e for e in events if isinstance(e.payload, HealthRecord) and not e.payload.change]
    dropped = sum(e.payload.dropped_records for e in events if isinstance(e.payload, GapRecord))
    assert dropped > 0 and len(samples) + dropped == written_samples


def test_the_gateway_stores_kind_health_with_its_numbers() -> None:
    row = _row("sb", "e1", sequence=5, timestamp_ms=1, payload=RECORD, received_at=None, generation=1)
    assert row[4] == "health" and row[5] is None
    assert row[6] == "health degraded: memory 91% of limit; disk /j 88% full"
    data = json.loads(row[7])
    assert data["state"] == "degraded" and data["change"] is True and data["oom_kills"] == 1
    assert data["disks"] == [
        {"path": "/j", "used_bytes": 88, "total_bytes": 100},
        {"path": "/data", "used_bytes": 1, "total_bytes": 2},
    ]
    log_row = _row(
        "sb",
        "e1",
        sequence=6,
        timestamp_ms=1,
        payload=LogRecord(LogStream.STDOUT, "x"),
        received_at=None,
        generation=1,
    )
    assert log_row[4] == "log"


# ------------------------------------------------------------------------- /metrics and /status


def test_metrics_and_status_show_the_latest_sample(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from supervisor.http import _health_json
    from supervisor.metrics import SupervisorMetrics
    from tests.support.supervisor_view import FakeView

    view = FakeView()
    assert _health_json(view) == {"enabled": False}, "a view without a monitor: health is off"
    assert b"health_state" not in generate_latest(SupervisorMetrics(view).registry)

    sink: list[Payload] = []
    monitor, cg = _monitor(tmp_path, sink, Clock())
    (cg / "memory.current").write_text("900\n")
    (cg / "cpu.stat").write_text("nr_periods 5\nnr_throttled 1\nthrottled_usec 2500000\n")
    monitor.check()
    view.health = monitor  # type: ignore[attr-defined]
    text = generate_latest(SupervisorMetrics(view).registry).decode()
    assert 'openshell_supervisor_health_state{state="degraded"} 1.0' in text
    assert 'openshell_supervisor_health_state{state="healthy"} 0.0' in text
    assert "openshell_supervisor_cgroup_memory_current_bytes 900.0" in text
    assert "openshell_supervisor_cgroup_memory_max_bytes 1000.0" in text
    assert "openshell_supervisor_cgroup_oom_kills_total 0.0" in text
    assert "openshell_supervisor_cgroup_cpu_throttled_seconds_total 2.5" in text
    assert "openshell_supervisor_cgroup_pids_max" not in text, "unknown or unlimited: absent"
    assert f'openshell_supervisor_disk_total_bytes{{path="{tmp_path}"}}' in text
    status = _health_json(view)
    assert status["enabled"] is True and status["state"] == "degraded"
    assert status["reasons"] == ["memory 90% of limit"] and status["cgroup"] == str(cg)
