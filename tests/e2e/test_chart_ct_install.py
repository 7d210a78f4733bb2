"""``ct install --upgrade`` (chart-testing) of helm/openshell on the local cluster with a real node: the
previous release of the chart installed, ``helm test``ed, upgraded to this one and tested again; then this
one installed, upgraded in place and tested, and installed fresh and tested (what ct does for each
ci/*-values.yaml, every release in a namespace of its own, uninstalled after).

The previous release is the chart as it was just before its version last changed (the parent of the
oldest commit carrying the working tree's version): 0.1.0 for 0.2.0. ct takes it from a target branch,
so the test builds a git repository of its own: the previous chart on ``origin/main``, this working
tree's chart (uncommitted edits included) on top as HEAD, with helm/ct/.

Two things are set for this cluster and said here:

- Values (``--helm-extra-set-args --values=FILE``, after each ci/ file, on install and upgrade alike):
  the images this test builds and pushes to the node's registry, and the node's addresses for the
  chart's NetworkPolicies (tests/support/openshelldeploy.py, as tests/e2e/test_chart_on_node.py).
- The previous chart's version is written as a pre-release of this one (0.1.0 becomes 0.2.0-0) in the
  test's repository: ct skips the upgrade test across a step it deems breaking, and under SemVer 0.x
  every minor step is one (ct's ``~0.1.0`` does not admit 0.2.0). The templates and values are the
  previous release's, as published.

Which ci/ files: ``default-values.yaml`` (SQLite, one gateway) by default; each file costs three installs,
two upgrades and five ``helm test`` runs on this 2-core machine. ``OPENSHELL_CT_VALUES`` names others
(comma-separated file names, or ``all``); only files whose dependencies (Secrets, CRDs, RuntimeClass
handlers) the cluster has can pass. docs/helm.md ("Chart testing") has the command for any cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import ct, gatewayimage, kubecluster, kubenode, openshelldeploy

pytestmark = pytest.mark.timeout(3000)

CHART_PATH = "helm/openshell"
CHART = ct.REPO / CHART_PATH
DEFAULT_VALUES = ["default-values.yaml"]
INSTALL_TIMEOUT = 2700.0


@dataclass
class Node:
    kubeconfig: Path
    values_file: Path  # the cluster's values, laid over each ci/ file


@pytest.fixture(scope="module")
def node(bundle: Path, rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.environ.get("KUBECONFIG"):
        pytest.skip(
            "runs on the local node (its registry gets the images built here); docs/helm.md has ct install"
        )
    reason = kubenode.node_unavailable() or gatewayimage.unavailable()
    if reason:
        pytest.skip(f"no local cluster with a real node: {reason}")
    try:
        plane_bin, node_bin = kubecluster.build(), kubenode.build_node()
    except kubecluster.BuildError as exc:
        pytest.skip(f"no local cluster with a real node: {exc.reason}")
    cluster = kubenode.LocalCluster(plane_bin, node_bin)
    try:
        cluster.start()  # built but not starting: a failure, not a skip
        assert cluster.registry is not None
        pushed = openshelldeploy.push_images(
            cluster.registry.host, bundle=bundle, sandbox_rootfs=rootfs, tag="ct"
        )
        # No database of ours: the ci/ files chosen by default run on the chart's SQLite; the port is
        # the chart's default (its egress rule names the host, which runs none).
        values = openshelldeploy.merged(
            openshelldeploy.chart_values(pushed), openshelldeploy.network_policy_values(cluster, 5432)
        )
        values_file = tmp_path_factory.mktemp("ct-values") / "node-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        yield Node(cluster.kubeconfig, values_file)
    finally:
        cluster.cleanup()


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd}: {done.stderr.strip()}")
    return done.stdout


def _version(chart_yaml: str) -> str:
    return str(yaml.safe_load(chart_yaml)["version"])


def previous_release() -> tuple[str, str]:
    """(commit, version) of the chart's previous release: the parent of the oldest commit in the run of
    commits, newest first, whose Chart.yaml carries the working tree's version (HEAD when the working
    tree's version is not committed yet)."""
    current = _version((CHART / "Chart.yaml").read_text())
    oldest_current = None
    for commit in _git("log", "--format=%H", "--", f"{CHART_PATH}/Chart.yaml", cwd=ct.REPO).split():
        version = _version(_git("show", f"{commit}:{CHART_PATH}/Chart.yaml", cwd=ct.REPO))
        if version != current:
            parent = f"{oldest_current}^" if oldest_current else "HEAD"
            return _git("rev-parse", parent, cwd=ct.REPO).strip(), version
        oldest_current = commit
    pytest.skip(f"no commit of {CHART_PATH} with a version other than {current} in this clone's history")


def _chosen_values() -> list[str]:
    given = os.environ.get("OPENSHELL_CT_VALUES", "").strip()
    if given == "all":
        return sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
    return [n.strip() for n in given.split(",") if n.strip()] or DEFAULT_VALUES


