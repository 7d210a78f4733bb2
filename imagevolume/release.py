#!/usr/bin/env python3
"""Build the gateway and supervisor images from the Dockerfile, push them, sign them, and write their
digests into a copy of the chart.

The release workflow (.github/workflows/release-chart.yml) runs this for linux/amd64 and linux/arm64;
tests/e2e/test_release_images.py runs it against a local registry, so the path tested is the one
released (docs/release.md). Each image is built with buildah (no Docker daemon: ``buildah build``
reads the Dockerfile, one build per platform gathered in a manifest list), pushed with every
platform under ``REGISTRY/openshell-<name>:VERSION``, and then referred to by the digest of that
index only: signatures and the chart name the digest, never the tag.

    python imagevolume/release.py --registry ghcr.io/OWNER --version 0.2.0 \\
        --platform linux/amd64 --platform linux/arm64 --sign keyless \\
        --chart helm/openshell --chart-out build/release/chart

What it prints (and writes to ``--digests-out``) is JSON: each image's repository, tag, digest and
reference by digest. ``--chart-out`` is a copy of the chart whose values.yaml has
``gateway.image`` and ``sandboxes.supervisor.image`` set to the pushed repository and digest (the
rest of the file, comments included, unchanged), for ``helm/publish.py --chart``.

Signing: ``--sign keyless`` runs ``cosign sign --yes REF@DIGEST`` (in GitHub Actions, cosign takes the
workflow's OIDC token: Fulcio certificate, Rekor entry); ``--sign key:PATH`` signs with a cosign key
pair (``COSIGN_PASSWORD`` in the environment), with no transparency-log upload, which is what works
offline. ``--sign none`` (the default) leaves the images unsigned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "helm" / "openshell"
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64")
DEFAULT_BASE = "debian:bookworm-slim"
#: Dockerfile target -> (repository name under --registry, the chart's values path of its image).
IMAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway": ("openshell-gateway", ("gateway", "image")),
    "supervisor": ("openshell-supervisor", ("sandboxes", "supervisor", "image")),
}
#: Where --build-ca is mounted in the build containers (the Dockerfile's PIP_CERT).
BUILD_CA_MOUNT = "/run/openshell-build-ca.crt"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PLATFORM = re.compile(r"^linux/(amd64|arm64)$")


class ReleaseError(Exception):
    """A step of the release failed; the message says which and why."""


@dataclass(frozen=True)
class Pushed:
    target: str  # the Dockerfile target
    repository: str  # REGISTRY/openshell-NAME
    tag: str
    digest: str  # sha256:... of the image index (every platform)
    platforms: tuple[str, ...]

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True)
class Buildah:
    """How buildah is invoked: its storage (``--root``/``--runroot``, a cache that outlives a run) and
    storage driver (vfs where overlay mounts are not allowed), and the isolation of RUN steps."""

    root: Path | None = None
    runroot: Path | None = None
    storage_driver: str | None = None
    isolation: str = "chroot"

    def argv(self, *args: str) -> list[str]:
        found = shutil.which("buildah")
        if found is None:
            raise ReleaseError("buildah is not installed (apt-get install buildah)")
        argv = [found]
        if self.root is not None:
            argv += ["--root", str(self.root)]
        if self.runroot is not None:
            argv += ["--runroot", str(self.runroot)]
        if self.storage_driver:
            argv += ["--storage-driver", self.storage_driver]
        return [*argv, *args]


def _log(message: str) -> None:
    print(f"release: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], *, what: str, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    _log("$ " + " ".join(argv))
    started = time.monotonic()
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise ReleaseError(f"{what}: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ReleaseError(f"{what}: no result in {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise ReleaseError(f"{what} failed (exit {done.returncode}):\n{tail}")
    _log(f"{what}: done in {time.monotonic() - started:.0f}s")
    return done.stdout


def build_args(*, version: str, revision: str, created: str, epoch: int, base: str, ca: bool) -> list[str]:
    args = {
        "VERSION": version,
        "REVISION": revision,
        "CREATED": created,
        "SOURCE_DATE_EPOCH": str(epoch),
        "DEBIAN_BASE": base,
    }
    if ca:
        args["PIP_CERT"] = BUILD_CA_MOUNT
    return [f"--build-arg={k}={v}" for k, v in args.items()]


def build(
    buildah: Buildah,
    target: str,
    *,
    manifest: str,
    platforms: Sequence[str],
    args: Sequence[str],
    epoch: int,
    build_ca: Path | None,
    pull: str,
    context: Path = REPO,
) -> None:
    """Build ``target`` of the Dockerfile for every platform into the manifest list ``manifest``
    (made afresh: ``--manifest`` adds to a list that exists)."""
    subprocess.run(buildah.argv("manifest", "rm", manifest), capture_output=True, check=False)
    argv = buildah.argv(
        "build",
        f"--isolation={buildah.isolation}",
        "--network=host",  # apt and pip in RUN steps reach the archive and the index as the host does
        "--layers",  # every step cached in buildah's storage, keyed by its inputs
        f"--pull={pull}",
        f"--timestamp={epoch}",
        f"--platform={','.join(platforms)}",
        f"--manifest={manifest}",
        f"--target={target}",
        f"--file={DOCKERFILE}",
        *args,
    )
    if build_ca is not None:
        argv.append(f"--volume={build_ca.resolve()}:{BUILD_CA_MOUNT}:ro")
    _run([*argv, str(context)], what=f"buildah build --target {target} ({', '.join(platforms)})")


def push(
    buildah: Buildah, manifest: str, destination: str, *, tls_verify: bool, authfile: Path | None
) -> str:
    """Push the manifest list with every image it names; the digest of the index pushed."""
    with tempfile.TemporaryDirectory(prefix="openshell-release-") as tmp:
        digestfile = Path(tmp) / "digest"
        argv = buildah.argv(
            "manifest",
            "push",
            "--all",
            "--format=oci",
            f"--tls-verify={'true' if tls_verify else 'false'}",
            f"--digestfile={digestfile}",
        )
        if authfile is not None:
            argv.append(f"--authfile={authfile}")
        _run([*argv, manifest, f"docker://{destination}"], what=f"push of {destination}")
        digest = digestfile.read_text().strip()
    if not _DIGEST.match(digest):
        raise ReleaseError(f"push of {destination}: buildah wrote {digest!r}, not a sha256 digest")
    return digest


def cosign_sign(reference: str, *, sign: str, cosign: str, insecure: bool) -> None:
    """Sign ``reference`` (REPOSITORY@DIGEST, or a chart's oci reference by digest) with cosign."""
    argv = [cosign, "sign", "--yes"]
    if insecure:
        argv.append("--allow-http-registry")
    if sign == "keyless":
        pass  # Fulcio and Rekor with the CI's OIDC identity
    elif sign.startswith("key:"):
        argv += ["--key", sign.removeprefix("key:"), "--tlog-upload=false"]
    else:
        raise ReleaseError(f"--sign {sign!r}: expected none, keyless or key:PATH")
    _run([*argv, reference], what=f"cosign sign {reference}")


def set_scalar(text: str, path: Sequence[str], value: str) -> str:
    """``text`` (block-style YAML) with the scalar at ``path`` replaced by ``value``, every other line
    (comments too) kept as it is. A value the line edit did not set exactly is an error."""
    key_line = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")
    stack: list[tuple[int, str]] = []
    lines = text.splitlines(keepends=True)
    hits = []
    for number, line in enumerate(lines):
        match = key_line.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if tuple(k for _, k in stack) == tuple(path):
            hits.append(number)
    where = ".".join(path)
    if len(hits) != 1:
        raise ReleaseError(f"values.yaml: expected one {where} key, found {len(hits)}")
    (number,) = hits
    match = key_line.match(lines[number])
    assert match is not None
    lines[number] = f"{match['indent']}{match['key']}: {json.dumps(value)}\n"
    edited = "".join(lines)
    node: Any = yaml.safe_load(edited)
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node != value:
        raise ReleaseError(f"values.yaml: setting {where} by line gave {node!r}, not {value!r}")
    return edited


def chart_with_digests(chart: Path, out: Path, pushed: Sequence[Pushed]) -> Path:
    """A copy of ``chart`` at ``out`` whose values pull every pushed image by its digest."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(chart, out)
    values = out / "values.yaml"
    text = values.read_text(encoding="utf-8")
    for image in pushed:
        path = IMAGES[image.target][1]
        text = set_scalar(text, (*path, "repository"), image.repository)
        text = set_scalar(text, (*path, "digest"), image.digest)
    values.write_text(text, encoding="utf-8")
    return out


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    except OSError:  # no git: a source tarball's build
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _app_version(chart: Path) -> str:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text(encoding="utf-8"))
    return str(meta["appVersion"])


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--registry", required=True, help="where the images go: HOST[:PORT]/PATH")
    parser.add_argument("--version", help="image tag (default: the chart's appVersion)")
    parser.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        help=f"linux/amd64 or linux/arm64, repeatable (default: {' and '.join(DEFAULT_PLATFORMS)})",
    )
    parser.add_argument(
        "--target", action="append", dest="targets", choices=sorted(IMAGES), help="default: both"
    )
    parser.add_argument("--base", default=DEFAULT_BASE, help="the Dockerfile's DEBIAN_BASE")
    parser.add_argument(
        "--pull", default="true", choices=("true", "false", "always", "never"), help="buildah's --pull"
    )
    parser.add_argument("--build-ca", type=Path, help="CA bundle for pip in the build (PIP_CERT)")
    parser.add_argument("--revision", help="org.opencontainers.image.revision (default: git HEAD)")
    parser.add_argument(
        "--source-date-epoch",
        type=int,
        help="image and file times (default: $SOURCE_DATE_EPOCH, else the last commit's time)",
    )
    parser.add_argument("--insecure", action="store_true", help="the registry speaks plain HTTP")
    parser.add_argument("--authfile", type=Path, help="registry credentials for the push")
    parser.add_argument("--sign", default="none", help="none, keyless or key:PATH (cosign)")
    parser.add_argument("--cosign", default="cosign", help="the cosign binary")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart whose values get the digests")
    parser.add_argument("--chart-out", type=Path, help="write a copy of the chart with the digests here")
    parser.add_argument("--digests-out", type=Path, help="write the JSON result here too")
    parser.add_argument("--storage-root", type=Path, help="buildah's --root (its image and layer cache)")
    parser.add_argument("--runroot", type=Path, help="buildah's --runroot")
    parser.add_argument("--storage-driver", help="buildah's --storage-driver (e.g. vfs)")
    parser.add_argument("--isolation", default="chroot", help="buildah's --isolation for RUN steps")
    args = parser.parse_args(argv)

    platforms = tuple(args.platforms or DEFAULT_PLATFORMS)
    bad = [p for p in platforms if not _PLATFORM.match(p)]
    if bad:
        parser.error(f"--platform {', '.join(bad)}: the images are built for linux/amd64 and linux/arm64")
    if args.sign not in {"none", "keyless"} and not args.sign.startswith("key:"):
        parser.error(f"--sign {args.sign!r}: expected none, keyless or key:PATH")
    if args.build_ca is not None and not args.build_ca.is_file():
        parser.error(f"--build-ca {args.build_ca}: no such file")
    if not (args.chart / "Chart.yaml").is_file():
        parser.error(f"--chart {args.chart}: no Chart.yaml there")
    version = args.version or _app_version(args.chart)
    revision = args.revision or _git("rev-parse", "HEAD") or "unknown"
    epoch = args.source_date_epoch
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or _git("log", "-1", "--format=%ct") or 0)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    buildah = Buildah(
        root=args.storage_root,
        runroot=args.runroot,
        storage_driver=args.storage_driver,
        isolation=args.isolation,
    )
    registry = args.registry.rstrip("/")
    build_argv = build_args(
        version=version,
        revision=revision,
        created=created,
        epoch=epoch,
        base=args.base,
        ca=args.build_ca is not None,
    )
    pushed: list[Pushed] = []
    try:
        for target in args.targets or sorted(IMAGES):
            name = IMAGES[target][0]
            manifest = f"localhost/openshell-release/{name}:{version}"
            build(
                buildah,
                target,
                manifest=manifest,
                platforms=platforms,
                args=build_argv,
                epoch=epoch,
                build_ca=args.build_ca,
                pull=args.pull,
            )
            repository = f"{registry}/{name}"
            digest = push(
                buildah,
                manifest,
                f"{repository}:{version}",
                tls_verify=not args.insecure,
                authfile=args.authfile,
            )
            image = Pushed(target, repository, version, digest, platforms)
            if args.sign != "none":
                cosign_sign(image.reference, sign=args.sign, cosign=args.cosign, insecure=args.insecure)
            pushed.append(image)
        if args.chart_out is not None:
            chart_with_digests(args.chart, args.chart_out, pushed)
    except ReleaseError as exc:
        print(f"imagevolume/release.py: {exc}", file=sys.stderr)
        return 1
    result = json.dumps(
        {p.target: {**asdict(p), "reference": p.reference} for p in pushed}, indent=2, sort_keys=True
    )
    if args.digests_out is not None:
        args.digests_out.parent.mkdir(parents=True, exist_ok=True)
        args.digests_out.write_text(result + "\n", encoding="utf-8")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
