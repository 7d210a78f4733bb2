"""The gateway's Kubernetes driver against a real API server, with only the RBAC it documents.

Any cluster through ``KUBECONFIG`` (the ``kubeconfig`` fixture starts a local kube-apiserver + etcd
when none is given, and skips with the reason when neither is possible). The driver runs with the
token of a ServiceAccount (TokenRequest) bound to a Role holding exactly
``gateway.drivers.kubernetes.RBAC_RULES``, in a namespace that enforces Pod Security "restricted":
its pods, image volume included, are admitted there, while a privileged pod is refused. Then each
verb is taken away in turn, and the operation that needs it fails with a sentence naming the verb,
the resource and docs/rbac.md: the documented RBAC is sufficient and minimal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, codecs
from lightkube.resources.core_v1 import Pod, Secret

from gateway.config import KubernetesDriverSettings
from gateway.drivers import podspec
from gateway.drivers.kubernetes import RBAC_RULES, KubernetesDriver, KubernetesDriverError, PodState
from tests.support import kubeaccess

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def sandbox_ns(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-sandboxes") as name:
        yield name


def settings_for(kubeconfig: Path, namespace: str) -> KubernetesDriverSettings:
    return KubernetesDriverSettings.model_validate(
        {
            "namespace": namespace,
            "kubeconfig": str(kubeconfig),
            "gateway_address": "openshell-gateway.openshell.svc:7070",
            "request_timeout_s": 20,
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
            "pod": {"default_image": "registry.invalid/agent:1"},
        }
    )


def without(verb: str, resource: str) -> list[dict[str, Any]]:
    rules = []
    for rule in RBAC_RULES:
        verbs = [v for v in rule["verbs"] if not (rule["resources"] == [resource] and v == verb)]
        if verbs:
            rules.append({**rule, "verbs": verbs})
    return rules


async def test_create_watch_delete_with_only_the_documented_rbac(
    admin: Client, kubeconfig: Path, sandbox_ns: str, tmp_path: Path
) -> None:
    identity = kubeaccess.identity_with_rules(admin, kubeconfig, sandbox_ns, RBAC_RULES, tmp_path / "kc")
    driver = KubernetesDriver(settings_for(identity, sandbox_ns))
    seen: list[PodState] = []

    async def follow() -> None:
        async for state in driver.watch():
            seen.append(state)

    try:
        await kubeaccess.until_granted(driver.states)
        await driver.check_access()
        watcher = asyncio.create_task(follow())
        created = await driver.create(podspec.SandboxRequest("drv-1", ["sleep", "3600"]))
        assert created.pod_name == "sandbox-drv-1" and created.pod_uid

        # Admitted under "restricted", image volume and all, exactly as built.
        pod = admin.get(Pod, "sandbox-drv-1", namespace=sandbox_ns)
        assert pod.spec is not None and pod.spec.volumes is not None
        image_volumes = [v for v in pod.spec.volumes if v.image is not None]
        assert [v.image.reference for v in image_volumes if v.image] == [
            "registry.invalid/openshell-supervisor:0.1.0"
        ], "the API server kept the image volume (ImageVolume is on)"
        assert pod.metadata is not None and pod.metadata.uid == created.pod_uid
        # The credential is a projected ServiceAccount token for the gateway's audience: no Secret.
        (projected,) = [v.projected for v in pod.spec.volumes if v.projected is not None]
        assert projected is not None and projected.sources is not None
        (source,) = projected.sources
        assert source.serviceAccountToken is not None
        assert source.serviceAccountToken.audience == "openshell-gateway"
        assert pod.spec.automountServiceAccountToken is False
        with pytest.raises(ApiError):
            admin.get(Secret, "sandbox-drv-1-credential", namespace=sandbox_ns)

        state = await driver.get("drv-1")
        assert state is not None and state.phase in ("Pending", "Running")
        for _ in range(100):
            if any(s.sandbox_id == "drv-1" for s in seen):
                break
            await asyncio.sleep(0.1)
        assert any(s.sandbox_id == "drv-1" and not s.deleted for s in seen), seen

        with pytest.raises(KubernetesDriverError, match="already has pods"):
            await driver.create(podspec.SandboxRequest("drv-1", ["sleep", "1"]))

        assert await driver.delete("drv-1", grace_s=0) is True
        for _ in range(100):
            if any(s.sandbox_id == "drv-1" and s.deleted for s in seen):
                break
            await asyncio.sleep(0.1)
        assert any(s.sandbox_id == "drv-1" and s.deleted for s in seen), seen
        assert await driver.get("drv-1") is None
        assert await driver.delete("drv-1") is False  # already gone: not an error
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    finally:
        await driver.close()


def test_a_privileged_pod_is_refused_in_the_sandbox_namespace(admin: Client, sandbox_ns: str) -> None:
    """The admission check is live: what our pods pass, a privileged pod does not."""
    privileged = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": sandbox_ns},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    with pytest.raises(ApiError) as refused:
        admin.create(codecs.from_dict(privileged))  # type: ignore[call-overload]
    assert refused.value.status.code == 403
    assert "violates PodSecurity" in (refused.value.status.message or "")


async def _create(driver: KubernetesDriver, sandbox_id: str) -> None:
    await driver.create(podspec.SandboxRequest(sandbox_id, ["sleep", "1"]))


async def _watch_once(driver: KubernetesDriver) -> None:
    async def first() -> None:
        async for _ in driver.watch():
            return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first(), 5)


CASES = [
    ("create", "pods"),
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    ("delete", "pods"),
]


@pytest.mark.parametrize(("verb", "resource"), CASES, ids=[f"{v}-{r}" for v, r in CASES])
async def test_each_documented_verb_is_needed(
    *, verb: str, resource: str, admin: Client, kubeconfig: Path, sandbox_ns: str, tmp_path: Path
) -> None:
    assert any(verb in r["verbs"] and r["resources"] == [resource] for r in RBAC_RULES)
    identity = kubeaccess.identity_with_rules(
        admin, kubeconfig, sandbox_ns, without(verb, resource), tmp_path / "kc"
    )
    driver = KubernetesDriver(settings_for(identity, sandbox_ns))
    sandbox_id = f"rbac-{verb}-{resource}"
    full = KubernetesDriver(
        settings_for(
            kubeaccess.identity_with_rules(admin, kubeconfig, sandbox_ns, RBAC_RULES, tmp_path / "full"),
            sandbox_ns,
        )
    )
    try:
        # Wait until this identity's Role is in force (a granted call succeeds), then the one verb.
        if (verb, resource) == ("list", "pods"):
            await kubeaccess.until_granted(lambda: driver.get("nothing-here"))
        else:
            await kubeaccess.until_granted(driver.states)
        await kubeaccess.until_granted(full.states)
        if (verb, resource) in (("delete", "pods"), ("get", "pods")):
            await _create(full, sandbox_id)  # something to get or delete

        operations = {
            ("create", "pods"): lambda: _create(driver, sandbox_id),
            ("get", "pods"): lambda: driver.get(sandbox_id),
            ("list", "pods"): driver.check_access,
            ("watch", "pods"): lambda: _watch_once(driver),
            ("delete", "pods"): lambda: driver.delete(sandbox_id, grace_s=0),
        }
        with pytest.raises(KubernetesDriverError) as failed:
            await operations[(verb, resource)]()
        message = str(failed.value)
        assert failed.value.status == 403, message
        assert f"refused to {verb} {resource} in namespace {sandbox_ns!r}" in message
        assert "docs/rbac.md" in message
    finally:
        with contextlib.suppress(KubernetesDriverError):
            await full.delete(sandbox_id, grace_s=0)
        await driver.close()
        await full.close()


async def test_the_longest_sandbox_id_fits_its_pod(
    admin: Client, kubeconfig: Path, sandbox_ns: str, tmp_path: Path
) -> None:
    identity = kubeaccess.identity_with_rules(admin, kubeconfig, sandbox_ns, RBAC_RULES, tmp_path / "kc")
    driver = KubernetesDriver(settings_for(identity, sandbox_ns))
    longest = "l" * podspec.MAX_SANDBOX_ID
    try:
        await kubeaccess.until_granted(driver.states)
        await driver.create(podspec.SandboxRequest(longest, ["sleep", "1"]))
        assert admin.get(Pod, podspec.pod_name(longest), namespace=sandbox_ns)
        assert await driver.delete(longest, grace_s=0)
    finally:
        await driver.close()
