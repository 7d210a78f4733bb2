"""A real Kubernetes API server: Pod Security admission, image volumes, ServiceAccount tokens.

Runs against ``$KUBECONFIG`` when set (kind, k3s, a cloud cluster), else against the local control plane
of tests/support/kubecluster.py (built on first use). Nothing here needs a kubelet: pods are admitted and
stored; the one test that wants a pod Running asks for a kwok fake node (label type=kwok) and skips
where the cluster has none.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.authentication_v1 import TokenRequestSpec, TokenReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.core_v1 import Namespace, Node, Pod, ServiceAccount, ServiceAccountToken

# The first test to use the fixture may build etcd and kube-apiserver (minutes on a cold Go cache).
pytestmark = pytest.mark.timeout(3600)

AUDIENCE = "openshell-test"
SUPERVISOR_IMAGE = "registry.example/openshell-supervisor:1"


@pytest.fixture(scope="module")
def client(kubeconfig: Path) -> Client:
    return Client(KubeConfig.from_file(kubeconfig), field_manager="openshell-test")


def _namespace(client: Client, enforce: str) -> Iterator[str]:
    name = f"openshell-test-{enforce}-{uuid.uuid4().hex[:8]}"
    labels = {
        "pod-security.kubernetes.io/enforce": enforce,
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    client.create(Namespace(metadata=ObjectMeta(name=name, labels=labels)))
    # Pods name this account: the ServiceAccount admission plugin refuses pods whose account does not
    # exist, and the "default" one is created asynchronously (by a controller some clusters lack).
    client.create(ServiceAccount(metadata=ObjectMeta(name="sandbox")), namespace=name)
    try:
        yield name
    finally:
        client.delete(Namespace, name)


@pytest.fixture
def restricted_ns(client: Client) -> Iterator[str]:
    yield from _namespace(client, "restricted")


@pytest.fixture
def privileged_ns(client: Client) -> Iterator[str]:
    yield from _namespace(client, "privileged")


def _pod(manifest: dict[str, Any]) -> Pod:
    pod = Pod.from_dict(manifest)
    assert isinstance(pod, Pod)
    return pod


def privileged_pod(name: str) -> Pod:
    return _pod(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "sandbox",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "main",
                        "image": "registry.example/busybox:1",
                        "securityContext": {"privileged": True},
                    }
                ],
            },
        }
    )


def restricted_pod_with_image_volume(name: str) -> Pod:
    return _pod(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "sandbox",
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "main",
                        "image": "registry.example/busybox:1",
                        "command": ["/opt/openshell/bin/openshell-supervisor"],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "sv", "mountPath": "/opt/openshell", "readOnly": True}],
                    }
                ],
                "volumes": [
                    {"name": "sv", "image": {"reference": SUPERVISOR_IMAGE, "pullPolicy": "IfNotPresent"}}
                ],
            },
        }
    )


def test_api_server_answers(client: Client) -> None:
    names = {ns.metadata.name for ns in client.list(Namespace) if ns.metadata}
    assert {"default", "kube-system"} <= names


def test_restricted_namespace_refuses_privileged_pod(client: Client, restricted_ns: str) -> None:
    with pytest.raises(ApiError) as info:
        client.create(privileged_pod("priv"), namespace=restricted_ns)
    assert info.value.status.code == 403
    message = info.value.status.message or ""
    assert "violates PodSecurity" in message, message
    assert "privileged" in message, message


def test_privileged_namespace_admits_the_same_pod(client: Client, privileged_ns: str) -> None:
    """The control for the test above: the refusal comes from the namespace's label, not the pod."""
    created = client.create(privileged_pod("priv"), namespace=privileged_ns)
    assert created.metadata is not None and created.metadata.uid


def test_restricted_namespace_admits_restricted_pod_with_image_volume(
    client: Client, restricted_ns: str
) -> None:
    client.create(restricted_pod_with_image_volume("sandbox"), namespace=restricted_ns)
    # Read it back: an API server whose ImageVolume gate is off drops the field instead of refusing.
    stored = client.get(Pod, "sandbox", namespace=restricted_ns)
    assert stored.spec is not None and stored.spec.volumes
    volume = next(v for v in stored.spec.volumes if v.name == "sv")
    assert volume.image is not None, "the API server dropped volumes[].image (ImageVolume feature gate off?)"
    assert volume.image.reference == SUPERVISOR_IMAGE
    assert volume.image.pullPolicy == "IfNotPresent"
    mount = stored.spec.containers[0].volumeMounts[0]  # type: ignore[index]
    assert mount.name == "sv" and mount.readOnly is True


