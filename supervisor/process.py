"""The sandbox's main process: start, capture, signal, stop with grace, wait.

The main process runs in its own process group (so a signal reaches the agent and its children
together) with stdout and stderr piped to the capture. Its exit becomes the sandbox's exit
code the way a shell or Kubernetes reports it: the code itself, or 128 + signal number.

It is started with ``subprocess.Popen``, not ``asyncio.create_subprocess_exec``: the supervisor's
:class:`~supervisor.reaper.Reaper` owns every ``waitpid`` (it also reaps orphans re-parented to
us), and asyncio's child watcher would race it for this pid. The pipes are read through asyncio
all the same (``connect_read_pipe``), so the capture is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from openshell_wire.records import LogRecord, LogStream, exit_code_from_returncode
from supervisor.capture import pump
from supervisor.reaper import Reaper

log = logging.getLogger(__name__)

#: How long the capture may go on reading after the main process exited (a grandchild that
#: keeps the pipes open must not hold the exit up).
DRAIN_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class ExitStatus:
    exit_code: int
    signal: int
    #: Why it ended, when the supervisor ended it ("killed after 10s grace"); empty otherwise.
    detail: str = ""


class StartFailed(Exception):
    """The command could not be executed; ``exit_code`` is what a shell would return (126/127)."""

    def __init__(self, detail: str, exit_code: int) -> None:
        super().__init__(detail)
        self.exit_code = exit_code


class MainProcess:
    """One run of the main process; a restart is a new instance."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        reaper: Reaper,
        sink: Callable[[LogRecord], None],
        max_line_bytes: int,
        echo_stdout: BinaryIO | None,
        echo_stderr: BinaryIO | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._argv = list(argv)
        self._reaper = reaper
        self._sink = sink
        self._max_line = max_line_bytes
        self._echo = (echo_stdout, echo_stderr)
        self._env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit: asyncio.Future[int] | None = None
        self._readers: list[tuple[asyncio.StreamReader, LogStream, BinaryIO | None]] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._kill_timer: asyncio.TimerHandle | None = None
        self._killed_after: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Started and not yet reaped."""
        return self._exit is not None and not self._exit.done()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            # Popen, not asyncio's, so that the reaper alone waits for it; the fork is quick.
            proc = subprocess.Popen(  # noqa: ASYNC220
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=self._env,
                bufsize=0,
            )
        except FileNotFoundError as exc:
            raise StartFailed(f"{self._argv[0]}: command not found ({exc.strerror})", 127) from None
        except PermissionError as exc:
            raise StartFailed(f"{self._argv[0]}: permission denied ({exc.strerror})", 126) from None
        except OSError as exc:
            raise StartFailed(f"{self._argv[0]}: cannot execute ({exc.strerror})", 126) from None
        # No await between the fork and this line: the reaper cannot take it for an orphan.
        self._exit = self._reaper.watch(proc.pid)
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        for pipe, stream, echo in (
            (proc.stdout, LogStream.STDOUT, self._echo[0]),
            (proc.stderr, LogStream.STDERR, self._echo[1]),
        ):
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
            self._transports.append(transport)
            self._readers.append((reader, stream, echo))
        return proc.pid

    def start_capture(self) -> None:
        """Deliver the main process's lines to the sink from now on (once; :meth:`wait` does it too).

        Apart from :meth:`start` so that the caller journals STARTED before the first line: output
        written meanwhile waits in the readers' buffers (and, past their limit, in the pipes)."""
        if self._pumps:
            return
        for reader, stream, echo in self._readers:
            self._pumps.append(
                asyncio.create_task(
                    pump(reader, stream=stream, sink=self._sink, max_line_bytes=self._max_line, echo=echo),
                    name=f"capture-{stream.value}",
                )
            )

    async def wait(self) -> ExitStatus:
        """Wait for the exit and for the last captured line (the pipes drain first)."""
        assert self._proc is not None and self._exit is not None, "start() first"
        self.start_capture()
        try:
            returncode = await self._exit
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        # Popen must never wait for this pid itself (the reaper did): give it the status.
        self._proc.returncode = returncode
        # A grandchild may keep the pipes open after the main process died: give the capture a
        # moment to drain, then stop reading rather than wait for a process we do not own.
        _, pending = await asyncio.wait(self._pumps, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in self._transports:
            transport.close()
        code, sig = exit_code_from_returncode(returncode)
        detail = ""
        if self._killed_after is not None and sig == signal.SIGKILL:
            detail = f"killed after {self._killed_after:g}s grace"
        return ExitStatus(exit_code=code, signal=sig, detail=detail)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the main process group (the agent and the children it started)."""
        if self._proc is None or not self.running:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def kill_after(self, grace_s: float) -> None:
        """SIGKILL the process group unless the main process exits within ``grace_s`` (armed once)."""
        if self._kill_timer is not None or not self.running:
            return
        self._kill_timer = asyncio.get_running_loop().call_later(grace_s, self._kill, grace_s)

    def _kill(self, grace_s: float) -> None:
        if not self.running:
            return
        log.warning(
            "main process still running %gs after the stop request: killing its process group",
            grace_s,
            extra={"pid": self.pid},
        )
        self._killed_after = grace_s
        self.send_signal(signal.SIGKILL)


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol
