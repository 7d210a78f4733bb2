"""The chart on a cluster whose node really runs pods: install it with its secure defaults (migration
hook, gateway, helm test), keep sandboxes off the HTTP API, other sandboxes and the cloud metadata
address with the chart's NetworkPolicies while they reach the gateway's gRPC port, see a sandbox
connect with its pod's projected ServiceAccount token (a real TokenReview) and that token refused for
another sandbox's id, cut a sandbox off with a NetworkPolicy, see it resume with every line once, run a
sandbox without a command (the image's ENTRYPOINT + CMD, read by the gateway pod from the registry),
run the init-container fallback, uninstall.

Where: any cluster through ``KUBECONFIG`` given our images and a database its pods reach
(``OPENSHELL_TEST_GATEWAY_IMAGE``, ``OPENSHELL_TEST_SUPERVISOR_IMAGE``, ``OPENSHELL_TEST_DATABASE_URL``;
``OPENSHELL_TEST_SANDBOX_IMAGE`` defaults to ``busybox:1.36``; for the image-command test,
``OPENSHELL_TEST_AGENT_IMAGE``, an image whose own command prints ``OPENSHELL_TEST_AGENT_LINE``).
Without ``KUBECONFIG``: a local cluster with one real node (``tests/support/kubenode.py``: kubelet,
containerd + runc, kube-proxy, kube-router), whose registry gets images built here (the gateway's root
filesystem from Debian and pip, the supervisor image from the bundle, a busybox sandbox) and whose pods
reach a PostgreSQL started here. It skips with the reason where neither can be had.

Why the gateway restarts during the cut: NetworkPolicy implementations (kube-router, Calico, ...) let
established connections be; a policy stops *new* ones. So the test applies the policy, then rolls the
gateway (its pod deleted, the Deployment makes another): the supervisor's stream ends and every
reconnect meets the policy, while the main process goes on writing into the journal. Lifting the policy
lets it reconnect to the new gateway pod, which resumes from what the database holds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
from lightkube import ApiError, Client, codecs
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod, Secret, ServiceAccount, ServiceAccountToken
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import PatchType

from gateway.drivers import podspec
from tests.support import gatewayimage, kubeaccess, kubecluster, kubenode, openshelldeploy
from tests.support.postgres import PostgresUnavailable, running_postgres
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(1500)

CHART = REPO / "helm" / "openshell"
RELEASE = "openshell"
LINES = 1200  # 0.1 s apart (two minutes): the main process writes through the whole cut
# How long the cut is held once the new gateway sees it: longer than the supervisor's reconnect backoff
# cap (supervisor reconnect_max_s, 30 s) plus a connect timeout, so reconnects are tried (and meet
# the policy) during the hold, whatever the jitter.
HOLD_S = 45


@dataclass
class Target:
    """Where the chart goes and what it runs."""

    kubeconfig: Path
    gateway_image: str
    supervisor_image: str
    sandbox_image: str
    database_url: str
    #: An image whose ENTRYPOINT + CMD prints ``agent_line``, in a registry the gateway reaches (for
    #: ours, ``agent_argv`` is that command); None: not tested.
    agent_image: str | None = None
    agent_line: str = ""
    agent_argv: list[str] | None = None
    values: dict[str, Any] = field(default_factory=dict)  # cluster-specific chart values
    #: Runs a command in the node's network namespace (the local cluster only): where the test puts
    #: a stand-in for the cloud metadata service. None: not tested.
    node_prefix: list[str] | None = None


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    given = os.environ.get("KUBECONFIG", "")
    if given:
        wanted = {
            "gateway": os.environ.get("OPENSHELL_TEST_GATEWAY_IMAGE", ""),
            "supervisor": os.environ.get("OPENSHELL_TEST_SUPERVISOR_IMAGE", ""),
            "database": os.environ.get("OPENSHELL_TEST_DATABASE_URL", ""),
        }
        missing = [k for k, v in wanted.items() if not v]
        if missing:
            pytest.skip(
                "KUBECONFIG is set: this test also needs OPENSHELL_TEST_GATEWAY_IMAGE, "
                "OPENSHELL_TEST_SUPERVISOR_IMAGE and OPENSHELL_TEST_DATABASE_URL (missing: "
                f"{', '.join(missing)})"
            )
        yield Target(
            Path(given.split(os.pathsep)[0]),
            wanted["gateway"],
            wanted["supervisor"],
            os.environ.get("OPENSHELL_TEST_SANDBOX_IMAGE", "busybox:1.36"),
            wanted["database"],
            # Any image whose ENTRYPOINT + CMD prints one line, and that line.
            agent_image=os.environ.get("OPENSHELL_TEST_AGENT_IMAGE") or None,
            agent_line=os.environ.get("OPENSHELL_TEST_AGENT_LINE", ""),
            # The peers of an unknown cluster (its API server's proxy, its database) are not known
            # here: the policies would keep this test out of the API.
            values={"networkPolicy": {"enabled": False}},
        )
        return
    # Only here: the bundle and the busybox root filesystem are built for the local cluster's images.
    bundle, rootfs = request.getfixturevalue("bundle"), request.getfixturevalue("rootfs")
    yield from _local_target(bundle, rootfs)


def _local_target(bundle: Path, rootfs: Path) -> Iterator[Target]:
    reason = kubenode.node_unavailable() or gatewayimage.unavailable()
    if reason:
        pytest.skip(f"no local cluster with a real node: {reason}")
    try:
        plane_bin, node_bin = kubecluster.build(), kubenode.build_node()
    except kubecluster.BuildError as exc:
        pytest.skip(f"no local cluster with a real node: {exc.reason}")
    cluster = kubenode.LocalCluster(plane_bin, node_bin)
    try:
        cluster.start()  # built but not starting: a failure, not a skip
        assert cluster.network is not None
        with running_postgres(listen=cluster.network.host_ip, trust_cidrs=[cluster.network.pod_cidr]) as pg:
            assert cluster.registry is not None
            pushed = openshelldeploy.push_images(
                cluster.registry.host, bundle=bundle, sandbox_rootfs=rootfs, tag="test"
            )
            yield Target(
                cluster.kubeconfig,
                pushed.gateway,
                pushed.supervisor,
                pushed.sandbox,
                pg.url("postgres"),
                values=openshelldeploy.merged(
                    openshelldeploy.chart_values(pushed),
                    openshelldeploy.network_policy_values(cluster, pg.port),
                ),
                agent_image=pushed.agent,
                agent_line=openshelldeploy.AGENT_LINE,
                agent_argv=openshelldeploy.AGENT_ARGV,
                node_prefix=cluster.network.prefix(),
            )
    except PostgresUnavailable as exc:
        pytest.skip(f"the gateway's database cannot run here: {exc}")
    finally:
        cluster.cleanup()


@dataclass
class Installed:
    admin: Client
    helm: Any
    namespace: str
    sandboxes: str
    values: dict[str, Any]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The gateway's HTTP API through the API server's service proxy."""
        return openshelldeploy.gateway_api(self.admin, self.namespace, RELEASE)(method, path, body)

    def state(self, sandbox: str) -> str:
        try:
            return str(self.call("GET", f"/sandboxes/{sandbox}")["state"])
        except Exception as exc:  # the gateway is restarting: say so, the wait goes on
            return f"unreachable ({type(exc).__name__})"

    def gateway_pods(self) -> list[Pod]:
        return list(
            self.admin.list(Pod, namespace=self.namespace, labels={"app.kubernetes.io/component": "gateway"})
        )


