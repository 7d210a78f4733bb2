"""The journal's small persisted state: its epoch, the acknowledged point, the highest sequence.

Segments alone cannot say everything: once all of them are trimmed after an acknowledgement, or
after ``advance_to`` moved the sequence past what is on disk, the next sequence number would be
forgotten and reused, which the gateway (storing on epoch + sequence) would take for a duplicate.
So ``state.json`` holds::

    {"format": 1, "epoch": "<uuid4 hex>", "acked_through": N, "last_sequence": M, "sent_through": S,
     "written_through": W}

It is rewritten atomically (``fsio.atomic_write``) whenever those must survive a restart. On open
the journal takes the larger of ``last_sequence`` and what the segments hold.

``sent_through`` is at or above every sequence put on the wire (the journal writes it ahead, in
steps, before sending past it): after a restart, records at or below it may be stored by the
gateway although never acknowledged, so they must not be evicted into an overflow gap whose own
sequence the gateway already holds. Files written before it existed lack it: it is then taken as
``acked_through``.

``written_through`` is the highest sequence the segments accounted for when the state was saved
(unlike ``last_sequence``, never moved by ``advance_to``): on open, segments that end below it lost
their newest file (or a power failure took an unsynced tail), and the missing sequences become a
CORRUPT gap. Files written before it existed lack it (``None``): that version named segments after
their first record, not in a chain, and on a rebuild saved ``acked_through`` 0, so the journal then
checks neither the newest file nor the names below the first segment (see ``Journal``). A missing
file means a new journal; an unreadable one raises :class:`StateFileError` and the journal rebuilds
from its segments under a new epoch (the gateway then sees a new journal rather than a mix of two),
saving ``acked_through`` just below its first segment: nothing below it is in that new epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from supervisor.journal.fsio import atomic_write

STATE_FILE = "state.json"
_FORMAT = 1


class StateFileError(Exception):
    """The state file exists but cannot be used; the text says why."""


@dataclass(frozen=True, slots=True)
class JournalState:
    epoch: str
    acked_through: int
    last_sequence: int
    sent_through: int = 0
    #: None: the file was written by a version without it (see the module docstring).
    written_through: int | None = None


def load_state(directory: Path) -> JournalState | None:
    """The stored state, or None when there is none yet. Raises StateFileError if it is unusable."""
    path = directory / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc}") from exc
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateFileError(f"{path}: expected a JSON object")
    if data.get("format") != _FORMAT:
        raise StateFileError(f"{path}: unknown format {data.get('format')!r}")
    epoch = data.get("epoch")
    acked = data.get("acked_through")
    last = data.get("last_sequence")
    if not isinstance(epoch, str) or not epoch:
        raise StateFileError(f"{path}: missing or empty epoch")
    for name, value in (("acked_through", acked), ("last_sequence", last)):
        if type(value) is not int or value < 0:
            raise StateFileError(f"{path}: {name} must be a non-negative integer, not {value!r}")
    assert isinstance(acked, int) and isinstance(last, int)
    sent = data.get("sent_through", acked)
    if type(sent) is not int or sent < 0:
        raise StateFileError(f"{path}: sent_through must be a non-negative integer, not {sent!r}")
    written = data.get("written_through")
    if written is not None and (type(written) is not int or written < 0):
        raise StateFileError(f"{path}: written_through must be a non-negative integer, not {written!r}")
    return JournalState(
        epoch=epoch,
        acked_through=min(acked, last),
        last_sequence=last,
        sent_through=max(sent, acked),
        written_through=None if written is None else min(written, last),
    )


def save_state(directory: Path, state: JournalState) -> None:
    """Durably replace the state file. Raises OSError."""
    body = {
        "format": _FORMAT,
        "epoch": state.epoch,
        "acked_through": state.acked_through,
        "last_sequence": state.last_sequence,
        "sent_through": state.sent_through,
        "written_through": state.written_through,
    }
    atomic_write(directory / STATE_FILE, [json.dumps(body).encode() + b"\n"])
