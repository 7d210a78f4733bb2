"""Push the supervisor's OCI image layout to a registry, and pull it back, with skopeo.

    python imagevolume/registry.py push --layout build/oci --tag 0.1.0 --registry 127.0.0.1:5000 --insecure
    python imagevolume/registry.py pull --registry 127.0.0.1:5000 --tag 0.1.0 --layout /tmp/pulled --insecure

``--insecure`` talks plain HTTP / skips TLS verification (a local test registry); leave it off
for real registries, whose credentials skopeo takes from ``--authfile`` or its usual auth file.
``--all`` copies a multi-arch image index and every image it lists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPOSITORY = "openshell/supervisor"


class RegistryError(Exception):
    """skopeo is missing or failed; the message says which and why."""


def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise RegistryError(
            "skopeo is not installed (or not on PATH): install it (Debian/Ubuntu: apt-get install skopeo; "
            "Fedora: dnf install skopeo; macOS: brew install skopeo)"
        )
    return path


def _run(args: list[str], *, timeout: float) -> str:
    command = [skopeo(), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RegistryError(f"skopeo timed out after {timeout:.0f}s: {' '.join(command)}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise RegistryError(f"skopeo failed (exit {done.returncode}): {' '.join(command)}\n{detail}")
    return done.stdout


def image_ref(registry: str, tag: str, repository: str = REPOSITORY) -> str:
    """``docker://HOST:PORT/openshell/supervisor:TAG``."""
    return f"docker://{registry.rstrip('/')}/{repository}:{tag}"


def _copy_args(side: str, *, all_platforms: bool, insecure: bool, authfile: Path | None) -> list[str]:
    """``skopeo copy`` options; ``side`` is the registry's end of the copy: ``dest`` or ``src``."""
    args = ["copy", "--retry-times", "3", "--preserve-digests"]
    if all_platforms:
        args.append("--all")
    if insecure:
        args.append(f"--{side}-tls-verify=false")
    if authfile:
        args += [f"--{side}-authfile", str(authfile)]
    return args


def push(
    layout: Path,
    *,
    registry: str,
    tag: str,
    layout_tag: str | None = None,
    repository: str = REPOSITORY,
    insecure: bool = False,
    all_platforms: bool = False,
    authfile: Path | None = None,
    timeout: float = 600,
) -> str:
    """Copy ``oci:LAYOUT:LAYOUT_TAG`` to the registry as ``repository:tag``; return the pushed digest."""
    if not (Path(layout) / "index.json").is_file():
        raise RegistryError(f"{layout} is not an OCI image layout (no index.json)")
    args = _copy_args("dest", all_platforms=all_platforms, insecure=insecure, authfile=authfile)
    with tempfile.TemporaryDirectory(prefix="skopeo-digest-") as tmp:
        digest_file = Path(tmp) / "digest"
        args += ["--digestfile", str(digest_file)]
        _run(
            [*args, f"oci:{layout}:{layout_tag or tag}", image_ref(registry, tag, repository)],
            timeout=timeout,
        )
        return digest_file.read_text().strip()


def pull(
    layout: Path,
    *,
    registry: str,
    tag: str,
    layout_tag: str | None = None,
    repository: str = REPOSITORY,
    insecure: bool = False,
    all_platforms: bool = False,
    authfile: Path | None = None,
    timeout: float = 600,
) -> None:
    """Copy ``repository:tag`` from the registry into the OCI image layout ``layout`` (created if missing)."""
    Path(layout).mkdir(parents=True, exist_ok=True)
    args = _copy_args("src", all_platforms=all_platforms, insecure=insecure, authfile=authfile)
    _run([*args, image_ref(registry, tag, repository), f"oci:{layout}:{layout_tag or tag}"], timeout=timeout)


def inspect(
    *, registry: str, tag: str, repository: str = REPOSITORY, insecure: bool = False, raw: bool = False
) -> dict[str, Any]:
    """``skopeo inspect`` of the pushed image (``raw``: the manifest or index itself)."""
    args = ["inspect"]
    if raw:
        args.append("--raw")
    if insecure:
        args.append("--tls-verify=false")
    return dict(json.loads(_run([*args, image_ref(registry, tag, repository)], timeout=120)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("push", "pull"):
        p = sub.add_parser(name)
        p.add_argument("--layout", type=Path, required=True, help="the OCI image layout directory")
        p.add_argument("--registry", required=True, help="HOST[:PORT]")
        p.add_argument("--tag", required=True, help="the tag in the registry")
        p.add_argument("--layout-tag", help="the tag in the layout (default: --tag)")
        p.add_argument("--repository", default=REPOSITORY)
        p.add_argument("--insecure", action="store_true", help="plain HTTP / no TLS verification")
        p.add_argument("--all", dest="all_platforms", action="store_true", help="copy every platform")
        p.add_argument("--authfile", type=Path)
    args = parser.parse_args(argv)
    options = {
        "registry": args.registry,
        "tag": args.tag,
        "layout_tag": args.layout_tag,
        "repository": args.repository,
        "insecure": args.insecure,
        "all_platforms": args.all_platforms,
        "authfile": args.authfile,
    }
    try:
        if args.command == "push":
            print(push(args.layout, **options))
        else:
            pull(args.layout, **options)
    except RegistryError as e:
        print(f"registry.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
