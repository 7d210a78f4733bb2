"""Small filesystem steps that make a file change durable and atomic.

A rewritten segment or a new state file is written under a temporary name, fsynced, renamed over
the old one and the directory fsynced, so a crash at any point leaves either the old or the new
file, never a mixture. Leftover temporaries (a crash before the rename) end in ``TMP_SUFFIX`` and
are removed when the journal opens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> int:
    """Replace ``path`` with ``chunks`` durably; returns the bytes written. Raises ``OSError``."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)
    return size
