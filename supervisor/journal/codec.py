"""Payload bytes: the protobuf ``Event`` encoding that the journal stores and the wire carries.

The journal has no payload format of its own: a frame's payload is exactly what
``openshell_wire.convert.encode_event`` produces, so a record read back is decoded with
``decode_event`` and could be forwarded as is.

Log lines are the hot path (one per captured line, up to tens of thousands a second), and
``encode_event`` builds three fresh protobuf objects per call, which alone would cost more than the
write. :meth:`PayloadEncoder.encode_log` therefore writes the protobuf wire format of a log ``Event``
directly: ``sequence`` (field 1, varint), ``timestamp_ms`` (field 2, varint, omitted when 0 as proto3
does), ``log`` (field 10, length-delimited) holding ``stream`` (1), ``message`` (2) and ``continued``
(3), each omitted at its default, all in field-number order: exactly the bytes protobuf emits, which
a unit test checks against ``encode_event`` over the edge cases (varint widths, empty and long
messages, every stream). Anything unusual (a negative timestamp, text that is not valid UTF-8) takes
the ``encode_event`` path, as do lifecycle and gap records, which are rare.
"""

from __future__ import annotations

from openshell_wire.convert import encode_event, event_to_proto
from openshell_wire.records import Event, LogRecord, LogStream, Payload

# Taken from the converter itself rather than restated, so the two can never disagree.
_STREAM_NUMBER = {
    stream: event_to_proto(Event(1, 0, LogRecord(stream, ""))).log.stream for stream in LogStream
}


def varint(value: int) -> bytes:
    """A protobuf base-128 varint (also used to assemble messages from stored bytes)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(128)]
_STREAM_FIELD = {stream: b"\x08" + varint(number) for stream, number in _STREAM_NUMBER.items()}
# Precomputed pieces, so that a line costs a few concatenations: the sequence field's tag and
# first byte (low seven bits, with or without the continuation bit) ...
_SEQ_SMALL = [b"\x08" + bytes((i,)) for i in range(128)]
_SEQ_LOW = [b"\x08" + bytes((i | 0x80,)) for i in range(128)]
# ... the ``log`` field's tag and one-byte length ...
_LOG_FIELD = [b"\x52" + bytes((i,)) for i in range(128)]
# ... and, per stream, the stream field plus the message tag and one-byte length (the message
# field is omitted when empty, as proto3 does).
_MESSAGE_HEAD = {
    stream: [field] + [field + b"\x12" + bytes((i,)) for i in range(1, 128)]
    for stream, field in _STREAM_FIELD.items()
}


class PayloadEncoder:
    """Encodes payloads to ``Event`` bytes, caching the slowly changing varints between calls."""

    __slots__ = ("_heads", "_high", "_high_ts", "_stream", "_stream_field", "_ts", "_ts_field")

    def __init__(self) -> None:
        self._high = -1
        #: The varint of ``sequence >> 7`` followed by the timestamp field.
        self._high_ts = b""
        self._ts = 0
        self._ts_field = b""
        self._stream: LogStream | None = None
        self._stream_field = b""
        self._heads: list[bytes] = []

    def encode(self, sequence: int, timestamp_ms: int, payload: Payload) -> bytes:
        if type(payload) is LogRecord:
            return self.encode_log(sequence, timestamp_ms, payload)
        return encode_event(Event(sequence, timestamp_ms, payload))

    def encode_log(self, sequence: int, timestamp_ms: int, record: LogRecord) -> bytes:
        if timestamp_ms != self._ts:
            if timestamp_ms < 0:
                return encode_event(Event(sequence, timestamp_ms, record))
            self._ts = timestamp_ms
            self._ts_field = b"\x10" + varint(timestamp_ms) if timestamp_ms else b""
            self._high = -1
        if sequence >= 128:
            # Sequences grow by one: the varint of sequence >> 7 changes once every 128 records.
            high = sequence >> 7
            if high != self._high:
                self._high = high
                self._high_ts = varint(high) + self._ts_field
            head = _SEQ_LOW[sequence & 0x7F] + self._high_ts
        elif sequence > 0:
            head = _SEQ_SMALL[sequence] + self._ts_field
        else:
            head = self._ts_field
        stream = record.stream
        if stream is not self._stream:
            # Enum hashing is Python code; lines mostly come from one stream, so compare identity.
            self._stream = stream
            self._stream_field = _STREAM_FIELD[stream]
            self._heads = _MESSAGE_HEAD[stream]
        try:
            text = record.message.encode()
        except UnicodeEncodeError:
            return encode_event(Event(sequence, timestamp_ms, record))
        size = len(text)
        inner = self._heads[size] if size < 128 else self._stream_field + b"\x12" + varint(size)
        if record.continued:
            inner = inner + text + b"\x18\x01"
            size = len(inner)
            return head + (_LOG_FIELD[size] if size < 128 else b"\x52" + varint(size)) + inner
        size += len(inner)
        return head + (_LOG_FIELD[size] if size < 128 else b"\x52" + varint(size)) + inner + text
