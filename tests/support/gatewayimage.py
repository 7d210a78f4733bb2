"""The gateway's container image, built here without Docker: what the Dockerfile's ``gateway`` target
holds, from the same sources.

The Dockerfile starts from ``python:3.11-slim-bookworm`` (Debian bookworm with CPython 3.11) and
``pip install .``; these machines reach Debian's archive and PyPI but no image registry, so the test image
is Debian bookworm's own root filesystem (``mmdebstrap``, variant essential, plus ``python3``) with the
project and its dependencies installed by pip into ``/opt/openshell`` (the same wheels: CPython 3.11 on
both sides). Entry point ``python3 -m gateway`` (what the ``openshell-gateway`` script runs), user
10001, as in the Dockerfile. The root filesystem is cached by a hash of the project's sources.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.procs import REPO

SUITE = "bookworm"
PACKAGES = ("python3", "libstdc++6", "ca-certificates")  # python3-slim's share: grpcio needs libstdc++
SITE = "/opt/openshell/lib"  # the project and its dependencies (PYTHONPATH)
ENTRYPOINT = ["/usr/bin/python3", "-m", "gateway"]
USER = "10001:10001"
ENV = [f"PYTHONPATH={SITE}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
SOURCES = ("pyproject.toml", "openshell_wire", "supervisor", "gateway")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openshell" / "gateway-rootfs"


class GatewayImageError(RuntimeError):
    pass


def sources_hash() -> str:
    digest = hashlib.sha256(f"{SUITE} {PACKAGES} {sys.version_info[:2]}".encode())
    for top in SOURCES:
        path = REPO / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts:
                continue
            digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def _run(argv: list[str], what: str, timeout: float = 900) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise GatewayImageError(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
        )


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building the gateway's root filesystem needs root (mmdebstrap, file owners)"
    if shutil.which("mmdebstrap") is None and shutil.which("apt-get"):
        apt = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"]
        subprocess.run(
            [*apt, "mmdebstrap"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            check=False,
            timeout=900,
        )
    if shutil.which("mmdebstrap") is None:
        return "needs mmdebstrap (apt install mmdebstrap) to build the gateway's root filesystem"
    if sys.version_info[:2] != (3, 11):
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return f"the image's Python is Debian {SUITE}'s 3.11 and its wheels come from pip here ({here})"
    return None


def build_rootfs() -> Path:
    """The gateway image's root filesystem (cached); raises GatewayImageError with the reason."""
    reason = unavailable()
    if reason:
        raise GatewayImageError(reason)
    out = CACHE / sources_hash()
    rootfs = out / "rootfs"
    if (out / ".complete").exists():
        return rootfs
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _run(
        [
            "mmdebstrap",
            "--variant=essential",
            f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale", "info")),
            SUITE,
            str(rootfs),
        ],
        f"mmdebstrap {SUITE}",
    )
    # The same wheels as `pip install .` in the Dockerfile (CPython 3.11, manylinux), into the image.
    site = rootfs / SITE.lstrip("/")
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(site), str(REPO)],
        "pip install of the project into the image",
    )
    for d in ("var/lib/openshell", "etc/openshell"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chown(rootfs / "var/lib/openshell", 10001, 10001)
    (out / ".complete").touch()
    return rootfs
