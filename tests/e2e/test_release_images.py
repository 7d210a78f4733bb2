"""The release's images, built as the release workflow builds them and then run: issue 24, point 1.

``imagevolume/release.py`` (what .github/workflows/release.yml runs) builds both targets of the
repository's Dockerfile with buildah (no Docker; chroot isolation, vfs storage), pushes them to a
real registry (Debian's docker-registry on 127.0.0.1) by digest, signs them with a cosign key made
here (the workflow signs keyless), and writes the digests into a copy of the chart. Then:

* cosign verifies both signatures with the key pair's public key, and refuses them with another key;
* the copied chart renders with both images pulled by those digests (real Helm, helm_python);
* the gateway image, pulled back by digest and unpacked (skopeo, umoci), runs in runc as its
  config says (its ENTRYPOINT, user 10001, PATH) with ``serve`` on SQLite, and answers /healthz;
* the supervisor image, pulled back and unpacked, is mounted read-only at /opt/openshell in a
  busybox sandbox (no libc, no Python), as a pod's image volume is, and its launcher runs there.

Only linux/amd64 is built here: arm64 needs QEMU's binfmt handlers, which the workflow installs and
these machines do not have. The Debian base (``DEBIAN_BASE``) is made with mmdebstrap, since no
image registry is reachable here (tests/support/buildah.py). Everything is cached under
``~/.cache/openshell`` (the base, and every Dockerfile step in buildah's storage), so a run whose
sources did not change rebuilds nothing; revision and SOURCE_DATE_EPOCH are pinned for that reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import buildah, cosign
from tests.support.procs import REPO, free_port
from tests.support.registry import Registry, ensure_tools, running_registry
from tests.support.runc import RuncContainer, runc_unavailable

# A cold build (apt and pip in the RUN steps of both targets, 2 cores) takes several minutes.
pytestmark = pytest.mark.timeout(3600)

VERSION = "0.0.0-test"
EPOCH = 1767225600  # 2026-01-01: pinned so the cached layers stay valid from commit to commit
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # this machine's roots, for pip in RUN steps


@dataclass(frozen=True)
class Release:
    registry: Registry
    images: dict[str, dict[str, Any]]  # release.py's JSON: target -> repository, digest, reference
    chart: Path
    private_key: Path
    public_key: Path
    cosign: str
    seconds: float


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    reason = buildah.unavailable() or runc_unavailable()
    if reason:
        pytest.skip(reason)
    ensure_tools("docker-registry", "skopeo", "umoci")
    cosign_binary = cosign.binary()
    if cosign_binary is None:
        pytest.skip(f"cosign is not installed and `go install {cosign.MODULE}@{cosign.VERSION}` failed")
    work = tmp_path_factory.mktemp("release")
    private_key, public_key = cosign.key_pair(cosign_binary, work / "keys")
    with running_registry(work / "registry") as registry:
        base = buildah.base_image()
        argv = [
            sys.executable,
            str(REPO / "imagevolume" / "release.py"),
            "--registry", f"{registry.host}/openshell",
            "--version", VERSION,
            "--platform", "linux/amd64",
            "--base", base,
            "--pull", "never",
            "--revision", "0" * 40,
            "--source-date-epoch", str(EPOCH),
            "--insecure",
            "--sign", f"key:{private_key}",
            "--cosign", cosign_binary,
            "--chart-out", str(work / "chart"),
            "--digests-out", str(work / "digests.json"),
            *buildah.storage_args(),
        ]  # fmt: skip
        if CA_BUNDLE.exists():
            argv += ["--build-ca", str(CA_BUNDLE)]
        started = time.monotonic()
        done = subprocess.run(
            argv, env=cosign.environment(), capture_output=True, text=True, timeout=3600, check=False
        )
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-4000:]
        print(f"\nimagevolume/release.py: {seconds:.0f}s", file=sys.stderr)
        images = json.loads(done.stdout)
        assert json.loads((work / "digests.json").read_text()) == images
        yield Release(registry, images, work / "chart", private_key, public_key, cosign_binary, seconds)


def test_the_release_workflow_lints_clean_and_runs_the_tested_script() -> None:
    """actionlint (with shellcheck, when installed, over every run: block) passes the workflows, and the
    release job builds with the very command line this module runs, bar the registry and signing."""
    actionlint = cosign.go_tool("github.com/rhysd/actionlint/cmd/actionlint", "v1.7.12", "actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed and go install of it failed")
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    done = subprocess.run([actionlint, *map(str, workflows)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release-chart.yml").read_text())
    steps = workflow["jobs"]["publish"]["steps"]
    runs = [s.get("run", "") for s in steps]
    (build,) = [r for r in runs if "imagevolume/release.py" in r]
    for option in ("--platform linux/amd64 --platform linux/arm64", "--sign keyless", "--chart-out"):
        assert option in build
    (publish,) = [r for r in runs if "helm/publish.py" in r]
    assert "--chart build/release/openshell" in publish  # the chart with the digests, not the repo's
    assert runs.index(build) < runs.index(publish)
    assert any("cosign sign --yes" in r for r in runs[runs.index(publish) :])  # the chart is signed
    assert workflow["permissions"]["id-token"] == "write"


def test_both_images_are_pushed_by_digest_with_their_labels(release: Release) -> None:
    assert set(release.images) == {"gateway", "supervisor"}
    for target, image in release.images.items():
        assert image["repository"] == f"{release.registry.host}/openshell/openshell-{target}"
        assert image["reference"] == f"{image['repository']}@{image['digest']}"
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image['reference']}"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        index = json.loads(raw)
        platforms = [m["platform"] for m in index["manifests"]]
        assert platforms == [{"architecture": "amd64", "os": "linux"}], index
        config = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{image['reference']}"],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout
        )  # fmt: skip
        labels = config["config"]["Labels"]
        assert labels["org.opencontainers.image.title"] == f"openshell-{target}"
        assert labels["org.opencontainers.image.version"] == VERSION
        assert labels["org.opencontainers.image.revision"] == "0" * 40


def test_the_signatures_verify_with_the_key_and_not_with_another(release: Release, tmp_path: Path) -> None:
    _, other = cosign.key_pair(release.cosign, tmp_path / "other")
    for image in release.images.values():
        good = cosign.verify(release.cosign, image["reference"], release.public_key)
        assert good.returncode == 0, good.stderr
        (claim,) = json.loads(good.stdout)
        assert claim["critical"]["image"]["docker-manifest-digest"] == image["digest"]
        bad = cosign.verify(release.cosign, image["reference"], other)
        assert bad.returncode != 0 and "no matching signatures" in bad.stderr, bad.stderr


def test_the_released_chart_pulls_both_images_by_digest(release: Release) -> None:
    import helm_python as helm

    values = yaml.safe_load((release.chart / "values.yaml").read_text())
    gateway, supervisor = release.images["gateway"], release.images["supervisor"]
    assert values["gateway"]["image"]["digest"] == gateway["digest"]
    assert values["sandboxes"]["supervisor"]["image"]["digest"] == supervisor["digest"]
    # Only those lines changed: the comments operators read stay in the released values.yaml.
    original = (REPO / "helm" / "openshell" / "values.yaml").read_text().splitlines()
    released = (release.chart / "values.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, released, strict=True) if a != b]
    assert len(changed) == 4, changed

    manifests = helm.Chart.load(release.chart).render({}, name="rel", namespace="openshell")
    docs = [
        d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    images = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert gateway["reference"] in images.values(), images
    rendered = "\n".join(manifests.values())
    assert supervisor["reference"] in rendered
    assert f":{VERSION}" not in rendered  # by digest, never by tag


def test_the_chart_with_the_digests_is_published_and_signed_as_the_workflow_does(release: Release) -> None:
    """The workflow's last steps: helm/publish.py pushes the chart copy, and cosign signs it by the
    digest publish.py printed (parsed the way the workflow's shell does)."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "helm" / "publish.py"),
            "--chart", str(release.chart),
            "--remote", f"oci://{release.registry.host}/charts",
            "--plain-http",
        ],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The workflow's shell: `read -r _ reference _`, then the digest of the manifest skopeo reads
    # (helm/publish.py prints one only when Helm's registry client returns it).
    reference = done.stdout.split()[1]
    tagged = reference.removeprefix("oci://")
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{tagged}"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    chart = tagged.rsplit(":", 1)[0]  # ${tagged%:*}
    assert chart == f"{release.registry.host}/charts/openshell"
    assert json.loads(raw)["config"]["mediaType"] == "application/vnd.cncf.helm.config.v1+json"
    signed = subprocess.run(
        [release.cosign, "sign", "--yes", "--key", str(release.private_key), "--tlog-upload=false",
         "--allow-http-registry", f"{chart}@{digest}"],
        env=cosign.environment(), capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    verified = cosign.verify(release.cosign, f"{chart}@{digest}", release.public_key)
    assert verified.returncode == 0, verified.stderr
    # What was pushed is the chart with the digests: helm pulls it back with them in its values.
    import helm_python as helm

    with tempfile.TemporaryDirectory() as tmp:
        client = helm.RegistryClient(plain_http=True)
        try:
            client.pull(f"oci://{chart}", version=reference.rsplit(":", 1)[1], destination=tmp)
        finally:
            client.close()
        (archive,) = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            member = tar.extractfile("openshell/values.yaml")
            assert member is not None
            values = yaml.safe_load(member.read())
    assert values["gateway"]["image"]["digest"] == release.images["gateway"]["digest"]
    assert values["sandboxes"]["supervisor"]["image"]["digest"] == release.images["supervisor"]["digest"]


def _unpack(reference: str, work: Path) -> Path:
    """The image at ``reference`` pulled by digest and unpacked as an OCI runtime bundle."""
    layout = work / "layout"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{reference}", f"oci:{layout}:image"],
        capture_output=True, check=True, timeout=300,
    )  # fmt: skip
    bundle = work / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:image", str(bundle)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    return bundle


