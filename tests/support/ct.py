"""chart-testing (``ct``, github.com/helm/chart-testing) and the ``helm`` command it drives, built from the
Go module proxy into a cache, and run against helm/openshell with the settings in ``helm/ct/``.

ct is a Go program that shells out: ``helm`` (lint, install, upgrade, test, uninstall), ``kubectl``
(namespaces, rollouts, events and logs; ``ct install`` only), ``git`` (the previous revision of
``ct install --upgrade``), ``yamllint`` and ``yamale`` (``ct lint``; Python packages, the dev extra).
The tests' other Helm is a library (helm-python-sdk) with no command, so this module builds one: Helm
``HELM_VERSION``, the Helm that library bundles. ``kubectl`` is taken from ``PATH``.

Both are built in their own modules' directories (``go mod download`` then ``go build``): ``go install
github.com/helm/chart-testing/v3/ct@VERSION`` fails on a proxy that serves the version but not the
module's version list (it asks the list for deprecations first).

    python -m tests.support.ct build      # build (or find) ct and helm, print their directory
    python -m tests.support.ct lint       # ct lint --config helm/ct/ct.yaml, from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "helm" / "ct" / "ct.yaml"
CT_MODULE = "github.com/helm/chart-testing/v3"
CT_VERSION = "v3.14.0"
HELM_MODULE = "helm.sh/helm/v4"
HELM_VERSION = "v4.2.3"  # helm-python-sdk's (helm_python._native.EXPECTED_HELM_SDK_VERSION)
BUILD_TIMEOUT = 1800.0


class Unavailable(RuntimeError):
    """ct or a command it needs cannot be had here; the message is one line saying which and why."""


def cache_root() -> Path:
    given = os.environ.get("OPENSHELL_CT_CACHE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openshell" / "ct"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # The modules' own go.sum pins everything; this machine's Go must do (no toolchain download).
    env.update(GOTOOLCHAIN="local", GOFLAGS="-mod=readonly -buildvcs=false", CGO_ENABLED="0")
    return env


def _module_dir(module: str, version: str, env: dict[str, str]) -> Path:
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # outside any module: no go.mod of ours is read or changed
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError:
        info = {}
    if done.returncode != 0 or "Dir" not in info:
        why = info.get("Error") or done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"go mod download {module}@{version} failed: {why}")
    return Path(info["Dir"])


def _go_build(
    module: str, version: str, package: str, out: Path, env: dict[str, str], *, version_var: str
) -> None:
    source = _module_dir(module, version, env)
    # The version stamped as the projects' own release builds do (ct checks Helm's: v3 or newer).
    ldflags = f"-X {version_var}={version}"
    done = subprocess.run(
        ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out), f"./{package}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=source,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise Unavailable(f"go build of {module}@{version} ./{package} failed:\n{tail}")


def build(*, cache: Path | None = None) -> Path:
    """The directory holding ``ct`` and ``helm`` at their pinned versions, built there on first use
    (a few minutes: Helm compiles much of client-go)."""
    out = (cache or cache_root()) / f"ct-{CT_VERSION}-helm-{HELM_VERSION}"
    bin_dir = out / "bin"
    if (out / ".complete").exists() and (bin_dir / "ct").exists() and (bin_dir / "helm").exists():
        return bin_dir
    if shutil.which("go") is None:
        raise Unavailable("Go is not installed (ct and helm are built from the Go module proxy)")
    env = _go_env()
    out.mkdir(parents=True, exist_ok=True)
    # Built beside, renamed into place: an interrupted build never leaves a half-written binary.
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        _go_build(
            CT_MODULE, CT_VERSION, "ct", Path(tmp) / "ct", env, version_var=f"{CT_MODULE}/ct/cmd.Version"
        )
        _go_build(
            HELM_MODULE,
            HELM_VERSION,
            "cmd/helm",
            Path(tmp) / "helm",
            env,
            version_var=f"{HELM_MODULE}/internal/version.version",
        )
        bin_dir.mkdir(exist_ok=True)
        for name in ("ct", "helm"):
            os.replace(Path(tmp) / name, bin_dir / name)
    (out / ".complete").write_text(f"{CT_MODULE}@{CT_VERSION}\n{HELM_MODULE}@{HELM_VERSION}\n")
    return bin_dir


def environment(bin_dir: Path, *, home: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    """The environment ct runs in: our ``ct`` and ``helm`` first on ``PATH``, then this Python's
    scripts (yamllint, yamale of the venv), Helm's state under ``home`` (no repositories or plugins of
    the user's), and ``KUBECONFIG`` when given."""
    env = dict(os.environ)
    scripts = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bin_dir), str(scripts), env.get("PATH", "")])
    for var, sub in (
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ):
        env[var] = str(home / sub)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def missing_commands(env: dict[str, str], names: Sequence[str]) -> list[str]:
    return [name for name in names if shutil.which(name, path=env["PATH"]) is None]


def run(
    args: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``ct ARGS`` with stdout and stderr in one text (ct interleaves its own lines with its tools')."""
    return subprocess.run(
        ["ct", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.ct", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find in the cache) ct and helm; print their directory")
    sub.add_parser("lint", help="ct lint --config helm/ct/ct.yaml from the repository root")
    args = parser.parse_args(argv)
    try:
        bin_dir = build()
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(bin_dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="openshell-ct-") as home:
        env = environment(bin_dir, home=Path(home))
        missing = missing_commands(env, ["git", "yamllint", "yamale"])
        if missing:
            print(
                f"error: ct lint needs {', '.join(missing)} on PATH (pip install -e '.[dev]')",
                file=sys.stderr,
            )
            return 1
        return subprocess.run(
            ["ct", "lint", "--config", str(CONFIG)], env=env, cwd=REPO, check=False
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
