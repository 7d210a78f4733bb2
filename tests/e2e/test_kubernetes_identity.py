"""A sandbox pod's projected ServiceAccount token, checked by the gateway against a real API server.

Any cluster through ``KUBECONFIG`` (the ``kubeconfig`` fixture: the local control plane with kwok
nodes, or any cluster). No kubelet runs these pods, so the test plays its part: it mints what the
kubelet projects into the pod (``kubeaccess.projected_token``: a TokenRequest for the pod's
ServiceAccount with the volume's audience and expiry, bound to the pod). The gateway's verifier
(``gateway.auth.kubernetes_tokens``) asks the API server with a TokenReview, as the gateway's own
identity holding exactly the driver's Role and its one ClusterRole rule: the right token is
accepted and names its sandbox and pod uid; a wrong audience, another namespace's ServiceAccount,
a token bound to no pod or to a pod that is no sandbox's, a forged token, a token whose pod was
deleted (a replay) and an expired one are each refused with their reason; without the
``tokenreviews`` rule the review is refused clearly, as an outage the supervisor retries, not as a
bad credential.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, codecs
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod, ServiceAccount

from gateway.auth import CredentialRefused, Refusal, SandboxPrincipal
from gateway.auth.kubernetes_tokens import KubernetesTokenVerifier, kubernetes_verifier
from gateway.auth.sandbox_tokens import SandboxTokens
from gateway.auth.supervisors import SupervisorAuthenticator
from gateway.config import GatewayConfig
from gateway.drivers import podspec
from gateway.drivers.kubernetes import CLUSTER_RBAC_RULES, KubernetesDriver, rbac_rules
from gateway.store import Database, SandboxStore
from gateway.store.signing_keys import SigningKeyStore
from tests.support import kubeaccess

pytestmark = pytest.mark.timeout(300)

SERVICE_ACCOUNT = "sandbox"
GATEWAY_IDENTITY = "gateway"


@dataclass(frozen=True)
class Cluster:
    admin: Client
    kubeconfig: Path
    namespace: str
    other_namespace: str


@pytest.fixture(scope="module")
def cluster(admin: Client, kubeconfig: Path) -> Iterator[Cluster]:
    with (
        kubeaccess.namespace(admin, "os-identity") as namespace,
        kubeaccess.namespace(admin, "os-elsewhere") as other,
    ):
        for ns in (namespace, other):
            admin.create(ServiceAccount(metadata=ObjectMeta(name=SERVICE_ACCOUNT, namespace=ns)))
        yield Cluster(admin, kubeconfig, namespace, other)


def config(namespace: str, *, review_cache_s: float = 300.0) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "auth": {"supervisors": {"review_cache_s": review_cache_s}},
            "drivers": {
                "kind": "kubernetes",
                "kubernetes": {
                    "namespace": namespace,
                    "gateway_address": "openshell-gateway.openshell.svc:7070",
                    "supervisor": {"image": "registry.invalid/openshell-supervisor:0.1.0"},
                    "pod": {
                        "default_image": "registry.invalid/agent:1",
                        "service_account_name": SERVICE_ACCOUNT,
                    },
                },
            },
        }
    )


def make_pod(
    c: Cluster, sandbox_id: str, *, namespace: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The sandbox pod exactly as the driver builds it (its projected token source included), as
    the API server holds it (with its uid)."""
    cfg = config(namespace or c.namespace)
    built = podspec.build_sandbox_pod(
        cfg.drivers.kubernetes,
        podspec.SandboxRequest(sandbox_id, ["sleep", "3600"]),
        auth=cfg.auth.supervisors,
    )
    if name is not None:
        built["metadata"]["name"] = name
    created = c.admin.create(codecs.from_dict(built))  # type: ignore[call-overload]
    return dict(created.to_dict())


def delete_pod(c: Cluster, pod: dict[str, Any]) -> None:
    c.admin.delete(Pod, pod["metadata"]["name"], namespace=pod["metadata"]["namespace"], grace_period=0)


