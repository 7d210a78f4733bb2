"""``ct lint`` (chart-testing, the Helm ecosystem's chart CI) on helm/openshell with helm/ct/ct.yaml:
Chart.yaml against ct's schema (yamale), Chart.yaml, values.yaml and every ci/*-values.yaml through
yamllint with ct's rules, and ``helm lint`` with each ci/ values file, by a real ct and a real helm
command (tests/support/ct.py builds both). Then that it can fail: a copy of the chart with a YAML fault
(trailing spaces in a ci/ file), and one whose Chart.yaml is outside ct's schema, are each refused with
the fault named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import ct

CHART = ct.REPO / "helm" / "openshell"
CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
LINT_TIMEOUT = 900.0  # helm lint once per ci/ file; ct's own startup is quick

pytestmark = pytest.mark.timeout(2400)  # the first run builds ct and helm (minutes)


@pytest.fixture(scope="module")
def ct_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    try:
        bin_dir = ct.build()
    except ct.Unavailable as exc:
        pytest.skip(f"no ct here: {exc}")
    env = ct.environment(bin_dir, home=tmp_path_factory.mktemp("helm-home"))
    missing = ct.missing_commands(env, ["git", "yamllint", "yamale"])
    if missing:
        pytest.skip(
            f"ct lint needs {', '.join(missing)} (pip install -e '.[dev]' brings yamllint and yamale)"
        )
    return env


def test_ct_lint_passes_on_the_chart_with_every_ci_values_file(ct_env: dict[str, str]) -> None:
    # --debug: ct prints each command it runs (">>> ..."), so what it checked is read, not assumed.
    done = ct.run(
        ["lint", "--debug", "--config", str(ct.CONFIG)], env=ct_env, cwd=ct.REPO, timeout=LINT_TIMEOUT
    )
    assert done.returncode == 0, done.stdout
    ran = {line.removeprefix(">>> ") for line in done.stdout.splitlines() if line.startswith(">>> ")}
    chart = "helm/openshell"
    assert f"yamale --schema helm/ct/chart_schema.yaml {chart}/Chart.yaml" in ran, done.stdout
    assert CI_FILES, f"{chart}/ci/ has no *-values.yaml"
    for name in ("Chart.yaml", "values.yaml", *(f"ci/{n}" for n in CI_FILES)):
        assert f"yamllint --config-file helm/ct/lintconf.yaml {chart}/{name}" in ran, done.stdout
    for name in CI_FILES:
        assert f"helm lint {chart} --values {chart}/ci/{name}" in ran, done.stdout
    assert "All charts linted successfully" in done.stdout, done.stdout


#: A fault per check ct runs before helm lint: (file in the chart, text appended, what ct's output names).
FAULTS = {
    "yamllint": ("ci/default-values.yaml", "# a comment ending in spaces   \n", "trailing spaces"),
    # A key Helm would ignore, outside the schema (ct's own parse of Chart.yaml would catch a mistyped one).
    "yamale": ("Chart.yaml", "owner: platform-team\n", "owner: Unexpected element"),
}


@pytest.mark.parametrize("check", sorted(FAULTS))
def test_ct_lint_refuses_a_chart_its_check_finds_a_fault_in(
    ct_env: dict[str, str], tmp_path: Path, check: str
) -> None:
    # ct.yaml's paths are relative to the repository root: the copy gets the same layout.
    shutil.copytree(ct.REPO / "helm" / "ct", tmp_path / "helm" / "ct")
    chart = tmp_path / "helm" / "openshell"
    shutil.copytree(CHART, chart)
    name, appended, named = FAULTS[check]
    (chart / name).write_text((chart / name).read_text() + appended)
    done = ct.run(
        ["lint", "--config", str(tmp_path / "helm" / "ct" / "ct.yaml")],
        env=ct_env,
        cwd=tmp_path,
        timeout=LINT_TIMEOUT,
    )
    assert done.returncode != 0, done.stdout
    assert named in done.stdout, done.stdout
