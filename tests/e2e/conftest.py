"""Fixtures the sandbox-container tests share: the bundle, a busybox root filesystem, bubblewrap.

The bundle (``imagevolume/bundle.py``: the supervisor's self-contained tree) is built once per
session into ``build/bundle/tree`` (or under ``$OPENSHELL_BUNDLE_DIR``), cached by a hash of the
sources. The root filesystem is Debian's static
busybox and nothing else: no libc, no Python, like the user images the supervisor must serve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lightkube import Client

from imagevolume import oci, registry
from imagevolume.bundle import SYSTEM_PYTHON, BundleError, _is_pyenv, build_bundle
from supervisor.install import TREE_ENTRIES
from tests.support import kubeaccess
from tests.support.busybox import apt_install, make_rootfs, static_busybox
from tests.support.procs import REPO
from tests.support.registry import ensure_tools, running_registry

BUNDLE_DIR = Path(os.environ.get("OPENSHELL_BUNDLE_DIR", REPO / "build" / "bundle"))


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not SYSTEM_PYTHON.exists() or _is_pyenv(SYSTEM_PYTHON):
        pytest.skip(f"needs Debian's {SYSTEM_PYTHON} (the tree carries it and the libraries it links)")
    try:
        return build_bundle(BUNDLE_DIR)
    except BundleError as exc:
        pytest.skip(f"cannot build the bundle here: {exc}")


@pytest.fixture(scope="module")
def admin(kubeconfig: Path) -> Client:
    """A client of the cluster with the admin's rights (the tests set things up with it)."""
    return kubeaccess.admin_client(kubeconfig)


@pytest.fixture(scope="session")
def bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None and apt_install("bubblewrap"):
        path = shutil.which("bwrap")
    if path is None:
        pytest.skip("bubblewrap (apt bubblewrap) is not installed and cannot be installed without root")
    probe = subprocess.run(
        [path, "--ro-bind", "/", "/", "--unshare-all", "--uid", "65534", "--gid", "65534", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"bwrap cannot create a sandbox here: {probe.stderr.strip()}")
    return path


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = static_busybox()
    if busybox is None:
        pytest.skip("needs a static /bin/busybox (apt busybox-static)")
    return make_rootfs(tmp_path_factory.mktemp("busybox-rootfs"), busybox)


IMAGE_ARGS = {"version": "0.1.0", "revision": "0" * 40, "created": "2026-01-02T03:04:05Z"}


@pytest.fixture(scope="session")
def pulled_image(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The supervisor image, through a real registry and back, unpacked: what a kubelet mounts."""
    ensure_tools("docker-registry", "skopeo", "umoci")
    work = tmp_path_factory.mktemp("supervisor-image")
    layout = work / "oci"
    digest = oci.build_image(bundle, layout, **IMAGE_ARGS, tag="0.1.0")
    pulled = work / "pulled"
    with running_registry(work / "registry") as reg:
        assert registry.push(layout, registry=reg.host, tag="0.1.0", insecure=True) == digest
        registry.pull(pulled, registry=reg.host, tag="0.1.0", layout_tag="pulled", insecure=True)
    unpacked = work / "image-volume"
    subprocess.run(
        ["umoci", "raw", "unpack", "--rootless", "--image", f"{pulled}:pulled", str(unpacked)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(TREE_ENTRIES)
    return unpacked
