"""Container images for tests, without Docker: a directory becomes an OCI image (umoci), which skopeo
pushes to a registry (``tests/support/registry.py``) that a real node pulls from.

``umoci insert`` takes the directory's files as they are (owners, modes, symlinks), so a root filesystem
laid out here is what the container sees.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


class ImageBuildError(RuntimeError):
    pass


def _run(*argv: str, timeout: float = 600) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ImageBuildError(
            f"`{' '.join(argv[:3])} ...` failed: {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def build_from_dir(
    layout: Path,
    name: str,
    rootfs: Path,
    *,
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = (),
    user: str = "",
    workdir: str = "",
    env: Sequence[str] = (),
) -> str:
    """Add the image ``name`` (one layer: ``rootfs``) to the OCI layout ``layout``; return ``layout:name``."""
    if not (layout / "index.json").exists():
        _run("umoci", "init", "--layout", str(layout))
    ref = f"{layout}:{name}"
    _run("umoci", "new", "--image", ref)
    _run("umoci", "insert", "--image", ref, str(rootfs), "/")
    config: list[str] = []
    for part in entrypoint:
        config += ["--config.entrypoint", part]
    for part in cmd:
        config += ["--config.cmd", part]
    if user:
        config += ["--config.user", user]
    if workdir:
        config += ["--config.workingdir", workdir]
    for item in env:
        config += ["--config.env", item]
    if config:
        _run("umoci", "config", "--image", ref, *config)
    return ref


def push(source: str, registry: str, repository: str, tag: str) -> str:
    """Copy ``source`` (``oci:LAYOUT:NAME`` or ``LAYOUT:NAME``) to ``registry`` (plain HTTP); return the
    reference a pod names: ``REGISTRY/REPOSITORY:TAG``."""
    if not source.startswith("oci:"):
        source = f"oci:{source}"
    target = f"{registry}/{repository}:{tag}"
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, f"docker://{target}")
    return target
