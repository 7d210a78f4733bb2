"""The chart's release path (.github/workflows/release-chart.yml, helm/publish.py) against a real
OCI registry.

`helm package`, then helm/publish.py to oci://127.0.0.1:PORT/charts (Debian's docker-registry,
plain HTTP), then the registry lists the version, `helm pull` brings the same bytes back, and the
pulled chart renders exactly what the chart directory renders. Publishing the same version again is
refused and leaves the registry's copy as it was; a bumped version is published beside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import helm_python as helm
import pytest
import yaml

from tests.support.procs import REPO
from tests.support.registry import running_registry

CHART = REPO / "helm" / "openshell"


def _publish_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("helm_publish", REPO / "helm" / "publish.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


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
    # The example values the README names ship with the chart (issue 24 point 5).
    assert {f"ci/{p.name}" for p in (CHART / "ci").glob("*.yaml")} <= names
    assert "dashboards/openshell-gateway.json" in names

    with running_registry(tmp_path / "registry") as registry:
        client = helm.RegistryClient(plain_http=True)
        remote = f"oci://{registry.host}/charts"
        ref = f"{remote}/{meta['name']}"
        publish = _publish_module()
        assert publish.published_versions(client, ref) == []  # nothing there yet: not an error
        published = publish.publish(CHART, remote, client=client)
        assert published.reference == f"{ref}:{meta['version']}"
        assert client.tags(ref) == [meta["version"]]
        descriptor = client.resolve(f"{ref}:{meta['version']}")
        assert descriptor["digest"].startswith("sha256:")
        _republish_is_refused(
            publish, client=client, remote=remote, tmp_path=tmp_path, digest=descriptor["digest"], meta=meta
        )

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


def _republish_is_refused(
    publish: ModuleType,
    *,
    client: helm.RegistryClient,
    remote: str,
    tmp_path: Path,
    digest: str,
    meta: dict[str, str],
) -> None:
    """A published version is never pushed again, even with other contents (issue 24 point 5)."""
    ref = f"{remote}/{meta['name']}"
    changed = tmp_path / "changed" / "openshell"
    shutil.copytree(CHART, changed)
    (changed / "templates" / "NOTES.txt").write_text("changed after the release\n")
    with pytest.raises(publish.AlreadyPublished, match=f"{meta['version']} is already published"):
        publish.publish(changed, remote, client=client)
    # The command line says so and exits 1; the registry's copy is the first one.
    assert publish.main(["--remote", remote, "--plain-http", "--chart", str(changed)]) == 1
    assert client.resolve(f"{ref}:{meta['version']}")["digest"] == digest
    assert client.tags(ref) == [meta["version"]]
    # A bumped version goes out beside it.
    chart_yaml = changed / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace(f"version: {meta['version']}", "version: 99.0.0", 1))
    assert publish.main(["--remote", remote, "--plain-http", "--chart", str(changed)]) == 0
    assert sorted(client.tags(ref)) == sorted([meta["version"], "99.0.0"])
