"""Issue 24 point 2: the supervisor's injection chosen from the cluster (gateway/drivers/injection.py).

Against real API servers: the session's control plane (Kubernetes 1.36, image volumes on), and a
second one started with ``--emulated-version=1.34``, which serves 1.34's features: ``ImageVolume``
off, so the server drops a pod's image volume and refuses the pod. The probe runs as the gateway's
own identity (the driver's Role only), so the permissions it needs are the ones the chart grants.
A namespace whose quota allows no pod shows a dry-run refusal that is not about the volume.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from lightkube import Client, codecs
from lightkube.models.core_v1 import LimitRangeItem, LimitRangeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import LimitRange, Pod, ServiceAccount

from chaos.proxy import DelayProxy
from gateway.app import Gateway
from gateway.config import GatewayConfig, KubernetesDriverSettings
from gateway.drivers import kubernetes as kubernetes_driver
from gateway.drivers.injection import InjectionChoice, decide
from gateway.drivers.kubernetes import KubernetesDriver, rbac_rules
from gateway.drivers.podspec import INIT_CONTAINER_NAME, VOLUME_SUPERVISOR, SandboxRequest, pod_name
from tests.support import kubeaccess
from tests.support.gateway import gateway_config
from tests.support.kubecluster import BuildError, LocalControlPlane, build
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(600)

SERVICE_ACCOUNT = "sandbox"


def settings(
    namespace: str, kubeconfig: Path, *, platform: str = "auto", **supervisor: str
) -> KubernetesDriverSettings:
    return KubernetesDriverSettings.model_validate(
        {
            "namespace": namespace,
            "platform": platform,
            "request_timeout_s": 5,
            "kubeconfig": str(kubeconfig),
            "gateway_address": "openshell-gateway.openshell.svc:7070",
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0", **supervisor},
            "pod": {"default_image": "registry.invalid/agent:1", "service_account_name": SERVICE_ACCOUNT},
        }
    )


def gateway_identity(admin: Client, kubeconfig: Path, namespace: str, path: Path) -> Path:
    """A kubeconfig with exactly the driver's Role in ``namespace``."""
    admin.create(ServiceAccount(metadata=ObjectMeta(name=SERVICE_ACCOUNT, namespace=namespace)))
    rules = rbac_rules(settings(namespace, kubeconfig))
    return kubeaccess.identity_with_rules(admin, kubeconfig, namespace, rules, path, name="gateway")


