"""Test helpers for the journal."""

from __future__ import annotations

import os
import time
from pathlib import Path

from openshell_wire.records import Event, Payload
from supervisor.journal import Journal, JournalOptions


def open_journal(directory: Path, **options: object) -> Journal:
    """``Journal.open`` with ``JournalOptions(directory=directory, **options)``."""
    return Journal.open(JournalOptions(directory=directory, **options))  # type: ignore[arg-type]


def read_all(journal: Journal, after: int = 0, *, max_records: int = 500) -> list[Event]:
    """Every record above ``after``, read in pages of ``max_records`` as a session reads them."""
    out: list[Event] = []
    while batch := journal.read_after(after, max_records=max_records):
        out.extend(batch)
        after = batch[-1].sequence
    return out


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
