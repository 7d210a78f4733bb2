"""buildah for the tests, and the Debian base image the Dockerfile builds from here.

The Dockerfile's stages start FROM ``DEBIAN_BASE`` (``debian:bookworm-slim`` by default). These
machines reach Debian's archive but no image registry, so the base is made the way Debian's slim
images are: ``mmdebstrap --variant=minbase bookworm`` (docs left out, as the slim images do), and
imported into buildah's storage under :data:`BASE_NAME`. Both the root filesystem's tarball and
buildah's storage live under ``~/.cache/openshell`` (:data:`CACHE`), so a second run reuses the base
and every Dockerfile step whose inputs did not change (``buildah build --layers``).

The storage driver is overlay where root may mount overlayfs over the cache, else vfs; RUN steps use
chroot isolation, so neither user namespaces nor a
daemon are needed, only root.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openshell"
RUNROOT = Path("/run/openshell-buildah")


def _overlay_mounts() -> bool:
    """Whether this machine lets root mount overlayfs over the cache's file system."""
    probe = CACHE / "buildah" / "overlay-probe"
    dirs = [probe / d for d in ("lower", "upper", "work", "merged")]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    lower, upper, work, merged = dirs
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    try:
        done = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    if done.returncode != 0:
        return False
    subprocess.run(["umount", str(merged)], capture_output=True, check=False)
    return True


@functools.cache
def storage_driver() -> str:
    """overlay where it mounts (each step stores only its changes), else vfs (each step a full copy:
    slow, and many GB of cache)."""
    return "overlay" if os.geteuid() == 0 and _overlay_mounts() else "vfs"


def storage() -> Path:
    """buildah's storage: one directory per driver (buildah does not mix them)."""
    return CACHE / "buildah" / storage_driver()


SUITE = "bookworm"
MMDEBSTRAP = (
    "mmdebstrap",
    "--variant=minbase",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
    SUITE,
)
#: The name the base gets in buildah's storage, keyed by how it is made.
BASE_KEY = hashlib.sha256(" ".join(MMDEBSTRAP).encode()).hexdigest()[:12]
BASE_NAME = f"localhost/openshell-build/debian:{SUITE}-slim-{BASE_KEY}"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildahError(RuntimeError):
    pass


def storage_args() -> list[str]:
    """imagevolume/release.py's options for the same storage as :func:`buildah`."""
    return [
        "--storage-root",
        str(storage()),
        "--runroot",
        str(RUNROOT / storage_driver()),
        "--storage-driver",
        storage_driver(),
    ]


def _argv(*args: str) -> list[str]:
    runroot = RUNROOT / storage_driver()
    return [
        "buildah",
        "--root",
        str(storage()),
        "--runroot",
        str(runroot),
        "--storage-driver",
        storage_driver(),
        *args,
    ]


def buildah(*args: str, timeout: float = 900) -> str:
    argv = [
        "buildah",
        "--root",
        str(storage()),
        "--runroot",
        str(RUNROOT / storage_driver()),
        "--storage-driver",
        storage_driver(),
    ]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BuildahError(
            f"buildah {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def _apt_install(*packages: str) -> None:
    subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            *packages,
        ],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        check=False,
        timeout=900,
    )


def unavailable() -> str | None:
    """Why buildah builds cannot run here, or None (installs buildah and mmdebstrap as root)."""
    if os.geteuid() != 0:
        return "buildah with chroot isolation and root-owned storage needs root here"
    missing = [p for p in ("buildah", "mmdebstrap") if shutil.which(p) is None]
    if missing and shutil.which("apt-get"):
        _apt_install(*missing)
    missing = [p for p in ("buildah", "mmdebstrap") if shutil.which(p) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install {' '.join(missing)})"
    return None


def base_image() -> str:
    """:data:`BASE_NAME` in buildah's storage (made once, then cached): Debian bookworm, minbase."""
    try:
        if buildah("images", "--quiet", "--filter", f"reference={BASE_NAME}").strip():
            return BASE_NAME
    except BuildahError as exc:
        # A storage entry left half-written (a run killed while it committed the base, seen once:
        # "reading manifest for image instance ...: file does not exist (consider removing the
        # image to resolve the issue)"): removed and made again, as buildah itself advises.
        if "consider removing the image" not in str(exc):
            raise
        subprocess.run(_argv("rmi", "--force", BASE_NAME), capture_output=True, check=False)
    tarball = CACHE / "debian-base" / f"{SUITE}-minbase-{BASE_KEY}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        done = subprocess.run(
            [*MMDEBSTRAP, str(partial)], capture_output=True, text=True, timeout=1800, check=False
        )
        if done.returncode != 0:
            raise BuildahError(
                f"mmdebstrap {SUITE} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        partial.rename(tarball)
    container = buildah("from", "scratch").strip()
    try:
        buildah("add", container, str(tarball), "/")
        buildah("config", f"--env=PATH={BASE_PATH}", "--cmd=bash", container)
        buildah("commit", "--quiet", container, BASE_NAME)
    finally:
        subprocess.run(_argv("rm", container), capture_output=True, check=False)
    return BASE_NAME
