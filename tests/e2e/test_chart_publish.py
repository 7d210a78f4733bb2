"""The chart's release path (.github/workflows/release-chart.yml) against a real OCI registry.

`helm package`, then `helm push` to oci://127.0.0.1:PORT/charts (Debian's docker-registry, plain
HTTP), then the registry lists the version, `helm pull` brings the same bytes back, and the pulled
chart renders exactly what the chart directory renders.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import helm_python as helm
import yaml

from tests.support.procs import REPO
from tests.support.registry import running_registry

CHART = REPO / "helm" / "openshell"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_push_and_pull_back(tmp_path: Path) -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    archive = Path(helm.package(CHART, destination=tmp_path / "out"))
    assert archive.name == f"{meta['name']}-{meta['version']}.tgz"
    packaged = helm.Chart.load_archive(archive.read_bytes())
    assert packaged.metadata["kubeVersion"] == ">=1.29.0-0"
    assert packaged.metadata["appVersion"] == meta["appVersion"]
    names = {f["name"] for f in packaged.files}
    assert "values.schema.json" not in names  # loaded as the schema, not a plain file
    assert packaged.schema is not None and packaged.schema["additionalProperties"] is False
    assert not any(n.startswith("ci/") for n in names), names  # .helmignore keeps ci/ out
    assert "dashboards/openshell-gateway.json" in names

    with running_registry(tmp_path / "registry") as registry:
        client = helm.RegistryClient(plain_http=True)
        remote = f"oci://{registry.host}/charts"
        pushed = client.push(archive, remote)
        assert pushed  # the push reports what it wrote
        ref = f"{remote}/{meta['name']}"
        assert client.tags(ref) == [meta["version"]]
        descriptor = client.resolve(f"{ref}:{meta['version']}")
        assert descriptor["digest"].startswith("sha256:")

        pulled_dir = tmp_path / "pulled"
        pulled_dir.mkdir()
        client.pull(ref, version=meta["version"], destination=pulled_dir)
        pulled = pulled_dir / archive.name
        assert pulled.exists(), list(pulled_dir.iterdir())
        assert _sha256(pulled) == _sha256(archive)
        assert helm.digest(pulled) == helm.digest(archive)

    from_registry = helm.Chart.load_archive(pulled.read_bytes())
    from_dir = helm.Chart.load(CHART)
    values = yaml.safe_load((CHART / "ci" / "ha-values.yaml").read_text())
    rendered = from_registry.render(values, name="openshell", namespace="openshell")
    assert rendered == from_dir.render(values, name="openshell", namespace="openshell")
    assert any(path.endswith("deployment.yaml") for path in rendered)
