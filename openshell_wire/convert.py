"""Conversion between the plain records and their protobuf form, at the edge of each side.

Everything that arrives from the wire (or from a journal file) passes through ``decode_event``
or ``event_from_proto``, which raise :class:`WireError` with a readable reason instead of
letting a malformed message travel inwards.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from openshell_wire.records import (
    Command,
    CommandKind,
    CommandResult,
    DiskUsage,
    Event,
    GapReason,
    GapRecord,
    HealthRecord,
    HealthState,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from openshell_wire.v1 import openshell_pb2 as pb


class WireError(ValueError):
    """A message that cannot be turned into a record; the text says why."""


_STREAM_TO_PB = {
    LogStream.STDOUT: pb.LOG_STREAM_STDOUT,
    LogStream.STDERR: pb.LOG_STREAM_STDERR,
    LogStream.SUPERVISOR: pb.LOG_STREAM_SUPERVISOR,
    LogStream.OCSF: pb.LOG_STREAM_OCSF,
}
_STREAM_FROM_PB = {v: k for k, v in _STREAM_TO_PB.items()}
#: Protobuf log stream number -> LogStream (read-only; for fast paths that skip the records).
STREAM_FROM_PB = _STREAM_FROM_PB
_LIFECYCLE_TO_PB = {
    LifecycleKind.STARTED: pb.LIFECYCLE_KIND_STARTED,
    LifecycleKind.EXITED: pb.LIFECYCLE_KIND_EXITED,
    LifecycleKind.START_FAILED: pb.LIFECYCLE_KIND_START_FAILED,
    LifecycleKind.SUPERVISOR_STARTED: pb.LIFECYCLE_KIND_SUPERVISOR_STARTED,
    LifecycleKind.OFFLINE_POLICY: pb.LIFECYCLE_KIND_OFFLINE_POLICY,
    LifecycleKind.RECONNECTED: pb.LIFECYCLE_KIND_RECONNECTED,
}
_LIFECYCLE_FROM_PB = {v: k for k, v in _LIFECYCLE_TO_PB.items()}
_GAP_TO_PB = {
    GapReason.OVERFLOW: pb.GAP_REASON_OVERFLOW,
    GapReason.CORRUPT: pb.GAP_REASON_CORRUPT,
    GapReason.WRITE_FAILED: pb.GAP_REASON_WRITE_FAILED,
    GapReason.UNSPECIFIED: pb.GAP_REASON_UNSPECIFIED,
}
_GAP_FROM_PB = {v: k for k, v in _GAP_TO_PB.items()}
_HEALTH_TO_PB = {
    HealthState.HEALTHY: pb.HEALTH_STATE_HEALTHY,
    HealthState.DEGRADED: pb.HEALTH_STATE_DEGRADED,
    HealthState.UNHEALTHY: pb.HEALTH_STATE_UNHEALTHY,
}
_HEALTH_FROM_PB = {v: k for k, v in _HEALTH_TO_PB.items()}


def event_to_proto(event: Event) -> pb.Event:
    msg = pb.Event(sequence=event.sequence, timestamp_ms=event.timestamp_ms)
    p = event.payload
    if isinstance(p, LogRecord):
        msg.log.stream = _STREAM_TO_PB[p.stream]
        msg.log.message = p.message
        msg.log.continued = p.continued
        if p.level:
            msg.log.level = p.level
        if p.target:
            msg.log.target = p.target
        for key, value in p.fields:
            msg.log.fields[key] = value
    elif isinstance(p, LifecycleRecord):
        msg.lifecycle.kind = _LIFECYCLE_TO_PB[p.kind]
        msg.lifecycle.pid = p.pid
        msg.lifecycle.exit_code = p.exit_code
        msg.lifecycle.signal = p.signal
        msg.lifecycle.argv.extend(p.argv)
        msg.lifecycle.detail = p.detail
        msg.lifecycle.instance_id = p.instance_id
        msg.lifecycle.duration_ms = p.duration_ms
    elif isinstance(p, HealthRecord):
        h = msg.health
        h.state = _HEALTH_TO_PB[p.state]
        h.reasons.extend(p.reasons)
        h.change = p.change
        h.cpu_percent = p.cpu_percent
        h.rss_bytes = p.rss_bytes
        h.threads = p.threads
        h.open_files = p.open_files
        h.processes = p.processes
        h.memory_current = p.memory_current
        h.memory_max = p.memory_max
        h.oom_kills = p.oom_kills
        h.cpu_throttled_usec = p.cpu_throttled_usec
        h.pids_current = p.pids_current
        h.pids_max = p.pids_max
        for d in p.disks:
            h.disks.add(path=d.path, used_bytes=d.used_bytes, total_bytes=d.total_bytes)
    else:
        msg.gap.reason = _GAP_TO_PB[p.reason]
        msg.gap.dropped_records = p.dropped_records
        msg.gap.dropped_bytes = p.dropped_bytes
        msg.gap.first_sequence = p.first_sequence
        msg.gap.last_sequence = p.last_sequence
        msg.gap.detail = p.detail
    return msg


#: Stores keep sequences in a signed 64-bit column; the wire's uint64 may not go above this.
MAX_SEQUENCE = 2**63 - 1


def event_from_proto(msg: pb.Event) -> Event:
    if msg.sequence == 0:
        raise WireError("event without a sequence number (sequences start at 1)")
    if msg.sequence > MAX_SEQUENCE:
        raise WireError(f"event sequence {msg.sequence} is above the largest allowed, {MAX_SEQUENCE}")
    kind = msg.WhichOneof("kind")
    payload: LogRecord | LifecycleRecord | GapRecord | HealthRecord
    if kind == "log":
        stream = _STREAM_FROM_PB.get(msg.log.stream)
        if stream is None:
            raise WireError(f"event {msg.sequence}: unknown log stream {msg.log.stream}")
        line = msg.log
        payload = LogRecord(
            stream=stream,
            message=line.message,
            continued=line.continued,
            level=line.level,
            target=line.target,
            fields=tuple(sorted(line.fields.items())),
        )
    elif kind == "lifecycle":
        lk = _LIFECYCLE_FROM_PB.get(msg.lifecycle.kind)
        if lk is None:
            raise WireError(f"event {msg.sequence}: unknown lifecycle kind {msg.lifecycle.kind}")
        lc = msg.lifecycle
        payload = LifecycleRecord(
            kind=lk,
            pid=lc.pid,
            exit_code=lc.exit_code,
            signal=lc.signal,
            argv=tuple(lc.argv),
            detail=lc.detail,
            instance_id=lc.instance_id,
            duration_ms=lc.duration_ms,
        )
    elif kind == "gap":
        g = msg.gap
        payload = GapRecord(
            # What matters in a gap is what it counts: a reason from a newer peer must not make
            # the whole batch refused (and so stall the stream), so it is kept as unspecified.
            reason=_GAP_FROM_PB.get(g.reason, GapReason.UNSPECIFIED),
            dropped_records=g.dropped_records,
            dropped_bytes=g.dropped_bytes,
            first_sequence=g.first_sequence,
            last_sequence=g.last_sequence,
            detail=g.detail,
        )
    elif kind == "health":
        h = msg.health
        state = _HEALTH_FROM_PB.get(h.state)
        if state is None:
            raise WireError(f"event {msg.sequence}: unknown health state {h.state}")
        payload = HealthRecord(
            state=state,
            reasons=tuple(h.reasons),
            change=h.change,
            cpu_percent=h.cpu_percent,
            rss_bytes=h.rss_bytes,
            threads=h.threads,
            open_files=h.open_files,
            processes=h.processes,
            memory_current=h.memory_current,
            memory_max=h.memory_max,
            oom_kills=h.oom_kills,
            cpu_throttled_usec=h.cpu_throttled_usec,
            pids_current=h.pids_current,
            pids_max=h.pids_max,
            disks=tuple(DiskUsage(d.path, d.used_bytes, d.total_bytes) for d in h.disks),
        )
    else:
        raise WireError(f"event {msg.sequence}: no known kind (a newer peer?)")
    return Event(sequence=msg.sequence, timestamp_ms=msg.timestamp_ms, payload=payload)


def encode_event(event: Event) -> bytes:
    return event_to_proto(event).SerializeToString()


def decode_event(data: bytes) -> Event:
    msg = pb.Event()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable event ({len(data)} bytes): {exc}") from exc
    return event_from_proto(msg)


def describe(event: Event) -> str:
    """One human line for an event, as the upstream log path and the CLI show it."""
    p = event.payload
    if isinstance(p, LogRecord):
        return p.message
    if isinstance(p, LifecycleRecord):
        if p.kind is LifecycleKind.EXITED:
            sig = f", signal {p.signal}" if p.signal else ""
            # Upstream's ReportMainProcessExit carries no pid: 0 is "not known", not a process.
            who = f"main process {p.pid}" if p.pid else "main process"
            return f"{who} exited with code {p.exit_code}{sig}"
        if p.kind is LifecycleKind.STARTED:
            return f"main process started, pid {p.pid}: {' '.join(p.argv)}"
        if p.kind is LifecycleKind.START_FAILED:
            return f"main process could not start: {p.detail}"
        if p.kind is LifecycleKind.OFFLINE_POLICY:
            return f"offline policy after {p.duration_ms / 1000:.1f}s without the gateway: {p.detail}"
        if p.kind is LifecycleKind.RECONNECTED:
            return f"gateway reachable again after {p.duration_ms / 1000:.1f}s"
        return f"supervisor started (instance {p.instance_id})"
    if isinstance(p, HealthRecord):
        return describe_health(p)
    detail = f": {p.detail}" if p.detail else ""
    return (
        f"{p.dropped_records} records ({p.dropped_bytes} bytes) were dropped "
        f"({p.reason.value}{detail}), sequences {p.first_sequence}..{p.last_sequence}"
    )


def describe_health(record: HealthRecord) -> str:
    """E.g. ``health degraded: memory 91% of limit`` or ``health sample: healthy (rss 52.1 MiB, ...)``."""
    head = f"health {record.state.value}" if record.change else f"health sample: {record.state.value}"
    if record.reasons:
        return f"{head}: {'; '.join(record.reasons)}"
    return (
        f"{head} (rss {record.rss_bytes / 1048576:.1f} MiB, cpu {record.cpu_percent:.0f}%, "
        f"{record.processes} processes)"
    )


def event_to_log_line(sandbox_id: str, event: Event) -> pb.SandboxLogLine:
    """The upstream PushSandboxLogs form of an event, for a gateway without ``events``.

    Levels are upstream's names in upstream's case ("INFO", "WARN", "ERROR", "OCSF"): its
    supervisor sends tracing's level names, its CLI prints ``level`` as sent, and its gateway's
    level filter (openshell-server src/grpc/validation.rs ``level_matches``) upper-cases before it
    compares, with unknown names always passing. A captured line's target is its stream."""
    p = event.payload
    fields: tuple[tuple[str, str], ...] = ()
    if isinstance(p, LogRecord):
        if p.stream is LogStream.OCSF:
            level = "OCSF"
        elif p.level:
            level = p.level.upper()
        else:
            level = "ERROR" if p.stream is LogStream.STDERR else "INFO"
        target = p.target or p.stream.value
        fields = p.fields
    elif isinstance(p, GapRecord):
        level, target = "WARN", "openshell.supervisor.gap"
    elif isinstance(p, HealthRecord):
        level = "INFO" if p.state is HealthState.HEALTHY else "WARN"
        target = "openshell.supervisor.health"
    else:
        level, target = "INFO", "openshell.supervisor.lifecycle"
    line = pb.SandboxLogLine(
        sandbox_id=sandbox_id,
        timestamp_ms=event.timestamp_ms,
        level=level,
        target=target,
        message=describe(event),
        source="sandbox",
    )
    line.fields.update(fields)
    # Ours, set last: a structured line's own "sequence" field cannot hide the journal's.
    line.fields["sequence"] = str(event.sequence)
    return line


