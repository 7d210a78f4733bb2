"""A sandbox root filesystem like the user images the supervisor must serve: Debian's static busybox and
nothing else (no libc, no Python), with the mount point of the supervisor's image volume."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MOUNT_DIR = "/opt/openshell"  # where the image volume is mounted, as in the pod wiring
APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "env", "id", "grep", "wget", "timeout")


def apt_install(*packages: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", *packages], env=env, capture_output=True, check=False
    )
    return result.returncode == 0


def _is_static(path: Path) -> bool:
    info = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True, check=False).stdout
    return not info or "statically linked" in info or "static-pie" in info


def static_busybox() -> Path | None:
    """/bin/busybox when it is static (installing busybox-static with apt when it can), else None."""
    path = Path("/bin/busybox")
    if not path.exists():
        apt_install("busybox-static")
    if path.exists() and not _is_static(path):
        apt_install("busybox-static")  # replaces the dynamic busybox
    return path if path.exists() and _is_static(path) else None


def make_rootfs(root: Path, busybox: Path) -> Path:
    """Lay the root filesystem out in ``root`` (which must exist and be empty)."""
    root.chmod(0o755)  # temp dirs are often 0700: uid 65534 could not walk from / then
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "dev", "proc", "sys", "journal", "control", "opt/openshell", "etc", "usr"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    assert not list(root.rglob("*python*")) and not list(root.rglob("libc*"))
    return root
