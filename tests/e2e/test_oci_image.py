"""The supervisor's OCI image: reproducible digest, real push and pull through a local registry, unpack.

"The bundle" here is any executable file (Debian's static busybox when present), never
``imagevolume/bundle.py``'s output, which takes minutes to build; ``OPENSHELL_TEST_BUNDLE`` can
point the tests at a real bundle.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagevolume import oci, registry
from tests.support.registry import Registry, ensure_tools, running_registry

REPO = Path(__file__).resolve().parents[2]
CREATED = "2026-01-02T03:04:05Z"
ARGS = {"version": "0.1.0", "revision": "0123456789abcdef0123456789abcdef01234567", "created": CREATED}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A small tree shaped like the supervisor's (``OPENSHELL_TEST_BUNDLE`` may name a real one):
    an executable with some bulk, read-only files, nested directories and a library symlink."""
    given = os.environ.get("OPENSHELL_TEST_BUNDLE")
    if given:
        return Path(given)
    tree = tmp_path / "bundle" / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "lib" / "python3.11").mkdir(parents=True)
    (tree / "site" / "supervisor").mkdir(parents=True)
    python = tree / "bin" / "python3"
    source = shutil.which("busybox")
    if source:
        shutil.copyfile(source, python)
    else:
        python.write_bytes(b"#!/bin/sh\necho openshell\n" + bytes(range(256)) * 4096)
    python.chmod(0o755)
    (tree / "lib" / "ld.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    (tree / "lib" / "ld.so").chmod(0o755)
    (tree / "lib" / "libz.so.1.2.13").write_bytes(b"\x7fELF libz")
    (tree / "lib" / "libz.so.1").symlink_to("libz.so.1.2.13")
    (tree / "lib" / "python3.11" / "os.py").write_text("# os\n")
    (tree / "site" / "supervisor" / "__init__.py").write_text("")
    (tree / oci.ENTRY).write_text("from supervisor.cli import main\n")
    return tree


def files_of(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``root``: relative path -> (mode, bytes, or a symlink's target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            found[rel] = (0o777, os.readlink(p))
        elif p.is_file():
            found[rel] = (stat.S_IMODE(p.stat().st_mode), p.read_bytes())
    return found


@pytest.fixture
def oci_registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


def blob(layout: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":")
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest
    return data


def manifest_for(layout: Path, tag: str) -> tuple[str, dict[str, object]]:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m["annotations"][oci.REF_NAME] == tag]
    return entry["digest"], json.loads(blob(layout, entry["digest"]))


def tree(layout: Path) -> dict[str, bytes]:
    return {str(p.relative_to(layout)): p.read_bytes() for p in sorted(layout.rglob("*")) if p.is_file()}


def test_two_builds_give_the_same_digest_and_bytes(bundle: Path, tmp_path: Path) -> None:
    first = oci.build_image(bundle, tmp_path / "a", **ARGS)
    second = oci.build_image(bundle, tmp_path / "b", **ARGS)
    assert first == second
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    # ... and the inputs do matter: another time or revision is another image.
    assert oci.build_image(bundle, tmp_path / "c", **{**ARGS, "created": "2026-01-02T03:04:06Z"}) != first
    assert oci.build_image(bundle, tmp_path / "d", **{**ARGS, "revision": "other"}) != first


def test_the_cli_honours_source_date_epoch(bundle: Path, tmp_path: Path) -> None:
    expected = oci.build_image(bundle, tmp_path / "lib", **ARGS, tag="t")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(oci.parse_created(CREATED))}
    command = [sys.executable, str(REPO / "imagevolume" / "oci.py"), "--bundle", str(bundle)]
    command += ["--version", ARGS["version"], "--revision", ARGS["revision"], "--tag", "t"]
    outputs = [
        subprocess.run(
            [*command, "--out", str(tmp_path / out)], env=env, capture_output=True, text=True, check=True
        )
        for out in ("cli1", "cli2")
    ]
    assert [o.stdout.strip() for o in outputs] == [expected, expected]


def test_the_layer_holds_only_the_tree_read_only_and_owned_by_root(bundle: Path, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    digest = oci.build_image(bundle, layout, **ARGS)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    manifest_digest, manifest = manifest_for(layout, "0.1.0")
    assert manifest_digest == digest
    (layer,) = manifest["layers"]  # type: ignore[misc]
    assert layer["mediaType"] == oci.MEDIA_LAYER_GZIP
    compressed = blob(layout, layer["digest"])
    # gzip header: no FNAME (or any) flag, MTIME 0.
    assert compressed[:2] == b"\x1f\x8b" and compressed[3] == 0 and compressed[4:8] == b"\0\0\0\0"
    raw = gzip.decompress(compressed)
    config = json.loads(blob(layout, manifest["config"]["digest"]))  # type: ignore[index]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert "Entrypoint" not in config["config"] and "Cmd" not in config["config"]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(
            p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
        )
        for member in members:
            assert (member.uid, member.gid, member.mtime) == (0, 0, oci.parse_created(CREATED)), member.name
            local = bundle / member.name
            if member.isdir():
                assert member.mode == 0o755
            elif member.issym():
                assert member.linkname == os.readlink(local)
            else:
                assert member.isreg() and member.mode == (0o555 if local.stat().st_mode & 0o111 else 0o444)
                extracted = tar.extractfile(member)
                assert extracted is not None and extracted.read() == local.read_bytes()
        assert {m.name: m.mode for m in members}["bin/python3"] == 0o555
        assert {m.name: m.mode for m in members}[oci.ENTRY] == 0o444


def test_arm64_images_say_so(bundle: Path, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    oci.build_image(bundle, layout, **ARGS, tag="arm", arch="arm64")
    _, manifest = manifest_for(layout, "arm")
    config = json.loads(blob(layout, manifest["config"]["digest"]))  # type: ignore[index]
    assert (config["architecture"], config["os"], config["variant"]) == ("arm64", "linux", "v8")
    with pytest.raises(oci.ImageError, match="unknown architecture"):
        oci.build_image(bundle, layout, **ARGS, arch="s390")


def test_push_pull_and_unpack_through_a_real_registry(
    bundle: Path, tmp_path: Path, oci_registry: Registry
) -> None:
    ensure_tools("skopeo", "umoci")
    layout = tmp_path / "oci"
    digest = oci.build_image(bundle, layout, **ARGS, tag="0.1.0")

    pushed = registry.push(layout, registry=oci_registry.host, tag="0.1.0", insecure=True)
    assert pushed == digest  # the registry stores exactly our bytes: same digest there as here

    inspected = registry.inspect(registry=oci_registry.host, tag="0.1.0", insecure=True)
    assert inspected["Digest"] == digest
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    assert inspected["Labels"] == oci.labels(version="0.1.0", revision=ARGS["revision"], created=CREATED)

    pulled = tmp_path / "pulled"
    registry.pull(pulled, registry=oci_registry.host, tag="0.1.0", layout_tag="back", insecure=True)
    assert manifest_for(pulled, "back")[0] == digest

    rootfs = tmp_path / "rootfs"
    subprocess.run(
        ["umoci", "raw", "unpack", "--rootless", "--image", f"{pulled}:back", str(rootfs)],
        check=True,
        capture_output=True,
    )
    unpacked = files_of(rootfs)
    expected = {
        name: (mode if isinstance(content, str) else (0o555 if mode & 0o111 else 0o444), content)
        for name, (mode, content) in files_of(bundle).items()
    }
    assert unpacked == expected


def test_a_multiarch_index_pushes_every_platform(
    bundle: Path, tmp_path: Path, oci_registry: Registry
) -> None:
    ensure_tools("skopeo")
    layout = tmp_path / "oci"
    amd64 = oci.build_image(bundle, layout, **ARGS, tag="0.1.0-amd64", arch="amd64")
    arm64 = oci.build_image(bundle, layout, **ARGS, tag="0.1.0-arm64", arch="arm64")
    index_digest = oci.build_multiarch_index(
        layout, tag="0.1.0", arch_tags={"amd64": "0.1.0-amd64", "arm64": "0.1.0-arm64"}
    )

    pushed = registry.push(layout, registry=oci_registry.host, tag="0.1.0", insecure=True, all_platforms=True)
    assert pushed == index_digest
    index = registry.inspect(registry=oci_registry.host, tag="0.1.0", insecure=True, raw=True)
    assert index["mediaType"] == oci.MEDIA_INDEX
    assert {(m["platform"]["architecture"], m["digest"]) for m in index["manifests"]} == {
        ("amd64", amd64),
        ("arm64", arm64),
    }


def test_missing_skopeo_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(registry.RegistryError, match="skopeo is not installed"):
        registry.push(tmp_path, registry="127.0.0.1:1", tag="x", insecure=True)
    command = [sys.executable, str(REPO / "imagevolume" / "registry.py"), "push", "--layout", str(tmp_path)]
    done = subprocess.run(
        [*command, "--registry", "127.0.0.1:1", "--tag", "x"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert done.returncode == 2 and "skopeo is not installed" in done.stderr


def test_the_dockerfile_has_both_targets() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = {
        line.split()[-1]: line.split()[1]
        for line in text.splitlines()
        if line.upper().startswith("FROM ") and " AS " in line.upper()
    }
    assert set(stages) >= {"build", "supervisor", "gateway"}
    assert stages["supervisor"] == "scratch"
    supervisor_stage = text.split(" AS supervisor", 1)[1].split("\nFROM ", 1)[0]
    assert "COPY --from=build" in supervisor_stage and "/out/tree/" in supervisor_stage
    for key in oci.labels(version="v", revision="r", created="c"):
        assert key in supervisor_stage
    gateway_stage = text.split(" AS gateway", 1)[1].split("\nFROM ", 1)[0]
    assert "USER " in gateway_stage and "openshell-gateway" in gateway_stage
