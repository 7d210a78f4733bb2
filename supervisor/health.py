"""Health of the sandbox: resource samples, a healthy / degraded / unhealthy verdict, and its journal.

What is sampled (every ``check_interval_s``, cheaply, on the event loop):

- **The main process tree** with psutil: the main process and all its descendants, summed. CPU is
  the tree's user + system time (children that were waited for included) since the last sample,
  as a percentage of one core; RSS, threads, open file descriptors and the number of processes.
  Each process is read inside ``oneshot()``; one that vanished or cannot be read is skipped.
- **The supervisor's cgroup v2**, where its files are readable: ``memory.current``, ``memory.max``
  (``max`` means unlimited), ``memory.stat``'s ``inactive_file``, ``memory.events``' ``oom_kill``,
  ``cpu.stat``'s ``nr_periods``, ``nr_throttled`` and ``throttled_usec``, ``pids.current`` and
  ``pids.max``. The cgroup is found from ``/proc/self/cgroup`` (the ``0::/path`` line) under
  ``cgroup_root``; a hybrid layout (cgroup v2 at ``cgroup_root/unified``) is recognised, and when
  the path does not exist under the root (no cgroup namespace) the root itself is taken, which is
  what a container sees of its own cgroup. A missing or unreadable file is simply unknown (0 on the
  wire): sampling never raises, and "cgroup v2 not readable" is said once, at debug level.
- **Disk usage** of the configured paths (the agent adds the journal directory), as ``df`` counts
  it: used / (used + available to unprivileged users).

The verdict (:func:`evaluate`, a pure function) is the worst of:

==========================  ==========================================================================
unhealthy                   an OOM kill in the cgroup since the last sample (for that sample only);
                            the journal cannot write (``journal cannot write: <why>``: while it
                            runs on its reserve or has a gap record pending, or for one sample
                            after any failed append);
                            memory working set (``memory.current - inactive_file``, the number the
                            kubelet evicts on) at ``memory_unhealthy_ratio`` of ``memory.max``; a disk
                            at ``disk_unhealthy_ratio``; ``pids.current`` at ``pids.max``
degraded                    memory at ``memory_degraded_ratio``; a disk at ``disk_degraded_ratio``;
                            pids at ``pids_degraded_ratio``; CPU throttled in at least
                            ``cpu_throttled_degraded_ratio`` of the CFS periods since the last sample
==========================  ==========================================================================

Journal: a verdict that differs from the last one journaled, or any new OOM kill (news even when
the state already was unhealthy), is journaled at once as a ``HealthRecord`` with ``change=True``
(framed like a lifecycle record: never evicted); otherwise a sample is journaled every
``interval_s`` with ``change=False`` (framed like a log line: under the journal's byte bound it
gives way to a gap that counts it). The journal starting or ceasing to fail is news as well, even
when the state stays unhealthy for another reason (a disk already 100% full, say). The supervisor
starts out presumed healthy, so a healthy start journals nothing until the first periodic sample. A
change that cannot be journaled (disk full) is tried again at the next check; a failed append wakes
the monitor at once (:meth:`HealthMonitor.notify`), and on a full disk the journal writes changes
from its reserve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, model_validator

from openshell_wire.records import DiskUsage, HealthRecord, HealthState, Payload
from supervisor.journal import JournalStats

log = logging.getLogger(__name__)

_RANK = {HealthState.HEALTHY: 0, HealthState.DEGRADED: 1, HealthState.UNHEALTHY: 2}
#: How a reason about the journal's writes starts (the rest is the cause, e.g. "No space left on device").
JOURNAL_REASON = "journal cannot write: "
_MIN_WAKE_S = 0.2


class HealthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Sample the main process tree, the cgroup and disks, derive healthy / degraded / "
        "unhealthy and journal it (kind `health` at the gateway).",
    )
    interval_s: float = Field(
        30.0,
        gt=0,
        description="Journal a periodic health sample this often; a state change is journaled at once.",
    )
    check_interval_s: float = Field(
        5.0,
        gt=0,
        description="Sample and evaluate this often (at most interval_s): how soon a state change is "
        "noticed.",
    )
    disk_paths: list[Path] = Field(
        default_factory=list,
        description="Paths whose file systems' usage is watched; the journal directory is always added.",
    )
    cgroup_root: Path = Field(
        Path("/sys/fs/cgroup"),
        description="Where cgroup v2 is mounted (a hybrid layout's `unified` below it is found). The "
        "supervisor's own cgroup is looked up from /proc/self/cgroup beneath it.",
    )
    memory_degraded_ratio: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Degraded at this fraction of memory.max (working set: current - inactive_file).",
    )
    memory_unhealthy_ratio: float = Field(
        0.95, gt=0, le=1, description="Unhealthy at this fraction of memory.max."
    )
    disk_degraded_ratio: float = Field(
        0.85, gt=0, le=1, description="Degraded when a watched file system is this full (as df counts it)."
    )
    disk_unhealthy_ratio: float = Field(
        0.95, gt=0, le=1, description="Unhealthy when a watched file system is this full."
    )
    pids_degraded_ratio: float = Field(
        0.9, gt=0, le=1, description="Degraded at this fraction of pids.max (unhealthy at the limit itself)."
    )
    cpu_throttled_degraded_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Degraded when the cgroup was CPU-throttled in this fraction of its CFS periods "
        "since the last sample.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> HealthSettings:
        if self.memory_degraded_ratio > self.memory_unhealthy_ratio:
            raise ValueError("memory_degraded_ratio must not exceed memory_unhealthy_ratio")
        if self.disk_degraded_ratio > self.disk_unhealthy_ratio:
            raise ValueError("disk_degraded_ratio must not exceed disk_unhealthy_ratio")
        return self


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeSample:
    """The main process tree, summed. ``cpu_seconds`` is cumulative (user + system, reaped children)."""

    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    open_files: int = 0
    processes: int = 0


@dataclass(frozen=True, slots=True)
class CgroupSample:
    """cgroup v2 numbers; None where the file is missing or unreadable (and for an unlimited max)."""

    memory_current: int | None = None
    memory_max: int | None = None
    inactive_file: int | None = None
    oom_kills: int | None = None
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_usec: int | None = None
    pids_current: int | None = None
    pids_max: int | None = None

    @property
    def readable(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    tree: TreeSample = field(default_factory=TreeSample)
    cgroup: CgroupSample = field(default_factory=CgroupSample)
    disks: tuple[DiskUsage, ...] = ()
    #: df's ratio per disk (used / (used + available)), in the order of ``disks``.
    disk_ratios: tuple[float, ...] = ()
    #: The main process the tree was read from (a new one resets the CPU baseline).
    main_pid: int | None = None
    #: The journal's failed appends since it opened, why it cannot write now (None: it can), and
    #: the cause of its latest failure.
    journal_errors: int = 0
    journal_problem: str | None = None
    journal_last_error: str = ""


# ---------------------------------------------------------------------------------------------
# cgroup v2
# ---------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path, *, max_is_none: bool = False) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    value = text.strip()
    if max_is_none and value == "max":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (``key value`` per line) as a dict; empty when unreadable."""
    text = _read_text(path)
    out: dict[str, int] = {}
    if text is None:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value.strip())
        except ValueError:
            continue
    return out