def _pod_logs(admin: Client, namespace: str, lines: int = 30) -> str:
    """Every container's state and last lines, for every pod in ``namespace``: what a failure report
    needs (a container that never started has only its state)."""
    out = []
    for pod in admin.list(Pod, namespace=namespace):
        if pod.metadata is None or pod.spec is None:
            continue
        statuses = {c.name: c.state for c in (pod.status.containerStatuses or [])} if pod.status else {}
        for container in pod.spec.containers:
            out.append(f"--- {pod.metadata.name}/{container.name}: {statuses.get(container.name)}")
            try:
                logged = admin.log(
                    pod.metadata.name, namespace=namespace, container=container.name, tail_lines=lines
                )
                text = "".join(logged)
            except Exception as exc:  # a report, best effort
                text = f"(no log: {exc})"
            out.append(text)
    return "\n".join(out)


def _ready(pod: Pod) -> bool:
    status = pod.status
    if status is None or status.conditions is None or (pod.metadata and pod.metadata.deletionTimestamp):
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions)


@pytest.fixture(scope="module")
def installed(target: Target) -> Iterator[Installed]:
    admin = kubeaccess.admin_client(target.kubeconfig)
    namespace = kubeaccess.unique("os-node")
    sandboxes = f"{namespace}-sb"
    values: dict[str, Any] = {
        "database": {"existingSecret": "openshell-db", "existingSecretKey": "url"},
        "gateway": {"image": kubeaccess.image_values(target.gateway_image), "logLevel": "info"},
        "sandboxes": {
            "namespace": sandboxes,
            "createNamespace": True,
            "supervisor": {"image": kubeaccess.image_values(target.supervisor_image)},
        },
        "tests": {"image": target.sandbox_image},  # busybox: the `helm test` pod needs wget
    }
    values = openshelldeploy.merged(values, target.values)
    helm = helm_python.Config(kubeconfig_path=target.kubeconfig, namespace=namespace)
    release = Installed(admin, helm, namespace, sandboxes, values)
    try:
        admin.create(Namespace(metadata=ObjectMeta(name=namespace)))
        admin.create(
            Secret(
                metadata=ObjectMeta(name="openshell-db", namespace=namespace),
                stringData={"url": target.database_url},
            )
        )
        try:
            helm.install(str(CHART), RELEASE, values, namespace=namespace, timeout=600)
        except helm_python.HelmError as exc:
            raise AssertionError(f"helm install failed: {exc}\n{_pod_logs(admin, namespace)}") from exc
        kubeaccess.wait_for(
            lambda: any(_ready(p) for p in release.gateway_pods()),
            timeout=300,
            what="a Ready gateway pod",
            detail=lambda: [p.status for p in release.gateway_pods()],
        )
        yield release
    finally:
        with contextlib.suppress(Exception):
            helm.uninstall(RELEASE, timeout=300, ignore_not_found=True)
        for name in (namespace, sandboxes):
            with contextlib.suppress(ApiError):
                admin.delete(Namespace, name)


