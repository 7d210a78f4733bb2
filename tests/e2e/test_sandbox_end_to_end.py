"""One sandbox end to end, on real components: milestone 1 in one test.

A real gateway process runs the Kubernetes driver against a real API server (the ``kubeconfig``
fixture: the local control plane, or any cluster) with only the documented RBAC, in a namespace
enforcing Pod Security "restricted". A sandbox is created through the gateway's HTTP API; the
gateway creates its pod. The API server holds no kubelet here, so the test plays one for that pod:
it reads the pod back from the API server, mints what a kubelet projects into it (a token of the
pod's ServiceAccount with the volume's audience, bound to the pod) and runs the pod's container
with runc (``tests/support/runc.py``), the supervisor image (built, pushed to a real
registry, pulled and unpacked) mounted read-only where the image volume goes, in a network
namespace of its own joined to the gateway's host by a veth pair. The supervisor connects with
that token, ships the agent's lines, rides out a cut of its link (nft drop), resumes with every
line once, and its exit reaches the API; deleting the sandbox through the API removes its pod.
(kwok, where present, plays the kubelet's status part: the pod shows Running in the sandbox's
``driver_state``.)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError
from lightkube.resources.core_v1 import Node, Pod

from gateway.config import LeaderSettings
from gateway.drivers import podspec
from gateway.drivers.kubernetes import CLUSTER_RBAC_RULES, RBAC_RULES
from gateway.leader import lease_rules
from tests.support import kubeaccess
from tests.support.netns import NetPair, netns_unavailable
from tests.support.procs import GatewayProcess, wait_until
from tests.support.runc import RuncContainer, empty_dir, runc_unavailable, runtime_spec_from_pod, secret_dir

pytestmark = [pytest.mark.timeout(900), pytest.mark.netns]

SANDBOX = "e2e-1"
INTERVAL = 0.5
AGENT = r"""
i=0
while [ ! -e /control/stop ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done
echo "ticks $i"
exit 7
"""


@pytest.fixture
def net() -> Iterator[NetPair]:
    for reason in (runc_unavailable(), netns_unavailable()):
        if reason is not None:
            pytest.skip(reason)
    pair = NetPair.create(gateway_on_host=True)
    yield pair
    pair.destroy()


def api(gw: GatewayProcess, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gw.http_port}/api/v1{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def state(gw: GatewayProcess) -> dict[str, Any]:
    status, doc = api(gw, "GET", f"/sandboxes/{SANDBOX}")
    assert status == 200, doc
    result: dict[str, Any] = doc
    return result


def test_one_sandbox_end_to_end(
    kubeconfig: Path, rootfs: Path, pulled_image: Path, net: NetPair, tmp_path: Path
) -> None:
    admin = kubeaccess.admin_client(kubeconfig)
    with (
        kubeaccess.namespace(admin, "os-e2e") as namespace,
        # TokenReview: the gateway checks the pod's projected token.
        kubeaccess.cluster_grant(admin, "gateway", namespace, CLUSTER_RBAC_RULES),
    ):
        identity = kubeaccess.identity_with_rules(
            # The driver's Role and the leader Lease's (the Lease in the driver's namespace here).
            admin,
            kubeconfig,
            namespace,
            [*RBAC_RULES, *lease_rules(LeaderSettings().lease_name)],
            tmp_path / "kc",
            name="gateway",
        )
        gw = GatewayProcess(
            tmp_path / "gw", grpc_host=net.gateway_ip, heartbeat_interval_s=INTERVAL, auth=True
        )
        config = tmp_path / "gateway.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "drivers": {
                        "kind": "kubernetes",
                        "kubernetes": {
                            "namespace": namespace,
                            "kubeconfig": str(identity),
                            "gateway_address": gw.address,
                            "supervisor": {
                                "image": "registry.invalid/openshell-supervisor:0.1.0",
                                "settings": {
                                    "session.reconnect_initial_s": "0.2",
                                    "session.reconnect_max_s": "2",
                                    "gateway.connect_timeout_s": "2",
                                },
                            },
                            "pod": {"default_image": "registry.invalid/busybox-without-python:1"},
                        },
                    }
                }
            )
        )
        gw.extra = ["--config", str(config)]
        container = RuncContainer(
            f"ose-{os.getpid()}", tmp_path / "bundle", tmp_path / "runc", tmp_path / "c.log"
        )
        control = tmp_path / "control"
        control.mkdir()
        try:
            gw.start()
            # RBAC is in force within moments; until then the create answers 502 with the reason.
            created = wait_until(
                lambda: (
                    (
                        r := api(
                            gw, "POST", "/sandboxes", {"id": SANDBOX, "command": ["/bin/sh", "-c", AGENT]}
                        )
                    )[0]
                    == 201
                    and r
                ),
                timeout=30,
                what="the sandbox created through the gateway's API",
            )
            assert created[1]["pod"] == f"sandbox-{SANDBOX}"

            # The kubelet's part: the pod as the API server holds it, and its projected token.
            pod = admin.get(Pod, f"sandbox-{SANDBOX}", namespace=namespace).to_dict()
            projected = kubeaccess.projected_token(admin, pod)
            fs_group = pod["spec"]["securityContext"]["fsGroup"]
            volumes = {
                podspec.VOLUME_SUPERVISOR: pulled_image,
                podspec.VOLUME_JOURNAL: empty_dir(tmp_path / "v" / "journal", fs_group),
                podspec.VOLUME_TMP: empty_dir(tmp_path / "v" / "tmp", fs_group),
                podspec.VOLUME_CREDENTIAL: secret_dir(
                    tmp_path / "v" / "credential",
                    {podspec.CREDENTIAL_KEY: projected.encode()},
                    mode=0o440,
                    fs_group=fs_group,
                ),
            }
            container.start(
                runtime_spec_from_pod(
                    pod,
                    rootfs=rootfs,
                    volumes=volumes,
                    netns=net.sandbox_ns,
                    extra_mounts={"/control": control},
                )
            )

            wait_until(
                lambda: state(gw)["state"] == "connected", timeout=120, what=f"connected ({container.log})"
            )
            wait_until(
                lambda: sum(x.startswith("tick ") for x in gw.log_lines(SANDBOX)) >= 20,
                timeout=60,
                what="lines",
            )
            if any(True for _ in admin.list(Node, labels={"type": "kwok"})):
                wait_until(
                    lambda: (state(gw)["driver_state"] or {}).get("phase") == "Running",
                    timeout=60,
                    what="the pod's phase from the driver's watch",
                )
            # Connected with supervisor auth required: the gateway took the projected token through
            # a TokenReview and bound it to this sandbox's pod (name and uid).

            net.cut()
            wait_until(
                lambda: state(gw)["state"] == "disconnected", timeout=60, what="the cut seen by the gateway"
            )
            time.sleep(4 * INTERVAL * 3)  # well past three heartbeats on the supervisor's side too
            during = len(gw.log_lines(SANDBOX))
            net.heal()
            wait_until(
                lambda: state(gw)["state"] == "connected", timeout=90, what="reconnected after the heal"
            )
            wait_until(
                lambda: len(gw.log_lines(SANDBOX)) > during + 20, timeout=60, what="lines after the heal"
            )

            (control / "stop").touch()
            assert container.wait(timeout=90) == 7, container.log_text()[-4000:]
            wait_until(lambda: state(gw)["state"] == "exited", timeout=60, what="the exit reported")
            assert state(gw)["exit_code"] == 7

            status, deleted = api(gw, "DELETE", f"/sandboxes/{SANDBOX}")
            assert status == 202 and deleted["deleted"] is True, deleted

            def gone() -> bool:
                for kind, name in ((Pod, f"sandbox-{SANDBOX}"),):
                    try:
                        admin.get(kind, name, namespace=namespace)  # type: ignore[call-overload]
                    except ApiError:
                        continue
                    return False
                return True

            wait_until(gone, timeout=60, what="pod deleted")
            wait_until(
                lambda: (state(gw)["driver_state"] or {}).get("phase") == "Deleted",
                timeout=60,
                what="the deletion seen by the driver's watch",
            )
        finally:
            container.stop()
            gw.stop()

    log = container.log_text()
    assert "no message from the gateway" in log, "the supervisor noticed the silent cut by itself"
    assert log.count("session accepted") >= 2
    lines = gw.log_lines(SANDBOX)
    ticks = [x for x in lines if x.startswith("tick ")]
    n = int(next(x for x in lines if x.startswith("ticks ")).split()[1])
    assert ticks == [f"tick {i}" for i in range(n)], "every line once, in order, across the cut"