def delete_pod_for_good(c: Cluster, pod: dict[str, Any]) -> None:
    """Delete the pod as a kubelet would see it deleted (graceful: the node, here kwok, removes it)
    and wait until it is gone. Before a pod of the same name is made: a forced delete left kwok
    to act on the old pod's name later, and once (a loaded CI run) it deleted the new pod."""
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    c.admin.delete(Pod, name, namespace=namespace)
    deadline = time.monotonic() + 60
    while True:
        try:
            c.admin.get(Pod, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return
            raise
        assert time.monotonic() < deadline, f"pod {name} still there 60 s after its deletion"
        time.sleep(0.2)


async def refused(verify: Callable[[], Awaitable[SandboxPrincipal]]) -> CredentialRefused:
    with pytest.raises(CredentialRefused) as raised:
        await verify()
    return raised.value


@pytest.fixture(scope="module")
def gateway_identity(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The gateway's identity: exactly the driver's Role in the sandbox namespace and its
    ClusterRole rule (TokenReview)."""
    c = cluster
    rules = rbac_rules(config(c.namespace).drivers.kubernetes)
    path = tmp_path_factory.mktemp("gateway") / "kubeconfig"
    identity = kubeaccess.identity_with_rules(
        c.admin, c.kubeconfig, c.namespace, rules, path, name=GATEWAY_IDENTITY
    )
    with kubeaccess.cluster_grant(c.admin, GATEWAY_IDENTITY, c.namespace, CLUSTER_RBAC_RULES):
        yield identity


def driver_for(identity: Path, namespace: str) -> KubernetesDriver:
    settings = config(namespace).drivers.kubernetes.model_copy(update={"kubeconfig": identity})
    return KubernetesDriver(settings)


async def until_reviewed(verifier_of: Callable[[], KubernetesTokenVerifier], token: str) -> SandboxPrincipal:
    """RBAC takes effect within moments: a fresh verifier each try until the review is allowed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await verifier_of().verify(token)
        except CredentialRefused as exc:
            if exc.reason is not Refusal.REVIEW_UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.3)


async def test_the_pods_own_token_is_accepted_and_every_bad_one_refused_with_its_reason(
    cluster: Cluster, gateway_identity: Path
) -> None:
    c = cluster
    driver = driver_for(gateway_identity, c.namespace)
    cfg = config(c.namespace)

    def verifier() -> KubernetesTokenVerifier:
        made = kubernetes_verifier(cfg, driver.client)
        assert isinstance(made, KubernetesTokenVerifier)
        return made

    pod = make_pod(c, "id-1")
    try:
        token = kubeaccess.projected_token(c.admin, pod)
        principal = await until_reviewed(verifier, token)
        assert principal.kind == "kubernetes" and principal.sandbox_id == "id-1"
        assert principal.pod_name == "sandbox-id-1" and principal.pod_uid == pod["metadata"]["uid"]
        now = time.time()
        assert now + 3000 < principal.expires_at <= now + 3700, "the projected token's own expiry"

        v = verifier()
        # Minted for another audience (say, the API server's own): not ours.
        other_audience = kubeaccess.request_token(
            c.admin,
            SERVICE_ACCOUNT,
            c.namespace,
            audiences=["someone-else"],
            pod=(pod["metadata"]["name"], pod["metadata"]["uid"]),
        )
        assert (await refused(lambda: v.verify(other_audience))).reason is Refusal.WRONG_AUDIENCE
        # Our audience, but not bound to any pod.
        unbound = kubeaccess.request_token(
            c.admin, SERVICE_ACCOUNT, c.namespace, audiences=[cfg.auth.supervisors.kubernetes_audience]
        )
        refusal = await refused(lambda: v.verify(unbound))
        assert refusal.reason is Refusal.NOT_A_SANDBOX and "not bound to a pod" in refusal.detail
        # A pod of the sandbox namespace that is no sandbox's.
        stray = make_pod(c, "id-2", name="not-a-sandbox")
        try:
            refusal = await refused(lambda: v.verify(kubeaccess.projected_token(c.admin, stray)))
            assert refusal.reason is Refusal.NOT_A_SANDBOX and "not a sandbox pod" in refusal.detail
        finally:
            delete_pod(c, stray)
        # A pod named like a sandbox's in another namespace: another ServiceAccount's token.
        elsewhere = make_pod(c, "id-1", namespace=c.other_namespace)
        try:
            refusal = await refused(lambda: v.verify(kubeaccess.projected_token(c.admin, elsewhere)))
            assert refusal.reason is Refusal.NOT_A_SANDBOX
            assert f"system:serviceaccount:{c.other_namespace}:{SERVICE_ACCOUNT}" in refusal.detail
        finally:
            delete_pod(c, elsewhere)
        # Forged: the right claims, no valid signature.
        header, _, _ = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'x' * 256).rstrip(b'=').decode()}"
        refusal = await refused(lambda: v.verify(forged))
        assert refusal.reason is Refusal.REVIEW_FAILED and forged not in str(refusal)
        assert (await refused(lambda: v.verify("not-a-jwt"))).reason is Refusal.MALFORMED
        # Expired: TokenRequest mints at least 10 minutes, so the verifier's clock moves instead.
        late = KubernetesTokenVerifier(
            verifier()._review,
            audience=cfg.auth.supervisors.kubernetes_audience,
            username=f"system:serviceaccount:{c.namespace}:{SERVICE_ACCOUNT}",
            cache_s=300,
            clock=lambda: time.time() + 7200,
        )
        assert (await refused(lambda: late.verify(token))).reason is Refusal.EXPIRED
        # The accepted token is still accepted (from the cache, or reviewed again)...
        assert (await v.verify(token)).pod_uid == pod["metadata"]["uid"]
    finally:
        delete_pod(c, pod)
    # ... until its pod is gone: the API server no longer authenticates it (a replay). The
    # apiserver may take a moment to see the deletion; each try is a fresh review.
    deadline = time.monotonic() + 30
    while True:
        try:
            await verifier().verify(token)
        except CredentialRefused as exc:
            assert exc.reason is Refusal.REVIEW_FAILED, exc
            assert token not in str(exc)
            break
        assert time.monotonic() < deadline, "a deleted pod's token was still accepted after 30 s"
        await asyncio.sleep(0.3)
    await driver.close()


