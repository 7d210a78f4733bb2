"""The one exception the journal raises, and how an ``OSError`` becomes a readable one.

Damage found in the journal's own files is never an error: it is recovered and counted. What is
left for :class:`JournalError` is what the journal cannot fix by itself (a directory it may not
write, a full disk, an I/O error), and its text names the path, the action and the errno in words,
so that an operator reading one log line knows what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class JournalError(Exception):
    """The journal could not do what was asked; the message says where and why."""


def io_error(action: str, path: Path | str, exc: OSError) -> JournalError:
    code = exc.errno
    if code is None:
        reason = str(exc)
    else:
        name = errno.errorcode.get(code, str(code))
        reason = f"{name}: {os.strerror(code)}"
        if code == errno.ENOSPC:
            reason += " (the disk is full)"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += " (the journal directory must be writable by the supervisor)"
    return JournalError(f"journal: cannot {action} {path}: {reason}")