def _healthz(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None


def test_the_gateway_image_serves_on_sqlite(release: Release, tmp_path: Path) -> None:
    bundle = _unpack(release.images["gateway"]["reference"], tmp_path)
    spec = json.loads((bundle / "config.json").read_text())
    process = spec["process"]
    # The image's own ENTRYPOINT + CMD, user and PATH, as a runtime reads them from its config.
    assert process["args"] == ["openshell-gateway", "serve"]
    assert (process["user"]["uid"], process["user"]["gid"]) == (10001, 10001)
    assert process["cwd"] == "/var/lib/openshell"
    grpc, http, ops = free_port(), free_port(), free_port()
    process["args"] += [
        "--grpc-listen", f"127.0.0.1:{grpc}",
        "--http-listen", f"127.0.0.1:{http}",
        "--ops-listen", f"127.0.0.1:{ops}",
        "--database-url", "sqlite:////var/lib/openshell/gateway.db",
    ]  # fmt: skip
    process["terminal"] = False
    # The host's network namespace, so that /healthz is reachable from here on loopback.
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    container = RuncContainer(f"gw-{os.getpid()}", bundle, tmp_path / "runc", tmp_path / "gateway.log")
    container.start(spec)
    try:
        deadline = time.monotonic() + 90
        body = None
        while body is None and time.monotonic() < deadline:
            assert container.proc is not None and container.proc.poll() is None, container.log_text()
            body = _healthz(f"http://127.0.0.1:{ops}/healthz")
            time.sleep(0.3)
        assert body == {"status": "ok"}, container.log_text()
        assert (bundle / "rootfs" / "var/lib/openshell/gateway.db").stat().st_uid == 10001
    finally:
        container.stop()


def test_the_supervisor_image_runs_from_its_mount_in_a_bare_sandbox(
    release: Release, rootfs: Path, tmp_path: Path
) -> None:
    tree = _unpack(release.images["supervisor"]["reference"], tmp_path) / "rootfs"
    assert (tree / "bin" / "openshell-supervisor").is_file()
    assert not (tree / "etc").exists() and not (tree / "usr").exists()  # FROM scratch: the tree only
    sandbox = tmp_path / "sandbox"
    shutil.copytree(rootfs, sandbox, symlinks=True)  # busybox alone: no libc, no Python
    for argv, expected in (
        (["/opt/openshell/bin/openshell-supervisor", "--help"], "run"),
        (["/opt/openshell/bin/openshell-supervisor", "config", "schema"], '"properties"'),
    ):
        spec = _sandbox_spec(sandbox, tree, argv)
        name = f"sup-{os.getpid()}-{argv[-1]}".replace("-", "")
        bundle = tmp_path / f"bundle-{argv[-1]}"
        log = tmp_path / f"{argv[-1]}.log"
        container = RuncContainer(name, bundle, tmp_path / "runc", log)
        container.start(spec)
        try:
            assert container.wait(60) == 0, container.log_text()
        finally:
            container.stop()
        assert expected in container.log_text(), container.log_text()


def _sandbox_spec(sandbox: Path, tree: Path, argv: list[str]) -> dict[str, Any]:
    """A read-only busybox container with the supervisor tree mounted read-only at /opt/openshell (what
    a pod's image volume does), as nobody with no capabilities."""
    done = subprocess.run(["runc", "spec", "--bundle", str(sandbox.parent)], capture_output=True, check=False)
    spec_file = sandbox.parent / "config.json"
    if done.returncode != 0 and not spec_file.exists():
        raise AssertionError(done.stderr.decode())
    spec: dict[str, Any] = json.loads(spec_file.read_text())
    spec_file.unlink()
    spec["root"] = {"path": str(sandbox), "readonly": True}
    spec["process"].update(
        terminal=False,
        args=argv,
        user={"uid": 65534, "gid": 65534},
        env=["PATH=/bin", "HOME=/tmp"],
        cwd="/",
        noNewPrivileges=True,
    )
    spec["process"]["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted", "ambient")}
    spec["mounts"].append(
        {
            "destination": "/opt/openshell",
            "type": "bind",
            "source": str(tree),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }
    )
    spec["mounts"].append(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}
    )
    return spec