def _keep_only(ci_dir: Path, names: list[str]) -> None:
    for path in ci_dir.glob("*-values.yaml"):
        if path.name not in names:
            path.unlink()


def make_repo(root: Path, *, previous: str, previous_version: str, values: list[str]) -> None:
    """``root``: a git repository whose origin/main holds the previous chart (its version written as a
    pre-release of the current one) and whose HEAD adds the working tree's chart and helm/ct/."""
    current = _version((CHART / "Chart.yaml").read_text())
    _git("init", "--quiet", "--initial-branch=work", str(root), cwd=root.parent)
    for key, value in (
        ("user.name", "ct test"),
        ("user.email", "ct@test.invalid"),
        ("commit.gpgsign", "false"),
    ):
        _git("config", key, value, cwd=root)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", previous, CHART_PATH], cwd=ct.REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    chart_yaml = root / CHART_PATH / "Chart.yaml"
    text, n = re.subn(
        rf"^version: *{re.escape(previous_version)} *$",
        f"version: {current}-0",
        chart_yaml.read_text(),
        flags=re.M,
    )
    assert n == 1, f"no 'version: {previous_version}' line in the previous Chart.yaml"
    chart_yaml.write_text(text)
    _keep_only(root / CHART_PATH / "ci", values)
    _git("add", "-A", cwd=root)
    _git("commit", "--quiet", "-m", f"chart {previous_version} ({previous[:12]}) as {current}-0", cwd=root)
    _git("update-ref", "refs/remotes/origin/main", "HEAD", cwd=root)
    shutil.rmtree(root / CHART_PATH)
    shutil.copytree(CHART, root / CHART_PATH)
    shutil.copytree(ct.REPO / "helm" / "ct", root / "helm" / "ct")
    _keep_only(root / CHART_PATH / "ci", values)
    _git("add", "-A", cwd=root)
    _git("commit", "--quiet", "-m", f"chart {current} (the working tree)", cwd=root)


def test_ct_install_upgrades_from_the_previous_release_and_tests_each_revision(
    node: Node, tmp_path: Path
) -> None:
    try:
        bin_dir = ct.build()
    except ct.Unavailable as exc:
        pytest.skip(f"no ct here: {exc}")
    env = ct.environment(bin_dir, home=tmp_path / "helm-home", kubeconfig=node.kubeconfig)
    missing = ct.missing_commands(env, ["git", "kubectl"])
    if missing:
        pytest.skip(f"ct install needs {', '.join(missing)} on PATH")
    previous, previous_version = previous_release()
    values = _chosen_values()
    unknown = [n for n in values if not (CHART / "ci" / n).is_file()]
    assert not unknown, f"OPENSHELL_CT_VALUES names no file of {CHART_PATH}/ci/: {unknown}"
    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo, previous=previous, previous_version=previous_version, values=values)

    started = time.monotonic()
    done = ct.run(
        [
            "install",
            "--config",
            "helm/ct/ct.yaml",
            "--upgrade",
            "--skip-missing-values",
            "--helm-extra-set-args",
            f"--values={node.values_file}",
        ],
        env=env,
        cwd=repo,
        timeout=INSTALL_TIMEOUT,
    )
    took = time.monotonic() - started
    out = done.stdout
    print(f"ct install --upgrade with {', '.join(values)}: {took:.0f} s")
    assert done.returncode == 0, out
    # ct passes over an upgrade quietly when the previous revision does not install or test: that
    # would be a pass without the upgrade. Every step is in its output or the test fails.
    assert "Skipping upgrade test" not in out, out
    assert "skipped because" not in out, out
    current = _version((CHART / "Chart.yaml").read_text())
    # ct writes its chart names with escaped quotes: openshell => (version: \"0.2.0\", path: \"...\").
    assert re.search(
        rf'relative to previous revision "openshell => \(version: \\"{re.escape(current)}-0\\", '
        rf'path: \\"ct-previous-revision\d+/{CHART_PATH}\\"\)"',
        out,
    ), out
    for name in values:
        ci_file = f"{CHART_PATH}/ci/{name}"
        # The previous revision installed, then this one upgraded in place, then a fresh install.
        assert re.search(rf'with values file "ct-previous-revision\d+/{re.escape(ci_file)}"', out), out
        assert f'path: \\"{CHART_PATH}\\")" with values file "{ci_file}"' in out, out
        assert f'Installing chart with values file "{ci_file}"' in out, out
    # Per values file: two upgrades (each leaves "Upgrade complete") and five helm test runs (each
    # names its test suite), all passed (ct stops at the first failure).
    assert out.count("DESCRIPTION: Upgrade complete") >= 2 * len(values), out
    assert out.count("TEST SUITE:") >= 5 * len(values), out
    assert "All charts installed successfully" in out, out
