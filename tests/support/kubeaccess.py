"""Working with any cluster from the tests: an admin client, throwaway namespaces, and identities
with exactly the RBAC a test grants (a ServiceAccount, its Role, and a TokenRequest token written
into a kubeconfig of its own). Every function takes the cluster through a KUBECONFIG path.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, Client, KubeConfig, codecs
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, ServiceAccount

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def admin_client(kubeconfig: Path) -> Client:
    return Client(KubeConfig.from_file(kubeconfig), field_manager="openshell-tests")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def namespace(admin: Client, prefix: str, *, labels: Mapping[str, str] = RESTRICTED) -> Iterator[str]:
    """A fresh namespace, deleted after (where no namespace controller runs it stays Terminating)."""
    name = unique(prefix)
    admin.create(Namespace(metadata=ObjectMeta(name=name, labels=dict(labels))))
    try:
        yield name
    finally:
        with contextlib.suppress(ApiError):
            admin.delete(Namespace, name)


def create_objects(admin: Client, objects: Iterable[Mapping[str, Any]], *, namespace: str) -> None:
    for obj in objects:
        resource = codecs.from_dict(dict(obj))
        admin.create(resource, namespace=namespace)  # type: ignore[call-overload]


def role_objects(name: str, rules: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding, all named ``name``."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": [dict(r) for r in rules],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name}],
        },
    ]


def request_token(
    admin: Client,
    service_account: str,
    namespace: str,
    *,
    audiences: Sequence[str] = (),
    seconds: int = 600,
    pod: tuple[str, str] | None = None,
) -> str:
    """A token through the TokenRequest API (``audiences`` empty: the API server's own); ``pod``
    (name, uid) binds it to that pod, as the kubelet's projected tokens are (the API server then
    names the pod in its TokenReview, and stops accepting the token once the pod is gone)."""
    bound = BoundObjectReference(apiVersion="v1", kind="Pod", name=pod[0], uid=pod[1]) if pod else None
    spec = TokenRequestSpec(audiences=list(audiences), expirationSeconds=seconds, boundObjectRef=bound)
    answer = admin.create(
        ServiceAccount.Token(metadata=ObjectMeta(name=service_account, namespace=namespace), spec=spec),
        service_account,
        namespace=namespace,
    )
    assert answer.status is not None and answer.status.token
    return str(answer.status.token)


def token_kubeconfig(admin_kubeconfig: Path, token: str, path: Path, *, namespace: str) -> Path:
    """A kubeconfig for the same cluster (server and CA of the admin's current context) and ``token``."""
    doc = yaml.safe_load(admin_kubeconfig.read_text())
    context_name = doc.get("current-context")
    context = next(c["context"] for c in doc["contexts"] if c["name"] == context_name)
    cluster = dict(next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"]))
    ca = cluster.get("certificate-authority")
    if ca and not Path(ca).is_absolute():  # relative to the admin kubeconfig's directory
        cluster["certificate-authority"] = str((admin_kubeconfig.parent / ca).resolve())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def identity_with_rules(
    admin: Client,
    admin_kubeconfig: Path,
    namespace: str,
    rules: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    name: str | None = None,
) -> Path:
    """A ServiceAccount granted exactly ``rules`` in ``namespace``; returns a kubeconfig with its token."""
    name = name or unique("sa")
    create_objects(admin, role_objects(name, rules), namespace=namespace)
    return token_kubeconfig(
        admin_kubeconfig, request_token(admin, name, namespace), path, namespace=namespace
    )


def projected_token(admin: Client, pod: Mapping[str, Any]) -> str:
    """What a kubelet writes into ``pod``'s projected ``serviceAccountToken`` volume source (the
    first one): a token of the pod's ServiceAccount with the source's audience and expiry, bound
    to the pod. Plays the kubelet's part where no kubelet runs the pod."""
    meta, spec = pod["metadata"], pod["spec"]
    source = next(
        s["serviceAccountToken"]
        for v in spec["volumes"]
        for s in (v.get("projected") or {}).get("sources", [])
        if "serviceAccountToken" in s
    )
    return request_token(
        admin,
        spec.get("serviceAccountName") or "default",
        meta["namespace"],
        audiences=[source["audience"]] if source.get("audience") else [],
        seconds=int(source.get("expirationSeconds", 3600)),
        pod=(meta["name"], meta["uid"]),
    )


@contextlib.contextmanager
def cluster_grant(
    admin: Client, service_account: str, namespace: str, rules: Sequence[Mapping[str, Any]]
) -> Iterator[str]:
    """A ClusterRole with ``rules`` bound to ``service_account`` of ``namespace`` (cluster-wide
    permissions, e.g. TokenReview, cannot be granted by a Role); both deleted after."""
    name = unique(f"os-{namespace}")[:63]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(r) for r in rules],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
    created = []
    try:
        for obj in (role, binding):
            resource = codecs.from_dict(obj)
            admin.create(resource)  # type: ignore[call-overload]
            created.append(resource)
        yield name
    finally:
        for resource in reversed(created):
            with contextlib.suppress(ApiError):
                admin.delete(type(resource), name)


async def until_granted(call: Callable[[], Awaitable[Any]]) -> None:
    """RBAC objects take effect within moments (the authorizer's caches): retry a call the identity
    is granted until it goes through."""
    from gateway.drivers.kubernetes import KubernetesDriverError

    async with asyncio.timeout(30):
        while True:
            try:
                await call()
                return
            except KubernetesDriverError:
                await asyncio.sleep(0.3)


def wait_for(predicate: Any, *, timeout: float, what: str, detail: Any = None) -> Any:
    """Poll ``predicate`` until truthy; on timeout fail naming ``what``, the last error, and ``detail()``
    (e.g. a pod's status) when given."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    about = f": {last}" if last else ""
    if detail is not None:
        try:
            about += f" ({detail()})"
        except Exception as exc:  # the report must not hide the timeout
            about += f" (no detail: {exc})"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{about}")


def image_values(reference: str) -> dict[str, str]:
    """The chart's ``image`` values for ``REPOSITORY:TAG`` or ``REPOSITORY@sha256:...`` (a registry
    port is not a tag: ``host:5000/x`` stays one repository)."""
    if "@" in reference:
        repository, _, digest = reference.partition("@")
        return {"repository": repository, "digest": digest}
    repository, _, tag = reference.rpartition(":")
    if repository and "/" not in tag:
        return {"repository": repository, "tag": tag}
    return {"repository": reference}
