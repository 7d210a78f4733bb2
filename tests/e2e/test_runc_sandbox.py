"""The supervisor image in a real container: built, pushed, pulled, unpacked, run by runc.

The image volume's whole path short of a kubelet: ``imagevolume/oci.py`` builds the image from the
bundle, skopeo pushes it to a real registry (Debian's docker-registry on 127.0.0.1) and pulls it
back, umoci unpacks it, and runc runs the very pod the gateway's Kubernetes driver builds
(``gateway.drivers.podspec``), translated by ``tests/support/runc.py``: a busybox root file system
without Python, read-only; the unpacked image mounted read-only at /opt/openshell; uid 65534; every
capability dropped; no_new_privileges; its own network namespace joined to the gateway's by a
veth pair. The supervisor connects, ships the main process's logs, rides out a cut of that link,
and the main process reads ``/proc/1/status`` (the supervisor's) to show no capabilities.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import KubernetesDriverSettings
from gateway.drivers import podspec
from supervisor.install import TREE_ENTRIES
from tests.support.netns import NetPair, netns_unavailable
from tests.support.procs import GatewayProcess, wait_until
from tests.support.runc import RuncContainer, empty_dir, runc_unavailable, runtime_spec_from_pod, secret_dir

pytestmark = [pytest.mark.timeout(900), pytest.mark.netns]

SANDBOX = "runc-sb"
INTERVAL = 0.5

# The main process: report what it can see and do, then tick until told to stop.
AGENT = r"""
grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/1/status | tr -s '\t ' ' '
echo "pid1 $(tr '\0' ' ' < /proc/1/cmdline)"
echo "id $(id -u):$(id -g)"
touch /rootfs-write 2>/dev/null && echo "root writable" || echo "root read-only"
touch /opt/openshell/x 2>/dev/null && echo "bundle writable" || echo "bundle read-only"
command -v python3 >/dev/null && echo "python present" || echo "no python"
i=0
while [ ! -e /control/stop ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done
echo "ticks $i"
exit 7
"""


@pytest.fixture
def skip_without_runc_or_netns() -> None:
    for reason in (runc_unavailable(), netns_unavailable()):
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def net(skip_without_runc_or_netns: None) -> Iterator[NetPair]:
    pair = NetPair.create()
    yield pair
    pair.destroy()


def test_the_gateways_pod_runs_in_runc_and_rides_out_a_cut(
    rootfs: Path, pulled_image: Path, net: NetPair, tmp_path: Path
) -> None:
    gw = GatewayProcess(
        tmp_path / "gw", grpc_host=net.gateway_ip, netns=net.gateway_ns, heartbeat_interval_s=INTERVAL
    )
    settings = KubernetesDriverSettings.model_validate(
        {
            "gateway_address": gw.address,
            "pod": {"default_image": "busybox-without-python"},
            "supervisor": {
                "settings": {
                    "session.reconnect_initial_s": "0.2",
                    "session.reconnect_max_s": "2",
                    "gateway.connect_timeout_s": "2",
                    "capture.echo": "true",
                }
            },
        }
    )
    pod = podspec.build_sandbox_pod(settings, podspec.SandboxRequest(SANDBOX, ["/bin/sh", "-c", AGENT]))
    fs_group = pod["spec"]["securityContext"]["fsGroup"]
    control = tmp_path / "control"
    control.mkdir()
    volumes = {
        podspec.VOLUME_SUPERVISOR: pulled_image,
        podspec.VOLUME_JOURNAL: empty_dir(tmp_path / "volumes" / "journal", fs_group),
        podspec.VOLUME_TMP: empty_dir(tmp_path / "volumes" / "tmp", fs_group),
        podspec.VOLUME_CREDENTIAL: secret_dir(
            tmp_path / "volumes" / "credential",
            # What the kubelet projects there: the pod's ServiceAccount token (any text here).
            {podspec.CREDENTIAL_KEY: b"t0k"},
            mode=pod["spec"]["volumes"][3]["projected"]["defaultMode"],
            fs_group=fs_group,
        ),
    }
    spec = runtime_spec_from_pod(
        pod, rootfs=rootfs, volumes=volumes, netns=net.sandbox_ns, extra_mounts={"/control": control}
    )
    container = RuncContainer(
        f"os-{os.getpid()}", tmp_path / "bundle", tmp_path / "runc-state", tmp_path / "c.log"
    )
    try:
        gw.start()
        container.start(spec)
        wait_until(
            lambda: sum(line.startswith("tick ") for line in gw.log_lines(SANDBOX)) >= 20,
            timeout=120,
            what=f"ticks stored (container log: {container.log})",
        )
        first = gw.log_lines(SANDBOX)
        status = {
            line.split(":")[0]: line.split(":", 1)[1].strip() for line in first if line.startswith("Cap")
        }
        assert status == {
            "CapInh": "0000000000000000",
            "CapPrm": "0000000000000000",
            "CapEff": "0000000000000000",
            "CapBnd": "0000000000000000",
            "CapAmb": "0000000000000000",
        }, first
        assert "NoNewPrivs: 1" in first
        assert any(line.startswith("Uid: 65534 65534") for line in first), first
        # The supervisor itself is PID 1 (no bootloader between it and the runtime's signals).
        pid1 = next(x for x in first if x.startswith("pid1"))
        assert "/opt/openshell/openshell-supervisor.py run" in pid1 and "/opt/openshell/lib/ld.so" in pid1, (
            first
        )
        assert {"id 65534:65534", "root read-only", "bundle read-only", "no python"} <= set(first), first

        net.cut()
        time.sleep(4 * INTERVAL * 3)  # past three heartbeat intervals on both sides
        during = len(gw.log_lines(SANDBOX))
        net.heal()
        wait_until(
            lambda: len(gw.log_lines(SANDBOX)) > during + 20, timeout=90, what="lines flowing after the heal"
        )
        (control / "stop").touch()
        assert container.wait(timeout=90) == 7, container.log_text()[-4000:]
    finally:
        container.stop()
        gw.stop()

    log = container.log_text()
    assert "no message from the gateway" in log, "the supervisor should notice the silent cut by itself"
    assert log.count("session accepted") >= 2, log[-4000:]
    lines = gw.log_lines(SANDBOX)
    ticks = [line for line in lines if line.startswith("tick ")]
    n = int(next(line for line in lines if line.startswith("ticks")).split()[1])
    assert ticks == [f"tick {i}" for i in range(n)], "every line once, in order, across the cut"
    assert gw.query(f"SELECT exit_code FROM sandboxes WHERE id = '{SANDBOX}'") == [(7,)]


def test_the_init_container_fallback_installs_the_bundle_for_the_sandbox(
    rootfs: Path, pulled_image: Path, net: NetPair, tmp_path: Path
) -> None:
    """Without ImageVolume: the init container runs from the supervisor image itself (nothing in it
    but the tree) and copies the tree into an emptyDir, which the sandbox mounts read-only."""
    gw = GatewayProcess(tmp_path / "gw", grpc_host=net.gateway_ip, netns=net.gateway_ns)
    settings = KubernetesDriverSettings.model_validate(
        {
            "gateway_address": gw.address,
            "pod": {"default_image": "busybox-without-python"},
            "supervisor": {"injection": "init-container", "settings": {"gateway.connect_timeout_s": "2"}},
        }
    )
    command = ["/bin/sh", "-c", "echo installed by the init container; echo $(ls /opt/openshell); exit 4"]
    pod = podspec.build_sandbox_pod(settings, podspec.SandboxRequest("init-sb", command))
    assert pod["spec"]["volumes"][0] == {
        "name": podspec.VOLUME_SUPERVISOR,
        "emptyDir": {"sizeLimit": podspec.SUPERVISOR_TREE_LIMIT},
    }
    fs_group = pod["spec"]["securityContext"]["fsGroup"]
    volumes = {
        podspec.VOLUME_SUPERVISOR: empty_dir(tmp_path / "volumes" / "supervisor", fs_group),
        podspec.VOLUME_JOURNAL: empty_dir(tmp_path / "volumes" / "journal", fs_group),
        podspec.VOLUME_TMP: empty_dir(tmp_path / "volumes" / "tmp", fs_group),
        podspec.VOLUME_CREDENTIAL: secret_dir(
            tmp_path / "volumes" / "credential", {"token": b"t0k"}, mode=0o440, fs_group=fs_group
        ),
    }
    # The supervisor image is the init container's root file system: it has no /proc or /tmp to
    # mount onto, and runc (like any runtime) makes those mount points in its copy of the image.
    init_root = tmp_path / "init-rootfs"
    subprocess.run(["cp", "-a", str(pulled_image), str(init_root)], check=True)
    init_root.chmod(0o755)
    init = RuncContainer(
        f"osi-{os.getpid()}", tmp_path / "init", tmp_path / "runc-state", tmp_path / "init.log"
    )
    main = RuncContainer(
        f"osm-{os.getpid()}", tmp_path / "main", tmp_path / "runc-state", tmp_path / "main.log"
    )
    try:
        init.start(
            runtime_spec_from_pod(
                pod,
                rootfs=init_root,
                volumes=volumes,
                netns=net.sandbox_ns,
                container_name=podspec.INIT_CONTAINER_NAME,
            )
        )
        assert init.wait(timeout=120) == 0, init.log_text()[-4000:]
        target = volumes[podspec.VOLUME_SUPERVISOR]
        for name in ("lib/ld.so", "bin/python3", podspec.TREE_ENTRY):
            assert (target / name).read_bytes() == (pulled_image / name).read_bytes(), name
        installed = target / "bin" / "python3"
        assert installed.stat().st_uid == 65534 and installed.stat().st_mode & 0o777 == 0o555

        gw.start()
        main.start(runtime_spec_from_pod(pod, rootfs=rootfs, volumes=volumes, netns=net.sandbox_ns))
        assert main.wait(timeout=120) == 4, main.log_text()[-4000:]
    finally:
        init.stop()
        main.stop()
        gw.stop()
    assert gw.log_lines("init-sb") == [
        "installed by the init container",
        " ".join(sorted(TREE_ENTRIES)),
    ]