def test_helm_test_reaches_the_gateway_through_its_service(installed: Installed) -> None:
    try:
        result = installed.helm.test(RELEASE, timeout=300, logs=True)
    except helm_python.HelmError as exc:
        raise AssertionError(
            f"helm test failed: {exc}\n{_pod_logs(installed.admin, installed.namespace)}"
        ) from exc
    assert '"status":"ok"' in result["logs"].replace(" ", ""), result


def test_the_charts_networkpolicy_keeps_sandboxes_off_the_http_api(
    installed: Installed, target: Target
) -> None:
    """The gateway's HTTP API is unauthenticated: the chart's NetworkPolicy admits the `helm test` pod
    to it (the test above) and sandboxes only to gRPC. A sandbox that tries the API is stopped."""
    if not _policies_on(target):
        pytest.skip(
            "the chart's NetworkPolicy is on only where this test knows the cluster's peers (local node)"
        )
    address = target.values["sandboxes"]["gatewayAddress"].rsplit(":", 1)[0]
    # The exit status and the reason, so that a missing applet or a wrong address is not taken for a
    # refusal: kube-router rejects (connection refused); a dropping implementation times out (143).
    wget = f"timeout 10 wget -q -O - http://{address}:7080/healthz"
    probe = f'out=$({wget} 2>&1); echo "rc=$? $out"'
    installed.call(
        "POST", "/sandboxes", {"id": "probe", "command": ["sh", "-c", probe], "image": target.sandbox_image}
    )
    kubeaccess.wait_for(
        lambda: installed.state("probe") == "exited", timeout=300, what="the probe sandbox to finish"
    )
    # It did connect over gRPC (its line is here), and the API stayed out of its reach.
    (line,) = _lines(installed, "probe")
    assert line.startswith("rc=143") or ("rc=1 " in line and "Connection refused" in line), line
    installed.call("DELETE", "/sandboxes/probe")


def _policies_on(target: Target) -> bool:
    return bool(target.values.get("networkPolicy", {}).get("enabled", True))


