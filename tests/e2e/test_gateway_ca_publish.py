"""The gateway's CA reaches supervisors (drivers.kubernetes.supervisor.gateway_ca_file), against a real
API server with only the RBAC the driver declares for it.

The ``kubeconfig`` fixture's local kube-apiserver (or ``KUBECONFIG``). The driver, holding exactly
``rbac_rules(settings)`` in a "restricted" namespace, publishes the CA file as the ConfigMap the
sandbox pods mount, keeps it when nothing changed, updates it when the file changes (the background
publisher, as the gateway runs it), refuses to publish a file that holds no certificate (the
published one stays), and still reads no other ConfigMap. A sandbox pod mounting it is admitted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import ConfigMap, Pod

from gateway.config import KubernetesDriverSettings
from gateway.drivers import podspec
from gateway.drivers.kubernetes import KubernetesDriver, KubernetesDriverError, rbac_rules
from tests.support import kubeaccess

pytestmark = pytest.mark.timeout(300)

CA_ONE = "-----BEGIN CERTIFICATE-----\nb25l\n-----END CERTIFICATE-----\n"
CA_TWO = "-----BEGIN CERTIFICATE-----\ndHdv\n-----END CERTIFICATE-----\n"


def _published(admin: Client, namespace: str) -> str | None:
    try:
        config_map = admin.get(ConfigMap, podspec.GATEWAY_CA_CONFIGMAP, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    return (config_map.data or {}).get(podspec.GATEWAY_CA_KEY)


async def test_the_gateway_ca_is_published_kept_and_updated_with_only_the_declared_rbac(
    admin: Client, kubeconfig: Path, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(CA_ONE)
    with kubeaccess.namespace(admin, "os-ca") as namespace:
        settings = KubernetesDriverSettings.model_validate(
            {
                "namespace": namespace,
                "gateway_address": "openshell-gateway.openshell.svc:7070",
                "request_timeout_s": 20,
                "supervisor": {
                    "image": "registry.invalid/openshell-supervisor:0.1.0",
                    "gateway_ca_file": str(ca_file),
                },
                "pod": {"default_image": "registry.invalid/agent:1"},
            }
        )
        rules = rbac_rules(settings)
        identity = kubeaccess.identity_with_rules(admin, kubeconfig, namespace, rules, tmp_path / "kc")
        driver = KubernetesDriver(settings.model_copy(update={"kubeconfig": identity}))
        try:
            await kubeaccess.until_granted(driver.publish_gateway_ca)
            assert _published(admin, namespace) == CA_ONE
            assert await driver.publish_gateway_ca() is False  # the same: nothing written
            # A fresh driver (a restart, another replica) finds it published and writes nothing.
            again = KubernetesDriver(settings.model_copy(update={"kubeconfig": identity}))
            try:
                assert await again.publish_gateway_ca() is False
            finally:
                await again.close()

            # The background publisher takes up a changed file (a renewed CA).
            driver.start_gateway_ca_publisher(interval_s=0.2)
            ca_file.write_text(CA_TWO)
            for _ in range(150):
                if _published(admin, namespace) == CA_TWO:
                    break
                await asyncio.sleep(0.2)
            assert _published(admin, namespace) == CA_TWO

            # A file that holds no certificate is refused with the reason; the published CA stays.
            ca_file.write_text("not a certificate\n")
            fresh = KubernetesDriver(settings.model_copy(update={"kubeconfig": identity}))
            try:
                with pytest.raises(KubernetesDriverError, match="holds no PEM certificate"):
                    await fresh.publish_gateway_ca()
            finally:
                await fresh.close()
            assert _published(admin, namespace) == CA_TWO

            # The create is unnamed (RBAC cannot name it), but reads are by name only.
            with pytest.raises(ApiError) as refused:
                await driver.client.get(ConfigMap, "kube-root-ca.crt", namespace=namespace)
            assert refused.value.status.code == 403

            # A sandbox pod mounting it is admitted under "restricted".
            ca_file.write_text(CA_TWO)
            created = await driver.create(podspec.SandboxRequest("ca-1", ["sleep", "3600"]))
            pod = admin.get(Pod, created.pod_name, namespace=namespace)
            assert pod.spec is not None and pod.spec.volumes is not None
            (volume,) = [v for v in pod.spec.volumes if v.configMap is not None]
            assert volume.configMap is not None and volume.configMap.name == podspec.GATEWAY_CA_CONFIGMAP
            await driver.delete("ca-1", grace_s=0)
        finally:
            await driver.close()
