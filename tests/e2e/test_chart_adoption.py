"""The chart meets objects that exist before it (issue 24 point 5), on a real API server with real
Helm: the local control plane the ``kubeconfig`` fixture starts, or any cluster through ``KUBECONFIG``.

A sandbox namespace that exists already is refused by name while ``sandboxes.createNamespace`` is
on (the chart's ``lookup``), and used as it is (referenced, neither labelled nor deleted) with it
off; a RuntimeClass that exists already (GKE Sandbox's ``gvisor``) is refused by name while
``runtimeClasses.*.create`` is on. The release's own namespace does not trip the check on upgrade
(``test_chart_live.py`` upgrades a release that created its namespace).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import helm_python
import pytest
from lightkube import ApiError, Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, ServiceAccount
from lightkube.resources.node_v1 import RuntimeClass
from lightkube.resources.rbac_authorization_v1 import Role

from tests.support import kubeaccess
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(600)

CHART = REPO / "helm" / "openshell"


def test_an_existing_sandbox_namespace_is_refused_or_used_as_it_is(admin: Client, kubeconfig: Path) -> None:
    namespace = kubeaccess.unique("os-adopt")
    sandboxes = f"{namespace}-own"
    admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    admin.create(Namespace(metadata=ObjectMeta(name=sandboxes, labels={"team": "agents"})))
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        created = {"sandboxes": {"namespace": sandboxes, "createNamespace": True}}
        with pytest.raises(helm_python.HelmError) as refused:
            helm.install(str(CHART), "adopt", created, namespace=namespace, timeout=120)
        message = str(refused.value)
        assert f'the Namespace "{sandboxes}" exists already and is not this release\'s' in message
        assert "sandboxes.createNamespace=false" in message
        assert not [r for r in helm.list(all_states=True) if r.get("name") == "adopt"]

        referenced = {"sandboxes": {"namespace": sandboxes, "createNamespace": False}}
        helm.install(str(CHART), "adopt", referenced, namespace=namespace, timeout=120)
        assert admin.get(Role, "adopt-openshell-gateway-sandboxes", namespace=sandboxes)
        assert admin.get(ServiceAccount, "adopt-openshell-sandbox", namespace=sandboxes)
        existing = admin.get(Namespace, sandboxes)
        assert existing.metadata is not None
        assert existing.metadata.labels == {"team": "agents", "kubernetes.io/metadata.name": sandboxes}
        assert "meta.helm.sh/release-name" not in (existing.metadata.annotations or {})
        helm.upgrade(str(CHART), "adopt", referenced, namespace=namespace, timeout=120)
        helm.uninstall("adopt", timeout=120)
        # Only referenced: the release's objects in it go, the namespace stays.
        left = admin.get(Namespace, sandboxes)
        assert left.metadata is not None and left.metadata.deletionTimestamp is None
        with pytest.raises(ApiError):
            admin.get(Role, "adopt-openshell-gateway-sandboxes", namespace=sandboxes)
    finally:
        with contextlib.suppress(Exception):
            helm.uninstall("adopt", timeout=120, ignore_not_found=True)
        for name in (namespace, sandboxes):
            with contextlib.suppress(ApiError):
                admin.delete(Namespace, name)


def test_an_existing_runtime_class_is_refused_by_name(admin: Client, kubeconfig: Path) -> None:
    namespace = kubeaccess.unique("os-rc")
    name = kubeaccess.unique("gvisor")  # cluster-scoped: never the real one's name
    admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    admin.create(RuntimeClass(metadata=ObjectMeta(name=name), handler="runsc"))
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        values = {"runtimeClasses": {"gvisor": {"create": True, "name": name}}}
        with pytest.raises(helm_python.HelmError) as refused:
            helm.install(str(CHART), "rc", values, namespace=namespace, timeout=120)
        message = str(refused.value)
        assert f'the RuntimeClass "{name}" exists already and is not this release\'s' in message
        assert "runtimeClasses.gvisor.create=false" in message
        # Pointing the sandboxes at it without creating one installs.
        using = {"sandboxes": {"pod": {"runtimeClassName": name}}}
        helm.install(str(CHART), "rc", using, namespace=namespace, timeout=120)
        helm.uninstall("rc", timeout=120)
        assert admin.get(RuntimeClass, name)  # not the release's: left alone
    finally:
        with contextlib.suppress(Exception):
            helm.uninstall("rc", timeout=120, ignore_not_found=True)
        with contextlib.suppress(ApiError):
            admin.delete(RuntimeClass, name)
        for ns in (namespace, f"{namespace}-sandboxes"):
            with contextlib.suppress(ApiError):
                admin.delete(Namespace, ns)
