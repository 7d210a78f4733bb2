"""What a journal is configured with, and what it reports about itself.

:class:`JournalOptions` is built once by the supervisor's config and handed to ``Journal.open``;
:class:`JournalStats` is a snapshot that metrics and the health endpoint read. Both are plain frozen
values so they can be logged and compared without touching the journal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class FsyncPolicy(enum.Enum):
    #: fsync after every append: nothing acknowledged by ``append`` is lost on power failure.
    ALWAYS = "always"
    #: fsync the segment being written every ``fsync_interval_s`` (``run_fsync_loop``): a power
    #: failure loses at most that window, which the gateway may already hold (``advance_to``).
    INTERVAL = "interval"
    #: leave it to the kernel; only ``sync``, segment rewrites and ``close`` fsync.
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class JournalOptions:
    directory: Path
    #: A segment past this size is closed and a new one started; eviction and trimming work on
    #: whole closed segments, so this is also their granularity.
    segment_bytes: int = 4 * 1024 * 1024
    #: Bound on all segments together. Past it, the oldest unsent log records are replaced by
    #: overflow gap records; lifecycle and gap records are never dropped, so it is soft for them.
    max_bytes: int = 64 * 1024 * 1024
    fsync: FsyncPolicy = FsyncPolicy.INTERVAL
    fsync_interval_s: float = 0.2
    #: How far ahead of what is sent the state file's ``sent_through`` is written, in sequences:
    #: one state write per this many records sent. After a restart up to this many records that
    #: were never sent stay unevictable until sent (8 batches of the session's default 4,000).
    sent_reserve: int = 32_000
    #: Bytes kept allocated in the ``reserve`` file beside the segments. When a write meets a full
    #: disk the journal frees them, and uses the room only for what must not be lost: the gap
    #: record counting the lines it could not write, health changes and lifecycle records; log
    #: lines are counted, not written, until the reserve can be allocated again (with as much again
    #: free). The directory holds up to ``max_bytes`` plus this. 0: no reserve.
    reserve_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.segment_bytes <= 0:
            raise ValueError(f"journal segment_bytes must be positive, not {self.segment_bytes}")
        if self.max_bytes <= 0:
            raise ValueError(f"journal max_bytes must be positive, not {self.max_bytes}")
        if self.reserve_bytes < 0:
            raise ValueError(f"journal reserve_bytes must not be negative, not {self.reserve_bytes}")
        if self.sent_reserve <= 0:
            raise ValueError(f"journal sent_reserve must be positive, not {self.sent_reserve}")
        if not self.fsync_interval_s > 0:
            raise ValueError(f"journal fsync_interval_s must be positive, not {self.fsync_interval_s}")


@dataclass(frozen=True, slots=True)
class JournalStats:
    bytes_on_disk: int
    #: Records held in segments (including gap records and acknowledged ones not yet trimmed).
    records: int
    segments: int
    first_sequence: int
    last_sequence: int
    acked_through: int
    sent_through: int
    #: Log records replaced by overflow gap records since open.
    dropped_records_total: int
    #: Records lost to corruption found since open (at open, or by a read that hit damage), and
    #: to segment files found missing or unreadable (by a read: leaving out what this run had
    #: already sent, which the gateway most likely holds; at open all unacknowledged ones).
    corrupt_records_total: int
    #: Records that could not be written (disk full, I/O error) since open; each is counted by a
    #: WRITE_FAILED gap record, written before any newer record as soon as the disk takes it.
    write_failed_records_total: int = 0
    #: Appends that failed since open (a lifecycle record retried until it is written counts once
    #: per attempt here, but is not among the failed records).
    write_errors_total: int = 0
    #: Failed records not yet covered by a gap record on disk (the disk still refuses it).
    write_failed_pending: int = 0
    #: Why the journal cannot write right now (e.g. "No space left on device"), or None.
    write_problem: str | None = None
    #: The cause of the latest failed append, in words ("" if none failed since open).
    last_write_error: str = ""