def test_restricted_pod_with_image_volume_is_scheduled_and_runs_on_a_fake_node(
    client: Client, restricted_ns: str
) -> None:
    """The real scheduler binds the pod; kwok (the stand-in kubelet) reports it Running."""
    if not any(True for _ in client.list(Node, labels={"type": "kwok"})):
        pytest.skip("no kwok fake node (label type=kwok) in this cluster")
    pod = restricted_pod_with_image_volume("runs")
    assert pod.spec is not None
    pod.spec.nodeSelector = {"type": "kwok"}
    client.create(pod, namespace=restricted_ns)
    deadline = time.monotonic() + 30
    while True:
        stored = client.get(Pod, "runs", namespace=restricted_ns)
        phase = stored.status.phase if stored.status else None
        if phase == "Running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stored.spec is not None and stored.status is not None
    assert phase == "Running", f"pod is {phase}: {stored.status.conditions}"
    assert (stored.spec.nodeName or "").startswith("kwok-node-"), stored.spec.nodeName
    assert stored.status.podIP


def _request_token(client: Client, namespace: str, audience: str = AUDIENCE) -> tuple[str, dt.datetime]:
    request = ServiceAccountToken(
        metadata=ObjectMeta(), spec=TokenRequestSpec(audiences=[audience], expirationSeconds=600)
    )
    issued = client.create(request, "sandbox", namespace=namespace)
    assert issued.status is not None
    token, expires = issued.status.token, issued.status.expirationTimestamp
    if isinstance(expires, str):
        expires = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    assert token and expires is not None
    return token, expires


def _review(client: Client, token: str, audience: str) -> Any:
    review = client.create(TokenReview(spec=TokenReviewSpec(token=token, audiences=[audience])))
    assert review.status is not None
    return review.status


def test_service_account_token_is_accepted_for_its_audience_only(client: Client, restricted_ns: str) -> None:
    token, expires = _request_token(client, restricted_ns)
    # TokenRequest's minimum lifetime is 600 s, too long to wait out: check the expiry the server set
    # (test_expired_token_is_refused checks that an expired token is refused).
    left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
    assert 540 <= left <= 660, f"token expires in {left:.0f}s, asked for 600s"

    accepted = _review(client, token, AUDIENCE)
    assert accepted.authenticated is True, accepted.error
    assert accepted.user.username == f"system:serviceaccount:{restricted_ns}:sandbox"
    assert accepted.audiences == [AUDIENCE]

    wrong = _review(client, token, "someone-else")
    assert not wrong.authenticated
    assert wrong.error, "a refused review says why"


def test_tampered_token_is_refused(client: Client, restricted_ns: str) -> None:
    token, _ = _request_token(client, restricted_ns)
    header, payload, signature = token.split(".")
    claims = json.loads(_b64decode(payload))
    claims["sub"] = f"system:serviceaccount:{restricted_ns}:admin"
    forged = ".".join([header, _b64encode(json.dumps(claims).encode()), signature])
    assert _review(client, token, AUDIENCE).authenticated is True
    assert not _review(client, forged, AUDIENCE).authenticated


def test_expired_token_is_refused(client: Client, restricted_ns: str, kubeconfig: Path) -> None:
    """Re-sign a real token's claims with the cluster's own signing key: with ``exp`` in the future it is
    accepted (the re-signing is right), with ``exp`` in the past it is refused. Needs the key, so only
    on the local control plane (its pki/ sits next to the KUBECONFIG)."""
    key_file = kubeconfig.parent / "pki" / "sa.key"
    if not key_file.is_file():
        pytest.skip("the service-account signing key is only known for the local control plane")
    token, _ = _request_token(client, restricted_ns)
    header, payload, _sig = token.split(".")
    claims = json.loads(_b64decode(payload))
    now = int(time.time())

    fresh = _sign(key_file, header, {**claims, "iat": now - 10, "nbf": now - 10, "exp": now + 600})
    assert _review(client, fresh, AUDIENCE).authenticated is True

    # Past the validator's leeway (60 s).
    expired = _sign(key_file, header, {**claims, "iat": now - 900, "nbf": now - 900, "exp": now - 300})
    status = _review(client, expired, AUDIENCE)
    assert not status.authenticated
    assert "expired" in (status.error or "").lower(), status.error


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(key_file: Path, header: str, claims: dict[str, Any]) -> str:
    """An ES256 JWS (the local plane's key is EC P-256), reusing the real token's header and ``kid``."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert json.loads(_b64decode(header))["alg"] == "ES256"
    signing_input = f"{header}.{_b64encode(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