@contextlib.contextmanager
def _listener_on_node(prefix: list[str], address: str, ports: list[int], body: str) -> Iterator[None]:
    """An HTTP server on ``address:port`` for each port in the node's network namespace, ``body`` at /:
    a stand-in for the cloud metadata service (the pods' default route leads to the node) and for a
    DNS server that is not the cluster's (TCP 53), so that a refusal is told from "nothing there" by
    the control that reaches it."""
    root = Path(os.environ.get("TMPDIR", "/tmp")) / kubeaccess.unique("os-metadata")
    root.mkdir()
    (root / "index.html").write_text(body)
    subprocess.run([*prefix, "ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    servers = [
        subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                address,
                "--directory",
                str(root),
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            kubeaccess.wait_for(
                lambda port=port: (
                    subprocess.run(
                        [
                            *prefix,
                            sys.executable,
                            "-c",
                            f"import urllib.request as u; u.urlopen('http://{address}:{port}/', timeout=2)",
                        ],
                        capture_output=True,
                    ).returncode
                    == 0
                ),
                timeout=30,
                what=f"the stand-in on {address}:{port} to listen",
            )
        yield
    finally:
        for server in servers:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=10)
            if server.poll() is None:
                server.kill()
                server.wait()
        subprocess.run([*prefix, "ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)
        for child in root.iterdir():
            child.unlink()
        root.rmdir()


METADATA = "169.254.169.254"
PEER_PORT = 8080


def _probe_script(targets: dict[str, str]) -> str:
    """One line per target: its name, wget's exit status and its message. kube-router rejects
    (Connection refused); a dropping implementation times out (143); a port that speaks something
    other than HTTP/1 (gRPC) connects and fails later, with another message."""
    steps = [
        f'out=$(timeout 8 wget -q -O - {url} 2>&1); echo "{name} rc=$? $out"' for name, url in targets.items()
    ]
    return "; ".join(steps)


def _outcomes(lines: list[str]) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}


def _blocked(outcome: str) -> bool:
    return outcome.startswith("rc=143") or ("rc=1 " in outcome and "Connection refused" in outcome)


def test_sandboxes_reach_only_dns_and_the_gateways_grpc(installed: Installed, target: Target) -> None:
    """The chart's sandbox NetworkPolicy (on by default): from inside a sandbox the gateway's gRPC
    port is reachable; its HTTP API, another sandbox's listening port, the cloud metadata address and
    a DNS port (53) of a server that is not the cluster DNS are not. A second probe under an extra
    sandbox policy that allows all of these, the API's port included, reaches the peer, the metadata
    address and that port 53: the first probe's refusals are the policy's, not an empty address. The
    API stays out of reach then too: the gateway's own ingress policy (httpFrom: here the API
    server's address only) refuses it, the layer that still holds with the sandbox policy relaxed."""
    if not _policies_on(target) or target.node_prefix is None:
        pytest.skip("the chart's NetworkPolicies are on only where this test knows the cluster (local node)")
    gateway = target.values["sandboxes"]["gatewayAddress"].rsplit(":", 1)[0]
    # The chart renders the API on 0.0.0.0 here (auth.allowUnauthenticatedApi: the test reaches it
    # through the API server's service proxy), so only the policies keep sandboxes off it.
    with _listener_on_node(target.node_prefix, METADATA, [80, 53], "metadata-stand-in"):
        # Another sandbox, listening (busybox httpd) on its pod address.
        serve = f"echo peer-page > /tmp/index.html && exec busybox httpd -f -p {PEER_PORT} -h /tmp"
        installed.call(
            "POST",
            "/sandboxes",
            {"id": "net-peer", "command": ["sh", "-c", serve], "image": target.sandbox_image},
        )
        kubeaccess.wait_for(
            lambda: installed.state("net-peer") == "connected", timeout=300, what="the peer sandbox"
        )
        peer_pod = installed.admin.get(Pod, "sandbox-net-peer", namespace=installed.sandboxes)
        assert peer_pod.status is not None and peer_pod.status.podIP
        targets = {
            "api": f"http://{gateway}:7080/api/v1/sandboxes",
            "grpc": f"http://{gateway}:7070/",
            "peer": f"http://{peer_pod.status.podIP}:{PEER_PORT}/",
            "metadata": f"http://{METADATA}/",
            # TCP 53 of a server that is not the cluster DNS (its peer is dnsTo: kube-dns pods only).
            "dns-other": f"http://{METADATA}:53/",
        }

        def probe(sandbox: str) -> dict[str, str]:
            command = ["sh", "-c", _probe_script(targets)]
            installed.call(
                "POST", "/sandboxes", {"id": sandbox, "command": command, "image": target.sandbox_image}
            )
            kubeaccess.wait_for(
                lambda: installed.state(sandbox) == "exited", timeout=300, what=f"{sandbox} to finish"
            )
            outcomes = _outcomes(_lines(installed, sandbox))
            installed.call("DELETE", f"/sandboxes/{sandbox}")
            return outcomes

        secure = probe("net-probe")
        assert set(secure) == set(targets), secure
        assert _blocked(secure["api"]), secure
        assert _blocked(secure["peer"]), secure
        assert _blocked(secure["metadata"]), secure
        assert _blocked(secure["dns-other"]), secure
        # gRPC: connected (HTTP/1 gets no answer it understands), neither refused nor timed out; the
        # probe's own lines came over that port too.
        assert not _blocked(secure["grpc"]), secure

        # The control: one more sandbox policy allows the peer, the metadata address on 80 and 53, and
        # the API's port 7080 anywhere; all but the API answer.
        allow = codecs.from_dict(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "test-allow-listeners", "namespace": installed.sandboxes},
                "spec": {
                    "podSelector": {"matchLabels": podspec.selector_labels()},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"ports": [{"port": PEER_PORT, "protocol": "TCP"}]}],
                    "egress": [
                        {
                            "to": [{"ipBlock": {"cidr": f"{METADATA}/32"}}],
                            "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "TCP"}],
                        },
                        {"ports": [{"port": PEER_PORT, "protocol": "TCP"}]},
                        {"ports": [{"port": 7080, "protocol": "TCP"}]},
                    ],
                },
            }
        )
        installed.admin.create(allow)  # type: ignore[call-overload]
        try:
            allowed = probe("net-control")
        finally:
            installed.admin.delete(NetworkPolicy, "test-allow-listeners", namespace=installed.sandboxes)
        assert allowed["metadata"].startswith("rc=0 metadata-stand-in"), allowed
        assert allowed["dns-other"].startswith("rc=0 metadata-stand-in"), allowed
        assert allowed["peer"].startswith("rc=0 peer-page"), allowed
        # The sandbox side now lets 7080 out: the gateway's own ingress policy is what refuses it.
        assert _blocked(allowed["api"]), allowed
        installed.call("DELETE", "/sandboxes/net-peer")


