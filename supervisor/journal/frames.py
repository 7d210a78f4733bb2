"""Binary framing of journal records: how one record sits in a segment file, and how to find it again.

A segment file is nothing but frames back to back, with no file header, so that appending is a
single ``write`` and a file can be cut at any frame boundary. Each frame is::

    offset  size  field
    0       4     magic      b"\\xf7OSJ"  (0xF7 never occurs in UTF-8 text, so log lines rarely mimic it)
    4       8     sequence   unsigned, little-endian
    12      1     kind       1 = log, 2 = lifecycle, 3 = gap
    13      4     length     payload length in bytes, unsigned, little-endian
    17      4     crc32      zlib.crc32 over bytes 0..16 and then the payload
    21      n     payload    the protobuf ``openshell.v1.Event`` bytes (``openshell_wire.convert``)

The sequence and the kind are repeated outside the payload so that recovery and eviction can order
frames and tell a log line from a lifecycle record without decoding protobuf. The frame kind is the
record's *eviction class* rather than its exact type: a health record (``HealthRecord``) has no kind
of its own but is framed by what may happen to it. A state change (``change``) is framed as
lifecycle, so it is never evicted; a periodic sample is framed as log, so under the byte bound it
gives way to an OVERFLOW gap that counts it like a dropped line. (No new kind number: a journal
written by this version stays readable by one that knows only kinds 1 to 3.) The magic lets a reader
resynchronise after damage: it searches forward for the magic and accepts a candidate only when its
length is sane and its CRC matches, so a stray magic inside a payload costs one failed check.

This module only knows bytes: it builds frames, parses one at an offset and searches for the next
valid one. What a damaged stretch means for sequences is decided in ``segments``.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import NamedTuple

from openshell_wire.records import GapRecord, HealthRecord, LifecycleRecord, LogRecord, Payload

MAGIC = b"\xf7OSJ"
_PREFIX = struct.Struct("<4sQBI")
_CRC = struct.Struct("<I")
_HEADER = struct.Struct("<4sQBII")
HEADER_SIZE = _HEADER.size
#: The bytes the CRC covers before the payload (all of the header but the CRC itself).
PREFIX_SIZE = _PREFIX.size
#: Larger lengths are taken as damage: a real payload is one log line (capped by capture) or a
#: lifecycle record, far below this.
MAX_PAYLOAD = 8 * 1024 * 1024


class Kind(enum.IntEnum):
    LOG = 1
    LIFECYCLE = 2
    GAP = 3


_KINDS = frozenset(int(k) for k in Kind)
#: For readers that inline :func:`parse_at` (the journal's read loop).
KINDS = _KINDS


def kind_of(payload: Payload) -> Kind:
    if isinstance(payload, LogRecord):
        return Kind.LOG
    if isinstance(payload, LifecycleRecord):
        return Kind.LIFECYCLE
    if isinstance(payload, GapRecord):
        return Kind.GAP
    if isinstance(payload, HealthRecord):
        # See the module docstring: changes are kept like lifecycle records, samples evicted like logs.
        return Kind.LIFECYCLE if payload.change else Kind.LOG
    raise TypeError(f"not a journal payload: {type(payload).__name__}")


class Frame(NamedTuple):
    """A valid frame found in a buffer; ``offset``/``end`` are positions in that buffer."""

    offset: int
    sequence: int
    kind: int
    length: int
    end: int

    @property
    def payload_offset(self) -> int:
        return self.offset + HEADER_SIZE


#: Bound methods for the append hot path, which inlines :func:`encode_frame`.
pack_prefix = _PREFIX.pack
pack_crc = _CRC.pack
unpack_header = _HEADER.unpack_from


def encode_frame(sequence: int, kind: int, payload: bytes) -> bytes:
    prefix = pack_prefix(MAGIC, sequence, kind, len(payload))
    return prefix + pack_crc(zlib.crc32(payload, zlib.crc32(prefix))) + payload


def parse_at(buf: bytes, pos: int) -> Frame | None:
    """The frame starting exactly at ``pos`` if it is complete and intact, else None."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    magic, sequence, kind, length, crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or kind not in _KINDS or length > MAX_PAYLOAD:
        return None
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return None
    view = memoryview(buf)
    if zlib.crc32(view[pos + HEADER_SIZE : end], zlib.crc32(view[pos : pos + _PREFIX.size])) != crc:
        return None
    return Frame(pos, sequence, kind, length, end)


def needed_at(buf: bytes, pos: int) -> int | None:
    """How many bytes from ``pos`` the frame there claims, if its header looks plausible.

    A reader that holds only part of a file uses this to tell "read more" from "damaged".
    """
    if len(buf) - pos < HEADER_SIZE:
        return HEADER_SIZE
    magic, _sequence, kind, length, _crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or kind not in _KINDS or length > MAX_PAYLOAD:
        return None
    return HEADER_SIZE + int(length)


def find_next(buf: bytes, start: int, *, min_sequence: int, below: int | None = None) -> Frame | None:
    """The first valid frame at or after ``start`` whose sequence lies in [min_sequence, below)."""
    pos = buf.find(MAGIC, start)
    while pos != -1:
        frame = parse_at(buf, pos)
        if frame is not None and frame.sequence >= min_sequence and (below is None or frame.sequence < below):
            return frame
        pos = buf.find(MAGIC, pos + 1)
    return None