# --- the script's own checks (no build) -----------------------------------------------------------


def test_set_scalar_changes_one_line_and_refuses_a_missing_or_ambiguous_key() -> None:
    from imagevolume.release import ReleaseError, set_scalar

    text = 'a:\n  # the image\n  image:\n    digest: ""  \n    tag: x\nb:\n  image:\n    digest: ""\n'
    edited = set_scalar(text, ("a", "image", "digest"), "sha256:" + "0" * 64)
    assert edited.splitlines()[3] == f'    digest: "sha256:{"0" * 64}"'
    assert [line for line in edited.splitlines() if "digest" not in line] == [
        line for line in text.splitlines() if "digest" not in line
    ]
    assert yaml.safe_load(edited)["b"]["image"]["digest"] == ""
    with pytest.raises(ReleaseError, match=r"expected one a\.image\.nope key, found 0"):
        set_scalar(text, ("a", "image", "nope"), "v")
    with pytest.raises(ReleaseError, match=r"expected one a\.image\.digest key, found 2"):
        set_scalar(text + "a:\n  image:\n    digest: y\n", ("a", "image", "digest"), "v")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--platform", "linux/s390x"], "--platform linux/s390x: the images are built for linux/amd64"),
        (["--sign", "sometimes"], "--sign 'sometimes': expected none, keyless or key:PATH"),
        (["--chart", "/nonexistent"], "--chart /nonexistent: no Chart.yaml there"),
        (["--build-ca", "/nonexistent.pem"], "--build-ca /nonexistent.pem: no such file"),
    ],
)
def test_bad_options_are_refused_by_name(options: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "imagevolume" / "release.py"), "--registry", "r.example/o", *options],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_buildah_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "imagevolume" / "release.py"), "--registry", "r.example/o"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert done.returncode == 1, done.stderr
    assert "buildah is not installed (apt-get install buildah)" in done.stderr
    assert "Traceback" not in done.stderr