def test_a_sandbox_connects_with_its_pods_token_which_no_other_sandbox_id_takes(
    installed: Installed, target: Target
) -> None:
    """Supervisor identity with the chart's defaults (auth.supervisors.required, register_unknown
    off): the sandbox pod's projected ServiceAccount token (audience auth.supervisors.kubernetes_audience)
    connects it, through a real TokenReview. The same token, presented from inside that pod by a small
    gRPC client (the supervisor tree's Python) for another sandbox's id, is refused PERMISSION_DENIED;
    without any token, UNAUTHENTICATED; for its own sandbox it is taken. Sandbox pods run as the
    chart's own ServiceAccount, so a token of the namespace's `default` ServiceAccount (with the
    gateway's audience, valid for the API server) is refused PERMISSION_DENIED for its own id too."""
    gateway = target.values.get("sandboxes", {}).get("gatewayAddress") or (
        f"{RELEASE}-gateway.{installed.namespace}.svc:7070"
    )
    installed.call(
        "POST", "/sandboxes", {"id": "victim", "command": ["sleep", "600"], "image": target.sandbox_image}
    )
    kubeaccess.wait_for(
        lambda: installed.state("victim") == "connected", timeout=300, what="the victim sandbox"
    )
    # The chart made the sandbox pods' ServiceAccount (no API token mounted) and the pod runs as it.
    account = f"{RELEASE}-sandbox"
    made = installed.admin.get(ServiceAccount, account, namespace=installed.sandboxes)
    assert made.automountServiceAccountToken is False
    victim_pod = installed.admin.get(Pod, podspec.pod_name("victim"), namespace=installed.sandboxes)
    assert victim_pod.spec is not None and victim_pod.spec.serviceAccountName == account
    client = _IMPOSTOR.format(
        token=f"{podspec.CREDENTIAL_DIR}/{podspec.CREDENTIAL_KEY}",
        gateway=gateway,
        other="victim",
        own="impostor",
        default_token=_default_account_token(installed),
    )
    root = podspec.SUPERVISOR_DIR
    argv = [
        f"{root}/lib/ld.so",
        "--library-path",
        f"{root}/lib",
        f"{root}/bin/python3",
        "-I",
        "-S",
        "-c",
        client,
    ]
    installed.call("POST", "/sandboxes", {"id": "impostor", "command": argv, "image": target.sandbox_image})
    kubeaccess.wait_for(lambda: installed.state("impostor") == "exited", timeout=300, what="the impostor")
    # It connected itself (its lines are here): its own pod's token passed the TokenReview.
    outcomes = _outcomes([line for line in _lines(installed, "impostor") if line.split(" ", 1)[0] in _CALLS])
    assert set(outcomes) == set(_CALLS), _lines(installed, "impostor")
    assert outcomes["other"].startswith("PERMISSION_DENIED"), outcomes
    assert outcomes["none"].startswith("UNAUTHENTICATED"), outcomes
    assert outcomes["default"].startswith("PERMISSION_DENIED not_a_sandbox"), outcomes
    assert f":{installed.sandboxes}:default'" in outcomes["default"], outcomes
    assert outcomes["own"].startswith("OK"), outcomes
    # The victim is untouched: still connected, no exit, none of the impostor's lines.
    victim = installed.call("GET", "/sandboxes/victim")
    assert victim["state"] == "connected" and victim.get("exit_code") is None, victim
    assert "impostor-line" not in _lines(installed, "victim")
    assert "impostor-line" in _lines(installed, "impostor")  # the own-id push was stored
    for sandbox in ("victim", "impostor"):
        installed.call("DELETE", f"/sandboxes/{sandbox}")


