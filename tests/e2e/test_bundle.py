"""The self-contained supervisor bundle runs where there is no Python at all.

The bundle (``imagevolume/bundle.py``) is built once per session into ``build/bundle`` (or
``$OPENSHELL_BUNDLE_DIR``); the build is cached by a hash of the sources, so only the first run
pays its minute or so. Each test runs the bundle in a busybox root filesystem (Debian's
``busybox-static``, nothing else: no libc, no Python) under bubblewrap, mounted read-only like an
image volume, as uid 65534 with no capabilities and a tmpfs ``/tmp`` to unpack into.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.busybox import MOUNT
from tests.support.procs import GatewayProcess, wait_until

pytestmark = pytest.mark.timeout(900)


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
    bwrap: str,
    rootfs: Path,
    bundle: Path,
    *,
    journal: Path,
    gateway: GatewayProcess,
    command: Sequence[str],
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    argv = [
        *_sandbox(bwrap, rootfs, bundle, "--bind", str(journal), "/journal", *extra, share_net=True),
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


def test_the_main_process_gets_the_containers_environment_not_the_bundles(
    bwrap: str, rootfs: Path, bundle: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """The bootloaders put the unpacked libraries on LD_LIBRARY_PATH and add _PYI_*/STATICX_*
    variables: none of it may reach the sandbox's programs (they would load our libraries)."""
    journal = tmp_path / "journal"
    journal.mkdir()
    command = ["/bin/sh", "-c", "env | grep -E '^(LD_|_PYI|_MEI|STATICX|AGENT)' | sort"]
    result = _run_supervisor(
        bwrap,
        rootfs,
        bundle,
        journal=journal,
        gateway=gateway,
        command=command,
        extra=["--setenv", "LD_LIBRARY_PATH", "/usr/local/nvidia/lib64", "--setenv", "AGENT_MODE", "fast"],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    wait_until(lambda: len(gateway.log_lines("bundle-sb")) >= 2, timeout=10, what="the env lines stored")
    assert gateway.log_lines("bundle-sb") == ["AGENT_MODE=fast", "LD_LIBRARY_PATH=/usr/local/nvidia/lib64"]


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
