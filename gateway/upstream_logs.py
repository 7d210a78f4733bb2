"""What a PushSandboxLogs line becomes in the store: the one place an upstream ``SandboxLogLine``
is read (docs/protocol.md, "Upstream log lines").

Upstream's supervisor pushes its own tracing output: ``level`` is the tracing level's Display in
upper case (``TRACE`` ... ``ERROR``) or ``OCSF`` for an OCSF event, whose ``target`` is ``ocsf``
and whose message is upstream's OCSF shorthand text (not JSON); ``fields`` are the event's other
tracing fields. Our own supervisor, in its upstream form (``openshell_wire.convert.
event_to_log_line``), sends the main process's output with the target ``stdout`` or ``stderr``.
So the target says which stream a line is of, and the level is kept as a name, not turned into one.
"""

from __future__ import annotations

from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb

#: Level spellings that name the same level (tracing says WARN, other loggers WARNING).
LEVEL_ALIASES = {"warning": "warn"}
#: The level and target upstream gives an OCSF event's line.
OCSF = "ocsf"
#: Targets that name a captured stream of the main process (what our supervisor sends).
CAPTURED = {LogStream.STDOUT.value: LogStream.STDOUT, LogStream.STDERR.value: LogStream.STDERR}


def normalize_level(level: str) -> str:
    """The level as a lower-case name, matched case-insensitively: ``WARN``, ``warning`` and
    ``Warn`` are all ``warn``; empty stays empty."""
    name = level.strip().lower()
    return LEVEL_ALIASES.get(name, name)


def log_record(line: pb.SandboxLogLine) -> LogRecord:
    """The record stored for one pushed line: its stream from the target (``ocsf`` level or target:
    OCSF; ``stdout``/``stderr``: that stream; anything else: the supervisor's own output), its
    message as it came, and its level, target and fields kept."""
    level = normalize_level(line.level)
    target = line.target
    if level == OCSF or target.strip().lower() == OCSF:
        stream = LogStream.OCSF
    else:
        stream = CAPTURED.get(target, LogStream.SUPERVISOR)
    return LogRecord(
        stream=stream,
        message=line.message,
        level=level,
        target=target,
        # A protobuf map has no order of its own: sorted, so the same line is stored the same way.
        fields=tuple(sorted(line.fields.items())),
    )