def _default_account_token(installed: Installed) -> str:
    """A token of the sandbox namespace's `default` ServiceAccount with the gateway's audience: what
    any pod of that namespace not made by the gateway could hold."""
    try:
        installed.admin.get(ServiceAccount, "default", namespace=installed.sandboxes)
    except ApiError:  # the ServiceAccount controller has not made it yet
        installed.admin.create(
            ServiceAccount(metadata=ObjectMeta(name="default", namespace=installed.sandboxes))
        )
    request = ServiceAccountToken(
        metadata=ObjectMeta(namespace=installed.sandboxes),
        spec=TokenRequestSpec(audiences=["openshell-gateway"], expirationSeconds=600),
    )
    answer = installed.admin.create(request, name="default", namespace=installed.sandboxes)
    assert answer.status is not None and answer.status.token
    return str(answer.status.token)


_CALLS = ("other", "none", "default", "own")
#: Run by the sandbox tree's own Python inside the impostor's pod: three calls with one result line each.
_IMPOSTOR = """
import sys, time
sys.path.insert(0, "/opt/openshell/site")
import grpc
from openshell_wire.v1 import openshell_pb2 as pb, openshell_pb2_grpc as rpc
token = open("{token}").read().strip()
stub = rpc.OpenShellStub(grpc.insecure_channel("{gateway}"))
def call(name, fn):
    try:
        fn()
        print(name, "OK", flush=True)
    except grpc.RpcError as exc:
        print(name, exc.code().name, exc.details(), flush=True)
bearer = [("authorization", "Bearer " + token)]
report = pb.ReportMainProcessExitRequest(sandbox_id="{other}", instance_id="x", exit_code=0)
call("other", lambda: stub.ReportMainProcessExit(report, metadata=bearer, timeout=20))
call("none", lambda: stub.ReportMainProcessExit(report, timeout=20))
elsewhere = [("authorization", "Bearer {default_token}")]
mine = pb.ReportMainProcessExitRequest(sandbox_id="{own}", instance_id="x", exit_code=0)
call("default", lambda: stub.ReportMainProcessExit(mine, metadata=elsewhere, timeout=20))
line = pb.SandboxLogLine(sandbox_id="{own}", timestamp_ms=int(time.time() * 1000), level="info",
    message="impostor-line", source="sandbox")
call("own", lambda: stub.PushSandboxLogs(iter([pb.PushSandboxLogsRequest(sandbox_id="{own}", logs=[line])]),
    metadata=bearer, timeout=20))
"""


