"""Line capture of the main process's stdout and stderr.

Bytes arrive in chunks of any size; lines are cut at ``\\n``. A line longer than the limit is
not cut off: it is split into parts of at most ``max_line_bytes`` (at a UTF-8 character
boundary), each but the last marked ``continued``, so a consumer can join them again. A final
line without a newline is flushed when the stream ends. Output is also echoed, unchanged, to
the supervisor's own stdout or stderr so ``kubectl logs`` keeps working.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import BinaryIO

from openshell_wire.records import LogRecord, LogStream

_READ_CHUNK = 64 * 1024


def _utf8_cut(data: bytes | bytearray, limit: int) -> int:
    """The largest cut point <= limit that does not split a UTF-8 character (limit if none fits)."""
    cut = limit
    # Continuation bytes look like 0b10xxxxxx; step back over at most three of them.
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


class LineSplitter:
    """Turns chunks into LogRecords; kept apart from the stream reading so it is testable alone."""

    def __init__(self, stream: LogStream, max_line_bytes: int) -> None:
        self._stream = stream
        self._max = max_line_bytes
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[LogRecord]:
        self._buf += chunk
        out: list[LogRecord] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl == -1 or nl > self._max:
                if len(self._buf) <= self._max:
                    break
                cut = _utf8_cut(self._buf, self._max)
                out.append(self._record(self._buf[:cut], continued=True))
                del self._buf[:cut]
                continue
            line = self._buf[:nl]
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            out.append(self._record(line, continued=False))
        return out

    def flush(self) -> list[LogRecord]:
        if not self._buf:
            return []
        rest = self._record(self._buf, continued=False)
        self._buf.clear()
        return [rest]

    def _record(self, data: bytes | bytearray, *, continued: bool) -> LogRecord:
        return LogRecord(
            stream=self._stream, message=bytes(data).decode("utf-8", "replace"), continued=continued
        )


async def pump(
    reader: asyncio.StreamReader,
    *,
    stream: LogStream,
    sink: Callable[[LogRecord], None],
    max_line_bytes: int,
    echo: BinaryIO | None,
) -> None:
    """Read ``reader`` to its end, handing every line to ``sink`` (and echoing the raw bytes)."""
    splitter = LineSplitter(stream, max_line_bytes)
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            break
        if echo is not None:
            try:
                echo.write(chunk)
                echo.flush()
            except (OSError, ValueError):
                echo = None  # our own stdout went away; capture must go on
        for record in splitter.feed(chunk):
            sink(record)
    for record in splitter.flush():
        sink(record)
