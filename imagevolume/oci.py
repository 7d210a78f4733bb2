"""Write the supervisor's OCI image (an image layout directory) with a reproducible digest.

The image exists to be mounted as a Kubernetes image volume, so it holds the self-contained
supervisor tree (``imagevolume/bundle.py``: ``lib/``, ``bin/``, ``site/``,
``openshell-supervisor.py``) at its root, owner 0:0, files 0555 or 0444, directories 0755. Nothing
runs the image itself, so its config carries no entrypoint; it does carry the platform and the
``org.opencontainers.image.*`` labels.

Only the standard library is used, and every byte is fixed by the inputs: tar entries are sorted
with fixed owner, mode and mtime (the ``created`` time); the gzip stream has mtime 0 and no file
name; JSON is written with sorted keys and no spaces. So two builds from the same bundle and
arguments give the same manifest digest (with the same zlib: another zlib version may compress
differently, which changes the layer digest but never its ``diff_id``).

    python imagevolume/oci.py --bundle build/bundle/tree --out build/oci --tag 0.1.0

``SOURCE_DATE_EPOCH`` (or else the last commit's time) sets ``created`` unless ``--created`` does.
"""

from __future__ import annotations

import argparse
import calendar
import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parents[1]

ENTRY = "openshell-supervisor.py"
SOURCE = "https://github.com/openshell/openshell-supervisor"
TITLE = "openshell-supervisor"
DESCRIPTION = (
    "The self-contained OpenShell sandbox supervisor (its loader, libraries, interpreter and packages), "
    "meant to be mounted read-only as a Kubernetes image volume and run from there."
)
LICENSES = "Apache-2.0"

MEDIA_LAYOUT_VERSION = "1.0.0"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

# GOARCH names, as OCI platforms use them; arm64 images carry the variant "v8".
ARCH_VARIANTS: dict[str, str | None] = {"amd64": None, "arm64": "v8"}