def test_a_sandbox_connects_rides_out_a_networkpolicy_cut_and_resumes(
    installed: Installed, target: Target
) -> None:
    sandbox = "live-1"
    script = f"i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.1; done"
    installed.call(
        "POST", "/sandboxes", {"id": sandbox, "command": ["sh", "-c", script], "image": target.sandbox_image}
    )
    pod_name = f"sandbox-{sandbox}"

    def pod_detail() -> Any:
        with contextlib.suppress(ApiError):
            pod = installed.admin.get(Pod, pod_name, namespace=installed.sandboxes)
            return pod.status
        return "no pod"

    kubeaccess.wait_for(
        lambda: installed.state(sandbox) == "connected",
        timeout=300,
        what="the sandbox to connect",
        detail=pod_detail,
    )

    cut = codecs.from_dict(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"cut-{sandbox}", "namespace": installed.sandboxes},
            "spec": {
                "podSelector": {"matchLabels": {podspec.LABEL_SANDBOX: sandbox}},
                "policyTypes": ["Egress"],
                "egress": [],
            },
        }
    )
    # Policies add up: the chart's sandbox policy (which allows the gateway) must leave this sandbox
    # for the cut to cut. It is put back as it was afterwards.
    chart_policy = f"{RELEASE}-gateway-sandboxes"
    if _policies_on(target):
        installed.admin.patch(
            NetworkPolicy,
            chart_policy,
            {
                "spec": {
                    "podSelector": {
                        "matchExpressions": [
                            {"key": podspec.LABEL_SANDBOX, "operator": "NotIn", "values": [sandbox]}
                        ]
                    }
                }
            },
            namespace=installed.sandboxes,
        )
    installed.admin.create(cut)  # type: ignore[call-overload]
    # The established stream outlives the policy: end it by rolling the gateway.
    old = {p.metadata.name for p in installed.gateway_pods() if p.metadata}
    for name in old:
        installed.admin.delete(Pod, name, namespace=installed.namespace)
    kubeaccess.wait_for(
        lambda: any(
            _ready(p) and p.metadata and p.metadata.name not in old for p in installed.gateway_pods()
        ),
        timeout=300,
        what="a new gateway pod",
    )
    kubeaccess.wait_for(
        lambda: installed.state(sandbox) == "disconnected",
        timeout=120,
        what="the new gateway to see the sandbox cut off",
    )
    stored_when_cut = len(_lines(installed, sandbox))
    # The policy holds: reconnects are tried and stopped by it, and the sandbox stays disconnected.
    held_until = time.monotonic() + HOLD_S
    while time.monotonic() < held_until:
        state = installed.state(sandbox)
        assert state in ("disconnected", "lost") or state.startswith("unreachable"), (
            f"{state} through the NetworkPolicy"
        )
        time.sleep(2)

    installed.admin.delete(type(cut), f"cut-{sandbox}", namespace=installed.sandboxes)
    if _policies_on(target):
        installed.admin.patch(
            NetworkPolicy,
            chart_policy,
            [{"op": "remove", "path": "/spec/podSelector/matchExpressions"}],
            namespace=installed.sandboxes,
            patch_type=PatchType.JSON,
        )
    kubeaccess.wait_for(
        lambda: installed.state(sandbox) in ("connected", "exited"),
        timeout=300,
        what="the sandbox to resume",
        detail=pod_detail,
    )
    kubeaccess.wait_for(
        lambda: installed.state(sandbox) == "exited", timeout=300, what="the main process to end"
    )
    row = installed.call("GET", f"/sandboxes/{sandbox}")
    assert row["exit_code"] == 0, row
    assert _lines(installed, sandbox) == [f"line {i}" for i in range(LINES)], "every line once, in order"
    assert stored_when_cut < LINES, "the main process was still writing when the cut began"
    # The supervisor's own account: one outage, at least as long as the hold.
    reconnects = [
        e["data"]
        for e in _events(installed, sandbox)
        if e["kind"] == "lifecycle" and e["data"]["kind"] == "reconnected"
    ]
    assert len(reconnects) == 1 and reconnects[0]["duration_ms"] >= HOLD_S * 1000, reconnects
    pod = installed.admin.get(Pod, pod_name, namespace=installed.sandboxes)
    assert pod.status is not None and pod.status.containerStatuses is not None
    assert pod.status.containerStatuses[0].restartCount == 0, "the cut never restarted the sandbox"

    installed.call("DELETE", f"/sandboxes/{sandbox}")
    kubeaccess.wait_for(lambda: not _exists(installed, pod_name), timeout=120, what="the sandbox pod to go")