@pytest.fixture
def sandbox_namespace(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-inject") as namespace:
        yield namespace


async def test_auto_mounts_the_image_volume_where_the_server_keeps_it(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path
) -> None:
    identity = gateway_identity(admin, kubeconfig, sandbox_namespace, tmp_path / "gateway")
    driver = KubernetesDriver(settings(sandbox_namespace, identity))
    try:
        choice = await driver.choose_injection()
    finally:
        await driver.close()
    assert choice.problem is None, choice
    assert choice.server_version is not None
    major, minor = (int(part) for part in choice.server_version.split("."))
    if os.environ.get("KUBECONFIG"):
        # Any cluster: the rule, whatever its version.
        assert choice == decide(
            "auto", version=(major, minor), accepted=choice.image_volume_accepted, problem=None
        )
        return
    # The local control plane is 1.36: image volumes are GA there.
    assert (major, minor) >= (1, 35) and choice.image_volume_accepted is True, choice
    assert choice.mode == "image-volume" and "keeps a sandbox pod's image volume" in choice.reason


async def test_a_refusal_that_is_not_about_the_volume_is_said_and_the_version_decides(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path
) -> None:
    # Containers of at least 100 GiB only: the LimitRanger admission refuses the dry run (a
    # quota is not evaluated for dry runs).
    admin.create(
        LimitRange(
            metadata=ObjectMeta(name="huge-only"),
            spec=LimitRangeSpec(limits=[LimitRangeItem(type="Container", min={"memory": "100Gi"})]),
        ),
        namespace=sandbox_namespace,
    )
    identity = gateway_identity(admin, kubeconfig, sandbox_namespace, tmp_path / "gateway")
    driver = KubernetesDriver(settings(sandbox_namespace, identity))
    try:
        choice = await driver.choose_injection()
    finally:
        await driver.close()
    assert choice.image_volume_accepted is None, choice
    assert choice.problem is not None and "refused by the API server (403)" in choice.problem, choice
    assert "100Gi" in choice.problem
    if not os.environ.get("KUBECONFIG"):
        assert choice.mode == "image-volume" and "did not say otherwise" in choice.reason


@pytest.fixture(scope="module")
def emulated_134(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A second API server that serves Kubernetes 1.34's features (ImageVolume off by default)."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("needs the local control plane's binaries: a second API server is started")
    try:
        bin_dir = build()
    except BuildError as exc:
        pytest.skip(f"no local Kubernetes control plane: {exc.reason}")
    plane = LocalControlPlane(
        bin_dir,
        workdir=tmp_path_factory.mktemp("kube134"),
        controller_manager=False,
        scheduler=False,
        fake_nodes=0,
        extra_apiserver_args=["--emulated-version=1.34"],
    )
    plane.start()
    try:
        yield plane.kubeconfig
    finally:
        plane.stop()


async def test_auto_falls_back_to_the_init_container_where_image_volumes_are_off(
    emulated_134: Path, tmp_path: Path
) -> None:
    admin = kubeaccess.admin_client(emulated_134)
    with kubeaccess.namespace(admin, "os-inject") as namespace:
        identity = gateway_identity(admin, emulated_134, namespace, tmp_path / "gateway")
        auto = KubernetesDriver(settings(namespace, identity))
        pinned = KubernetesDriver(settings(namespace, identity, injection="image-volume"))
        try:
            choice = await auto.choose_injection()
            kept = await pinned.choose_injection()
            # The sandbox pods it then builds are the init container's, and the server takes them.
            await auto.create(SandboxRequest("sb-1", ["sleep", "1"], image="registry.invalid/agent:1"))
            pod = admin.get(Pod, pod_name("sb-1"), namespace=namespace)
        finally:
            await auto.close()
            await pinned.close()
    assert (choice.server_version, choice.image_volume_accepted, choice.problem) == ("1.34", False, None)
    assert choice.mode == "init-container" and "drops image volumes" in choice.reason
    assert pod.spec is not None and pod.spec.initContainers and pod.spec.volumes
    assert [c.name for c in pod.spec.initContainers] == [INIT_CONTAINER_NAME]
    [tree] = [v for v in pod.spec.volumes if v.name == VOLUME_SUPERVISOR]
    assert tree.image is None and tree.emptyDir is not None
    # Configured explicitly, the mode stays, and the reason says what will happen.
    assert kept.mode == "image-volume" and "every sandbox pod will be refused" in kept.reason


async def test_the_ops_status_shows_the_choice(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path
) -> None:
    # The admin's kubeconfig: the gateway's other work (leader Lease, token reviews) needs more
    # than the driver's Role, and the probe's own permissions are the tests' above.
    admin.create(ServiceAccount(metadata=ObjectMeta(name=SERVICE_ACCOUNT, namespace=sandbox_namespace)))
    config: GatewayConfig = gateway_config(
        tmp_path,
        {
            "drivers": {
                "kind": "kubernetes",
                "kubernetes": settings(sandbox_namespace, kubeconfig).model_dump(mode="json"),
            }
        },
    )
    gw = Gateway(config)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{gw.ops_url}/status") as resp:
            assert resp.status == 200
            doc = await resp.json()
    finally:
        await gw.stop()
    assert doc["replica"] == gw.identity.id and doc["draining"] is False and doc["version"]
    injection = doc["driver"]["injection"]
    assert doc["driver"]["kind"] == "kubernetes" and doc["driver"]["namespace"] == sandbox_namespace
    assert injection["configured"] == "auto" and injection["mode"] in ("image-volume", "init-container")
    assert injection["server_version"] and injection["reason"]


async def test_a_choice_made_while_the_api_did_not_answer_is_asked_again(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API out of reach at start: the choice is provisional (init-container, said so) and not
    kept for the process's life; once the API answers, the next creation asks again and settles."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("reaches the API server through a local proxy: the tests' own control plane only")
    identity = gateway_identity(admin, kubeconfig, sandbox_namespace, tmp_path / "gateway")
    doc = yaml.safe_load(identity.read_text())
    api = urllib.parse.urlsplit(doc["clusters"][0]["cluster"]["server"])
    proxy = DelayProxy(workdir=tmp_path / "proxy", host="127.0.0.1", target=f"127.0.0.1:{api.port}")
    # The gateway dials the proxy's port, where nothing listens yet: every call is refused.
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    (tmp_path / "via-proxy").write_text(yaml.safe_dump(doc))
    driver = KubernetesDriver(settings(sandbox_namespace, tmp_path / "via-proxy", platform="kubernetes"))
    try:
        first = await driver.choose_injection()
        assert (first.settled, first.mode, first.server_version) == (False, "init-container", None), first
        assert "provisional" in first.reason
        monkeypatch.setattr(kubernetes_driver, "RETRY_UNSETTLED_S", 0.0)
        proxy.start()
        await driver.create(SandboxRequest("sb-late", ["true"], image="registry.invalid/agent:1"))
        settled = driver.injection
        assert settled is not None and settled.settled and settled.mode == "image-volume", settled
        pod = admin.get(Pod, pod_name("sb-late"), namespace=sandbox_namespace)
        assert pod.spec is not None and pod.spec.volumes
        [tree] = [v for v in pod.spec.volumes if v.name == VOLUME_SUPERVISOR]
        assert tree.image is not None and not pod.spec.initContainers
    finally:
        proxy.stop()
        await driver.close()


def _no_image_volumes(namespace: str) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy (the API server's own CEL admission, as a policy engine would
    do it) refusing pods with an image volume in ``namespace``: a 422 that names no volume index."""
    name = f"no-image-volumes-{namespace}"
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": (
                            "!has(object.spec.volumes) || object.spec.volumes.all(v, !has(v.image))"
                        ),
                        "message": "image is not an allowed volume type in this namespace",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]


async def test_an_admission_rule_against_image_volumes_makes_auto_take_the_init_container(
    admin: Client, kubeconfig: Path, sandbox_namespace: str, tmp_path: Path
) -> None:
    """A refusal the server does not tie to the volume (a policy's own list of volume types): the
    pod with the init container is dry-run too, and admitted, so auto takes the init container."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("creates cluster-wide admission policies: the tests' own control plane only")
    identity = gateway_identity(admin, kubeconfig, sandbox_namespace, tmp_path / "gateway")
    policies = [codecs.from_dict(doc) for doc in _no_image_volumes(sandbox_namespace)]
    for policy in policies:
        admin.create(policy)  # type: ignore[call-overload]
    try:

        async def chosen() -> InjectionChoice | None:
            driver = KubernetesDriver(settings(sandbox_namespace, identity, platform="kubernetes"))
            try:
                choice = await driver.choose_injection()
            finally:
                await driver.close()
            # The policy takes effect within moments (the API server's policy cache).
            return choice if choice.problem is not None else None

        choice = await until(chosen, within=30, what="the admission policy refusing the image volume")
    finally:
        for policy in reversed(policies):
            admin.delete(type(policy), policy.metadata.name)
    assert choice.problem is not None and "image is not an allowed volume type" in choice.problem
    assert (choice.mode, choice.settled, choice.image_volume_accepted) == ("init-container", True, None)
    assert "admits it with the init container" in choice.reason
