"""The self-contained supervisor tree runs where there is no Python and no libc at all.

The tree (``imagevolume/bundle.py``) is built once per session into ``build/bundle/tree`` (or
``$OPENSHELL_BUNDLE_DIR``); the build is cached by a hash of the sources. Each test runs it in a
busybox root filesystem (Debian's ``busybox-static``, nothing else: no libc, no Python) under
bubblewrap, mounted read-only at /opt/openshell like an image volume, as uid 65534 with no
capabilities, started the way the pod's command starts it (``podspec.launcher``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gateway.drivers import podspec
from supervisor.install import TREE_ENTRIES
from tests.support.busybox import MOUNT_DIR
from tests.support.procs import GatewayProcess, wait_until

pytestmark = pytest.mark.timeout(900)


def _sandbox(bwrap: str, rootfs: Path, bundle: Path, *extra: str, share_net: bool = False) -> list[str]:
    argv = [
        bwrap,
        "--ro-bind", str(rootfs), "/",
        "--ro-bind", str(bundle), MOUNT_DIR,
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
    argv = [*_sandbox(bwrap, rootfs, bundle), *podspec.launcher(MOUNT_DIR), "config", "schema"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "properties" in schema and "gateway" in schema["properties"], sorted(schema)

    # And the sandbox really is bare: no python, uid 65534, the bundle read-only.
    probe = [
        *_sandbox(bwrap, rootfs, bundle),
        "/bin/sh",
        "-c",
        f"id -u; ls /bin /lib 2>&1; echo x > {MOUNT_DIR}/x || echo ro",
    ]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False).stdout.split()
    assert out[0] == "65534" and "python3" not in out and "libc.so.6" not in out and out[-1] == "ro", out


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
    tmp_path: Path,
    gateway: GatewayProcess,
    command: Sequence[str],
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """The bundle as a supervisor in the sandbox, its journal on a fresh writable bind mount."""
    journal = tmp_path / "journal"
    journal.mkdir()
    argv = [
        *_sandbox(bwrap, rootfs, bundle, "--bind", str(journal), "/journal", *extra, share_net=True),
        *podspec.launcher(MOUNT_DIR), "run",
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
    command = ["/bin/sh", "-c", "echo hello from busybox; exit 3"]
    result = _run_supervisor(bwrap, rootfs, bundle, tmp_path=tmp_path, gateway=gateway, command=command)
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
    """The tree's libraries are the loader's business (--library-path, not inherited): nothing of
    them may reach the sandbox's programs, which would load our libc and libssl. (The one-file
    bundle this tree replaced leaked LD_LIBRARY_PATH and _PYI_*/STATICX_* variables.)"""
    command = ["/bin/sh", "-c", "env | grep -E '^(LD_|LC_|_PYI|_MEI|STATICX|PYTHON|AGENT)' | sort"]
    result = _run_supervisor(
        bwrap,
        rootfs,
        bundle,
        tmp_path=tmp_path,
        gateway=gateway,
        command=command,
        extra=[
            "--setenv",
            "LD_LIBRARY_PATH",
            "/usr/local/nvidia/lib64",
            "--setenv",
            "AGENT_MODE",
            "fast",
            # The image's own Python settings: the sandbox's, and ignored by the supervisor (-I).
            "--setenv",
            "PYTHONPATH",
            "/nowhere",
            # A C.UTF-8 locale in the image, as Debian's and Ubuntu's have: the interpreter's
            # start-up coerces its own locale to it (LC_CTYPE), which must not reach the sandbox.
            "--tmpfs",
            "/usr",
            "--ro-bind",
            "/usr/lib/locale/C.utf8",
            "/usr/lib/locale/C.utf8",
        ],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    wait_until(lambda: len(gateway.log_lines("bundle-sb")) >= 3, timeout=10, what="the env lines stored")
    assert gateway.log_lines("bundle-sb") == [
        "AGENT_MODE=fast",
        "LD_LIBRARY_PATH=/usr/local/nvidia/lib64",
        "PYTHONPATH=/nowhere",
    ]


def test_the_supervisor_is_pid_1_with_nothing_unpacked(
    bwrap: str, rootfs: Path, bundle: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """Run from the read-only tree as the container's first process: no bootloader in between
    (signals from the runtime reach it), and /tmp stays empty."""
    command = ["/bin/sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls -A /tmp | wc -l"]
    result = _run_supervisor(
        bwrap, rootfs, bundle, tmp_path=tmp_path, gateway=gateway, command=command, extra=["--as-pid-1"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    wait_until(lambda: len(gateway.log_lines("bundle-sb")) >= 2, timeout=10, what="the lines stored")
    pid1, in_tmp = gateway.log_lines("bundle-sb")
    assert pid1.startswith(f"{MOUNT_DIR}/lib/ld.so --library-path"), pid1
    assert f"{MOUNT_DIR}/openshell-supervisor.py run" in pid1, pid1
    assert in_tmp.strip() == "0"


PRELOAD_PROBE = r"""
#include <unistd.h>
__attribute__((constructor)) static void announce(void) {
    static const char line[] = "the image's preload ran here\n";
    write(2, line, sizeof line - 1);
}
"""


def test_the_images_ld_preload_is_the_sandboxs_not_the_supervisors(
    bwrap: str, rootfs: Path, bundle: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """An image may preload a library (a malloc, built against its own, maybe newer, glibc): the
    launcher keeps it out of the supervisor's process and the main process gets LD_PRELOAD back."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the preloaded probe library")
    library = tmp_path / "libprobe.so"
    source = tmp_path / "probe.c"
    source.write_text(PRELOAD_PROBE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    result = _run_supervisor(
        bwrap,
        rootfs,
        bundle,
        tmp_path=tmp_path,
        gateway=gateway,
        command=["/bin/sh", "-c", "env | grep -E '^(LD_|OPENSHELL_SANDBOX)' | sort"],
        extra=[
            "--tmpfs",
            "/usr",
            "--ro-bind",
            str(library),
            "/usr/lib/libprobe.so",
            "--setenv",
            "LD_PRELOAD",
            "/usr/lib/libprobe.so",
        ],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "the image's preload ran here" not in result.stderr, "the supervisor's loader preloaded it"
    wait_until(lambda: gateway.log_lines("bundle-sb"), timeout=10, what="the env line stored")
    assert gateway.log_lines("bundle-sb") == ["LD_PRELOAD=/usr/lib/libprobe.so"]


def test_the_bundle_installs_a_copy_of_itself(bundle: Path, tmp_path: Path) -> None:
    """The init-container fallback: a FROM scratch image has no cp, so the tree copies itself, and
    again over an earlier copy (a recreated pod sandbox keeps its emptyDir)."""
    target = tmp_path / "shared"
    target.mkdir()
    for _ in range(2):
        done = subprocess.run(
            [*podspec.launcher(str(bundle)), "install", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target / podspec.TREE_ENTRY)
    assert sorted(p.name for p in target.iterdir()) == sorted(TREE_ENTRIES)
    for name in ("lib/ld.so", "bin/python3", "lib/libc.so.6", podspec.TREE_ENTRY):
        assert (target / name).read_bytes() == (bundle / name).read_bytes(), name
        assert (target / name).stat().st_mode & 0o777 == (bundle / name).stat().st_mode & 0o777, name
    schema = subprocess.run(
        [*podspec.launcher(str(target)), "config", "schema"], capture_output=True, text=True, timeout=120
    )
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
