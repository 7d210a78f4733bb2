"""The local-process sandbox driver: each sandbox is a supervisor subprocess on this machine.

For development, demos and tests without a cluster. The supervisor is started as a separate
program (``python -m supervisor run ...`` by default), exactly as it runs in a pod, so the
gateway never imports it. Each sandbox gets a directory under ``work_dir`` holding its journal
and the supervisor's own output (``supervisor.log``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from gateway.config import LocalDriverSettings
from openshell_wire.records import sandbox_id_problem

log = logging.getLogger(__name__)


@dataclass
class LocalSandbox:
    sandbox_id: str
    directory: Path
    process: asyncio.subprocess.Process

    @property
    def log_path(self) -> Path:
        return self.directory / "supervisor.log"


class LocalDriver:
    name = "local"

    def __init__(self, settings: LocalDriverSettings, *, gateway_address: str) -> None:
        self._settings = settings
        self._gateway = gateway_address
        self._sandboxes: dict[str, LocalSandbox] = {}

    def supervisor_argv(self) -> list[str]:
        return list(self._settings.supervisor_command) or [sys.executable, "-m", "supervisor"]

    async def create(
        self,
        sandbox_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        fresh: bool = True,
    ) -> LocalSandbox:
        problem = sandbox_id_problem(sandbox_id)
        if problem is not None:
            raise ValueError(problem)  # also keeps the id from naming a path outside work_dir
        if sandbox_id in self._sandboxes:
            raise ValueError(f"sandbox {sandbox_id} already runs here")
        directory = (self._settings.work_dir / sandbox_id).resolve()
        if fresh and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        argv = [
            *self.supervisor_argv(),
            "run",
            "--sandbox-id",
            sandbox_id,
            "--gateway",
            self._gateway,
            "--journal-dir",
            str(directory / "journal"),
            *extra_args,
            "--",
            *command,
        ]
        out = (directory / "supervisor.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            out.close()
        sandbox = LocalSandbox(sandbox_id=sandbox_id, directory=directory, process=process)
        self._sandboxes[sandbox_id] = sandbox
        log.info("local sandbox started", extra={"sandbox_id": sandbox_id, "pid": process.pid})
        return sandbox

    async def wait(self, sandbox_id: str) -> int:
        return await self._sandboxes[sandbox_id].process.wait()

    async def delete(self, sandbox_id: str, *, grace_s: float = 10.0) -> None:
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None or sandbox.process.returncode is not None:
            return
        # The supervisor forwards SIGTERM to the main process and waits for it; if that takes
        # longer than the grace period, kill the whole tree: the main process runs in a process
        # group of its own, so killing the supervisor's group alone would leave it behind.
        with contextlib.suppress(ProcessLookupError):
            sandbox.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(sandbox.process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(sandbox.process.pid).children(recursive=True)
                for proc in [psutil.Process(sandbox.process.pid), *tree]:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
            await sandbox.process.wait()

    async def close(self) -> None:
        await asyncio.gather(*(self.delete(s) for s in list(self._sandboxes)))
