"""The Journal: an append-only, crash-safe, byte-bounded queue of records between capture and session.

Flow: capture and the process supervisor call :meth:`Journal.append` (synchronous, one ``write``
per record, fsync by policy), which assigns the next sequence number and wakes the session task
waiting in :meth:`Journal.wait_for_append`. The session reads with :meth:`Journal.read_raw_after`
(the stored protobuf bytes, CRC-checked, forwarded without decoding; :meth:`Journal.read_after`
decodes them into records), marks what it puts on the wire with :meth:`Journal.mark_sent`, and
passes the gateway's acknowledgements to :meth:`Journal.ack`, which deletes whole segments. After
a reconnect the session reads again from the gateway's resume point; a read that jumps backwards
rescans one segment, a read that continues where the last one stopped resumes from a cached file
offset.

Guarantees and their limits:

* Sequences are never reused, even after every segment is trimmed or the tail is lost: the highest
  sequence ever assigned lives in the state file (``state``) whenever the segments cannot tell it.
* Nothing is lost silently. Damage found at open (or by a read) is replaced in place by a CORRUPT
  gap record; log lines evicted by the byte bound are replaced by OVERFLOW gap records that count
  them exactly (periodic health samples count as log lines here, see ``frames``). Lifecycle, gap and
  health-change records are never evicted, nor is anything already sent.
* A reader resuming strictly inside a gap's range (the gateway stored the first records it stands
  for before a restart forgot they were sent) gets the rest of it: the gap is split there on disk
  (``_split``) and the part above, counting exactly the records above, is delivered.
* The byte bound is enforced on closed segments only, oldest first, each rewritten at most once
  (after which it holds nothing evictable), down to a low-water mark below ``max_bytes``, so the
  cost is amortised over many appends.
* One journal per directory: ``open`` takes an exclusive ``flock`` on its ``lock`` file, held
  until ``close`` (or the process's death), so a second supervisor over it fails fast.
* A failed append (disk full, I/O error) raises :class:`JournalError` and cuts the file back to the
  last whole frame (a torn frame that cannot be cut is left past the indexed size, and its segment
  closed: a later scan bounds it by the next segment's name, so it is counted once, by the gap
  below). It is never silent: a log line (or periodic health sample) that could not be written is
  counted, and the count goes to disk as a WRITE_FAILED gap record (the error in its ``detail``)
  before any newer record, taking the sequences of what it stands for. Lifecycle-class records
  (lifecycle, health changes) are not counted: their callers retry (``lost`` counts one given up).
* A full disk frees the ``reserve`` file (``reserve_bytes`` preallocated at open) and uses that
  room only for gap, health-change and lifecycle records, and for the state file and lost-segment
  gaps without which nothing could be acknowledged, trimmed or delivered again (``_with_room``);
  log lines are counted, not written, until ``maintain`` (every second under every policy, from
  ``run_fsync_loop``) has written the pending gap and can allocate the reserve again with as much
  again to spare. Its limits: the reserve holds a few thousand such records; another process may
  take the freed room first; and a crash while failed records wait for their gap loses their
  count (``close`` and ``maintain`` write it as soon as the disk takes it).
* A segment file found missing (a hole in the chained names, a newest file gone below the state
  file's ``written_through``, saved at every roll) or unreadable (EIO, the file set aside as
  ``.bad``), at open or by a read, is replaced by a CORRUPT gap counting every unacknowledged
  sequence it held, and the rest of the journal still delivers. Segments are deleted only once the
  state file has their acknowledgement, and a rebuilt state file starts just below the first
  segment, so a hole below the first name is always a lost file. Not told: what the newest segment
  got since the state was last saved, if that file is lost in a crash.

Everything runs on the event loop's thread: the only awaits are in ``wait_for_append`` and
``run_fsync_loop``, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from zlib import crc32

from openshell_wire.convert import WireError, decode_event, encode_event
from openshell_wire.records import Event, GapReason, GapRecord, JournalEpoch, LogRecord, Payload
from supervisor.journal.codec import PayloadEncoder
from supervisor.journal.errors import JournalError, io_error
from supervisor.journal.frames import (
    HEADER_SIZE,
    KINDS,
    MAGIC,
    MAX_PAYLOAD,
    PREFIX_SIZE,
    Kind,
    encode_frame,
    kind_of,
    pack_crc,
    pack_prefix,
    unpack_header,
)
from supervisor.journal.fsio import TMP_SUFFIX, atomic_write, fsync_directory
from supervisor.journal.options import FsyncPolicy, JournalOptions, JournalStats
from supervisor.journal.segments import (
    Rewritten,
    Segment,
    describe_damage,
    gap_frame,
    list_segments,
    rewrite,
    scan,
    segment_name,
    straddling_gap,
)
from supervisor.journal.state import JournalState, StateFileError, load_state, save_state

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024
_OPEN_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
_EVICT_RETRY_S = 1.0
#: Held (flock) by the open journal, so a second supervisor over the same directory fails fast.
LOCK_NAME = "lock"
#: Preallocated room given up on a full disk for the records that must not be lost (``reserve_bytes``).
RESERVE_NAME = "reserve"
#: An unreadable segment file is kept under its name plus this (``_set_aside``).
BAD_SUFFIX = ".bad"
#: How often a freed reserve is allocated again at most (each try is a failing fallocate).
_RESERVE_RETRY_S = 1.0
#: How often ``run_fsync_loop`` runs ``maintain``.
_MAINTAIN_S = 1.0
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_LOG = int(Kind.LOG)
_GAP = int(Kind.GAP)
_T = TypeVar("_T")


class _Damaged(Exception):
    """A read met bytes that are not a valid frame; the segment needs a repair scan."""

    def __init__(self, segment: Segment) -> None:
        super().__init__(str(segment.path))
        self.segment = segment


class _Straddle(Exception):
    """A read resumes inside the range of a gap record: the segment needs that gap split there."""

    def __init__(self, segment: Segment) -> None:
        super().__init__(str(segment.path))
        self.segment = segment


class _Lost(Exception):
    """A read found a segment file missing or unreadable: its records are replaced by a gap."""

    def __init__(self, segment: Segment, reason: str) -> None:
        super().__init__(str(segment.path))
        self.segment = segment
        self.reason = reason


class _WriteFailed(Exception):
    """An append's write failed; ``error`` says where and why, ``code`` is the errno if any."""

    def __init__(self, error: JournalError, code: int | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.code = code

    @property
    def full(self) -> bool:
        return self.code in _FULL

    @property
    def reason(self) -> str:
        """The cause in words, as a gap's detail and a health reason say it."""
        return os.strerror(self.code) if self.code else str(self.error)


class _Cursor(NamedTuple):
    after: int
    segment: Segment
    generation: int
    offset: int


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Journal:
    """See the module docstring. Build with :meth:`Journal.open`; not safe across threads."""

    def __init__(self, options: JournalOptions) -> None:
        self._options = options
        self._dir = options.directory
        self._policy = options.fsync
        self._always = options.fsync is FsyncPolicy.ALWAYS
        self._segment_bytes = options.segment_bytes
        self._max_bytes = options.max_bytes
        self._segments: list[Segment] = []
        self._active: Segment | None = None
        self._fd = -1
        #: Closed segments not yet rewritten by eviction, oldest first.
        self._compactable: deque[Segment] = deque()
        self._bytes = 0
        self._records = 0
        self._epoch = JournalEpoch("")
        self._last_sequence = 0
        self._acked = 0
        self._sent = 0
        #: What the state file says was sent at most (written ahead of ``_sent``; see ``state``).
        self._sent_reserved = 0
        self._dropped_total = 0
        self._corrupt_total = 0
        self._dirty = False
        self._state_dirty = False
        self._closed = True
        self._encoder = PayloadEncoder()
        self._waiters: list[asyncio.Future[None]] = []
        self._cursor: _Cursor | None = None
        self._reader: tuple[Segment, int, int] | None = None
        self._lock_fd = -1
        self._evict_retry_at = 0.0
        # Failed writes (see ``append``): what waits for its WRITE_FAILED gap, and the reserve.
        self._troubled = False
        self._pending_records = 0
        self._pending_bytes = 0
        self._pending_detail = ""
        self._write_problem: str | None = None
        self._last_write_error = ""
        self._last_error_message = ""
        self._write_failed_total = 0
        self._write_errors_total = 0
        self._reserve_bytes = options.reserve_bytes
        self._reserve_fd = -1
        self._reserve_released = False
        self._reserve_retry_at = 0.0
        #: ``written_through`` as last saved: kept when every segment is gone (see ``state``).
        self._written_floor = 0
        #: Acknowledged segments wait for a state file saying so before they are deleted (``ack``).
        self._trim_pending = False
        #: The highest sequence put on the wire in this run (``_sent`` starts at the state file's
        #: mark, written ahead): what a lost segment's gap counts as lost starts above it.
        self._wire = 0

    # ------------------------------------------------------------------ open / recovery

    @classmethod
    def open(cls, options: JournalOptions) -> Journal:
        journal = cls(options)
        journal._recover()
        return journal

    def _recover(self) -> None:
        directory = self._dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error("use the journal directory", directory, exc) from exc
        self._lock_directory()
        try:
            self._recover_locked()
        except BaseException:
            self._unlock_directory()
            raise

    def _lock_directory(self) -> None:
        """Take the directory for this journal alone: two writers would corrupt each other."""
        directory = self._dir
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise io_error("open the lock file", path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalError(
                    f"journal: {directory} is in use by another process (another supervisor holds "
                    f"the lock on {path}); each supervisor needs a journal directory of its own"
                ) from None
            raise io_error("lock", path, exc) from exc
        self._lock_fd = fd

    def _unlock_directory(self) -> None:
        if self._lock_fd >= 0:
            # Closing the descriptor releases the lock; the file itself stays, harmlessly.
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1

    def _recover_locked(self) -> None:
        directory = self._dir
        try:
            for leftover in directory.glob("*" + TMP_SUFFIX):
                leftover.unlink()
            found = list_segments(directory)
        except OSError as exc:
            raise io_error("use the journal directory", directory, exc) from exc
        state: JournalState | None
        try:
            state = load_state(directory)
        except StateFileError as exc:
            log.warning(
                "journal: %s; rebuilding from the segments under a new epoch "
                "(the gateway will see a new journal)",
                exc,
            )
            state = None
        else:
            if state is None and found:
                log.warning("journal: %s has segments but no state file; starting a new epoch", directory)
        if state is None:
            # A new journal, or one rebuilt under a new epoch: nothing below its first segment is in
            # it, so its acknowledged point starts there (saved as 0, the next open would take every
            # sequence below the first name for a missing file, and deliver that false gap).
            acked = found[0][0] - 1 if found else 0
        elif state.written_through is None and found:
            # Written by the version before chained names, whose rebuild saved 0 here and whose
            # acknowledgement could trim segments without saving the state: no hole below the first.
            acked = max(state.acked_through, found[0][0] - 1)
        else:
            acked = state.acked_through
        covered = state.last_sequence if state is not None else 0
        now_ms = _now_ms()
        # Room for the gap records below on a full disk: the reserve the last run left (``_with_room``).
        self._open_reserve()
        # The first sequence not accounted for yet. Segment names chain (``_start_segment``), so
        # a name above it means the file holding it went missing.
        expected = acked + 1
        for index, (base, path) in enumerate(found):
            upper = found[index + 1][0] if index + 1 < len(found) else None
            if base > expected:
                self._segments.append(
                    self._gap_segment(expected, base - 1, detail="segment file missing", now_ms=now_ms)
                )
            try:
                data = path.read_bytes()
            except OSError as exc:
                last = upper - 1 if upper is not None else max(base, covered)
                segment = self._gap_segment(
                    max(base, expected),
                    last,
                    detail=f"segment unreadable: {_strerror(exc)}",
                    now_ms=now_ms,
                    path=path,
                    base=base,
                )
                self._segments.append(segment)
                # A file wholly acknowledged gives an empty entry ending below ``expected``.
                expected = max(expected, segment.covered_through + 1)
                continue
            result = scan(data, base=base, upper=upper)
            segment = Segment(
                path,
                base,
                size=len(data),
                records=result.records,
                first_sequence=result.first_sequence,
                last_sequence=result.last_sequence,
                last_log_sequence=result.last_log_sequence,
                gap_through=result.covered_through,
            )
            damages = result.damages
            if damages:
                for damage in damages:
                    log.warning(describe_damage(path, damage))
                try:
                    rewritten = rewrite(path, data, result, evict_above=None, now_ms=now_ms)
                except OSError as exc:
                    raise io_error("repair journal segment", path, exc) from exc
                self._apply_rewrite(segment, rewritten, counted=False)
                self._corrupt_total += rewritten.corrupt_records
            # Written by an earlier run, perhaps by another version: raw reads check them.
            segment.untrusted_below = segment.size
            self._segments.append(segment)
            expected = max(expected, segment.covered_through + 1)
        written_through = state.written_through if state is not None else None
        if written_through is not None and written_through >= expected:
            # The segments end below what the state file saw written: the newest segment file went
            # missing (or a power failure took what was not fsynced yet). Whatever of it the
            # gateway holds already lies at or below its resume point, so is never sent again.
            self._segments.append(
                self._gap_segment(expected, written_through, detail="segment file missing", now_ms=now_ms)
            )
        self._written_floor = written_through or 0
        for segment in self._segments:
            covered = max(covered, segment.covered_through)
        self._last_sequence = covered
        self._acked = min(acked, covered)
        # What the last run may have sent without an acknowledgement coming back: protected from
        # eviction like anything sent in this run (see ``state``).
        self._sent = max(self._acked, min(state.sent_through if state is not None else 0, covered))
        self._sent_reserved = self._sent
        self._epoch = JournalEpoch(state.epoch if state is not None else uuid.uuid4().hex)
        try:
            self._save_state()
        except OSError as exc:
            raise io_error("write the journal state file in", directory, exc) from exc
        # Empty segments (a crash right after a roll) and fully acknowledged ones (a crash between
        # saving the state and unlinking) are dropped now, so the index only holds real records.
        kept: list[Segment] = []
        for segment in self._segments:
            if segment.records == 0 or segment.covered_through <= self._acked:
                self._unlink(segment)
            else:
                kept.append(segment)
        self._segments = kept
        self._bytes = sum(s.size for s in kept)
        self._records = sum(s.records for s in kept)
        newest = kept[-1] if kept else None
        if newest is not None and newest.size < self._segment_bytes:
            try:
                self._fd = os.open(newest.path, _OPEN_APPEND)
            except OSError as exc:
                raise io_error("open journal segment", newest.path, exc) from exc
            self._active = newest
        self._compactable.extend(s for s in kept if s is not self._active)
        self._closed = False
        if self._allocate_reserve():
            # Freed above for a gap record (``_with_room``) and back now: nothing waits for room.
            self._reserve_released = self._troubled = False
        else:
            self._reserve_released = self._troubled = True
            self._reserve_retry_at = time.monotonic() + _RESERVE_RETRY_S
            self._write_problem = "no room for the journal's reserve (the disk is full)"
            log.error("journal: %s: %s; log lines are counted, not written", directory, self._write_problem)
        if self._bytes > self._max_bytes:
            self._enforce_bound()

    def _gap_segment(
        self,
        first: int,
        last: int,
        *,
        detail: str,
        now_ms: int,
        path: Path | None = None,
        base: int | None = None,
    ) -> Segment:
        """A segment file holding one CORRUPT gap for ``first..last``, in place of a segment file
        found missing (a new file) or unreadable (``path``, named ``base``: set aside, see
        ``_set_aside``)."""
        if path is None or base is None:
            path, base = self._dir / segment_name(first), first
        elif last >= first:
            self._set_aside(path)
        if last < first:
            # Nothing unacknowledged was in it: the empty entry is dropped (and the file deleted).
            return Segment(path, base, last_sequence=base - 1)
        count = last - first + 1
        frame = gap_frame(
            GapReason.CORRUPT, first=first, last=last, count=count, nbytes=0, now_ms=now_ms, detail=detail
        )
        try:
            size = self._with_room(lambda: atomic_write(path, [frame]))
        except OSError as exc:
            raise io_error("write a gap record for a lost segment to", path, exc) from exc
        self._corrupt_total += count
        log.warning(
            "journal: %s (%s): sequences %d..%d (%d records) replaced by a gap",
            path,
            detail,
            first,
            last,
            count,
        )
        return Segment(
            path, base, size=size, records=1, first_sequence=first, last_sequence=first, gap_through=last
        )

    # ------------------------------------------------------------------ properties

    @property
    def epoch(self) -> JournalEpoch:
        return self._epoch

    @property
    def first_sequence(self) -> int:
        for segment in self._segments:
            if segment.records:
                return segment.first_sequence
        return 0

    @property
    def last_sequence(self) -> int:
        return self._last_sequence

    @property
    def acked_through(self) -> int:
        return self._acked

    @property
    def options(self) -> JournalOptions:
        return self._options

    # ------------------------------------------------------------------ append

    def append(self, payload: Payload, *, timestamp_ms: int | None = None) -> int:
        """Journal ``payload``; return its sequence number. Raises :class:`JournalError`.

        A failure is never silent. A log line or periodic health sample (an evictable record)
        that cannot be written is counted, and the count is written as a WRITE_FAILED gap record
        before any newer record as soon as the disk takes one (``maintain`` also tries). A
        lifecycle-class record (lifecycle, health change) is not counted: its caller keeps it and
        retries, or calls :meth:`lost` when it gives up. On a full disk the reserve is freed and
        used for exactly those (see ``JournalOptions.reserve_bytes``).
        """
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        if self._troubled:
            return self._append_troubled(payload, timestamp_ms, retry=True)
        sequence = self._last_sequence + 1
        # This is the hot path (one call per captured line): encode_frame is inlined and the
        # kind is a plain int; see benchmarks/journal_append.py for what each step costs.
        if type(payload) is LogRecord:
            kind = _LOG
            data = self._encoder.encode_log(sequence, timestamp_ms, payload)
        else:
            kind = kind_of(payload)
            data = self._encoder.encode(sequence, timestamp_ms, payload)
        prefix = pack_prefix(MAGIC, sequence, kind, len(data))
        frame = prefix + pack_crc(crc32(data, crc32(prefix))) + data
        segment = self._active
        if segment is None:
            # Starting a segment (and the closed check): the general path.
            try:
                self._write_frame(frame, sequence=sequence, kind=kind, through=sequence)
            except _WriteFailed as failed:
                return self._failed(failed, payload, timestamp_ms, kind=kind, size=len(data), retry=True)
            return sequence
        # ``_write_frame``, inlined for the hot path; keep the two in step.
        fd = self._fd
        size = len(frame)
        try:
            written = os.write(fd, frame)
            while written < size:
                # A short write is how a regular file reports the first bytes past a full disk;
                # the next write raises ENOSPC, which lands in the except below.
                written += os.write(fd, frame[written:])
            if self._always:
                os.fsync(fd)
        except OSError as exc:
            self._cut_back(segment)
            error = _WriteFailed(io_error("append to journal segment", segment.path, exc), exc.errno)
            return self._failed(error, payload, timestamp_ms, kind=kind, size=len(data), retry=True)
        segment.size += size
        segment.records += 1
        segment.last_sequence = sequence
        if kind == _LOG:
            segment.last_log_sequence = sequence
        self._bytes += size
        self._records += 1
        self._last_sequence = sequence
        self._dirty = True
        if segment.size >= self._segment_bytes:
            self._roll()
        if self._bytes > self._max_bytes:
            self._enforce_bound()
        if self._waiters:
            self._wake()
        return sequence

    def lost(self, payload: Payload) -> None:
        """Count ``payload``, which its caller could not append and stops retrying, in the next
        WRITE_FAILED gap (for lifecycle-class records; evictable ones are counted by ``append``)."""
        self._count_failed(self._payload_size(payload, _now_ms()))

    def _payload_size(self, payload: Payload, timestamp_ms: int) -> int:
        """The bytes of ``payload``'s record, as a gap's ``dropped_bytes`` counts them everywhere
        (an OVERFLOW gap, a failed write): the encoded record, without the frame header."""
        return len(self._encoder.encode(self._last_sequence + 1, timestamp_ms, payload))

    def _append_troubled(self, payload: Payload, timestamp_ms: int, *, retry: bool) -> int:
        """``append`` while failed records wait for their gap, or while the reserve is freed."""
        kind = _LOG if type(payload) is LogRecord else int(kind_of(payload))
        if self._reserve_released and kind == _LOG and not self._restore_reserve():
            # The room freed from the reserve is for what must not be lost; a log line is
            # counted (in the gap written before the next record) instead of written.
            self._count_failed(self._payload_size(payload, timestamp_ms))
            raise JournalError(
                f"{self._last_error_message or f'journal: {self._dir} is full'}; log record counted in a "
                f"gap record, not written (the freed reserve is kept for what must not be lost)"
            )
        size = self._payload_size(payload, timestamp_ms)
        try:
            if self._pending_records:
                self._write_pending()
            sequence = self._last_sequence + 1
            data = self._encoder.encode(sequence, timestamp_ms, payload)
            frame = encode_frame(sequence, kind, data)
            self._write_frame(frame, sequence=sequence, kind=kind, through=sequence)
        except _WriteFailed as failed:
            return self._failed(failed, payload, timestamp_ms, kind=kind, size=size, retry=retry)
        self._wrote()
        return sequence

    def _failed(
        self, failed: _WriteFailed, payload: Payload, timestamp_ms: int, *, kind: int, size: int, retry: bool
    ) -> int:
        """After a failed write: free the reserve on a full disk and try once more, else count an
        evictable record for its gap; raise the error (or return the sequence of the retry)."""
        if self._closed:
            raise failed.error
        self._note_failure(failed)
        if retry and failed.full and self._release_reserve():
            return self._append_troubled(payload, timestamp_ms, retry=False)
        if kind == _LOG:
            self._count_failed(size)
            raise JournalError(f"{failed.error}; the record is counted in a gap record") from None
        raise failed.error

    def _count_failed(self, size: int) -> None:
        self._pending_records += 1
        self._pending_bytes += size
        self._pending_detail = self._last_write_error or "write failed"
        self._write_failed_total += 1
        self._troubled = True

    def _note_failure(self, failed: _WriteFailed) -> None:
        # Through the slow path until a write goes through (``_wrote``), which ends the problem.
        self._troubled = True
        self._write_errors_total += 1
        self._last_write_error = failed.reason
        self._last_error_message = str(failed.error)
        if self._write_problem is None:
            log.error("journal: %s", failed.error)
        self._write_problem = failed.reason

    def _wrote(self) -> None:
        """A write went through: the journal is well again unless it still runs on its reserve."""
        if self._reserve_released or self._pending_records:
            return
        self._troubled = False
        if self._write_problem is not None:
            log.warning("journal: %s takes writes again (after: %s)", self._dir, self._write_problem)
            self._write_problem = None

    def _write_pending(self) -> None:
        """Write the WRITE_FAILED gap for the records that could not be written. Raises _WriteFailed."""
        count = self._pending_records
        first = self._last_sequence + 1
        last = first + count - 1
        frame = gap_frame(
            GapReason.WRITE_FAILED,
            first=first,
            last=last,
            count=count,
            nbytes=self._pending_bytes,
            now_ms=_now_ms(),
            detail=self._pending_detail,
        )
        # The gap takes the sequences of what it stands for, as an eviction gap does, so that a
        # gap's range always holds exactly the records it counts.
        self._write_frame(frame, sequence=first, kind=_GAP, through=last)
        self._pending_records = self._pending_bytes = 0
        log.warning(
            "journal: %d records could not be written (%s): counted by a gap record, sequences %d..%d",
            count,
            self._pending_detail,
            first,
            last,
        )

    def _write_frame(self, frame: bytes, *, sequence: int, kind: int, through: int) -> None:
        """Append one frame of ``sequence`` (standing for sequences up to ``through``): all of it
        or, cut back, nothing. Raises _WriteFailed."""
        segment = self._active
        if segment is None:
            # Also the closed check: a closed journal has no active segment.
            try:
                segment = self._start_segment(sequence)
            except JournalError as exc:
                cause = exc.__cause__
                raise _WriteFailed(exc, cause.errno if isinstance(cause, OSError) else None) from None
        fd = self._fd
        size = len(frame)
        try:
            written = os.write(fd, frame)
            while written < size:
                # A short write is how a regular file reports the first bytes past a full disk;
                # the next write raises ENOSPC, which lands in the except below.
                written += os.write(fd, frame[written:])
            if self._always:
                os.fsync(fd)
        except OSError as exc:
            self._cut_back(segment)
            raise _WriteFailed(io_error("append to journal segment", segment.path, exc), exc.errno) from None
        segment.size += size
        segment.records += 1
        segment.last_sequence = sequence
        if kind == _LOG:
            segment.last_log_sequence = sequence
        if through != sequence:
            segment.gap_through = max(segment.gap_through, through)
        self._bytes += size
        self._records += 1
        self._last_sequence = through
        self._dirty = True
        if segment.size >= self._segment_bytes:
            self._roll()
        if self._bytes > self._max_bytes:
            self._enforce_bound()
        if self._waiters:
            self._wake()

    # ------------------------------------------------------------------ the reserve

    def _open_reserve(self) -> None:
        """Open the reserve file (as the last run left it) without allocating it yet."""
        if self._reserve_bytes == 0 or self._reserve_fd >= 0:
            return
        with contextlib.suppress(OSError):  # ``_allocate_reserve`` tries again, and says why
            self._reserve_fd = os.open(self._dir / RESERVE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _allocate_reserve(self) -> bool:
        """Make the reserve file hold ``reserve_bytes`` again; False when the disk has no room."""
        if self._reserve_bytes == 0:
            return True
        try:
            if self._reserve_fd < 0:
                self._reserve_fd = os.open(
                    self._dir / RESERVE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            os.posix_fallocate(self._reserve_fd, 0, self._reserve_bytes)
        except OSError as exc:
            if self._reserve_fd >= 0:
                # Give back whatever part of it was allocated before the disk ran out.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._reserve_fd, 0)
            if exc.errno in _FULL:
                return False
            # Not a full disk (a file system without fallocate, say): go on without a reserve
            # rather than count every line as unwritable.
            log.warning(
                "journal: no reserve in %s (%s): on a full disk, lifecycle and health-change records "
                "wait for room (retried) like everything else",
                self._dir,
                exc,
            )
            self._reserve_bytes = 0
        return True

    def _release_reserve(self) -> bool:
        """Free the reserve for what must not be lost; False when there was none to free."""
        if self._reserve_released or self._reserve_bytes == 0 or self._reserve_fd < 0:
            return False
        try:
            os.ftruncate(self._reserve_fd, 0)
        except OSError as exc:
            log.error("journal: cannot release the reserve in %s: %s", self._dir, exc)
            return False
        self._reserve_released = True
        self._reserve_retry_at = time.monotonic() + _RESERVE_RETRY_S
        self._troubled = True
        log.error(
            "journal: %s is full: released its %d-byte reserve for gap, health-change and lifecycle "
            "records; log lines are counted in gap records, not written, until the reserve can be "
            "allocated again",
            self._dir,
            self._reserve_bytes,
        )
        return True

    def _restore_reserve(self) -> bool:
        """Leave reserve mode if the reserve can be allocated again (tried at most once a second).

        Only with the reserve's size and as much again free: allocated on a disk with just its
        size free, it would fill the disk again and the next line would free it again, every
        second, each time with an error in the log and a health change."""
        if not self._reserve_released:
            return True
        now = time.monotonic()
        if now < self._reserve_retry_at:
            return False
        self._reserve_retry_at = now + _RESERVE_RETRY_S
        if self._free_bytes() < 2 * self._reserve_bytes or not self._allocate_reserve():
            return False
        self._reserve_released = False
        log.warning("journal: %s has room again (reserve allocated): log lines are written again", self._dir)
        return True

    def _free_bytes(self) -> int:
        """What the journal's file system has free for it (unknown: as if plenty)."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return 1 << 62
        return st.f_bavail * st.f_frsize

    def _with_room(self, write: Callable[[], _T]) -> _T:
        """``write()``; on a full disk once more after freeing the reserve. For what must get
        written for anything to move again (a gap record in place of a lost segment, the state
        file before acknowledged segments are deleted): waiting for room could wait forever, the
        room coming only from trimming what is delivered. Raises OSError."""
        try:
            return write()
        except OSError as exc:
            if exc.errno not in _FULL or not self._release_reserve():
                raise
        return write()

    def _set_aside(self, path: Path) -> None:
        """Keep an unreadable segment file as ``<name>.bad`` rather than write its gap over it (an
        EIO may be transient, its records recoverable by hand); only the newest one is kept, so
        the directory holds at most one segment more than ``max_bytes`` says."""
        try:
            os.replace(path, path.with_name(path.name + BAD_SUFFIX))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("journal: cannot set %s aside (%s); its gap record replaces it", path, exc)
            return
        for older in sorted(self._dir.glob("seg-*.log" + BAD_SUFFIX))[:-1]:
            with contextlib.suppress(OSError):
                older.unlink()

    def maintain(self) -> None:
        """Periodic upkeep (``run_fsync_loop`` calls it every second under every policy): write
        the pending WRITE_FAILED gap when the disk takes it, so the gateway learns of the hole
        without waiting for the next record; allocate the reserve again once the disk has room;
        save the state and trim acknowledged segments if an acknowledgement could not."""
        if self._closed:
            return
        wrote = False
        if self._pending_records:
            # First, from the reserve's room if it is freed: allocating the reserve first would
            # take the room the gap needs.
            for retry in (True, False):
                try:
                    self._write_pending()
                    wrote = True
                except _WriteFailed as failed:
                    self._note_failure(failed)
                    if retry and failed.full and self._release_reserve():
                        continue
                break
        if self._reserve_released and self._restore_reserve():
            wrote = True  # the disk took the reserve's bytes
        if self._trim_pending and self._try_save_state():
            self._trim()
        if wrote:
            # Only after a write that went through: a failure nothing has been written since (a
            # lifecycle record its caller retries) is still the journal's problem.
            self._wrote()

    def _start_segment(self, sequence: int) -> Segment:
        if self._closed:
            raise JournalError(f"journal: {self._dir} is closed")
        # Named right after what the newest segment accounts for, even when the sequence jumped
        # (``advance_to``): so the names chain without holes, and a hole in them always means a
        # segment file that went missing (``_recover_locked``).
        base = self._segments[-1].covered_through + 1 if self._segments else sequence
        if self._segments and self._segments[-1].base == base:
            # An empty segment (left by a failed write): its name is the one to use.
            self._drop_segment(self._segments[-1])
        path = self._dir / segment_name(base)
        try:
            fd = os.open(path, _OPEN_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise io_error("create journal segment", path, exc) from exc
        if self._policy is not FsyncPolicy.NEVER:
            try:
                fsync_directory(self._dir)
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                raise io_error("fsync journal directory", self._dir, exc) from exc
        segment = Segment(path, base, first_sequence=sequence, last_sequence=base - 1)
        self._segments.append(segment)
        self._active = segment
        self._fd = fd
        return segment

    def _cut_back(self, segment: Segment) -> None:
        try:
            os.ftruncate(self._fd, segment.size)
        except OSError as exc:
            # The file may now end in half a frame; stop writing to it so that the half frame
            # stays past the indexed size, where readers never look and recovery drops it.
            log.error("journal: cannot cut %s back to %d bytes: %s", segment.path, segment.size, exc)
            self._roll()

    def _roll(self) -> None:
        segment = self._active
        fd = self._fd
        if segment is None:
            return
        self._active = None
        self._fd = -1
        try:
            if self._dirty and self._policy is not FsyncPolicy.NEVER:
                os.fsync(fd)
        except OSError as exc:
            log.warning("journal: fsync of %s failed: %s", segment.path, exc)
        finally:
            os.close(fd)
        self._dirty = False
        self._compactable.append(segment)
        # ``written_through`` follows at once (one small write per segment) under every policy: a
        # newest closed file lost in a crash is then told at open, its sequences never reused.
        self._try_save_state()

    def _wake(self) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ byte bound

    def _enforce_bound(self) -> None:
        if time.monotonic() < self._evict_retry_at:
            return
        slack = max(1, min(self._segment_bytes, self._max_bytes // 4))
        low_water = self._max_bytes - slack
        while self._bytes > low_water:
            if self._compactable:
                segment = self._compactable.popleft()
                try:
                    self._evict_from(segment)
                except OSError as exc:
                    # Likely the disk is full and the rewrite needs room for its temporary file;
                    # retry later instead of on every append.
                    self._compactable.appendleft(segment)
                    self._evict_retry_at = time.monotonic() + _EVICT_RETRY_S
                    log.error("journal: cannot evict from %s: %s", segment.path, exc)
                    return
                continue
            active = self._active
            if (
                self._bytes > self._max_bytes
                and active is not None
                and active.size >= slack // 2
                and active.last_log_sequence > max(self._sent, self._acked)
            ):
                # Everything closed is already as small as it can get: close the current segment
                # early so it can be evicted from. The size floor keeps this from happening per append.
                self._roll()
                continue
            return

    def _evict_from(self, segment: Segment) -> None:
        protect = max(self._sent, self._acked)
        if not segment.alive or segment.last_log_sequence <= protect:
            return
        data = segment.path.read_bytes()
        result = scan(data, base=segment.base, upper=self._upper_of(segment))
        for damage in result.damages:
            log.warning(describe_damage(segment.path, damage))
        rewritten = rewrite(segment.path, data, result, evict_above=protect, now_ms=_now_ms())
        self._apply_rewrite(segment, rewritten, counted=True)
        self._dropped_total += rewritten.dropped_records
        self._corrupt_total += rewritten.corrupt_records

    def _upper_of(self, segment: Segment) -> int | None:
        index = bisect.bisect_left(self._segments, segment.base, key=lambda s: s.base)
        return self._segments[index + 1].base if index + 1 < len(self._segments) else None

    def _apply_rewrite(self, segment: Segment, rewritten: Rewritten, *, counted: bool) -> None:
        if counted:
            self._bytes += rewritten.size - segment.size
            self._records += rewritten.records - segment.records
        segment.size = rewritten.size
        segment.records = rewritten.records
        segment.first_sequence = rewritten.first_sequence
        segment.last_sequence = rewritten.last_sequence if rewritten.records else segment.base - 1
        segment.last_log_sequence = rewritten.last_log_sequence
        segment.gap_through = rewritten.covered_through
        if rewritten.written:
            segment.generation += 1
            if segment.untrusted_below:
                # Offsets moved; all that is in the file now is as untrusted as any of it was.
                segment.untrusted_below = rewritten.size

    # ------------------------------------------------------------------ reading

    def read_after(self, sequence: int, *, max_records: int = 500, max_bytes: int = 1 << 20) -> list[Event]:
        """Records above ``sequence``, oldest first, decoded; at most ``max_records``, and about
        ``max_bytes`` of payload (at least one record)."""
        return self._read_repairing(sequence, max_records, max_bytes, raw=False)

    def read_raw_after(
        self, sequence: int, *, max_records: int = 500, max_bytes: int = 1 << 20
    ) -> list[tuple[int, bytes]]:
        """Like :meth:`read_after`, as (sequence, payload bytes) without decoding them.

        The bytes are the protobuf ``Event`` exactly as the journal stores it (``encode_event``'s
        output), ready to be forwarded. Every frame's CRC is checked. Frames this process did not
        write (found at open, or in a segment a read had to repair) are also decoded once, and a
        record that does not decode comes back as a CORRUPT gap, exactly as :meth:`read_after`
        delivers it; what this process wrote itself came from valid records, so it is passed on
        as is.
        """
        return self._read_repairing(sequence, max_records, max_bytes, raw=True)

    def _read_repairing(self, sequence: int, max_records: int, max_bytes: int, *, raw: bool) -> list[Any]:
        if self._closed or max_records <= 0 or sequence >= self._last_sequence:
            return []
        # A repair changes the file under the read; each one removes damage, so this converges.
        for _attempt in range(8):
            try:
                return self._read(sequence, max_records, max_bytes, raw)
            except _Damaged as damaged:
                self._repair(damaged.segment)
            except _Straddle as straddle:
                self._split(straddle.segment, sequence)
            except _Lost as lost:
                self._replace_lost(lost.segment, lost.reason)
        raise JournalError(f"journal: {self._dir} keeps changing under a read; giving up")

    def _read(self, after: int, max_records: int, max_bytes: int, raw: bool) -> list[Any]:
        segments = self._segments
        out: list[Any] = []
        cursor = self._cursor
        if (
            cursor is not None
            and cursor.after == after
            and cursor.segment.alive
            and cursor.generation == cursor.segment.generation
        ):
            index = bisect.bisect_left(segments, cursor.segment.base, key=lambda s: s.base)
            offset = cursor.offset
        else:
            index = bisect.bisect_right(segments, after, key=lambda s: s.covered_through)
            offset = 0
        budget = max_bytes
        last_returned = after
        at_least = 0
        done = False
        while index < len(segments) and not done:
            segment = segments[index]
            if offset >= segment.size:
                if index + 1 == len(segments):
                    break
                index += 1
                offset = 0
                continue
            want = min(segment.size - offset, max(_READ_CHUNK, at_least))
            buf = self._pread(segment, want, offset)
            size = len(buf)
            if size < want:
                raise _Damaged(segment)
            # Frames that start below this position in ``buf`` were not written by this process.
            trusted_from = segment.untrusted_below - offset
            pos = 0
            at_least = 0
            # parse_at (and needed_at), inlined: this loop runs once per record delivered.
            while pos < size:
                start = pos + HEADER_SIZE
                if start > size:
                    need = HEADER_SIZE
                else:
                    magic, sequence, kind, length, crc = unpack_header(buf, pos)
                    if magic != MAGIC or kind not in KINDS or length > MAX_PAYLOAD:
                        raise _Damaged(segment)
                    end = start + length
                    need = 0 if end <= size else end - pos
                if need:
                    if offset + pos + need <= segment.size:
                        # The frame runs past what was read: read again from its start.
                        at_least = need
                        break
                    raise _Damaged(segment)
                payload = buf[start:end]
                if crc32(payload, crc32(buf[pos : pos + PREFIX_SIZE])) != crc:
                    raise _Damaged(segment)
                if sequence > after:
                    if out and length > budget:
                        done = True
                        break
                    if raw:
                        if pos >= trusted_from:
                            out.append((sequence, payload))
                        else:
                            out.append((sequence, self._checked(payload, sequence, length, segment)))
                    else:
                        out.append(self._decode(payload, sequence, length, segment))
                    budget -= length
                    last_returned = sequence
                    if len(out) >= max_records:
                        pos = end
                        done = True
                        break
                elif kind == _GAP and straddling_gap(payload, sequence, after) is not None:
                    # The reader resumes inside this gap's range (the gateway stored the first
                    # records it replaced before they were evicted or damaged, then this journal
                    # was reopened): the rest of its count must not be skipped with it.
                    raise _Straddle(segment)
                pos = end
            offset += pos
        if index < len(segments):
            segment = segments[index]
            self._cursor = _Cursor(last_returned, segment, segment.generation, offset)
        else:
            self._cursor = None
        return out

    def _pread(self, segment: Segment, size: int, offset: int) -> bytes:
        reader = self._reader
        if reader is None or reader[0] is not segment or reader[1] != segment.generation:
            self._close_reader()
            try:
                fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise _Lost(segment, "segment file missing") from None
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise _Lost(segment, f"segment unreadable: {_strerror(exc)}") from None
                raise io_error("open journal segment", segment.path, exc) from exc
            reader = (segment, segment.generation, fd)
            self._reader = reader
        try:
            return os.pread(reader[2], size, offset)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise _Lost(segment, f"segment unreadable: {_strerror(exc)}") from None
            raise io_error("read journal segment", segment.path, exc) from exc

    def _replace_lost(self, segment: Segment, reason: str) -> None:
        """Replace a segment whose file a read found missing or unreadable by a CORRUPT gap for
        every unacknowledged sequence it accounted for, so the rest of the journal still delivers."""
        if not segment.alive:
            return
        self._close_reader()
        if segment is self._active:
            # Appends went to a file nobody can read back: start a new one after the gap.
            self._roll()
        first = max(segment.base, self._acked + 1)
        last = segment.covered_through
        if last < first:
            self._drop_segment(segment)
            return
        count = last - first + 1
        frame = gap_frame(
            GapReason.CORRUPT, first=first, last=last, count=count, nbytes=0, now_ms=_now_ms(), detail=reason
        )
        path = segment.path
        self._set_aside(path)
        try:
            # On a full disk from the reserve: else nothing more is delivered, acknowledged, or
            # trimmed to make room, and every read fails here again.
            size = self._with_room(lambda: atomic_write(path, [frame]))
        except OSError as exc:
            raise io_error("write a gap record for a lost segment to", segment.path, exc) from exc
        self._bytes += size - segment.size
        self._records += 1 - segment.records
        segment.size = size
        segment.records = 1
        segment.first_sequence = segment.last_sequence = first
        segment.last_log_sequence = 0
        segment.gap_through = last
        segment.generation += 1
        segment.untrusted_below = 0
        # The gap starts above the acknowledged point (a reader may resume anywhere past it), but
        # what this run already put on the wire is most likely at the gateway: not counted lost.
        self._corrupt_total += max(0, last - max(first - 1, self._wire))
        log.warning(
            "journal: %s (%s): sequences %d..%d (%d records) replaced by a gap",
            segment.path,
            reason,
            first,
            last,
            count,
        )

    def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                os.close(self._reader[2])
            self._reader = None

    def _decode(self, payload: bytes, sequence: int, length: int, segment: Segment) -> Event:
        event = self._try_decode(payload, sequence, segment)
        return event if event is not None else self._corrupt(sequence, length)

    def _checked(self, payload: bytes, sequence: int, length: int, segment: Segment) -> bytes:
        """``payload`` if it decodes to a record of ``sequence``, else the bytes of its CORRUPT gap."""
        if self._try_decode(payload, sequence, segment) is not None:
            return payload
        return encode_event(self._corrupt(sequence, length))

    def _try_decode(self, payload: bytes, sequence: int, segment: Segment) -> Event | None:
        try:
            event = decode_event(payload)
            if event.sequence == sequence:
                return event
            problem = f"payload says sequence {event.sequence}"
        except WireError as exc:
            problem = str(exc)
        # The CRC matched, so these are the bytes that were written: a writer bug or a newer
        # format, not disk damage. Deliver a gap for it rather than stall the stream on it.
        log.error("journal: record %d in %s cannot be decoded (%s)", sequence, segment.path, problem)
        return None

    def _corrupt(self, sequence: int, length: int) -> Event:
        self._corrupt_total += 1
        return Event(sequence, _now_ms(), GapRecord(GapReason.CORRUPT, 1, length, sequence, sequence))

    def _repair(self, segment: Segment) -> None:
        if not segment.alive:
            return
        active = segment is self._active
        try:
            try:
                data = segment.path.read_bytes()
            except FileNotFoundError:
                self._replace_lost(segment, "segment file missing")
                return
            result = scan(data, base=segment.base, upper=self._upper_of(segment))
            for damage in result.damages:
                log.warning(describe_damage(segment.path, damage))
            rewritten = rewrite(segment.path, data, result, evict_above=None, now_ms=_now_ms())
            if not rewritten.written:
                # The file was sound and only the index was off (someone cut or grew the file):
                # trust the bytes on disk.
                rewritten = rewritten._replace(size=len(data), written=True)
            if active:
                os.close(self._fd)
                self._fd = os.open(segment.path, _OPEN_APPEND)
        except OSError as exc:
            raise io_error("repair journal segment", segment.path, exc) from exc
        self._apply_rewrite(segment, rewritten, counted=True)
        self._corrupt_total += rewritten.corrupt_records
        # The file changed under us (damage, or someone else wrote to it): check what it holds.
        segment.untrusted_below = segment.size
        self._close_reader()

    def _split(self, segment: Segment, after: int) -> None:
        """Rewrite ``segment`` with the gap straddling ``after`` cut in two there, on disk.

        Why on disk rather than made up for this one read: the upper part goes out with
        ``after + 1`` as its sequence, so the gateway's high-water mark may become exactly that.
        A later resume from there must then see a gap of that own sequence (which it skips, the
        gateway holding it), not the original range straddling it again, which would count the
        same records twice; and this must hold across a restart.
        """
        if not segment.alive:
            return
        active = segment is self._active
        try:
            data = segment.path.read_bytes()
            result = scan(data, base=segment.base, upper=self._upper_of(segment))
            for damage in result.damages:
                log.warning(describe_damage(segment.path, damage))
            rewritten = rewrite(
                segment.path, data, result, evict_above=None, now_ms=_now_ms(), split_after=after
            )
            if active and rewritten.written:
                os.close(self._fd)
                self._fd = os.open(segment.path, _OPEN_APPEND)
        except OSError as exc:
            raise io_error("split a gap record in journal segment", segment.path, exc) from exc
        self._apply_rewrite(segment, rewritten, counted=True)
        self._corrupt_total += rewritten.corrupt_records
        self._close_reader()
        log.info(
            "journal: split a gap record at sequence %d in %s for a resuming reader", after, segment.path
        )

    # ------------------------------------------------------------------ acknowledgement

    def mark_sent(self, sequence: int) -> None:
        """Call before putting records through ``sequence`` on the wire."""
        self._sent = max(self._sent, min(sequence, self._last_sequence))
        self._wire = max(self._wire, self._sent)
        if self._sent > self._sent_reserved:
            # Durable before the send: a restart must know these may be at the gateway already.
            # If the state cannot be written, this run still protects them; the next send retries.
            previous, self._sent_reserved = self._sent_reserved, self._sent + self._options.sent_reserve
            if not self._try_save_state():
                self._sent_reserved = previous

    def ack(self, sequence: int) -> None:
        sequence = min(sequence, self._last_sequence)
        if sequence <= self._acked:
            return
        self._acked = sequence
        self._sent = max(self._sent, sequence)
        doomed: list[Segment] = []
        for segment in self._segments:
            if segment.covered_through > sequence:
                break
            doomed.append(segment)
        if not doomed:
            self._state_dirty = True
            if self._always or not self._segments:
                # Without segments (after ``advance_to``), only the state file says where the
                # next segment's name may start without a hole (``_recover_locked``).
                self._try_save_state()
            return
        # Deleted only once the state file says they are acknowledged: deleted first, the next
        # open would see a hole below its first segment and count a false CORRUPT gap. On a full
        # disk the reserve gives the state file its room (trimming then frees more).
        self._trim_pending = True
        try:
            self._with_room(self._save_state)
        except OSError as exc:
            self._state_dirty = True
            log.warning(
                "journal: cannot write the state file in %s: %s; acknowledged segments are deleted "
                "once it can be written",
                self._dir,
                exc,
            )
            return
        self._trim()

    def _trim(self) -> None:
        """Delete the segments wholly acknowledged (the state file saying so already)."""
        self._trim_pending = False
        while self._segments and self._segments[0].covered_through <= self._acked:
            self._drop_segment(self._segments[0])

    def _drop_segment(self, segment: Segment) -> None:
        if segment is self._active:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._active = None
            self._fd = -1
            self._dirty = False
        if self._reader is not None and self._reader[0] is segment:
            self._close_reader()
        self._segments.remove(segment)
        with contextlib.suppress(ValueError):
            self._compactable.remove(segment)
        self._bytes -= segment.size
        self._records -= segment.records
        self._unlink(segment)

    def _unlink(self, segment: Segment) -> None:
        segment.alive = False
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("journal: cannot delete %s: %s", segment.path, exc)

    def advance_to(self, sequence: int) -> None:
        if sequence <= self._last_sequence:
            return
        self._last_sequence = sequence
        if self._waiters:
            self._wake()
        try:
            self._save_state()
        except OSError as exc:
            self._state_dirty = True
            raise io_error("record the advanced sequence in", self._dir, exc) from exc

    # ------------------------------------------------------------------ state, fsync, waiting

    def _save_state(self) -> None:
        last = self._last_sequence
        sent = max(self._sent_reserved, self._acked)
        written = max((s.covered_through for s in self._segments), default=self._written_floor)
        save_state(self._dir, JournalState(str(self._epoch), self._acked, last, sent, written))
        self._written_floor = written
        self._state_dirty = False

    def _try_save_state(self) -> bool:
        try:
            self._save_state()
        except OSError as exc:
            self._state_dirty = True
            log.warning("journal: cannot write the state file in %s: %s", self._dir, exc)
            return False
        return True

    async def wait_for_append(self, after: int) -> None:
        loop = asyncio.get_running_loop()
        while self._last_sequence <= after:
            if self._closed:
                raise JournalError(f"journal: {self._dir} is closed")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def run_fsync_loop(self) -> None:
        """Until cancelled: fsync every ``fsync_interval_s`` under the INTERVAL policy, and under
        every policy ``maintain`` every second (also when that interval is longer)."""
        interval = self._options.fsync_interval_s if self._policy is FsyncPolicy.INTERVAL else None
        tick = min(interval, _MAINTAIN_S) if interval is not None else _MAINTAIN_S
        sync_at = maintain_at = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if self._closed:
                continue
            now = time.monotonic()
            if interval is not None and now >= sync_at:
                sync_at = now + interval - tick / 2  # no drift past a tick from sleep's lateness
                try:
                    self.sync()
                except JournalError as exc:
                    # Transient (EIO, ENOSPC for the state file): keep the loop alive and retry next tick.
                    log.warning("%s", exc)
            if now >= maintain_at:
                maintain_at = now + _MAINTAIN_S - tick / 2
                self.maintain()

    def sync(self) -> None:
        if self._closed:
            return
        if self._dirty and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                assert self._active is not None
                raise io_error("fsync journal segment", self._active.path, exc) from exc
            self._dirty = False
        if self._state_dirty:
            try:
                self._save_state()
            except OSError as exc:
                raise io_error("write the journal state file in", self._dir, exc) from exc
        if self._trim_pending:
            self._trim()

    def stats(self) -> JournalStats:
        return JournalStats(
            bytes_on_disk=self._bytes,
            records=self._records,
            segments=len(self._segments),
            first_sequence=self.first_sequence,
            last_sequence=self._last_sequence,
            acked_through=self._acked,
            sent_through=self._sent,
            dropped_records_total=self._dropped_total,
            corrupt_records_total=self._corrupt_total,
            write_failed_records_total=self._write_failed_total,
            write_errors_total=self._write_errors_total,
            write_failed_pending=self._pending_records,
            write_problem=self._write_problem,
            last_write_error=self._last_write_error,
        )

    def close(self) -> None:
        if self._closed:
            return
        if self._pending_records:
            self.maintain()  # a last try to write the gap for what could not be written
        # Saved in any case: ``written_through`` lets the next open tell a newest segment gone.
        self._state_dirty = True
        try:
            self.sync()
            if self._fd >= 0:
                os.fsync(self._fd)
        except (JournalError, OSError) as exc:
            log.warning("journal: closing %s: %s", self._dir, exc)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._active = None
        self._close_reader()
        if self._pending_records:
            log.error(
                "journal: closing %s with %d records that could not be written and whose gap record "
                "could not be written either (%s): they are lost without a gap",
                self._dir,
                self._pending_records,
                self._pending_detail,
            )
        if self._reserve_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._reserve_fd)
            self._reserve_fd = -1
        self._unlock_directory()
        self._closed = True
        self._cursor = None
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(JournalError(f"journal: {self._dir} was closed"))

    def __repr__(self) -> str:
        return f"<Journal {self._dir} epoch={self._epoch} last={self._last_sequence} acked={self._acked}>"
