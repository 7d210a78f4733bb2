#!/usr/bin/env python3
"""Package the openshell chart and push it to an OCI registry, never over a published version.

The release workflow (.github/workflows/release-chart.yml) runs this; tests/e2e/test_chart_publish.py
runs it against a real registry. A chart version, once pushed, is what every `helm install
--version X` of it gets: pushing X again would change an installed release's chart under it (and
Artifact Hub's record of it). So before pushing, the registry's tags of the chart are listed, and a
version already there is refused (exit 1) with what to do: bump `version` in Chart.yaml and add the
CHANGELOG.md entry. A registry that cannot say which tags it holds refuses the release too (exit 2):
no push without knowing. Two releases of the same version racing each other are not caught (OCI
has no create-only push); the tag check of the workflow makes that a deliberate act.

    python helm/publish.py --remote oci://ghcr.io/OWNER/charts [--username U --password-stdin]
    python helm/publish.py --remote oci://127.0.0.1:5000/charts --plain-http
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "openshell"

#: How registries answer a tag list of a repository that does not exist yet (nothing published).
_NO_REPOSITORY = ("name unknown", "status code 404", "not found")


class AlreadyPublished(Exception):
    """The registry holds this chart version already; it is never pushed again."""


class RegistryUnreadable(Exception):
    """The registry's tags of the chart could not be listed, so nothing is pushed."""


@dataclass(frozen=True)
class Published:
    reference: str  # oci://HOST/PATH/NAME:VERSION
    digest: str


def published_versions(client: helm.RegistryClient, repository: str) -> list[str]:
    """The chart versions ``repository`` (oci://HOST/PATH/NAME) holds; [] when it does not exist."""
    try:
        return client.tags(repository)
    except helm.HelmRegistryError as exc:
        if any(marker.lower() in str(exc).lower() for marker in _NO_REPOSITORY):
            return []
        raise RegistryUnreadable(f"cannot list the tags of {repository}: {exc}") from exc


def publish(chart: Path, remote: str, *, client: helm.RegistryClient) -> Published:
    """Package ``chart`` and push it to ``remote`` (oci://HOST/PATH) unless its version is there."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text(encoding="utf-8"))
    name, version = str(meta["name"]), str(meta["version"])
    repository = f"{remote.rstrip('/')}/{name}"
    # OCI tags cannot hold "+": Helm pushes semver build metadata as "_".
    if version.replace("+", "_") in published_versions(client, repository):
        raise AlreadyPublished(
            f"{name} {version} is already published at {repository}; a published version is never "
            f"overwritten: bump `version` in {chart / 'Chart.yaml'} and add its entry to CHANGELOG.md"
        )
    with tempfile.TemporaryDirectory(prefix="openshell-chart-") as tmp:
        archive = helm.package(chart, destination=tmp)
        pushed = client.push(archive, remote)
    return Published(reference=f"{repository}:{version}", digest=str(pushed.get("digest", "")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--remote", required=True, help="OCI repository root, e.g. oci://ghcr.io/OWNER/charts"
    )
    parser.add_argument("--chart", type=Path, default=CHART, help="chart directory (default: %(default)s)")
    parser.add_argument("--plain-http", action="store_true", help="speak plain HTTP to the registry")
    parser.add_argument("--username", help="log in as this user (with --password-stdin)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    args = parser.parse_args(argv)
    if not args.remote.startswith("oci://"):
        parser.error(f"--remote must start with oci://, got {args.remote!r}")
    if bool(args.username) != args.password_stdin:
        parser.error("--username and --password-stdin go together")
    client = helm.RegistryClient(plain_http=args.plain_http)
    try:
        if args.username:
            host = args.remote.removeprefix("oci://").split("/", 1)[0]
            client.login(host, args.username, sys.stdin.read().strip(), plain_http=args.plain_http)
        published = publish(args.chart, args.remote, client=client)
    except AlreadyPublished as exc:
        print(f"helm/publish.py: refused: {exc}", file=sys.stderr)
        return 1
    except (RegistryUnreadable, helm.HelmError) as exc:
        print(f"helm/publish.py: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(f"published {published.reference} {published.digest}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
