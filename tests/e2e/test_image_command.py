"""A sandbox created without a command runs its image's ENTRYPOINT + CMD: the driver reads them from
a registry that asks for credentials, with the pod's pull Secret read through the Kubernetes API
by an identity granted exactly ``rbac_rules(settings)`` (``get`` on that Secret by name).

Any cluster through ``KUBECONFIG`` (else the local control plane; skips with the reason without
either). The registry is a real docker-registry with htpasswd on 127.0.0.1: only the gateway side
talks to it, so the pods need not run (they are deleted).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Pod, Secret

from gateway.config import KubernetesDriverSettings
from gateway.drivers import podspec
from gateway.drivers.kubernetes import RBAC_RULES, KubernetesDriver, rbac_rules
from gateway.drivers.podspec import PodSpecError
from gateway.drivers.registry import RegistryError
from tests.support import kubeaccess
from tests.support.agentimages import ARGV, Pushed, push_agent_images
from tests.support.registry import ensure_tools, htpasswd_auth, running_registry

pytestmark = pytest.mark.timeout(600)
PULL_SECRET = "agents-pull"
#: A second pull Secret for the same registry: the first holds a password rotated away since.
ROTATED_SECRET = "agents-pull-rotated"


@pytest.fixture(scope="module")
def sandbox_ns(admin: Client) -> Iterator[str]:
    with kubeaccess.namespace(admin, "os-image-cmd") as name:
        yield name


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    """The agent images behind htpasswd (user puller, password s3cret)."""
    ensure_tools("docker-registry", "skopeo", "umoci")
    work = tmp_path_factory.mktemp("private-registry")
    with running_registry(work / "open") as open_registry:
        pushed = push_agent_images(open_registry, work)
    auth = htpasswd_auth(work, "puller", "s3cret")
    with running_registry(work / "private", auth=auth, storage=open_registry.root) as registry:
        yield Pushed(registry=registry, digests=pushed.digests)


def settings_for(kubeconfig: Path, namespace: str, registry_host: str) -> KubernetesDriverSettings:
    return KubernetesDriverSettings.model_validate(
        {
            "namespace": namespace,
            "kubeconfig": str(kubeconfig),
            "gateway_address": "openshell-gateway.openshell.svc:7070",
            "request_timeout_s": 20,
            "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
            "pod": {"image_pull_secrets": [ROTATED_SECRET, PULL_SECRET]},
            "registry": {"plain_http": [registry_host], "cache_ttl_s": 0},
        }
    )


def docker_config_secret(name: str, host: str, user: str, password: str) -> dict[str, object]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = json.dumps({"auths": {host: {"auth": auth}}}).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config).decode()},
    }


async def test_the_image_command_is_read_with_the_pull_secret_granted_by_name(
    admin: Client, kubeconfig: Path, sandbox_ns: str, private: Pushed, tmp_path: Path
) -> None:
    host = private.registry.host
    kubeaccess.create_objects(
        admin,
        [
            docker_config_secret(ROTATED_SECRET, host, "puller", "rotated-away"),
            docker_config_secret(PULL_SECRET, host, "puller", "s3cret"),
            docker_config_secret("not-for-the-gateway", host, "other", "x"),
        ],
        namespace=sandbox_ns,
    )
    rules = rbac_rules(settings_for(kubeconfig, sandbox_ns, host))
    assert rules[-1] == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": [ROTATED_SECRET, PULL_SECRET],
    }
    identity = kubeaccess.identity_with_rules(admin, kubeconfig, sandbox_ns, rules, tmp_path / "kc")
    driver = KubernetesDriver(settings_for(identity, sandbox_ns, host))
    try:
        await kubeaccess.until_granted(driver.states)
        # Both Secrets' credentials match; the first is refused, the second works (as the kubelet tries them).
        created = await driver.create(podspec.SandboxRequest("img-1", [], image=private.reference("1")))
        assert created.command == tuple(ARGV["1"])
        assert created.command_from_image == private.digests["1"]
        pinned = f"{private.reference('1')}@{private.digests['1']}"
        assert created.image == pinned
        pod = admin.get(Pod, "sandbox-img-1", namespace=sandbox_ns)
        assert pod.spec is not None and pod.metadata is not None and pod.metadata.annotations is not None
        assert pod.spec.containers[0].image == pinned, "the pod runs the image the command was read from"
        command = pod.spec.containers[0].command or []
        assert command[: len(podspec.launcher())] == podspec.launcher()
        assert command[command.index("--") + 1 :] == ARGV["1"], command
        assert pod.metadata.annotations[podspec.ANNOTATION_IMAGE_MANIFEST] == private.digests["1"]

        # An index narrowed to linux/amd64; a request's own command is never replaced.
        multi = await driver.create(podspec.SandboxRequest("img-2", [], image=private.reference("multi")))
        assert multi.command == tuple(ARGV["multi"]) and multi.command_from_image == private.digests["1"]
        assert multi.image == f"{private.reference('multi')}@{private.digests['multi']}"
        own = await driver.create(
            podspec.SandboxRequest("img-3", ["sleep", "1"], image=private.reference("1"))
        )
        assert own.command == ("sleep", "1") and own.command_from_image is None
        assert own.image == private.reference("1"), "a request's own command leaves its image as given"

        with pytest.raises(PodSpecError, match="has neither ENTRYPOINT nor CMD"):
            await driver.create(podspec.SandboxRequest("img-4", [], image=private.reference("bare")))
        with pytest.raises(RegistryError, match="not found in registry"):
            await driver.create(podspec.SandboxRequest("img-4", [], image=private.reference("gone")))
        assert admin.get(Pod, "sandbox-img-1", namespace=sandbox_ns) is not None
        with pytest.raises(ApiError) as refused:  # the grant is by name: no other Secret is readable
            await driver.client.get(Secret, "not-for-the-gateway", namespace=sandbox_ns)
        assert refused.value.status.code == 403
    finally:
        for sandbox_id in ("img-1", "img-2", "img-3"):
            await driver.delete(sandbox_id, grace_s=0)
        await driver.close()


async def test_without_the_secret_rule_the_registry_refusal_says_no_credentials(
    admin: Client, kubeconfig: Path, sandbox_ns: str, private: Pushed, tmp_path: Path
) -> None:
    host = private.registry.host
    identity = kubeaccess.identity_with_rules(admin, kubeconfig, sandbox_ns, RBAC_RULES, tmp_path / "kc")
    driver = KubernetesDriver(settings_for(identity, sandbox_ns, host))
    try:
        await kubeaccess.until_granted(driver.states)
        with pytest.raises(RegistryError) as caught:
            await driver.create(podspec.SandboxRequest("img-5", [], image=private.reference("1")))
        assert caught.value.caller_fault
        assert "HTTP 401) with no credentials" in str(caught.value)
        assert "image_pull_secrets" in str(caught.value)
        # Why no credentials were used is in the answer, not only in the gateway's log.
        assert f"pull Secret {ROTATED_SECRET!r} could not be read" in str(caught.value)
        assert "403 Forbidden" in str(caught.value)
        assert await driver.get("img-5") is None, "no pod without a command"
    finally:
        await driver.close()
