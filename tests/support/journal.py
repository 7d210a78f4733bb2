"""Test helpers for the journal."""

from __future__ import annotations

import os
import time

from openshell_wire.records import Event, Payload
from supervisor.journal import Journal


def append(journal: Journal, payload: Payload, *, timestamp_ms: int | None = None) -> Event:
    """``journal.append`` that returns the record as read_after will give it back."""
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    return Event(journal.append(payload, timestamp_ms=timestamp_ms), timestamp_ms, payload)


def crash(journal: Journal) -> None:
    """Drop ``journal`` as a killed process would: its descriptors (and so its directory lock) are
    released, nothing is fsynced or saved."""
    for fd in (journal._fd, journal._lock_fd):
        if fd >= 0:
            os.close(fd)
    journal._fd = journal._lock_fd = -1
    journal._close_reader()
