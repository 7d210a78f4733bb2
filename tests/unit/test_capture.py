"""Line capture: lines cut at newlines, long lines split (never cut off), echo kept."""

from __future__ import annotations

import asyncio
import io

from openshell_wire.records import LogRecord, LogStream
from supervisor.capture import LineSplitter, pump


def _joined(records: list[LogRecord]) -> list[str]:
    """Re-join continued parts into the lines they came from."""
    lines, part = [], ""
    for r in records:
        part += r.message
        if not r.continued:
            lines.append(part)
            part = ""
    assert part == "", "a continued record must be followed by its rest"
    return lines


def test_lines_are_cut_at_newlines_across_chunks() -> None:
    s = LineSplitter(LogStream.STDOUT, 64)
    out = s.feed(b"one\ntw") + s.feed(b"o\r\nthree") + s.feed(b"\n") + s.flush()
    assert [r.message for r in out] == ["one", "two", "three"]
    assert not any(r.continued for r in out)


def test_a_final_line_without_newline_is_flushed() -> None:
    s = LineSplitter(LogStream.STDERR, 64)
    assert s.feed(b"partial") == []
    (last,) = s.flush()
    assert last == LogRecord(LogStream.STDERR, "partial", continued=False)
    assert s.flush() == []


def test_long_lines_are_split_into_continued_parts_and_lose_nothing() -> None:
    s = LineSplitter(LogStream.STDOUT, 100)
    long = "x" * 1050
    out = s.feed(long.encode() + b"\nshort\n")
    assert all(len(r.message.encode()) <= 100 for r in out)
    assert [r.continued for r in out[:-2]] == [True] * (len(out) - 2)
    assert _joined(out) == [long, "short"]


def test_splitting_never_breaks_a_utf8_character() -> None:
    s = LineSplitter(LogStream.STDOUT, 64)
    text = "é€😀" * 40  # 2-, 3- and 4-byte characters
    out = s.feed(text.encode() + b"\n")
    assert all("\ufffd" not in r.message for r in out), "a split must fall between characters"
    assert _joined(out) == [text]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    s = LineSplitter(LogStream.STDOUT, 64)
    (rec,) = s.feed(b"bad \xff\xfe bytes\n")
    assert rec.message == "bad \ufffd\ufffd bytes"


async def test_pump_reads_to_the_end_and_echoes_the_raw_bytes() -> None:
    reader = asyncio.StreamReader()
    data = b"alpha\nbeta\n" + b"y" * 300 + b"\ngamma"
    reader.feed_data(data)
    reader.feed_eof()
    echo = io.BytesIO()
    got: list[LogRecord] = []
    await pump(reader, stream=LogStream.STDOUT, sink=got.append, max_line_bytes=128, echo=echo)
    assert echo.getvalue() == data
    assert _joined(got) == ["alpha", "beta", "y" * 300, "gamma"]
