"""The pod watch's recovery (gateway/provisioner.py): after an error it resumes from the
resourceVersion of the last event it recorded, without listing again; a 410 Gone (that version
was compacted away) lists again. (The real API server's watch and its resourceVersions are in
tests/e2e/test_kubernetes_driver.py and tests/e2e/test_leader_election.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.drivers.kubernetes import KubernetesDriverError, PodState, Snapshot
from gateway.store import SandboxStore
from tests.unit.test_provisioner import FakeDriver, phase_becomes, provisioner, store

__all__ = ["store"]  # the fixture


@dataclass
class ScriptedWatch(FakeDriver):
    """Each watch call plays the next script: its events (with their resourceVersions), then the
    error that ends it (None: it stays open)."""

    scripts: list[tuple[list[PodState], KubernetesDriverError | None]] = field(default_factory=list)
    lists: int = 0
    watched_from: list[str | None] = field(default_factory=list)
    #: Set once every script was played.
    played: asyncio.Event = field(default_factory=asyncio.Event)

    async def snapshot(self) -> Snapshot:
        self.lists += 1
        return Snapshot(list(self.pods.values()), f"list-{self.lists}")

    async def watch(self, resource_version: str | None = None) -> AsyncIterator[PodState]:
        self.watched_from.append(resource_version)
        events, error = self.scripts.pop(0) if self.scripts else ([], None)
        if not self.scripts:
            self.played.set()
        for event in events:
            # The list after a 410 shows what the watch last showed, as the API server's would.
            self.pods[event.sandbox_id] = event
            yield event
        if error is not None:
            raise error
        await asyncio.Event().wait()


def pod(phase: str, version: str) -> PodState:
    return PodState("sb-1", "sandbox-sb-1", phase, pod_uid="uid-1", resource_version=version)


async def test_the_watch_resumes_from_the_last_recorded_version_and_lists_again_on_410(
    store: SandboxStore,
) -> None:
    driver = ScriptedWatch(
        scripts=[
            # A connection dropped (the API server restarted, a proxy cut it): resume, no list.
            ([pod("Pending", "11"), pod("Running", "12")], KubernetesDriverError("cannot reach", None)),
            ([pod("Succeeded", "13")], KubernetesDriverError("too old resource version", 410)),
            ([], None),
        ]
    )
    prov = provisioner(store, driver)
    await prov.create("sb-1", ["true"], image=None, env={})
    driver.pods["sb-1"] = pod("Running", "10")
    await prov.start()
    try:
        await phase_becomes(store, "sb-1", "Succeeded")
        await asyncio.wait_for(driver.played.wait(), 30)
    finally:
        await prov.close()
    assert driver.watched_from == ["list-1", "12", "list-2"], driver.watched_from
    assert driver.lists == 2, "listed at start and after the 410 only"