async def test_without_the_tokenreviews_rule_the_review_is_refused_clearly(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    rules = rbac_rules(config(c.namespace).drivers.kubernetes)
    identity = kubeaccess.identity_with_rules(c.admin, c.kubeconfig, c.namespace, rules, tmp_path / "kc")
    driver = driver_for(identity, c.namespace)
    pod = make_pod(c, "id-norbac")
    try:
        await kubeaccess.until_granted(driver.states)  # the Role is in force: only the rule lacks
        token = kubeaccess.projected_token(c.admin, pod)
        refusal = await refused(lambda: kubernetes_verifier(config(c.namespace), driver.client).verify(token))
        assert refusal.reason is Refusal.REVIEW_UNAVAILABLE, refusal
        assert (
            "403" in refusal.detail and "tokenreviews" in refusal.detail and "docs/rbac.md" in refusal.detail
        )
        assert token not in str(refusal)
    finally:
        delete_pod(c, pod)
        await driver.close()


async def test_through_the_authenticator_a_pods_token_speaks_for_its_own_live_sandbox_only(
    cluster: Cluster, gateway_identity: Path, tmp_path: Path
) -> None:
    """The gateway's one rule for supervisor calls (gateway/auth/supervisors.py) with this
    verifier and the real store: a pod's token acts for its sandbox, never for another; a pod
    made under the sandbox's pod name by someone else than the gateway (its row still naming the
    gateway's pod) is refused ``stale`` although the API server accepts its token; so is any pod
    for a row that names no pod; once the gateway's create re-records the sandbox's pod, the old
    pod's token is refused ``stale`` even while its accepted review is still cached (review cache
    on); once its pod is gone (the sandbox deleted) a token no longer gets in, within
    review_cache_s (0 for that step)."""
    c = cluster
    cfg = config(c.namespace, review_cache_s=0)
    driver = driver_for(gateway_identity, c.namespace)
    db = await Database.open(f"sqlite:///{tmp_path}/gateway.db")
    sandboxes = SandboxStore(db)
    authenticator = SupervisorAuthenticator(
        cfg, tokens=SandboxTokens(cfg.auth.supervisors, SigningKeyStore(db)), sandboxes=sandboxes
    )
    authenticator.use_kubernetes(kubernetes_verifier(cfg, driver.client))
    # The same with the review cache on: a token reviewed once is not asked about again, so only
    # the binding to the row's pod uid can refuse it.
    cached_cfg = config(c.namespace, review_cache_s=300)
    cached = SupervisorAuthenticator(
        cached_cfg,
        tokens=SandboxTokens(cached_cfg.auth.supervisors, SigningKeyStore(db)),
        sandboxes=sandboxes,
    )
    cached.use_kubernetes(kubernetes_verifier(cached_cfg, driver.client))

    async def call(
        tok: str, sandbox_id: str, *, through: SupervisorAuthenticator = authenticator
    ) -> SandboxPrincipal | None:
        return await through.authenticate(
            [("authorization", f"Bearer {tok}")], sandbox_id=sandbox_id, method="test", peer="ipv4:10.0.0.1:1"
        )

    pods = {}
    try:
        for sandbox_id in ("id-a", "id-b"):
            pods[sandbox_id] = make_pod(c, sandbox_id)
            await sandboxes.create(sandbox_id, driver="kubernetes")
            await sandboxes.set_spec(sandbox_id, {}, pod_uid=pods[sandbox_id]["metadata"]["uid"])
        token_a = kubeaccess.projected_token(c.admin, pods["id-a"])
        deadline = time.monotonic() + 30
        while True:  # the gateway identity's RBAC takes effect within moments
            try:
                principal = await call(token_a, "id-a")
                break
            except CredentialRefused as exc:
                if exc.reason is not Refusal.REVIEW_UNAVAILABLE or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.3)
        assert principal is not None and principal.sandbox_id == "id-a"
        refusal = await refused(lambda: call(token_a, "id-b"))  # type: ignore[arg-type, return-value]
        assert refusal.reason is Refusal.OTHER_SANDBOX and refusal.status.name == "PERMISSION_DENIED"

        assert (await call(token_a, "id-a", through=cached)) is not None  # reviewed, and cached

        # Someone else makes a pod under the sandbox's pod name (the gateway's is gone; labels,
        # annotation and ServiceAccount copied): the API server accepts its token, but the row
        # still names the gateway's pod.
        delete_pod_for_good(c, pods["id-a"])
        pods["id-a"] = make_pod(c, "id-a")
        token_new = kubeaccess.projected_token(c.admin, pods["id-a"])
        for through in (authenticator, cached):
            refusal = await refused(lambda t=through: call(token_new, "id-a", through=t))  # type: ignore[arg-type, return-value]
            assert refusal.reason is Refusal.STALE, refusal
        # A row that names no pod (a failed create again, or a row from before uids were
        # recorded) binds none: the pod's name alone does not let it in.
        await sandboxes.create("id-c", driver="kubernetes")
        pods["id-c"] = make_pod(c, "id-c")
        refusal = await refused(lambda: call(kubeaccess.projected_token(c.admin, pods["id-c"]), "id-c"))  # type: ignore[arg-type, return-value]
        assert refusal.reason is Refusal.STALE, refusal

        # The gateway's create records the new pod: its token gets in, and the old pod's, whose
        # accepted review is still cached, is refused by the binding alone.
        await sandboxes.set_spec("id-a", {}, pod_uid=pods["id-a"]["metadata"]["uid"])
        assert (await call(token_new, "id-a", through=cached)) is not None
        refusal = await refused(lambda: call(token_a, "id-a", through=cached))  # type: ignore[arg-type, return-value]
        assert refusal.reason is Refusal.STALE, refusal

        # Sandbox b deleted (its pod gone, its row kept): its token is refused once the API server
        # has seen the deletion, however long the token itself still lives.
        token_b = kubeaccess.projected_token(c.admin, pods["id-b"])
        assert (await call(token_b, "id-b")) is not None
        delete_pod(c, pods.pop("id-b"))
        deadline = time.monotonic() + 30
        while True:
            try:
                await call(token_b, "id-b")
            except CredentialRefused as exc:
                assert exc.reason is Refusal.REVIEW_FAILED, exc
                break
            assert time.monotonic() < deadline, "a deleted sandbox's token was still accepted after 30 s"
            await asyncio.sleep(0.3)
    finally:
        for pod in pods.values():
            with contextlib.suppress(ApiError):  # already gone: nothing to clean up
                delete_pod(c, pod)
        authenticator.close()
        cached.close()
        await driver.close()
        await db.close()