def _events(installed: Installed, sandbox: str) -> list[dict[str, Any]]:
    return list(installed.call("GET", f"/sandboxes/{sandbox}/logs?tail=5000")["events"])


def _lines(installed: Installed, sandbox: str) -> list[str]:
    return [e["message"] for e in _events(installed, sandbox) if e["kind"] == "log"]


def _exists(installed: Installed, pod_name: str) -> bool:
    try:
        installed.admin.get(Pod, pod_name, namespace=installed.sandboxes)
        return True
    except ApiError:
        return False


def test_a_sandbox_without_a_command_runs_the_images_own(installed: Installed, target: Target) -> None:
    """The gateway pod reads the image's ENTRYPOINT + CMD from the registry (through the chart's
    NetworkPolicy) and the supervisor runs them."""
    if target.agent_image is None:
        pytest.skip("set OPENSHELL_TEST_AGENT_IMAGE and OPENSHELL_TEST_AGENT_LINE to test this on KUBECONFIG")
    created = installed.call("POST", "/sandboxes", {"id": "own-command", "image": target.agent_image})
    if target.agent_argv is not None:
        assert created["command"] == target.agent_argv, created
    assert created["command_from_image"].startswith("sha256:"), created
    kubeaccess.wait_for(
        lambda: installed.state("own-command") == "exited",
        timeout=300,
        what="the sandbox of the image's command",
    )
    assert _lines(installed, "own-command") == [target.agent_line]
    installed.call("DELETE", "/sandboxes/own-command")


# Last in this module: it upgrades the release the tests above share.
def test_the_init_container_fallback_runs_the_same_sandbox(installed: Installed, target: Target) -> None:
    """``injection: init-container`` (clusters without image volumes): an init container from the
    supervisor image installs the bundle into an emptyDir and the sandbox runs it from there."""
    values = openshelldeploy.merged(
        installed.values, {"sandboxes": {"supervisor": {"injection": "init-container"}}}
    )
    try:
        installed.helm.upgrade(str(CHART), RELEASE, values, namespace=installed.namespace, timeout=600)
    except helm_python.HelmError as exc:
        raise AssertionError(
            f"helm upgrade failed: {exc}\n{_pod_logs(installed.admin, installed.namespace)}"
        ) from exc
    openshelldeploy.wait_rolled_out(installed.admin, installed.namespace, RELEASE)
    script = "echo ran"
    installed.call(
        "POST",
        "/sandboxes",
        {"id": "fallback", "command": ["sh", "-c", script], "image": target.sandbox_image},
    )
    kubeaccess.wait_for(
        lambda: installed.state("fallback") == "exited", timeout=300, what="the fallback sandbox"
    )
    assert _lines(installed, "fallback") == ["ran"]  # the supervisor ran it and shipped its line
    pod = installed.admin.get(Pod, "sandbox-fallback", namespace=installed.sandboxes)
    assert pod.spec is not None and pod.spec.initContainers and pod.spec.volumes is not None
    assert not [v for v in pod.spec.volumes if v.image is not None], "no image volume in this mode"
    mounts = pod.spec.containers[0].volumeMounts or []
    supervisor_dir = next(m.name for m in mounts if m.mountPath == "/opt/openshell")
    assert next(v for v in pod.spec.volumes if v.name == supervisor_dir).emptyDir is not None
    assert pod.status is not None and pod.status.initContainerStatuses
    installer = pod.status.initContainerStatuses[0].state
    assert installer is not None and installer.terminated is not None and installer.terminated.exitCode == 0
    installed.call("DELETE", "/sandboxes/fallback")
