"""Plain, typed journal records: what the supervisor observes and the gateway stores.

A record is one of a log line, a lifecycle change of the main process, a health sample, or a gap
marker that stands in for records that will never be delivered. Each carries the per-journal monotonic
``sequence`` that the supervisor assigns when it appends the record to its journal, and the
wall-clock time of the observation. The gateway stores records idempotently on
(sandbox, journal epoch, sequence), which makes a replay after a reconnect harmless.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import NewType

SandboxId = NewType("SandboxId", str)
SessionId = NewType("SessionId", str)
JournalEpoch = NewType("JournalEpoch", str)

#: DNS-1123 subdomain: what a Kubernetes object name, and so a sandbox id, may be.
_SANDBOX_ID = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def sandbox_id_problem(sandbox_id: str) -> str | None:
    """None when ``sandbox_id`` is valid, else the reason (the same rule on both sides)."""
    if not sandbox_id:
        return "sandbox_id is empty"
    if not _SANDBOX_ID.fullmatch(sandbox_id):  # "$" would let a trailing newline through
        return (
            f"sandbox_id {sandbox_id[:80]!r} is not a valid name (lowercase letters, digits, '-' and '.', "
            "at most 253 characters, starting and ending alphanumeric)"
        )
    return None


#: Capabilities a peer may announce (SupervisorHello.capabilities, SessionAccepted.capabilities).
CAP_RESUME = "resume"
CAP_EVENTS = "events"
CAP_RECONNECT = "reconnect"
CAP_COMMANDS = "commands"
#: The gateway may change the heartbeat interval of a live session with SessionUpdate (adaptive
#: heartbeats).
CAP_INTERVAL = "interval"
ALL_CAPABILITIES = (CAP_RESUME, CAP_EVENTS, CAP_RECONNECT, CAP_COMMANDS, CAP_INTERVAL)


class LogStream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    SUPERVISOR = "supervisor"
    #: OCSF event lines (an upstream supervisor's level "OCSF"): network, process, policy, findings.
    OCSF = "ocsf"


class LifecycleKind(enum.Enum):
    STARTED = "started"
    EXITED = "exited"
    START_FAILED = "start_failed"
    SUPERVISOR_STARTED = "supervisor_started"
    OFFLINE_POLICY = "offline_policy"
    RECONNECTED = "reconnected"


class GapReason(enum.Enum):
    OVERFLOW = "overflow"
    CORRUPT = "corrupt"
    #: The journal could not write them (disk full, I/O error); ``GapRecord.detail`` says why.
    WRITE_FAILED = "write_failed"
    #: A reason this side does not know (a newer peer): the gap and its count are kept.
    UNSPECIFIED = "unspecified"


class HealthState(enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class LogRecord:
    stream: LogStream
    message: str
    #: The line was longer than the capture limit and continues in the next record.
    continued: bool = False
    #: A structured line's level, lower case ("info", "warn", "error", "ocsf"; empty for captured
    #: output), its target (logger or tracing target) and its fields, in the order received: what
    #: an upstream supervisor's SandboxLogLine carries.
    level: str = ""
    target: str = ""
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class LifecycleRecord:
    kind: LifecycleKind
    pid: int = 0
    #: For EXITED: the sandbox's exit code, 128 + signal number for a signal exit.
    exit_code: int = 0
    signal: int = 0
    argv: tuple[str, ...] = ()
    detail: str = ""
    instance_id: str = ""
    #: OFFLINE_POLICY, RECONNECTED: how long the gateway was unreachable.
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class GapRecord:
    reason: GapReason
    dropped_records: int
    dropped_bytes: int
    first_sequence: int
    last_sequence: int
    #: Why, in words (for WRITE_FAILED the error, e.g. "No space left on device"); may be empty.
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DiskUsage:
    path: str
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class HealthRecord:
    """A resource sample of the sandbox and the state derived from it (``supervisor.health``).

    ``change`` is True for the record of a state change or a new OOM kill (journaled at once, never
    evicted) and False for a periodic sample (evictable under the journal's byte bound, like a log line). The
    cgroup numbers are 0 when unknown; ``memory_max`` and ``pids_max`` are 0 also when unlimited.
    """

    state: HealthState
    reasons: tuple[str, ...] = ()
    change: bool = False
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    open_files: int = 0
    processes: int = 0
    memory_current: int = 0
    memory_max: int = 0
    oom_kills: int = 0
    cpu_throttled_usec: int = 0
    pids_current: int = 0
    pids_max: int = 0
    disks: tuple[DiskUsage, ...] = ()


Payload = LogRecord | LifecycleRecord | GapRecord | HealthRecord


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    timestamp_ms: int
    payload: Payload = field(compare=True)

    @property
    def is_log(self) -> bool:
        return isinstance(self.payload, LogRecord)


class CommandKind(enum.Enum):
    STOP = "stop"
    SIGNAL = "signal"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, slots=True)
class Command:
    """A gateway-to-supervisor command; its id makes applying it twice a no-op."""

    command_id: str
    kind: CommandKind
    #: STOP: grace before SIGKILL (0: the supervisor's configured grace).
    grace_ms: int = 0
    #: SIGNAL: the signal number.
    signal: int = 0
    #: HEARTBEAT: the new interval.
    interval_ms: int = 0


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str
    applied: bool
    error: str = ""
    duplicate: bool = False


def exit_code_from_returncode(returncode: int) -> tuple[int, int]:
    """Map a subprocess return code to (exit code, signal) as the sandbox reports it.

    asyncio reports a signal death as ``-signum``; shells and Kubernetes report 128 + signum.
    """
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, 0
