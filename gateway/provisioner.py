"""Creating and deleting sandboxes through the configured driver, and following what it sees.

The HTTP API's ``POST /api/v1/sandboxes`` and ``DELETE /api/v1/sandboxes/{id}`` land here. A
sandbox is registered in the store first (so its supervisor's hello finds it), then created by
the driver; if the driver refuses, the registration is taken back and the caller gets the
driver's reason. For the Kubernetes driver a background task follows the sandbox pods' watch and
records each pod's phase and reason in the sandbox's ``driver_state``; it re-opens the watch with
backoff after errors, and :meth:`close` cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import KubernetesDriverSettings
from gateway.drivers import ProvisionError
from gateway.drivers.kubernetes import KubernetesDriver, KubernetesDriverError, PodState
from gateway.drivers.podspec import PodSpecError, SandboxRequest
from gateway.store import SandboxStore
from gateway.store.db import utcnow

log = logging.getLogger(__name__)


@dataclass
class KubernetesProvisioner:
    settings: KubernetesDriverSettings
    sandboxes: SandboxStore
    driver: KubernetesDriver | None = None
    _watcher: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        if self.driver is None:
            self.driver = KubernetesDriver(self.settings)
        try:
            await self.driver.check_access()
        except KubernetesDriverError as exc:
            # Not fatal: the API may come back; creates answer with the reason meanwhile.
            log.error("kubernetes driver cannot reach its namespace: %s", exc)
        self._watcher = asyncio.create_task(self._follow(), name="kubernetes-pod-watch")

    async def create(
        self, sandbox_id: str, command: Sequence[str], *, image: str | None, env: Mapping[str, str]
    ) -> dict[str, Any]:
        assert self.driver is not None, "start() first"
        request = SandboxRequest(sandbox_id=sandbox_id, command=list(command), image=image, env=dict(env))
        if await self.sandboxes.get(sandbox_id) is not None:
            raise ProvisionError(409, f"sandbox {sandbox_id!r} exists")
        spec = {"image": image or self.settings.pod.default_image, "command": list(command)}
        await self.sandboxes.ensure(sandbox_id, driver="kubernetes", spec=spec)
        try:
            created = await self.driver.create(request)
        except PodSpecError as exc:
            await self.sandboxes.delete(sandbox_id)
            raise ProvisionError(400, str(exc)) from None
        except KubernetesDriverError as exc:
            await self.sandboxes.delete(sandbox_id)
            raise ProvisionError(409 if exc.status == 409 else 502, str(exc)) from None
        state = {"phase": "Created", "pod": created.pod_name, "at": utcnow().isoformat()}
        await self.sandboxes.set_driver_state(sandbox_id, state)
        # Kept for the credential check of the auth issue: the hash, never the token.
        await self.sandboxes.set_spec(sandbox_id, {**spec, "credential_sha256": created.credential_sha256})
        return {"id": sandbox_id, "pod": created.pod_name, "namespace": self.settings.namespace}

    async def delete(self, sandbox_id: str) -> bool:
        assert self.driver is not None, "start() first"
        try:
            return await self.driver.delete(sandbox_id)
        except KubernetesDriverError as exc:
            raise ProvisionError(502, str(exc)) from None

    async def _record(self, state: PodState) -> None:
        doc: dict[str, Any] = {"phase": state.phase, "pod": state.pod_name, "at": utcnow().isoformat()}
        if state.reason:
            doc["reason"] = state.reason
        if state.exit_code is not None:
            doc["exit_code"] = state.exit_code
        await self.sandboxes.set_driver_state(state.sandbox_id, doc)

    async def _follow(self) -> None:
        assert self.driver is not None
        failures = 0
        while True:
            try:
                for state in await self.driver.states():  # catch up on what changed while away
                    await self._record(state)
                async for state in self.driver.watch():
                    failures = 0
                    await self._record(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watch must outlive API and database hiccups
                failures += 1
                delay = random.uniform(0, min(30.0, 0.5 * 2**failures))
                log.warning("sandbox pod watch failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.driver is not None:
            await self.driver.close()
