"""The chart against a real API server, with real Helm (helm-python-sdk): any cluster through
``KUBECONFIG``, or the local control plane the ``kubeconfig`` fixture starts.

1. Install, upgrade and uninstall the chart with an external database (its URL from an existing
   Secret): every object is accepted server-side, and the migration Job runs as a pre-install and
   pre-upgrade hook. Hook Jobs must finish for Helm to go on, so this needs pods that complete:
   kwok's fake nodes on the local control plane, or a real cluster given a database the Job can
   reach (``OPENSHELL_TEST_DATABASE_URL``) and a gateway image (``OPENSHELL_TEST_GATEWAY_IMAGE``;
   ``OPENSHELL_TEST_SUPERVISOR_IMAGE`` too, for the sandbox pods' image volume).
2. The gateway's Kubernetes driver, configured by the ConfigMap the chart installed and running
   with a TokenRequest token of the chart's own ServiceAccount (so with only the chart's RBAC),
   creates a sandbox in the namespace the chart created (Pod Security "restricted"), watches it,
   and deletes it; with the same token the gateway may review a sandbox's projected token (the
   chart's tokenreviews ClusterRole), and without the binding it may not.

A sandbox that really runs, connects, is cut off by a NetworkPolicy and resumes is
``test_chart_on_node.py``'s: on a cluster whose node runs pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from lightkube import ApiError, Client
from lightkube.config.kubeconfig import KubeConfig
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.core_v1 import ConfigMap, Namespace, Node, Pod, Secret, Service, ServiceAccount
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.resources.rbac_authorization_v1 import ClusterRole, ClusterRoleBinding, Role, RoleBinding

from gateway.config import GatewayConfig
from gateway.drivers import podspec
from gateway.drivers.kubernetes import KubernetesDriver, KubernetesDriverError, PodState
from openshell_wire.configfile import load_settings
from tests.support import kubeaccess
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(900)

CHART = REPO / "helm" / "openshell"
RELEASE = "openshell"
GATEWAY_IMAGE = os.environ.get("OPENSHELL_TEST_GATEWAY_IMAGE", "")
SUPERVISOR_IMAGE = os.environ.get("OPENSHELL_TEST_SUPERVISOR_IMAGE", "")
DATABASE_URL = os.environ.get("OPENSHELL_TEST_DATABASE_URL", "")


def fake_nodes(admin: Client) -> bool:
    return any(True for _ in admin.list(Node, labels={"type": "kwok"}))


@pytest.fixture(scope="module")
def release(admin: Client, kubeconfig: Path) -> Iterator[dict[str, Any]]:
    """The chart installed once for this module; uninstalled (and checked gone) at the end."""
    if not fake_nodes(admin) and not (DATABASE_URL and GATEWAY_IMAGE):
        pytest.skip(
            "the migration hook Job must complete: needs kwok's fake nodes (the local control plane) or, "
            "on a real cluster, OPENSHELL_TEST_DATABASE_URL and OPENSHELL_TEST_GATEWAY_IMAGE"
        )
    namespace = kubeaccess.unique("os-chart")
    sandboxes = f"{namespace}-sb"
    admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    admin.create(
        Secret(
            metadata=ObjectMeta(name="openshell-db", namespace=namespace),
            stringData={"url": DATABASE_URL or "postgresql+asyncpg://openshell:secret@db.invalid/openshell"},
        )
    )
    values: dict[str, Any] = {
        "database": {"existingSecret": "openshell-db", "existingSecretKey": "url"},
        "sandboxes": {
            "namespace": sandboxes,
            "createNamespace": True,
            "pod": {"defaultImage": "registry.invalid/agent:1"},
        },
        "gateway": {"logLevel": "info"},
    }
    if GATEWAY_IMAGE:
        values["gateway"]["image"] = kubeaccess.image_values(GATEWAY_IMAGE)
    if SUPERVISOR_IMAGE:
        values["sandboxes"]["supervisor"] = {"image": kubeaccess.image_values(SUPERVISOR_IMAGE)}
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    installed = helm.install(str(CHART), RELEASE, values, namespace=namespace, timeout=300)
    info = {
        "helm": helm,
        "namespace": namespace,
        "sandboxes": sandboxes,
        "values": values,
        "installed": installed,
        "first_hook_run": migration_hook(helm)["last_run"].get("started_at", ""),
    }
    try:
        yield info
    finally:
        helm.uninstall(RELEASE, timeout=300, ignore_not_found=True)
        for name in (namespace, sandboxes):
            with contextlib.suppress(ApiError):
                admin.delete(Namespace, name)


def _manifest_objects(release: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(release["manifest"]) if d]


def test_install_puts_every_object_on_the_server_and_runs_the_migration_hook(
    admin: Client, release: dict[str, Any]
) -> None:
    namespace, sandboxes = release["namespace"], release["sandboxes"]
    status = release["helm"].status(RELEASE)
    objects = _manifest_objects(status)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {k for k, _ in kinds} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "NetworkPolicy",
    }
    cluster_scoped = {
        "Namespace": Namespace,
        "ClusterRole": ClusterRole,
        "ClusterRoleBinding": ClusterRoleBinding,
    }
    lookups = {
        "Deployment": Deployment,
        "Service": Service,
        "ConfigMap": ConfigMap,
        "ServiceAccount": ServiceAccount,
        "Role": Role,
        "RoleBinding": RoleBinding,
        "NetworkPolicy": NetworkPolicy,
    }
    for obj in objects:  # each one is really there, where the chart said
        if obj["kind"] in cluster_scoped:
            assert admin.get(cluster_scoped[obj["kind"]], obj["metadata"]["name"])  # type: ignore[call-overload]
            continue
        kind = lookups.get(obj["kind"])
        if kind is None:
            continue
        ns = obj["metadata"].get("namespace", namespace)
        assert admin.get(kind, obj["metadata"]["name"], namespace=ns)  # type: ignore[call-overload]
    sb_ns = admin.get(Namespace, sandboxes)
    assert sb_ns.metadata is not None and sb_ns.metadata.labels is not None
    assert sb_ns.metadata.labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    # The Role sits in the sandbox namespace, bound to the gateway's ServiceAccount.
    role_binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert role_binding["metadata"]["namespace"] == sandboxes
    # Both NetworkPolicies: the gateway's in its namespace, the sandboxes' in theirs.
    policies = {o["metadata"]["namespace"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert policies == {namespace, sandboxes}

    # The migration Job ran as a pre-install hook and succeeded (Helm waits for hook Jobs; its
    # delete policy removes the Job after success, so the release's hook record is the evidence).
    job = migration_hook(release["helm"])
    assert {"pre-install", "pre-upgrade"} <= set(job["events"])
    assert job["last_run"]["phase"] == "Succeeded", job
    assert release["first_hook_run"] and job["last_run"]["completed_at"] >= job["last_run"]["started_at"]


def migration_hook(helm: Any) -> dict[str, Any]:
    hooks = helm.get_all(RELEASE)["hooks"]
    (job,) = [h for h in hooks if h["kind"] == "Job"]
    return {k: v for k, v in job.items() if k != "manifest"}


def test_upgrade_runs_the_hook_again_and_rolls_the_gateway(admin: Client, release: dict[str, Any]) -> None:
    namespace = release["namespace"]
    before = admin.get(Deployment, f"{RELEASE}-gateway", namespace=namespace)
    values = json.loads(json.dumps(release["values"]))
    values["gateway"]["logLevel"] = "debug"
    upgraded = release["helm"].upgrade(str(CHART), RELEASE, values, namespace=namespace, timeout=300)
    assert upgraded["revision"] == 2
    job = migration_hook(release["helm"])
    assert job["last_run"]["phase"] == "Succeeded"
    assert job["last_run"]["started_at"] > release["first_hook_run"], "the hook ran again for the upgrade"
    after = admin.get(Deployment, f"{RELEASE}-gateway", namespace=namespace)
    annotations = lambda d: (d.spec.template.metadata.annotations or {}) if d.spec else {}  # noqa: E731
    assert annotations(before) != annotations(after), "a config change rolls the gateway (checksum)"
    config = admin.get(ConfigMap, f"{RELEASE}-gateway", namespace=namespace)
    assert config.data is not None and "log_level: debug" in next(iter(config.data.values()))


async def test_the_driver_runs_on_the_charts_config_and_rbac(
    admin: Client, kubeconfig: Path, release: dict[str, Any], tmp_path: Path
) -> None:
    namespace, sandboxes = release["namespace"], release["sandboxes"]
    config_map = admin.get(ConfigMap, f"{RELEASE}-gateway", namespace=namespace)
    assert config_map.data is not None
    (name, text), *_ = config_map.data.items()
    config_file = tmp_path / name
    config_file.write_text(text)
    config = load_settings(GatewayConfig, file=config_file, use_env=False)
    assert config.drivers.kind == "kubernetes" and config.drivers.kubernetes.namespace == sandboxes

    sa_name = f"{RELEASE}-gateway"
    token = kubeaccess.request_token(admin, sa_name, namespace)
    identity = kubeaccess.token_kubeconfig(kubeconfig, token, tmp_path / "kc", namespace=namespace)
    settings = config.drivers.kubernetes.model_copy(update={"kubeconfig": identity})
    driver = KubernetesDriver(settings)
    seen: list[PodState] = []

    async def follow() -> None:
        async for state in driver.watch():
            seen.append(state)

    try:
        async with asyncio.timeout(30):
            while True:  # RBAC takes a moment to be in force
                try:
                    await driver.check_access()
                    break
                except Exception:
                    await asyncio.sleep(0.3)
        watcher = asyncio.create_task(follow())
        await driver.create(podspec.SandboxRequest("chart-sb", ["sleep", "600"]))
        pod = admin.get(Pod, "sandbox-chart-sb", namespace=sandboxes)
        assert pod.spec is not None and pod.spec.containers[0].command is not None
        command = pod.spec.containers[0].command
        after = len(podspec.launcher()) + 1  # the launcher, then "run"
        assert command[after : after + 4] == [
            "--sandbox-id",
            "chart-sb",
            "--gateway",
            f"{RELEASE}-gateway.{namespace}.svc:7070",
        ]
        await _until(lambda: any(s.sandbox_id == "chart-sb" for s in seen))
        assert await driver.delete("chart-sb", grace_s=0)
        await _until(lambda: any(s.sandbox_id == "chart-sb" and s.deleted for s in seen))
        watcher.cancel()

        # Take one verb out of the chart's own Role: the driver now fails, saying what is missing.
        role_name = next(
            o["metadata"]["name"]
            for o in _manifest_objects(release["helm"].status(RELEASE))
            if o["kind"] == "Role"
        )
        role = admin.get(Role, role_name, namespace=sandboxes)
        assert role.rules is not None
        for rule in role.rules:
            if rule.resources == ["pods"]:
                rule.verbs = [v for v in rule.verbs if v != "delete"]
        admin.replace(role)
        await driver.create(podspec.SandboxRequest("chart-sb-2", ["sleep", "600"]))
        async with asyncio.timeout(30):
            while True:  # until the authorizer has the new Role
                try:
                    await driver.delete("chart-sb-2", grace_s=0)
                except KubernetesDriverError as exc:
                    refused = exc
                    break
                await driver.create(podspec.SandboxRequest("chart-sb-2", ["sleep", "600"]))
        assert refused.status == 403
        assert f"refused to delete pods in namespace {sandboxes!r}" in str(refused)
        assert "docs/rbac.md" in str(refused)

        # TokenReviews, as the gateway checks sandbox pods' projected tokens: allowed by the chart's
        # ClusterRole to this ServiceAccount, refused without its binding.
        reviewer = Client(KubeConfig.from_file(identity), field_manager="openshell-tests")
        audience = config.auth.supervisors.kubernetes_audience
        sandbox_token = kubeaccess.request_token(admin, "default", sandboxes, audiences=[audience])
        review = TokenReview(spec=TokenReviewSpec(token=sandbox_token, audiences=[audience]))
        answer = reviewer.create(review)
        assert answer.status is not None and answer.status.authenticated, answer.status
        binding_name = next(
            o["metadata"]["name"]
            for o in _manifest_objects(release["helm"].status(RELEASE))
            if o["kind"] == "ClusterRoleBinding"
        )
        admin.delete(ClusterRoleBinding, binding_name)
        async with asyncio.timeout(30):
            while True:  # until the authorizer drops the binding
                try:
                    reviewer.create(review)
                except ApiError as exc:
                    assert exc.status.code == 403, exc
                    break
                await asyncio.sleep(0.3)
    finally:
        await driver.close()


def test_uninstall_removes_what_the_chart_made(admin: Client, kubeconfig: Path) -> None:
    """A release of its own with the defaults (SQLite, no hook, a sandbox namespace of its own),
    installed and uninstalled: nothing of it is left."""
    namespace = kubeaccess.unique("os-uninstall")
    sandboxes = f"{namespace}-sandboxes"
    admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        helm.install(str(CHART), "gone", {}, namespace=namespace, timeout=120)
        assert admin.get(Deployment, "gone-openshell-gateway", namespace=namespace)
        created = admin.get(Namespace, sandboxes)
        assert created.metadata is not None and created.metadata.labels is not None
        assert created.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert [r for r in admin.list(Role, namespace=sandboxes)], (
            "the gateway's Role is in the sandbox namespace"
        )
        helm.uninstall("gone", timeout=120)

        def leftovers() -> list[str]:
            left = [d.metadata.name for d in admin.list(Deployment, namespace=namespace) if d.metadata]
            left += [c.metadata.name for c in admin.list(ConfigMap, namespace=namespace) if c.metadata]
            # The cluster-scoped grant goes too (it is named after the release's namespace).
            left += [
                f"gone: ClusterRole {r.metadata.name}"
                for r in admin.list(ClusterRole)
                if r.metadata and r.metadata.name and r.metadata.name.startswith(f"{namespace}-")
            ]
            try:
                ns = admin.get(Namespace, sandboxes)
            except ApiError:
                return [n for n in left if n and n.startswith("gone")]
            if ns.metadata is None or ns.metadata.deletionTimestamp is None:
                left.append(f"namespace {sandboxes}")
            return [n for n in left if n and (n.startswith("gone") or n.startswith("namespace"))]

        deadline = time.monotonic() + 60
        while (left := leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left
    finally:
        admin.delete(Namespace, namespace)


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - the watch task appends; polling its list is enough here
            await asyncio.sleep(0.1)