class ImageError(Exception):
    """The inputs cannot make an image (missing bundle, bad time, unknown architecture)."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_created(created: str) -> int:
    """An RFC 3339 UTC time (``2026-01-02T03:04:05Z``) as seconds since the epoch."""
    try:
        return calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        raise ImageError(
            f"created must look like 2026-01-02T03:04:05Z (UTC, whole seconds), not {created!r}"
        ) from None


def format_created(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def labels(*, version: str, revision: str, created: str, source: str = SOURCE) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": TITLE,
        "org.opencontainers.image.description": DESCRIPTION,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.licenses": LICENSES,
    }


class _HashingWriter:
    """Passes writes through to ``sink`` while hashing them and counting their size."""

    def __init__(self, sink: BinaryIO | gzip.GzipFile) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.sink.write(view)
        self.size += len(view)
        return len(view)


class _Blobs:
    def __init__(self, layout: Path) -> None:
        self.dir = layout / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        path = self.dir / digest
        if not path.exists():
            tmp = path.with_name(f".{digest}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return f"sha256:{digest}", len(data)


def _tree_entries(tree: Path) -> list[tuple[str, Path]]:
    """(path in the image, file here) for every directory, file and symlink under ``tree``, sorted."""
    return sorted((p.relative_to(tree).as_posix(), p) for p in tree.rglob("*"))


def _write_layer(tree: Path, blobs: _Blobs, mtime: int) -> tuple[str, int, str]:
    """The gzipped tar of ``tree``'s contents at the image's root: (digest, size, diff_id)."""
    tmp = blobs.dir / f".layer-{os.getpid()}.tmp"
    try:
        with tmp.open("wb") as out:
            compressed = _HashingWriter(out)
            # mtime=0 and filename="" keep the gzip header free of the build's time and paths.
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=9) as gz:
                uncompressed = _HashingWriter(gz)
                with tarfile.open(
                    fileobj=uncompressed,  # type: ignore[call-overload]
                    mode="w",
                    format=tarfile.PAX_FORMAT,  # long paths (site-packages) without GNU extensions
                ) as tar:
                    for name, source in _tree_entries(tree):
                        info = tarfile.TarInfo(name)
                        info.mtime = mtime
                        info.uid = info.gid = 0
                        info.uname = info.gname = "root"
                        st = source.lstat()
                        if stat.S_ISLNK(st.st_mode):
                            info.type = tarfile.SYMTYPE
                            info.linkname = os.readlink(source)
                            info.mode = 0o777
                            tar.addfile(info)
                        elif stat.S_ISDIR(st.st_mode):
                            info.type = tarfile.DIRTYPE
                            info.mode = 0o755
                            tar.addfile(info)
                        else:
                            info.type = tarfile.REGTYPE
                            info.size = st.st_size
                            info.mode = 0o555 if st.st_mode & 0o111 else 0o444
                            with source.open("rb") as f:
                                tar.addfile(info, f)
        digest = compressed.sha.hexdigest()
        tmp.replace(blobs.dir / digest)
    finally:
        tmp.unlink(missing_ok=True)
    return f"sha256:{digest}", compressed.size, f"sha256:{uncompressed.sha.hexdigest()}"


def build_image(
    bundle: Path,
    out_dir: Path,
    *,
    version: str,
    revision: str,
    created: str,
    tag: str | None = None,
    arch: str = "amd64",
    source: str = SOURCE,
) -> str:
    """Write (or add to) the OCI image layout ``out_dir``; return the manifest digest (``sha256:...``).

    ``created`` (RFC 3339, UTC, whole seconds) is also every file's mtime. The manifest is
    listed in ``index.json`` under ``tag`` (default: ``version``), replacing an entry of that tag.
    """
    bundle = Path(bundle)
    out_dir = Path(out_dir)
    if not (bundle / ENTRY).is_file():
        raise ImageError(f"the bundle {bundle} is not a supervisor tree (no {ENTRY} in it)")
    if arch not in ARCH_VARIANTS:
        raise ImageError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_VARIANTS)}")
    mtime = parse_created(created)
    tag = tag or version
    image_labels = labels(version=version, revision=revision, created=created, source=source)

    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = _Blobs(out_dir)
    layer_digest, layer_size, diff_id = _write_layer(bundle, blobs, mtime)

    platform: dict[str, str] = {"architecture": arch, "os": "linux"}
    variant = ARCH_VARIANTS[arch]
    if variant:
        platform["variant"] = variant
    config = {
        "created": created,
        **platform,
        # No Entrypoint or Cmd: image volumes mount the image's files, they never run it.
        "config": {"Labels": image_labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "imagevolume/oci.py: COPY tree /"}],
    }
    config_digest, config_size = blobs.put(canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
        "annotations": image_labels,
    }
    manifest_digest, manifest_size = blobs.put(canonical_json(manifest))

    (out_dir / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": MEDIA_LAYOUT_VERSION}))
    index_path = out_dir / "index.json"
    entries: list[dict[str, Any]] = []
    if index_path.exists():
        entries = [
            m
            for m in json.loads(index_path.read_text()).get("manifests", [])
            if m.get("annotations", {}).get(REF_NAME) != tag
        ]
    entries.append(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": platform,
            "annotations": {REF_NAME: tag},
        }
    )
    entries.sort(key=lambda m: (m.get("annotations", {}).get(REF_NAME, ""), m["digest"]))
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries}
    tmp = index_path.with_name(".index.json.tmp")
    tmp.write_bytes(canonical_json(index))
    tmp.replace(index_path)
    return manifest_digest


def build_multiarch_index(out_dir: Path, *, tag: str, arch_tags: Mapping[str, str]) -> str:
    """In layout ``out_dir``, tag an image index (a manifest list) over per-arch tags.

    ``arch_tags`` maps an architecture to the tag its image already has in the same layout (built
    by :func:`build_image` with ``arch=``). ``skopeo copy --all oci:DIR:TAG docker://...`` then
    pushes the index and every image it lists. Returns the index digest.
    """
    index_path = out_dir / "index.json"
    by_tag = {
        m.get("annotations", {}).get(REF_NAME): m for m in json.loads(index_path.read_text())["manifests"]
    }
    listed = []
    for arch in sorted(arch_tags):
        entry = by_tag.get(arch_tags[arch])
        if entry is None:
            raise ImageError(f"no image tagged {arch_tags[arch]!r} in {out_dir}")
        if entry.get("platform", {}).get("architecture") != arch:
            raise ImageError(f"the image tagged {arch_tags[arch]!r} is not for {arch}")
        listed.append({k: entry[k] for k in ("mediaType", "digest", "size", "platform")})
    digest, size = _Blobs(out_dir).put(
        canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": listed})
    )
    entries = [m for t, m in by_tag.items() if t != tag]
    entries.append({"mediaType": MEDIA_INDEX, "digest": digest, "size": size, "annotations": {REF_NAME: tag}})
    entries.sort(key=lambda m: (m.get("annotations", {}).get(REF_NAME, ""), m["digest"]))
    index_path.write_bytes(
        canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries})
    )
    return digest


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def default_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def default_created() -> str:
    """``SOURCE_DATE_EPOCH``, else the last commit's time, else the epoch: never the clock."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH") or _git("log", "-1", "--format=%ct") or "0"
    return format_created(int(epoch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="the supervisor tree (imagevolume/bundle.py's output)")
    parser.add_argument("--out", type=Path, required=True, help="the OCI image layout directory")
    parser.add_argument("--tag", help="the tag in the layout (default: the version)")
    parser.add_argument("--version", dest="image_version", help="default: pyproject.toml's version")
    parser.add_argument("--revision", help="default: git rev-parse HEAD")
    parser.add_argument("--created", help="RFC 3339 UTC; default: SOURCE_DATE_EPOCH or the last commit")
    parser.add_argument("--arch", default="amd64", choices=sorted(ARCH_VARIANTS))
    parser.add_argument("--source", default=SOURCE)
    parser.add_argument(
        "--index",
        metavar="TAG",
        help="instead of building: tag a multi-arch index over the --platform ARCH=TAG images in --out",
    )
    parser.add_argument("--platform", action="append", default=[], metavar="ARCH=TAG")
    args = parser.parse_args(argv)
    try:
        if args.index:
            arch_tags = dict(p.split("=", 1) for p in args.platform)
            if not arch_tags:
                parser.error("--index needs at least one --platform ARCH=TAG")
            print(build_multiarch_index(args.out, tag=args.index, arch_tags=arch_tags))
            return 0
        if args.bundle is None:
            parser.error("--bundle is required (unless --index)")
        digest = build_image(
            args.bundle,
            args.out,
            version=args.image_version or default_version(),
            revision=args.revision or _git("rev-parse", "HEAD") or "unknown",
            created=args.created or default_created(),
            tag=args.tag,
            arch=args.arch,
            source=args.source,
        )
    except ImageError as e:
        print(f"oci.py: {e}", file=sys.stderr)
        return 2
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
