"""The self-contained supervisor bundle runs where there is no Python at all.

The bundle (``imagevolume/bundle.py``) is built once per session into ``build/bundle`` (or
``$OPENSHELL_BUNDLE_DIR``); the build is cached by a hash of the sources, so only the first run
pays its minute or so. Each test runs the bundle in a busybox root filesystem (Debian's
``busybox-static``, nothing else: no libc, no Python) under bubblewrap, mounted read-only like an
image volume, as uid 65534 with no capabilities and a tmpfs ``/tmp`` to unpack into.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from imagevolume.bundle import SYSTEM_PYTHON, BundleError, _is_pyenv, build_bundle
from tests.support.procs import REPO, GatewayProcess, wait_until

pytestmark = pytest.mark.timeout(900)

BUNDLE_DIR = Path(os.environ.get("OPENSHELL_BUNDLE_DIR", REPO / "build" / "bundle"))
MOUNT = "/opt/openshell/openshell-supervisor"
APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "env", "id")


def _apt_install(*packages: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", *packages], env=env, capture_output=True, check=False
    )
    return result.returncode == 0


def _static_busybox() -> Path | None:
    path = Path("/bin/busybox")
    if not path.exists() and not _apt_install("busybox-static"):
        return None
    if not path.exists():
        return None
    info = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True, check=False).stdout
    if info and "statically linked" not in info and "static-pie" not in info:
        _apt_install("busybox-static")  # replaces the dynamic busybox
        info = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True, check=False).stdout
        if info and "statically linked" not in info and "static-pie" not in info:
            return None
    return path


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not SYSTEM_PYTHON.exists() or _is_pyenv(SYSTEM_PYTHON):
        pytest.skip(f"needs Debian's {SYSTEM_PYTHON} (staticx refuses pyenv's Python)")
    try:
        return build_bundle(BUNDLE_DIR)
    except BundleError as exc:
        pytest.skip(f"cannot build the bundle here: {exc}")


@pytest.fixture(scope="session")
def bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None and _apt_install("bubblewrap"):
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
    busybox = _static_busybox()
    if busybox is None:
        pytest.skip("needs a static /bin/busybox (apt busybox-static)")
    root = tmp_path_factory.mktemp("busybox-rootfs")
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "dev", "proc", "journal", "opt/openshell", "etc"):
        (root / d).mkdir(parents=True)
    (root / MOUNT.lstrip("/")).touch()  # the read-only root cannot grow a mount point
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    assert not list(root.rglob("*python*")) and not list(root.rglob("libc*"))
    return root


def _sandbox(bwrap: str, rootfs: Path, bundle: Path, *extra: str, share_net: bool = False) -> list[str]:
    argv = [
        bwrap,
        "--ro-bind", str(rootfs), "/",
        "--ro-bind", str(bundle), MOUNT,
        "--tmpfs", "/tmp",
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-all",
    ]  # fmt: skip
    if share_net:
        argv.append("--share-net")
    argv += [
        "--uid", "65534",
        "--gid", "65534",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--clearenv",
        "--setenv", "PATH", "/bin",
        "--setenv", "TMPDIR", "/tmp",
        *extra,
    ]  # fmt: skip
    return argv


def test_config_schema_in_a_rootfs_without_python(bwrap: str, rootfs: Path, bundle: Path) -> None:
    argv = [*_sandbox(bwrap, rootfs, bundle), MOUNT, "config", "schema"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "properties" in schema and "gateway" in schema["properties"], sorted(schema)

    # And the sandbox really is bare: no python, uid 65534, the bundle read-only.
    probe = [
        *_sandbox(bwrap, rootfs, bundle),
        "/bin/sh",
        "-c",
        f"id -u; ls /bin; echo x > {MOUNT} || echo ro",
    ]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False).stdout.split()
    assert out[0] == "65534" and "python3" not in out and out[-1] == "ro", out


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gateway")
    gw.start()
    yield gw
    gw.stop()


def _run_supervisor(
    bwrap: str, rootfs: Path, bundle: Path, *, journal: Path, gateway: GatewayProcess, command: Sequence[str]
) -> subprocess.CompletedProcess[str]:
    argv = [
        *_sandbox(bwrap, rootfs, bundle, "--bind", str(journal), "/journal", share_net=True),
        MOUNT, "run",
        "--sandbox-id", "bundle-sb",
        "--gateway", gateway.address,
        "--journal-dir", "/journal",
        "--log-level", "debug",
        "--set", "session.reconnect_initial_s=0.2",
        "--set", "session.reconnect_max_s=2",
        "--",
        *command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_bundle_supervises_a_busybox_main_process(
    bwrap: str, rootfs: Path, bundle: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    command = ["/bin/sh", "-c", "echo hello from busybox; exit 3"]
    result = _run_supervisor(bwrap, rootfs, bundle, journal=journal, gateway=gateway, command=command)
    context = f"supervisor stderr:\n{result.stderr[-4000:]}\ngateway:\n{gateway.log_text()[-4000:]}"
    assert result.returncode == 3, context
    assert "session accepted" in result.stderr, context

    wait_until(lambda: gateway.log_lines("bundle-sb"), timeout=10, what="the log line stored")
    assert gateway.log_lines("bundle-sb") == ["hello from busybox"], context
    exits = [e for e in gateway.events("bundle-sb", "lifecycle") if (e["data"] or {}).get("kind") == "exited"]
    assert len(exits) == 1 and exits[0]["data"]["exit_code"] == 3, exits
    assert gateway.query("SELECT exit_code FROM sandboxes WHERE id = 'bundle-sb'") == [(3,)]


def test_the_bundle_installs_a_copy_of_itself(bundle: Path, tmp_path: Path) -> None:
    """The init-container fallback: a FROM scratch image has no cp, so the bundle copies itself."""
    target = tmp_path / "shared"
    target.mkdir()
    done = subprocess.run([str(bundle), "install", str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    copy = target / "openshell-supervisor"
    assert done.stdout.strip() == str(copy)
    assert copy.read_bytes() == bundle.read_bytes(), "the bundle itself, not what staticx unpacked"
    assert copy.stat().st_mode & 0o777 == 0o555
    schema = subprocess.run([str(copy), "config", "schema"], capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0 and '"sandbox_id"' in schema.stdout


def test_install_outside_a_bundle_says_why(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "install", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "not running from a bundle" in done.stderr
