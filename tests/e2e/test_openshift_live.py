"""Issue 24 point 3 on a real API server (the session's control plane, or $KUBECONFIG's cluster).

- The sandbox pod built for OpenShift (its ids left to the SCC) is admitted, in a dry run, in a
  namespace enforcing the Pod Security Standard "restricted", with either injection; the driver's
  own start-up dry run on platform openshift reports no problem.
- ``drivers.kubernetes.platform: auto`` says "kubernetes" on a plain API server, and "openshift"
  once the server serves the ``security.openshift.io`` group, which a CRD for
  ``securitycontextconstraints.security.openshift.io`` (what OpenShift serves) makes appear in
  its discovery. The CRD is deleted at the end.

Not shown here: an OpenShift cluster's own SCC admission (no OpenShift runs here); its rules are
tests/support/scc.py's, checked offline by tests/unit/test_openshift.py (docs/openshift.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from lightkube import ApiError, AsyncClient, Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Pod, ServiceAccount

from gateway.config import KubernetesDriverSettings
from gateway.drivers.kubernetes import KubernetesDriver, rbac_rules
from gateway.drivers.openshift import (
    SCC_GROUP,
    api_groups,
    choose_platform,
    platform_pod_settings,
    serves_scc_group,
)
from gateway.drivers.podspec import SandboxRequest, build_sandbox_pod
from tests.support import kubeaccess

pytestmark = pytest.mark.timeout(300)

SERVICE_ACCOUNT = "sandbox"
SCC_CRD = f"securitycontextconstraints.{SCC_GROUP}"


def settings(namespace: str, kubeconfig: Path, **extra: Any) -> KubernetesDriverSettings:
    return KubernetesDriverSettings.model_validate(
        {
            "namespace": namespace,
            "kubeconfig": str(kubeconfig),
            "gateway_address": "openshell-gateway.openshell.svc:7070",
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
            "pod": {"default_image": "registry.invalid/agent:1", "service_account_name": SERVICE_ACCOUNT},
            **extra,
        }
    )


@pytest.fixture
def sandbox_namespace(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-openshift") as namespace:  # PSS restricted, enforced
        admin.create(ServiceAccount(metadata=ObjectMeta(name=SERVICE_ACCOUNT, namespace=namespace)))
        yield namespace


def gateway_identity(admin: Client, kubeconfig: Path, namespace: str, path: Path) -> Path:
    """A kubeconfig with exactly the driver's Role in ``namespace`` (discovery is every identity's)."""
    rules = rbac_rules(settings(namespace, kubeconfig))
    return kubeaccess.identity_with_rules(admin, kubeconfig, namespace, rules, path, name="gateway")


@pytest.mark.parametrize("injection", ["image-volume", "init-container"])
def test_the_openshift_sandbox_pod_is_admitted_under_pss_restricted(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, injection: str
) -> None:
    base = settings(sandbox_namespace, kubeconfig, platform="openshift")
    base = base.model_copy(update={"supervisor": base.supervisor.model_copy(update={"injection": injection})})
    doc = build_sandbox_pod(platform_pod_settings(base, "openshift"), SandboxRequest("os-1", ["true"]))
    created = admin.create(cast(Pod, Pod.from_dict(doc)), dry_run=True)
    assert created.spec is not None and created.spec.securityContext is not None
    # No ids from the gateway: on OpenShift the SCC's admission fills them in (here nothing does).
    assert created.spec.securityContext.runAsUser is None and created.spec.securityContext.fsGroup is None
    assert created.spec.securityContext.runAsNonRoot is True


async def test_auto_detects_kubernetes_and_the_openshift_dry_run_has_no_problem(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path
) -> None:
    identity = gateway_identity(admin, kubeconfig, sandbox_namespace, tmp_path / "gateway")
    for platform in ("auto", "openshift"):
        driver = KubernetesDriver(settings(sandbox_namespace, identity, platform=platform))
        try:
            choice = await driver.choose_injection()
        finally:
            await driver.close()
        assert driver.platform is not None and choice.platform == driver.platform.platform
        assert choice.problem is None, choice  # the probe pod passed PSS restricted, ids or not
        if platform == "openshift":
            assert driver.platform.reason == "openshift as configured"
        elif not os.environ.get("KUBECONFIG"):
            assert driver.platform.platform == "kubernetes", driver.platform


def _established(client: Client) -> bool:
    try:
        status = client.get(CustomResourceDefinition, SCC_CRD).status
    except ApiError:
        return False
    conditions = (status.conditions if status is not None else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _gone(client: Client) -> bool:
    try:
        client.get(CustomResourceDefinition, SCC_CRD)
    except ApiError as exc:
        return exc.status.code == 404
    return False


async def test_auto_detects_openshift_where_the_scc_group_is_served(admin: Client, kubeconfig: Path) -> None:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("adds a cluster-wide CRD: only on the session's own control plane")
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": SCC_CRD},
        "spec": {
            "group": SCC_GROUP,
            "scope": "Cluster",
            "names": {
                "kind": "SecurityContextConstraints",
                "plural": "securitycontextconstraints",
                "singular": "securitycontextconstraints",
                "listKind": "SecurityContextConstraintsList",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }
    auto = KubernetesDriverSettings(gateway_address="gw:7070", kubeconfig=kubeconfig)
    client = AsyncClient(KubeConfig.from_file(kubeconfig))
    try:
        assert (await choose_platform(client, auto)).platform == "kubernetes"
        admin.create(cast(CustomResourceDefinition, CustomResourceDefinition.from_dict(crd)))
        try:
            kubeaccess.wait_for(lambda: _established(admin), timeout=30, what=f"CRD {SCC_CRD} established")
            choice = await choose_platform(client, auto)
            assert choice.platform == "openshift" and SCC_GROUP in choice.reason, choice
            assert serves_scc_group(await api_groups(client))
        finally:
            # Gone before the next test: a driver there would take this server for OpenShift.
            admin.delete(CustomResourceDefinition, SCC_CRD)
            kubeaccess.wait_for(lambda: _gone(admin), timeout=60, what=f"CRD {SCC_CRD} deleted")
    finally:
        await client.close()
