"""The leader Lease's RBAC (docs/rbac.md, ``gateway.leader.lease_rules``) against a real API
server: with exactly those rules the elector takes, renews and releases its Lease and may not read
another Lease; without any one of its verbs it never leads, and says which permission is missing
and where it is documented."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from gateway.config import KubernetesDriverSettings, LeaderSettings
from gateway.drivers.kubernetes import RBAC_RULES, KubernetesDriver
from gateway.leader import LeaderElector, lease_rules
from gateway.replicas import ReplicaIdentity
from gateway.store import Database
from gateway.store.leadership import LeadershipStore, LeaderTerm
from tests.support import kubeaccess

pytestmark = pytest.mark.timeout(300)

SETTINGS = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 0.3}


@pytest.fixture(scope="module")
def namespace(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-lease-rbac") as name:
        yield name


@pytest.fixture
async def leadership(tmp_path: Path) -> AsyncIterator[LeadershipStore]:
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    try:
        yield LeadershipStore(db)
    finally:
        await db.close()


def without(lease: str, verb: str) -> list[dict[str, Any]]:
    rules = []
    for rule in lease_rules(lease):
        verbs = [v for v in rule["verbs"] if v != verb]
        if verbs:
            rules.append({**rule, "verbs": verbs})
    return rules


async def campaign(
    driver: KubernetesDriver, leadership: LeadershipStore, lease: str, *, for_s: float
) -> tuple[LeaderElector, LeaderTerm | None]:
    """An elector of this identity, started and watched for ``for_s``: its term once it leads."""

    led = asyncio.Event()

    async def lead(term: LeaderTerm) -> None:
        led.set()
        await asyncio.Event().wait()

    elector = LeaderElector(
        driver.client,
        namespace=driver.namespace,
        identity=ReplicaIdentity(id="gw-rbac", run="r1"),
        settings=LeaderSettings.model_validate({"lease_name": lease, **SETTINGS}),
        store=leadership,
        lead=lead,
    )
    elector.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(led.wait(), for_s)
    return elector, elector.term


async def identity_driver(
    admin: Client, kubeconfig: Path, namespace: str, rules: list[dict[str, Any]], path: Path
) -> KubernetesDriver:
    identity = kubeaccess.identity_with_rules(admin, kubeconfig, namespace, [*RBAC_RULES, *rules], path)
    driver = KubernetesDriver(
        KubernetesDriverSettings.model_validate(
            {"namespace": namespace, "kubeconfig": str(identity), "gateway_address": "gw:7070"}
        )
    )
    await kubeaccess.until_granted(driver.states)  # the Role is in force (its rules come together)
    return driver


async def test_the_documented_rules_take_renew_and_release_that_lease_only(
    admin: Client, kubeconfig: Path, namespace: str, leadership: LeadershipStore, tmp_path: Path
) -> None:
    lease = "lease-all"
    driver = await identity_driver(admin, kubeconfig, namespace, lease_rules(lease), tmp_path / "kc")
    try:
        elector, term = await campaign(driver, leadership, lease, for_s=20)
        assert term is not None, "leads with exactly the documented rules"
        await asyncio.sleep(4 * SETTINGS["retry_period_s"])
        assert elector.term == term, "and keeps leading: renewals (update) go through"
        with pytest.raises(ApiError) as refused:
            await driver.client.get(Lease, "kube-scheduler", namespace=namespace)
        assert refused.value.status.code == 403, "no other Lease can be read"
        await elector.stop()
        spec = admin.get(Lease, lease, namespace=namespace).spec
        assert spec is not None and not spec.holderIdentity, "released on stop"
    finally:
        await driver.close()


@pytest.mark.parametrize("verb", ["create", "get", "update"])
async def test_each_lease_verb_is_needed(
    *,
    verb: str,
    admin: Client,
    kubeconfig: Path,
    namespace: str,
    leadership: LeadershipStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lease = f"lease-no-{verb}"
    if verb == "update":
        # A Lease released by someone: taking it is an update (a create would need none).
        admin.create(
            Lease(
                metadata=ObjectMeta(name=lease, namespace=namespace),
                spec=LeaseSpec(leaseDurationSeconds=1, leaseTransitions=0),
            )
        )
    driver = await identity_driver(admin, kubeconfig, namespace, without(lease, verb), tmp_path / "kc")
    caplog.set_level(logging.WARNING, logger="gateway.leader")
    try:
        elector, term = await campaign(driver, leadership, lease, for_s=3)
        await elector.stop()
        assert term is None, f"led without {verb} on leases"
        refusals = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
        assert refusals, caplog.text
        assert "docs/rbac.md" in refusals[0] and lease in refusals[0], refusals[0]
    finally:
        await driver.close()
