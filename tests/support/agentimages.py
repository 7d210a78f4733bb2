"""Small agent images with known ENTRYPOINT and CMD in a real registry, for the image-command lookups.

``push_agent_images`` builds four single-layer images with umoci (``team/agent:1`` with both,
``:cmd-only``, ``:bare`` with neither, ``:arm`` with another entrypoint, ``:big`` with a config of
about 1 MiB), pushes them with skopeo to an open registry, and adds ``:multi``, a multi-platform OCI
index as buildx pushes one (amd64, arm64 and an attestation-like unknown/unknown entry). Registries
that ask for credentials can then serve the same storage (``running_registry(storage=...)``).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import images
from tests.support.registry import Registry

REPOSITORY = "team/agent"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: ENTRYPOINT + CMD of each tag, as the runtime would run them on linux/amd64.
ARGV = {
    "1": ["/bin/agent", "--serve", "--port", "80"],
    "cmd-only": ["python3", "main.py"],
    "bare": [],
    "arm": ["/bin/agent-arm"],
    "multi": ["/bin/agent", "--serve", "--port", "80"],
    "big": ["/bin/agent"],
}
#: Environment entries of ``:big``, whose config (about 1 MiB) arrives in many reads.
BIG_ENV = [f"VAR_{i:05d}={'x' * 300}" for i in range(3400)]


@dataclass
class Pushed:
    registry: Registry
    digests: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest

    def reference(self, tag: str, host: str | None = None) -> str:
        return f"{host or self.registry.host}/{REPOSITORY}:{tag}"


def request(
    url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), dict(resp.headers)


def push_agent_images(registry: Registry, workdir: Path) -> Pushed:
    rootfs = workdir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "agent").write_text("#!/bin/sh\n")
    layout = workdir / "layout"
    built = {
        "1": images.build_from_dir(layout, "1", rootfs, entrypoint=ARGV["1"][:2], cmd=ARGV["1"][2:]),
        "cmd-only": images.build_from_dir(layout, "cmd-only", rootfs, cmd=ARGV["cmd-only"]),
        "bare": images.build_from_dir(layout, "bare", rootfs),
        "arm": images.build_from_dir(layout, "arm", rootfs, entrypoint=ARGV["arm"]),
        "big": images.build_from_dir(layout, "big", rootfs, entrypoint=ARGV["big"], env=BIG_ENV),
    }
    pushed = Pushed(registry=registry)
    sizes: dict[str, int] = {}
    for tag, source in built.items():
        images.push(source, registry.host, REPOSITORY, tag)
        body, headers = request(
            f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
        )
        pushed.digests[tag] = headers["Docker-Content-Digest"]
        sizes[tag] = len(body)
        # umoci leaves mediaType out of the manifest (optional in OCI): the type is the header's,
        # which the lookup must then go by.
        assert "mediaType" not in json.loads(body)
        assert headers["Content-Type"] == OCI_MANIFEST

    def entry(tag: str, platform: dict[str, str]) -> dict[str, object]:
        return {
            "mediaType": OCI_MANIFEST,
            "digest": pushed.digests[tag],
            "size": sizes[tag],
            "platform": platform,
        }

    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry("1", {"os": "linux", "architecture": "amd64"}),
            # No variant, as buildx writes arm64 (containerd reads it as arm64/v8).
            entry("arm", {"os": "linux", "architecture": "arm64"}),
            entry("bare", {"os": "unknown", "architecture": "unknown"}),
        ],
    }
    _, headers = request(
        f"{registry.url}/v2/{REPOSITORY}/manifests/multi",
        method="PUT",
        body=json.dumps(index).encode(),
        headers={"Content-Type": OCI_INDEX},
    )
    pushed.digests["multi"] = headers["Docker-Content-Digest"]
    return pushed