def command_to_proto(command: Command) -> pb.Command:
    msg = pb.Command(command_id=command.command_id)
    if command.kind is CommandKind.STOP:
        msg.stop.grace_ms = command.grace_ms
    elif command.kind is CommandKind.SIGNAL:
        msg.signal.signal = command.signal
    else:
        msg.heartbeat.interval_ms = command.interval_ms
    return msg


def command_from_proto(msg: pb.Command) -> Command:
    """The command, or WireError saying why it cannot be applied (its id is kept in the error)."""
    if not msg.command_id:
        raise WireError("command without a command_id")
    action = msg.WhichOneof("action")
    if action == "stop":
        return Command(msg.command_id, CommandKind.STOP, grace_ms=msg.stop.grace_ms)
    if action == "signal":
        if not 0 < msg.signal.signal < 65:
            raise WireError(f"command {msg.command_id}: signal {msg.signal.signal} is not a signal number")
        return Command(msg.command_id, CommandKind.SIGNAL, signal=msg.signal.signal)
    if action == "heartbeat":
        if msg.heartbeat.interval_ms < 100:
            raise WireError(
                f"command {msg.command_id}: heartbeat interval {msg.heartbeat.interval_ms} ms is below 100 ms"
            )
        return Command(msg.command_id, CommandKind.HEARTBEAT, interval_ms=msg.heartbeat.interval_ms)
    raise WireError(f"command {msg.command_id}: no known action (a newer gateway?)")


def result_to_proto(result: CommandResult) -> pb.CommandResult:
    return pb.CommandResult(
        command_id=result.command_id, applied=result.applied, error=result.error, duplicate=result.duplicate
    )


def result_from_proto(msg: pb.CommandResult) -> CommandResult:
    if not msg.command_id:
        raise WireError("command result without a command_id")
    return CommandResult(msg.command_id, applied=msg.applied, error=msg.error, duplicate=msg.duplicate)


def describe_command(command: Command) -> str:
    if command.kind is CommandKind.STOP:
        return f"stop, grace {command.grace_ms} ms" if command.grace_ms else "stop"
    if command.kind is CommandKind.SIGNAL:
        return f"signal {command.signal}"
    return f"heartbeat every {command.interval_ms} ms"
