"""The sandbox's main process: start, capture, signal, wait.

The main process runs in its own process group (so a signal reaches the agent and its children
together) with stdout and stderr piped to the capture. Its exit becomes the sandbox's exit
code the way a shell or Kubernetes reports it: the code itself, or 128 + signal number.
Full init duties (reaping orphans, restart policy, grace-then-kill) build on this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from openshell_wire.records import LogRecord, LogStream, exit_code_from_returncode
from supervisor.capture import pump

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    exit_code: int
    signal: int


class StartFailed(Exception):
    """The command could not be executed; ``exit_code`` is what a shell would return (126/127)."""

    def __init__(self, detail: str, exit_code: int) -> None:
        super().__init__(detail)
        self.exit_code = exit_code


class MainProcess:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        sink: Callable[[LogRecord], None],
        max_line_bytes: int,
        echo_stdout: BinaryIO | None,
        echo_stderr: BinaryIO | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._argv = list(argv)
        self._sink = sink
        self._max_line = max_line_bytes
        self._echo = (echo_stdout, echo_stderr)
        self._env = dict(env) if env is not None else None
        self._proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> int:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=self._env,
            )
        except FileNotFoundError as exc:
            raise StartFailed(f"{self._argv[0]}: command not found ({exc.strerror})", 127) from None
        except PermissionError as exc:
            raise StartFailed(f"{self._argv[0]}: permission denied ({exc.strerror})", 126) from None
        except OSError as exc:
            raise StartFailed(f"{self._argv[0]}: cannot execute ({exc.strerror})", 126) from None
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._pumps = [
            asyncio.create_task(
                pump(
                    self._proc.stdout,
                    stream=LogStream.STDOUT,
                    sink=self._sink,
                    max_line_bytes=self._max_line,
                    echo=self._echo[0],
                ),
                name="capture-stdout",
            ),
            asyncio.create_task(
                pump(
                    self._proc.stderr,
                    stream=LogStream.STDERR,
                    sink=self._sink,
                    max_line_bytes=self._max_line,
                    echo=self._echo[1],
                ),
                name="capture-stderr",
            ),
        ]
        return self._proc.pid

    async def wait(self) -> ExitStatus:
        """Wait for the exit and for the last captured line (the pipes drain first)."""
        assert self._proc is not None, "start() first"
        returncode = await self._proc.wait()
        # A grandchild may keep the pipes open after the main process died: give the capture a
        # moment to drain, then stop reading rather than wait for a process we do not own.
        _, pending = await asyncio.wait(self._pumps, timeout=2.0)
        for task in pending:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        code, sig = exit_code_from_returncode(returncode)
        return ExitStatus(exit_code=code, signal=sig)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the main process group (the agent and the children it started)."""
        if self._proc is None or self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
