"""The local-process sandbox driver: each sandbox is a supervisor subprocess on this machine.

For development, demos and tests without a cluster. The supervisor is started as a separate
program (``python -m supervisor run ...`` by default), exactly as it runs in a pod, so the
gateway never imports it. Each sandbox gets a directory under ``work_dir`` holding its journal
and the supervisor's own output (``supervisor.log``).

With supervisor auth (``auth.supervisors.required``), each supervisor is given a sandbox token the
gateway minted for it, in ``<work_dir>/<id>/gateway-token`` (0600, replaced atomically), named
by ``--set gateway.credential_file``; it renews it over its session (``gateway.credential_refresh``)
and the gateway writes a fresh one into the file well before the last one expires, so a
supervisor restarted after a long gateway outage still finds a valid token there.

:class:`LocalProvisioner` serves the HTTP API's creates and deletes with this driver; the gateway
owns it and stops its sandboxes when it stops (they are its child processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from gateway.auth.sandbox_tokens import SandboxTokens
from gateway.config import LocalDriverSettings
from gateway.drivers import ProvisionError
from gateway.store import SandboxRow, SandboxStore, StoreError
from gateway.store.db import utcnow
from openshell_wire.records import sandbox_id_problem

log = logging.getLogger(__name__)

DRIVER = "local"
#: The file a local supervisor reads its sandbox token from, in its sandbox's directory.
CREDENTIAL_FILE = "gateway-token"
#: The running sandboxes' token files are written again every token_ttl_s / this.
REFRESH_FRACTION = 3


def write_credential(path: Path, token: str) -> None:
    """Replace ``path`` with ``token`` atomically, readable by this user only (0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp makes it 0600
            out.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class LocalSandbox:
    sandbox_id: str
    directory: Path
    process: asyncio.subprocess.Process

    @property
    def log_path(self) -> Path:
        return self.directory / "supervisor.log"

    @property
    def credential_path(self) -> Path:
        return self.directory / CREDENTIAL_FILE

    @property
    def running(self) -> bool:
        return self.process.returncode is None


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
        credential: str | None = None,
    ) -> LocalSandbox:
        """Start the sandbox's supervisor; with ``credential`` (a minted sandbox token) it is
        written to the sandbox's token file and the supervisor told to present and renew it."""
        problem = sandbox_id_problem(sandbox_id)
        if problem is not None:
            raise ValueError(problem)  # also keeps the id from naming a path outside work_dir
        if sandbox_id in self._sandboxes:
            raise ValueError(f"sandbox {sandbox_id} already runs here")
        directory = (self._settings.work_dir / sandbox_id).resolve()
        if fresh and directory.exists():
            shutil.rmtree(directory)
        # 0700: other users cannot read a sandbox's token, journal or output. (Sandboxes share this
        # uid with each other and the gateway: against them, modes do nothing; see security.md.)
        self._settings.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # also a directory kept from before (fresh=False)
        auth_args: list[str] = []
        if credential is not None:
            path = directory / CREDENTIAL_FILE
            write_credential(path, credential)
            auth_args = [
                "--set",
                f"gateway.credential_file={path}",
                "--set",
                "gateway.credential_refresh=true",
            ]
        argv = [
            *self.supervisor_argv(),
            "run",
            "--sandbox-id",
            sandbox_id,
            "--gateway",
            self._gateway,
            "--journal-dir",
            str(directory / "journal"),
            *auth_args,
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

    def get(self, sandbox_id: str) -> LocalSandbox | None:
        return self._sandboxes.get(sandbox_id)

    def sandboxes(self) -> list[LocalSandbox]:
        return list(self._sandboxes.values())

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


class LocalProvisioner:
    """The HTTP API's creates and deletes with the local-process driver (a
    :class:`gateway.drivers.Provisioner`), and the renewal of the running sandboxes' token files."""

    def __init__(
        self,
        settings: LocalDriverSettings,
        sandboxes: SandboxStore,
        *,
        gateway_address: str,
        tokens: SandboxTokens | None,
        token_ttl_s: float,
    ) -> None:
        self.driver = LocalDriver(settings, gateway_address=gateway_address)
        self._sandboxes = sandboxes
        #: None: supervisor auth is off, supervisors get no token.
        self._tokens = tokens
        self._refresh_s = token_ttl_s / REFRESH_FRACTION
        self._generations: dict[str, int] = {}
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._tokens is not None:
            self._refresher = asyncio.create_task(self._refresh_files(), name="local-token-files")

    def _gone(self, row: SandboxRow) -> bool:
        """Whether the id's sandbox is a local one no longer running here (deleted, or exited)."""
        if row.driver != DRIVER:
            return False
        sandbox = self.driver.get(row.id)
        return sandbox is None or not sandbox.running

    async def create(
        self,
        sandbox_id: str,
        command: Sequence[str],
        *,
        image: str | None,
        env: Mapping[str, str],
        created_by: str | None = None,
        team: str | None = None,
        may_replace: Callable[[SandboxRow], bool] | None = None,
    ) -> dict[str, Any]:
        if image is not None:
            raise ProvisionError(400, "the local driver runs commands on this machine: it takes no image")
        if not command:
            raise ProvisionError(400, "the local driver needs a command")
        stale = self.driver.get(sandbox_id)
        if stale is not None and not stale.running:
            await self.driver.delete(sandbox_id)  # an exited one: its id may be created again
        generation = await self._sandboxes.create(
            sandbox_id,
            driver=DRIVER,
            spec={"command": list(command)},
            driver_state={"phase": "Running", "at": utcnow().isoformat()},
            replaces=self._gone,
            may_replace=may_replace,
            created_by=created_by,
            team=team,
        )
        if generation is None:
            raise ProvisionError(409, f"sandbox {sandbox_id!r} exists: delete it first")
        try:
            token = None
            if self._tokens is not None:
                token = (await self._tokens.mint(sandbox_id, generation=generation)).token
            sandbox = await self.driver.create(sandbox_id, command, env=env, credential=token)
        except BaseException as exc:
            with contextlib.suppress(StoreError):
                await self._sandboxes.set_driver_state(
                    sandbox_id,
                    {"phase": "Failed", "reason": f"the create failed: {exc}", "at": utcnow().isoformat()},
                    generation=generation,
                )
            if isinstance(exc, (OSError, ValueError)):
                raise ProvisionError(400, f"cannot start the sandbox's supervisor: {exc}") from None
            raise
        self._generations[sandbox_id] = generation
        return {
            "id": sandbox_id,
            "generation": generation,
            "pid": sandbox.process.pid,
            "directory": str(sandbox.directory),
            "command": list(command),
        }

    async def delete(self, sandbox_id: str) -> bool:
        found = self.driver.get(sandbox_id) is not None
        await self.driver.delete(sandbox_id)
        generation = self._generations.pop(sandbox_id, None)
        await self._sandboxes.set_driver_state(
            sandbox_id, {"phase": "Deleted", "at": utcnow().isoformat()}, generation=generation
        )
        return found

    async def _refresh_files(self) -> None:
        """Write a fresh token into each running sandbox's file every ``token_ttl_s / 3``: its
        supervisor renews its own over the session, but one restarted (or reconnecting) after a
        long outage reads the file, which must not hold an expired token then."""
        assert self._tokens is not None
        while True:
            await asyncio.sleep(self._refresh_s)
            for sandbox in self.driver.sandboxes():
                generation = self._generations.get(sandbox.sandbox_id)
                if not sandbox.running or generation is None:
                    continue
                try:
                    minted = await self._tokens.mint(sandbox.sandbox_id, generation=generation)
                    write_credential(sandbox.credential_path, minted.token)
                except (StoreError, OSError) as exc:  # the next round tries again
                    log.warning(
                        "cannot renew the token file of sandbox %s: %s",
                        sandbox.sandbox_id,
                        exc,
                        extra={"sandbox_id": sandbox.sandbox_id},
                    )
                except Exception:  # anything else (an unreadable key...): said, and the next round
                    log.exception(
                        "cannot renew the token file of sandbox %s",
                        sandbox.sandbox_id,
                        extra={"sandbox_id": sandbox.sandbox_id},
                    )

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass
            except Exception:  # never breaks the gateway's stop
                log.exception("the token file refresher had failed")
            self._refresher = None
        await self.driver.close()
