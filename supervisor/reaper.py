"""Init duty one: reap every child that exits, the main process and re-parented orphans alike.

The supervisor is the sandbox's init (PID 1 in a container): every process whose parent dies is
re-parented to it, and each becomes a zombie until someone waits for it. Outside a container
(tests, the local driver) the supervisor asks the kernel to treat it the same way by becoming a
*child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+).

One owner for every ``waitpid``: on SIGCHLD the reaper collects every exited child with
``waitpid(-1, WNOHANG)``. The exit status of a process someone waits for resolves that waiter:
:meth:`Reaper.watch` (the main process, started with ``subprocess.Popen``) or asyncio's own
subprocess machinery, for which the reaper stands in as asyncio's *child watcher* while it is
installed, so ``asyncio.create_subprocess_exec`` elsewhere in the supervisor (a readiness
command, say) keeps working and is never robbed of its status. Any other exited child is an
orphan: counted and logged.

What must not happen while the reaper is installed: waiting for a child by any other means
(``Popen.wait``/``poll``, ``subprocess.run`` in a thread, ``os.waitpid``): the reaper may collect
it first. Python 3.14 removed asyncio's child watchers; there, asyncio's subprocesses would race
the reaper, so the supervisor must start children through :meth:`Reaper.watch` instead (the
reaper warns at install).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (True if we changed it to that).

    PID 1 receives every orphan of its namespace already; elsewhere a failure is logged and the
    supervisor carries on (orphans then go to the real init).
    """
    if os.getpid() == 1:
        return False
    if not sys.platform.startswith("linux"):
        log.warning("not PID 1 and not Linux: orphaned grandchildren will not be reaped by us")
        return False
    try:
        _set_subreaper(True)
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper (%s): orphans go to the real init", exc)
        return False
    log.debug("child subreaper: orphaned descendants are re-parented to the supervisor")
    return True


ChildCallback = Callable[..., object]


class Reaper:
    """Collects every exited child on SIGCHLD; see the module docstring."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        #: pid -> (callback, args): called as callback(pid, returncode, *args) once it is reaped.
        self._handlers: dict[int, tuple[ChildCallback, tuple[Any, ...]]] = {}
        self._asyncio_watcher: _AsyncioWatcher | None = None
        #: Orphans (exited children nobody waited for) reaped so far.
        self.orphans_reaped = 0
        #: True while this process is a child subreaper by our doing.
        self.subreaper = False

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Become a subreaper and handle SIGCHLD; call before any child is started."""
        if self._loop is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self.subreaper = become_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._take_over_asyncio()
        # A child that ended before the handler existed sent its SIGCHLD to nobody: look now.
        self.reap()

    def uninstall(self) -> None:
        if self._loop is None:
            return
        self.reap()
        self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None
        if self.subreaper:
            # Leave the process as we found it (it matters when it lives on: tests, embedding).
            with contextlib.suppress(OSError, AttributeError):
                _set_subreaper(False)
            self.subreaper = False
        if self._asyncio_watcher is not None:
            self._asyncio_watcher = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                # None: asyncio makes its default one again when next needed.
                asyncio.set_child_watcher(None)  # type: ignore[arg-type]
        if self._handlers:
            log.debug("reaper uninstalled while pids %s were still watched", sorted(self._handlers))
        self._handlers.clear()

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s return code (``-signum`` for a signal death, as Popen reports it).

        Register a child in the same loop callback that started it (no ``await`` in between), so
        the reaper can never collect it first and take it for an orphan.
        """
        loop = self._loop
        assert loop is not None, "install() first"
        fut: asyncio.Future[int] = loop.create_future()

        def resolve(_pid: int, returncode: int) -> None:
            if not fut.done():
                fut.set_result(returncode)

        self.add_handler(pid, resolve)
        return fut

    def add_handler(self, pid: int, callback: ChildCallback, *args: Any) -> None:
        self._handlers[pid] = (callback, args)

    def remove_handler(self, pid: int) -> bool:
        return self._handlers.pop(pid, None) is not None

    def reap(self) -> None:
        """Collect every child that has exited, until none is left waiting."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no children at all
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.error("waitpid failed: %s", exc)
                return
            if pid == 0:
                return  # children remain, none has exited
            returncode = os.waitstatus_to_exitcode(status)
            handler = self._handlers.pop(pid, None)
            if handler is not None:
                callback, args = handler
                try:
                    callback(pid, returncode, *args)
                except Exception:
                    log.exception("child exit handler for pid %d failed", pid)
                continue
            self.orphans_reaped += 1
            log.debug(
                "reaped orphaned process",
                extra={"pid": pid, "returncode": returncode, "orphans_reaped": self.orphans_reaped},
            )

    def _take_over_asyncio(self) -> None:
        """Stand in as asyncio's child watcher, so its subprocesses are reaped here, not raced."""
        if not _HAS_CHILD_WATCHERS:
            log.warning(
                "this Python has no asyncio child watchers: asyncio subprocesses would race the reaper"
            )
            return
        watcher = _AsyncioWatcher(self)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(watcher)
        self._asyncio_watcher = watcher


_HAS_CHILD_WATCHERS = sys.version_info < (3, 14) and hasattr(asyncio, "AbstractChildWatcher")

with warnings.catch_warnings():
    # Deprecated (not yet removed) in 3.12 and 3.13; the supervisor's bundle runs 3.11.
    warnings.simplefilter("ignore", DeprecationWarning)

    class _AsyncioWatcher(asyncio.AbstractChildWatcher):
        """asyncio's child-watcher interface over the reaper (everything runs in the loop thread)."""

        def __init__(self, reaper: Reaper) -> None:
            self._reaper = reaper

        def add_child_handler(self, pid: int, callback: ChildCallback, *args: Any) -> None:  # type: ignore[override]
            self._reaper.add_handler(pid, callback, *args)

        def remove_child_handler(self, pid: int) -> bool:
            return self._reaper.remove_handler(pid)

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass

        def close(self) -> None:
            pass

        def is_active(self) -> bool:
            return self._reaper._loop is not None

        def __enter__(self) -> _AsyncioWatcher:
            return self

        def __exit__(self, *exc: object) -> None:
            pass