def own_cgroup_path(proc_cgroup: Path = Path("/proc/self/cgroup")) -> str | None:
    """The cgroup v2 path of this process (``/`` in a cgroup namespace), from the ``0::`` line."""
    text = _read_text(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def find_cgroup_dir(root: Path, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path | None:
    """This process's cgroup v2 directory under ``root``, or None when there is no cgroup v2 there.

    ``root`` may be the unified mount (``/sys/fs/cgroup``), a hybrid layout's parent of
    ``unified``, or a cgroup directory itself (taken as is when our path is not found below it).
    """
    mount = root
    if not (mount / "cgroup.controllers").exists():
        if (root / "unified" / "cgroup.controllers").exists():
            mount = root / "unified"
        else:
            return None
    rel = own_cgroup_path(proc_cgroup)
    if rel is not None and rel != "/":
        candidate = mount / rel.lstrip("/")
        if candidate.is_dir():
            return candidate
    return mount


def read_cgroup(directory: Path | None) -> CgroupSample:
    """The numbers of one cgroup v2 directory; never raises (unknown stays None)."""
    if directory is None:
        return CgroupSample()
    events = _read_keyed(directory / "memory.events")
    stat = _read_keyed(directory / "memory.stat")
    cpu = _read_keyed(directory / "cpu.stat")
    return CgroupSample(
        memory_current=_read_int(directory / "memory.current"),
        memory_max=_read_int(directory / "memory.max", max_is_none=True),
        inactive_file=stat.get("inactive_file"),
        oom_kills=events.get("oom_kill"),
        nr_periods=cpu.get("nr_periods"),
        nr_throttled=cpu.get("nr_throttled"),
        throttled_usec=cpu.get("throttled_usec"),
        pids_current=_read_int(directory / "pids.current"),
        pids_max=_read_int(directory / "pids.max", max_is_none=True),
    )


# ---------------------------------------------------------------------------------------------
# The process tree and disks
# ---------------------------------------------------------------------------------------------


def _descendants(pid: int, proc: Path = Path("/proc")) -> list[int] | None:
    """The descendants of ``pid`` from ``/proc/<pid>/task/<tid>/children``; None where the kernel
    does not offer that file (then psutil's scan of every process is the way)."""
    out: list[int] = []
    todo = [pid]
    first = True
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(proc / str(parent) / "task")
        except OSError:
            if first:
                return None
            continue  # it ended meanwhile
        for tid in tasks:
            try:
                text = (proc / str(parent) / "task" / tid / "children").read_text()
            except FileNotFoundError:
                if first:
                    return None
                continue
            except OSError:
                continue
            first = False
            for child in text.split():
                out.append(int(child))
                todo.append(int(child))
        first = False
    return out


class TreeReader:
    """Reads the main process tree with psutil, keeping ``Process`` objects between samples."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None or not proc.is_running():
            proc = psutil.Process(pid)
            self._procs[pid] = proc
        return proc

    def read(self, main_pid: int | None) -> TreeSample:
        if main_pid is None:
            self._procs.clear()
            return TreeSample()
        try:
            main = self._process(main_pid)
            pids = _descendants(main_pid)
            if pids is None:
                children = main.children(recursive=True)
            else:
                children = []
                for pid in pids:
                    with contextlib.suppress(psutil.Error, OSError):
                        children.append(self._process(pid))
            tree = [main, *children]
        except (psutil.Error, OSError):
            self._procs.clear()
            return TreeSample()
        cpu = 0.0
        rss = threads = fds = count = 0
        seen: set[int] = set()
        for proc in tree:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    mem = proc.memory_info()
                    n_threads = proc.num_threads()
                    try:
                        n_fds = proc.num_fds()
                    except psutil.AccessDenied:
                        n_fds = 0
            except (psutil.Error, OSError):
                continue
            seen.add(proc.pid)
            self._procs.setdefault(proc.pid, proc)
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += mem.rss
            threads += n_threads
            fds += n_fds
            count += 1
        for pid in [p for p in self._procs if p not in seen]:
            del self._procs[pid]
        return TreeSample(cpu_seconds=cpu, rss_bytes=rss, threads=threads, open_files=fds, processes=count)


def read_disks(paths: Sequence[Path]) -> tuple[tuple[DiskUsage, ...], tuple[float, ...]]:
    disks: list[DiskUsage] = []
    ratios: list[float] = []
    for path in paths:
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        disks.append(DiskUsage(path=str(path), used_bytes=used, total_bytes=total))
        ratios.append(used / (used + avail) if used + avail > 0 else 0.0)
    return tuple(disks), tuple(ratios)


# ---------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def evaluate(
    sample: Sample, previous: Sample | None, t: HealthSettings
) -> tuple[HealthState, tuple[str, ...]]:
    """The state and its reasons for ``sample`` (``previous``: the sample before, for rates)."""
    unhealthy: list[str] = []
    degraded: list[str] = []
    cg = sample.cgroup
    before = previous.cgroup if previous is not None else None

    new = _new_oom_kills(sample, previous)
    if new:
        unhealthy.append("OOM kill" if new == 1 else f"{new} OOM kills")

    problem = sample.journal_problem
    if problem is None and sample.journal_errors > (previous.journal_errors if previous is not None else 0):
        # It failed since the last sample and writes again (a one-off I/O error): still news.
        problem = sample.journal_last_error or "write failed"
    if problem is not None:
        unhealthy.append(JOURNAL_REASON + problem)

    if cg.memory_current is not None and cg.memory_max:
        working = max(cg.memory_current - (cg.inactive_file or 0), 0)
        ratio = working / cg.memory_max
        if ratio >= t.memory_unhealthy_ratio:
            unhealthy.append(f"memory {_pct(ratio)} of limit")
        elif ratio >= t.memory_degraded_ratio:
            degraded.append(f"memory {_pct(ratio)} of limit")

    for disk, ratio in zip(sample.disks, sample.disk_ratios, strict=True):
        if ratio >= t.disk_unhealthy_ratio:
            unhealthy.append(f"disk {disk.path} {_pct(ratio)} full")
        elif ratio >= t.disk_degraded_ratio:
            degraded.append(f"disk {disk.path} {_pct(ratio)} full")

    if cg.pids_current is not None and cg.pids_max:
        ratio = cg.pids_current / cg.pids_max
        if cg.pids_current >= cg.pids_max:
            unhealthy.append(f"pids at limit ({cg.pids_current}/{cg.pids_max})")
        elif ratio >= t.pids_degraded_ratio:
            degraded.append(f"pids {_pct(ratio)} of limit")

    if (
        before is not None
        and cg.nr_periods is not None
        and cg.nr_throttled is not None
        and before.nr_periods is not None
        and before.nr_throttled is not None
    ):
        periods = cg.nr_periods - before.nr_periods
        throttled = cg.nr_throttled - before.nr_throttled
        if periods > 0 and throttled >= 0:
            ratio = throttled / periods
            if ratio >= t.cpu_throttled_degraded_ratio:
                degraded.append(f"CPU throttled in {_pct(ratio)} of periods")

    if unhealthy:
        return HealthState.UNHEALTHY, (*unhealthy, *degraded)
    if degraded:
        return HealthState.DEGRADED, tuple(degraded)
    return HealthState.HEALTHY, ()


def _new_oom_kills(sample: Sample, previous: Sample | None) -> int:
    if previous is None or sample.cgroup.oom_kills is None or previous.cgroup.oom_kills is None:
        return 0
    return max(sample.cgroup.oom_kills - previous.cgroup.oom_kills, 0)


def cpu_percent(sample: Sample, previous: Sample | None) -> float:
    """The tree's CPU use between two samples, in percent of one core (0 when it cannot be told)."""
    if previous is None or previous.main_pid != sample.main_pid or sample.main_pid is None:
        return 0.0
    elapsed = sample.at - previous.at
    used = sample.tree.cpu_seconds - previous.tree.cpu_seconds
    if elapsed <= 0 or used < 0:
        return 0.0
    return round(used / elapsed * 100, 2)


def to_record(
    sample: Sample, previous: Sample | None, state: HealthState, reasons: tuple[str, ...]
) -> HealthRecord:
    cg = sample.cgroup
    return HealthRecord(
        state=state,
        reasons=reasons,
        change=False,
        cpu_percent=cpu_percent(sample, previous),
        rss_bytes=sample.tree.rss_bytes,
        threads=sample.tree.threads,
        open_files=sample.tree.open_files,
        processes=sample.tree.processes,
        memory_current=cg.memory_current or 0,
        memory_max=cg.memory_max or 0,
        oom_kills=cg.oom_kills or 0,
        cpu_throttled_usec=cg.throttled_usec or 0,
        pids_current=cg.pids_current or 0,
        pids_max=cg.pids_max or 0,
        disks=sample.disks,
    )


# ---------------------------------------------------------------------------------------------
# The monitor
# ---------------------------------------------------------------------------------------------


class HealthMonitor:
    """Samples, evaluates and journals health; ``run`` until cancelled.

    ``main_pid`` says which process tree to read (None while there is no main process);
    ``record`` journals a payload and says whether it could (``Agent.record``).
    """

    def __init__(
        self,
        settings: HealthSettings,
        *,
        main_pid: Callable[[], int | None],
        record: Callable[[Payload], bool],
        extra_disk_paths: Iterable[Path] = (),
        journal_stats: Callable[[], JournalStats] | None = None,
        session_problem: Callable[[], str] | None = None,
        proc_cgroup: Path = Path("/proc/self/cgroup"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        #: A problem of the session that is not an outage ("" when none): the gateway refuses our
        #: credential. The sandbox runs, but nothing it journals is delivered: degraded.
        self._session_problem = session_problem
        self._main_pid = main_pid
        self._record = record
        self._journal_stats = journal_stats
        self._wake = asyncio.Event()
        #: Whether the record last journaled said the journal cannot write.
        self._journaled_journal_failing = False
        self._clock = clock
        paths: list[Path] = []
        for path in [*settings.disk_paths, *extra_disk_paths]:
            if path not in paths:
                paths.append(path)
        self.disk_paths = tuple(paths)
        self._proc_cgroup = proc_cgroup
        self.cgroup_dir: Path | None = None
        self._cgroup_found = False
        self._said_unreadable = False
        self._tree = TreeReader()
        self._previous: Sample | None = None
        #: The state last journaled (presumed healthy at start); a different verdict is a change.
        self._journaled_state = HealthState.HEALTHY
        self._last_journaled_at: float | None = None
        #: The latest verdict and sample, for /status and /metrics.
        self.state = HealthState.HEALTHY
        self.last: HealthRecord | None = None
        self.last_at: float | None = None
        #: Whether the latest sample read anything of the cgroup (else its cgroup numbers are unknown).
        self.last_cgroup_readable = False
        self.changes = 0
        self.samples_journaled = 0

    # -- sampling -------------------------------------------------------------------------

    def _cgroup(self) -> Path | None:
        if not self._cgroup_found:
            self._cgroup_found = True
            self.cgroup_dir = find_cgroup_dir(self.settings.cgroup_root, self._proc_cgroup)
        return self.cgroup_dir

    def sample(self) -> Sample:
        """One sample of everything; never raises."""
        pid = self._main_pid()
        try:
            tree = self._tree.read(pid)
        except Exception:  # psutil on an odd platform: health must never take the supervisor down
            log.debug("health: reading the process tree failed", exc_info=True)
            tree = TreeSample()
        cgroup = read_cgroup(self._cgroup())
        if not cgroup.readable and not self._said_unreadable:
            self._said_unreadable = True
            log.debug(
                "health: cgroup v2 not readable under %s (found %s); sampling without it",
                self.settings.cgroup_root,
                self.cgroup_dir,
            )
        disks, ratios = read_disks(self.disk_paths)
        journal = self._journal_stats() if self._journal_stats is not None else None
        return Sample(
            at=self._clock(),
            tree=tree,
            cgroup=cgroup,
            disks=disks,
            disk_ratios=ratios,
            main_pid=pid,
            journal_errors=journal.write_errors_total if journal is not None else 0,
            journal_problem=journal.write_problem if journal is not None else None,
            journal_last_error=journal.last_write_error if journal is not None else "",
        )

    def check(self) -> HealthRecord:
        """Sample, evaluate and journal what is due; the record of this sample."""
        sample = self.sample()
        previous = self._previous
        state, reasons = evaluate(sample, previous, self.settings)
        problem = self._session_problem() if self._session_problem is not None else ""
        if problem:
            reasons = (*reasons, problem)
            if state is HealthState.HEALTHY:
                state = HealthState.DEGRADED
        record = to_record(sample, previous, state, reasons)
        self._previous = sample
        self.state = state
        self.last = record
        self.last_at = sample.at
        self.last_cgroup_readable = sample.cgroup.readable
        now = sample.at
        journal_failing = any(reason.startswith(JOURNAL_REASON) for reason in reasons)
        if (
            state is not self._journaled_state
            or _new_oom_kills(sample, previous)
            or journal_failing != self._journaled_journal_failing
        ):
            # An OOM kill is news even to a sandbox already unhealthy (say, for its memory), and
            # so is a journal that stops (or starts again) taking writes.
            change = replace(record, change=True)
            if self._record(change):
                self._journaled_journal_failing = journal_failing
                log.log(
                    logging.INFO if state is HealthState.HEALTHY else logging.WARNING,
                    "health %s -> %s%s",
                    self._journaled_state.value,
                    state.value,
                    f": {'; '.join(reasons)}" if reasons else "",
                )
                self._journaled_state = state
                self._last_journaled_at = now
                self.changes += 1
            return change
        if self._last_journaled_at is None:
            # The first periodic sample comes one interval after the start.
            self._last_journaled_at = now
        elif now - self._last_journaled_at >= self.settings.interval_s and self._record(record):
            self._last_journaled_at = now
            self.samples_journaled += 1
        return record

    def notify(self) -> None:
        """Check now rather than at the next period (the journal just failed an append)."""
        self._wake.set()

    async def run(self) -> None:
        """Check every ``check_interval_s`` (at most ``interval_s``), or at once after ``notify``,
        until cancelled."""
        period = min(self.settings.check_interval_s, self.settings.interval_s)
        while True:
            self._wake.clear()
            try:
                self.check()
            except Exception:  # a bug here must be seen, but must not stop the supervisor
                log.exception("health: check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)
            if self._wake.is_set():
                # Woken checks at most a few times a second, however fast appends fail.
                await asyncio.sleep(min(_MIN_WAKE_S, period))

    # -- views ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The /status section."""
        rec = self.last
        doc: dict[str, Any] = {
            "enabled": True,
            "state": self.state.value,
            "reasons": list(rec.reasons) if rec is not None else [],
            "interval_s": self.settings.interval_s,
            "check_interval_s": self.settings.check_interval_s,
            "cgroup": str(self.cgroup_dir) if self.cgroup_dir is not None else None,
            "changes": self.changes,
        }
        if rec is not None:
            doc["sample"] = {
                "cpu_percent": rec.cpu_percent,
                "rss_bytes": rec.rss_bytes,
                "threads": rec.threads,
                "open_files": rec.open_files,
                "processes": rec.processes,
                "memory_current": rec.memory_current,
                "memory_max": rec.memory_max,
                "oom_kills": rec.oom_kills,
                "cpu_throttled_usec": rec.cpu_throttled_usec,
                "pids_current": rec.pids_current,
                "pids_max": rec.pids_max,
                "disks": [
                    {"path": d.path, "used_bytes": d.used_bytes, "total_bytes": d.total_bytes}
                    for d in rec.disks
                ],
            }
        return doc
