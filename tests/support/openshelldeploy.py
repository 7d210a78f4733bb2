"""OpenShell on the local cluster with a real node (``tests/support/kubenode.py``): our images built here
and pushed to the cluster's registry, the chart values for a cluster without DNS, and the developer loop.

    python -m tests.support.kubenode up --workdir /tmp/os-dev    # terminal 1: the cluster, until Ctrl-C
    python -m tests.support.openshelldeploy /tmp/os-dev          # terminal 2: after each change

The second command builds the images from the working tree (the gateway's root filesystem and the
supervisor bundle are cached by a hash of the sources, so an unchanged tree rebuilds nothing), pushes
them under a tag made of that hash, installs or upgrades the chart (SQLite, one gateway replica; a
changed tag rolls the gateway), waits for the gateway, runs one sandbox through its API and prints its
output. ``tests/e2e/test_chart_on_node.py`` uses the same images and values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagevolume import oci
from imagevolume.bundle import build_bundle, tree_digest
from tests.support import busybox, gatewayimage, images, kubeaccess
from tests.support.procs import REPO

CHART = REPO / "helm" / "openshell"
BUNDLE_DIR = REPO / "build" / "bundle"
GATEWAY_IP = "10.96.200.10"  # no cluster DNS: the gateway Service gets this address (kube-proxy routes it)
IMAGE_CREATED = "2026-01-02T03:04:05Z"


#: ENTRYPOINT (the first two) + CMD of the ``agent`` image, and the one line it prints.
AGENT_LINE = "ran the command of the image"
AGENT_ARGV = ["/bin/sh", "-c", f"echo {AGENT_LINE}"]


@dataclass(frozen=True)
class Images:
    gateway: str
    supervisor: str
    sandbox: str
    #: busybox with an ENTRYPOINT and CMD of its own: a sandbox created without a command runs them.
    agent: str

    @property
    def registry(self) -> str:
        return self.sandbox.split("/", 1)[0]


def push_images(registry: str, *, bundle: Path, sandbox_rootfs: Path, tag: str) -> Images:
    """Build the gateway, supervisor and busybox sandbox images and push them to ``registry`` as
    ``openshell/gateway:TAG``, ``openshell/supervisor:TAG``, ``busybox:TAG`` and ``busybox:TAG-agent``
    (with ``AGENT_ARGV`` as ENTRYPOINT + CMD)."""
    with tempfile.TemporaryDirectory(prefix="openshell-images-") as tmp:
        layout = Path(tmp) / "oci"
        gateway = images.build_from_dir(
            layout,
            "gateway",
            gatewayimage.build_rootfs(),
            entrypoint=gatewayimage.ENTRYPOINT,
            cmd=["serve"],
            user=gatewayimage.USER,
            workdir="/var/lib/openshell",
            env=gatewayimage.ENV,
        )
        # Like any busybox image: PATH set (runc looks the `helm test` pod's `wget` up in it).
        sandbox = images.build_from_dir(layout, "busybox", sandbox_rootfs, env=["PATH=/bin"])
        agent = images.build_from_dir(
            layout, "agent", sandbox_rootfs, entrypoint=AGENT_ARGV[:2], cmd=AGENT_ARGV[2:], env=["PATH=/bin"]
        )
        supervisor_layout = Path(tmp) / "supervisor"
        oci.build_image(
            bundle, supervisor_layout, version="0.1.0", revision="0" * 40, created=IMAGE_CREATED, tag=tag
        )
        return Images(
            gateway=images.push(gateway, registry, "openshell/gateway", tag),
            supervisor=images.push(f"oci:{supervisor_layout}:{tag}", registry, "openshell/supervisor", tag),
            sandbox=images.push(sandbox, registry, "busybox", tag),
            agent=images.push(agent, registry, "busybox", f"{tag}-agent"),
        )


def chart_values(pushed: Images) -> dict[str, Any]:
    """Values that point the chart at ``pushed`` and let sandboxes reach the gateway without DNS."""
    return {
        "gateway": {"image": kubeaccess.image_values(pushed.gateway), "service": {"clusterIP": GATEWAY_IP}},
        "sandboxes": {
            "gatewayAddress": f"{GATEWAY_IP}:7070",
            "supervisor": {"image": kubeaccess.image_values(pushed.supervisor)},
            # The local registry speaks plain HTTP: for the lookup of images' own commands.
            "registry": {"plainHttp": [pushed.registry]},
        },
        "tests": {"image": pushed.sandbox},  # busybox: the `helm test` pod needs wget
        # Without OIDC the chart keeps the API on the pod's loopback; this local cluster's callers
        # reach it through the API server's service proxy (the pod's address), so it is opened,
        # unauthenticated, on purpose: the NetworkPolicies' httpFrom admits only that proxy.
        "auth": {"allowUnauthenticatedApi": True},
    }


def network_policy_values(cluster: Any, pg_port: int) -> dict[str, Any]:
    """The chart's NetworkPolicies (on by default) with the peers of ``cluster`` (a
    ``kubenode.LocalCluster``): the API server and PostgreSQL listen on the host's end of the node's
    link, on ports of their own; the API server's service proxy (how the tests reach the HTTP API)
    comes from there too."""
    assert cluster.network is not None and cluster.plane is not None and cluster.registry is not None
    host = {"ipBlock": {"cidr": f"{cluster.network.host_ip}/32"}}
    registry_port = int(cluster.registry.host.rsplit(":", 1)[1])
    return {
        "networkPolicy": {
            # Only the API server's proxy: the `helm test` pod must then get in by the chart's own rule.
            "httpFrom": [host],
            "apiServerCidrs": [f"{cluster.network.host_ip}/32"],
            "apiServerPorts": [int(cluster.plane.server.rsplit(":", 1)[1])],
            "databaseTo": [host],
            "databasePort": pg_port,
            # The registry, for the gateway's lookups of images' own commands (docs/helm.md).
            "extraEgress": [{"to": [host], "ports": [{"port": registry_port, "protocol": "TCP"}]}],
        }
    }


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested dictionaries merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if nested else value
    return out


def gateway_api(admin: Any, namespace: str, release: str) -> Callable[..., Any]:
    """``call(method, path, body=None)`` on the gateway's HTTP API (``/api/v1`` + path) through the API
    server's service proxy: no port-forward, no route from here to the pods needed. Raises on an
    error answer (httpx's HTTPStatusError, the gateway's ``{"error": ...}`` in its response)."""
    api = f"/api/v1/namespaces/{namespace}/services/{release}-gateway:7080/proxy/api/v1"
    http = admin._client._client  # lightkube's own httpx client: its TLS and credentials

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = http.request(method, api + path, json=body)
        response.raise_for_status()
        return response.json()

    return call


def pod_api(admin: Any, namespace: str, pod: str) -> Callable[..., Any]:
    """Like :func:`gateway_api`, but on one gateway pod's HTTP API (the API server's pod proxy):
    what that one replica answers, whichever the Service would have picked."""
    api = f"/api/v1/namespaces/{namespace}/pods/{pod}:7080/proxy/api/v1"
    http = admin._client._client

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = http.request(method, api + path, json=body)
        response.raise_for_status()
        return response.json()

    return call


def wait_rolled_out(admin: Any, namespace: str, release: str, timeout: float = 300) -> None:
    """Until the gateway Deployment's newest generation is all updated and available."""
    from lightkube.resources.apps_v1 import Deployment
    from lightkube.resources.core_v1 import Pod

    name = f"{release}-gateway"

    def rolled_out() -> bool:
        d = admin.get(Deployment, name, namespace=namespace)
        spec, status = d.spec, d.status
        return bool(
            spec
            and status
            and status.observedGeneration == (d.metadata.generation if d.metadata else None)
            and status.updatedReplicas == spec.replicas
            and status.availableReplicas == spec.replicas
            and not status.unavailableReplicas
        )

    def only_new_pods_serve() -> bool:
        # The old pod drains (preStop) after its ReplicaSet is scaled down and may still be an endpoint.
        labels = {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": "gateway"}
        pods = admin.list(Pod, namespace=namespace, labels=labels)
        return all(
            p.metadata is not None
            and p.metadata.deletionTimestamp is None
            and p.status is not None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            for p in pods
        )

    kubeaccess.wait_for(rolled_out, timeout=timeout, what=f"deployment/{name} to roll out")
    kubeaccess.wait_for(only_new_pods_serve, timeout=timeout, what=f"the old {name} pods to go")


# --- the developer loop -----------------------------------------------------------------------------


def _tree_tag(bundle: Path) -> str:
    digest = hashlib.sha256(gatewayimage.sources_hash().encode() + tree_digest(bundle).encode()).hexdigest()
    return f"dev-{digest[:12]}"


def deploy(cluster_dir: Path, *, namespace: str = "openshell", release: str = "openshell") -> int:
    import helm_python
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    info_file = cluster_dir / "cluster.json"
    if not info_file.exists():
        print(
            f"error: no {info_file}: start the cluster with `python -m tests.support.kubenode up "
            f"--workdir {cluster_dir}` first",
            file=sys.stderr,
        )
        return 2
    info = json.loads(info_file.read_text())
    kubeconfig, registry = Path(info["kubeconfig"]), info["registry"]
    rootfs_busybox = busybox.static_busybox()
    if rootfs_busybox is None:
        print("error: needs a static /bin/busybox (apt install busybox-static)", file=sys.stderr)
        return 2
    bundle = build_bundle(BUNDLE_DIR)
    tag = _tree_tag(bundle)
    with tempfile.TemporaryDirectory(prefix="openshell-sandbox-rootfs-") as tmp:
        sandbox_rootfs = busybox.make_rootfs(Path(tmp), rootfs_busybox)
        pushed = push_images(registry, bundle=bundle, sandbox_rootfs=sandbox_rootfs, tag=tag)
    print(f"images {tag} pushed to {registry}", file=sys.stderr)

    admin = kubeaccess.admin_client(kubeconfig)
    if not any(n.metadata and n.metadata.name == namespace for n in admin.list(Namespace)):
        admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    values = merged(chart_values(pushed), {"gateway": {"logLevel": "info"}})
    installed = any(r.get("name") == release for r in helm.list(all_states=True))
    if installed:
        helm.upgrade(str(CHART), release, values, namespace=namespace, timeout=300)
    else:
        helm.install(str(CHART), release, values, namespace=namespace, timeout=300)
    print(
        f"chart {'upgraded' if installed else 'installed'}: release {release} in {namespace}", file=sys.stderr
    )

    name = f"{release}-gateway"
    wait_rolled_out(admin, namespace, release)
    call = gateway_api(admin, namespace, release)
    sandbox = f"dev-{int(time.time())}"
    script = "for i in 1 2 3; do echo hello $i from $(id -un); sleep 1; done"
    call("POST", "/sandboxes", {"id": sandbox, "command": ["sh", "-c", script], "image": pushed.sandbox})
    kubeaccess.wait_for(
        lambda: call("GET", f"/sandboxes/{sandbox}")["state"] == "exited",
        timeout=300,
        what=f"sandbox {sandbox} to run and exit",
    )
    for event in call("GET", f"/sandboxes/{sandbox}/logs?tail=100")["events"]:
        print(f"{sandbox}: [{event['kind']}] {event['message']}")
    call("DELETE", f"/sandboxes/{sandbox}")
    print(
        f"KUBECONFIG={kubeconfig}; the API: GET https://.../api/v1/namespaces/{namespace}/services/"
        f"{name}:7080/proxy/api/v1/sandboxes",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.openshelldeploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "cluster_dir", type=Path, help="the --workdir given to `python -m tests.support.kubenode up`"
    )
    parser.add_argument("--namespace", default="openshell")
    args = parser.parse_args(argv)
    return deploy(args.cluster_dir.resolve(), namespace=args.namespace)


if __name__ == "__main__":
    sys.exit(main())
