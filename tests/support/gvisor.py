"""gVisor for the local node (``tests/support/kubenode.py``): runsc and its containerd shim built from the
pins of ``tests/cluster/gvisor``, whether runsc runs a sandbox on this machine, and the containerd runtime
(handler ``runsc``) the node registers when asked to (``LocalCluster(..., gvisor=Runtime(...))``).

    python -m tests.support.gvisor build    # print the bin directory (cached)
    python -m tests.support.gvisor probe    # build, then `runsc do /bin/true`: "ok" or why not

Two shims are built. ``containerd-shim-runsc-v1`` is gVisor's, as released. It cannot start where root
lacks CAP_SYS_RESOURCE (these VMs drop it from every process's bounding set): its ``start`` lowers the
shim daemon's oom_score_adj to -999 and fails on the EACCES (pkg/shim/v1/manager.go, "failed to set OOM
Score on shim"), where containerd's own shims go on (``restrict_oom_score_adj``; its sys.SetOOMScore
ignores EACCES, but only for non-root or in a user namespace). ``containerd-shim-runsc-v1-no-oom-cap``
is the same source with that one statement tolerating EACCES (:data:`OOM_PATCH`) and nothing else;
:func:`default_shim` picks it only where CAP_SYS_RESOURCE is missing. (containerd's runc shim driving
runsc as its OCI runtime starts pods too, but never sees a container of a pod exit: runsc writes the
sandbox's pid, not the container's, into every ``--pid-file``; gVisor's shim asks ``runsc wait``.)

The binaries are cached like ``tests/cluster/build.sh``'s, under
``$OPENSHELL_CLUSTER_CACHE/<sha256 of the pins>/bin``; they are built here, not by build.sh, because
build.sh is part of the plane's and the node's cache keys: a gVisor target in it would make every
machine rebuild the whole cluster (about 25 minutes of CPU) for binaries most runs never start.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.kubecluster import BuildError
from tests.support.procs import REPO

PINS = REPO / "tests" / "cluster" / "gvisor"
MODULE = "gvisor.dev/gvisor"
RUNSC = "runsc"
SHIM = "containerd-shim-runsc-v1"  # the name containerd derives from runtime_type io.containerd.runsc.v1
SHIM_NO_OOM_CAP = "containerd-shim-runsc-v1-no-oom-cap"
SHIMS = {"runsc": SHIM, "runsc-no-oom-cap": SHIM_NO_OOM_CAP}
HANDLER = "runsc"  # the RuntimeClass handler: the chart's runtimeClasses.gvisor.handler default
RUNTIME_TYPE = "io.containerd.runsc.v1"
CAP_SYS_RESOURCE = 24
#: What uname(2) says inside a sandbox (pkg/sentry/kernel/version's defaultRelease): only the sentry does.
SENTRY_RELEASE = "4.19.0-gvisor"
BUILD_TIMEOUT = 900.0  # runsc alone takes about a minute of two cores with a warm module cache
PROBE_TIMEOUT = 60.0
#: (file in the module, statement, replacement): the shim's start goes on when the kernel refuses the
#: lower OOM score for want of CAP_SYS_RESOURCE, as containerd's shims do.
OOM_PATCH = (
    "pkg/shim/v1/manager.go",
    "\tif err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil {\n",
    "\tif err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil && !os.IsPermission(err) {\n",
)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openshell" / "cluster"
    return Path(os.environ.get("OPENSHELL_CLUSTER_CACHE", default))


def build(*, quiet: bool = True) -> Path:
    """runsc and both shims at the pinned gVisor version (a no-op when cached); returns their
    directory. Raises BuildError with a one-line reason (Go missing, a failed build, a patch that no
    longer applies)."""
    digest = hashlib.sha256(b"gvisor\n")
    for name in ("go.mod", "go.sum", "tools.go"):
        digest.update((PINS / name).read_bytes())
    digest.update("\0".join(OOM_PATCH).encode())
    out = cache_root() / digest.hexdigest()[:16]
    bin_dir = out / "bin"
    names = (RUNSC, SHIM, SHIM_NO_OOM_CAP)
    if (out / ".complete").exists() and all(os.access(bin_dir / b, os.X_OK) for b in names):
        return bin_dir
    go = shutil.which("go")
    if go is None:
        raise BuildError("Go is not installed (need go >= 1.26.3 on PATH to build runsc)")
    env = {
        **os.environ,
        # As build.sh: the pins are in go.sum, the local toolchain must do, static binaries.
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod",
        "GONOSUMDB": "*",
        "GOSUMDB": "off",
        "CGO_ENABLED": "0",
    }
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(dir=out, prefix=".build.") as tmp:
        work = Path(tmp)
        static = ["build", "-trimpath", "-ldflags", "-s -w"]
        _go(go, [*static, "-o", str(work / RUNSC), f"{MODULE}/runsc"], env, log)
        _go(go, [*static, "-o", str(work / SHIM), f"{MODULE}/shim"], env, log)
        modfile = _patched_module(go, work, env, log)
        _go(
            go,
            [*static, "-modfile", str(modfile), "-o", str(work / SHIM_NO_OOM_CAP), f"{MODULE}/shim"],
            env,
            log,
        )
        bin_dir.mkdir(exist_ok=True)
        for name in names:
            shutil.move(work / name, bin_dir / name)
    (out / ".complete").touch()
    if not quiet:
        print(f"built {', '.join(names)} into {bin_dir}", file=sys.stderr)
    return bin_dir


def _go(go: str, args: list[str], env: dict[str, str], log: Path) -> str:
    argv = [go, *args]
    with log.open("a") as sink:
        sink.write("$ " + " ".join(argv) + "\n")
    try:
        done = subprocess.run(argv, cwd=PINS, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"`go {' '.join(args[:1])}` took over {BUILD_TIMEOUT:.0f} s (log: {log})") from exc
    with log.open("a") as sink:
        sink.write(done.stderr)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:]
        raise BuildError(f"`go {' '.join(args)}` failed: {' '.join(tail)} (log: {log})")
    return done.stdout


def _patched_module(go: str, work: Path, env: dict[str, str], log: Path) -> Path:
    """A copy of the pinned gVisor module with :data:`OOM_PATCH` applied, and a go.mod (beside a copy
    of go.sum) that replaces the module by it; returns that go.mod. (``go build -overlay`` may not
    replace files of the module cache.)"""
    source = Path(_go(go, ["list", "-m", "-f", "{{.Dir}}", MODULE], env, log).strip())
    copy = work / "gvisor"
    shutil.copytree(source, copy)
    for path in copy.rglob("*"):  # the module cache's files are read-only
        path.chmod(path.stat().st_mode | 0o200)
    name, old, new = OOM_PATCH
    text = (copy / name).read_text()
    if text.count(old) != 1:
        raise BuildError(f"{MODULE}'s {name} no longer has the statement OOM_PATCH replaces (gvisor.py)")
    (copy / name).write_text(text.replace(old, new))
    modfile = work / "go.mod"
    modfile.write_text((PINS / "go.mod").read_text() + f"\nreplace {MODULE} => {copy}\n")
    shutil.copy(PINS / "go.sum", work / "go.sum")
    return modfile


def has_cap_sys_resource() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (the shims it starts inherit its capabilities)."""
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> CAP_SYS_RESOURCE & 1)


def default_shim() -> str:
    """gVisor's shim as released where root holds CAP_SYS_RESOURCE, as on a real node; else the one
    that tolerates the refused OOM score (see the module docstring)."""
    return "runsc" if has_cap_sys_resource() else "runsc-no-oom-cap"


def unavailable(bin_dir: Path) -> str | None:
    """Why runsc cannot run a sandbox here, in runsc's own words (the last line it printed), or None.
    The probe is ``runsc do /bin/true``: the sentry, the gofer, the chroot with its procfs, the platform
    (systrap, the default), everything the shim's ``runsc create`` needs too."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "runsc needs Linux and root here (the node's containerd runs it as root)"
    with tempfile.TemporaryDirectory(prefix="runsc-probe-") as state:
        argv = [str(bin_dir / RUNSC), "--root", state, "--network=none", "do", "/bin/true"]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(argv)}` did not finish within {PROBE_TIMEOUT:.0f} s"
        except OSError as exc:
            return f"cannot execute {argv[0]}: {exc.strerror}"
    if done.returncode == 0:
        return None
    last = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:]
    return f"`{' '.join(argv)}` exited {done.returncode}: {' '.join(last) or '(no output)'}"


@dataclass(frozen=True)
class Runtime:
    """runsc as the node's runtime handler ``runsc``, started by the shim ``shim`` (a key of SHIMS)."""

    bin_dir: Path
    shim: str = "runsc"

    def __post_init__(self) -> None:
        if self.shim not in SHIMS:
            raise ValueError(f"gvisor shim {self.shim!r}: expected one of {', '.join(SHIMS)}")

    @staticmethod
    def state_root(containerd_dir: Path) -> Path:
        """runsc's state (one directory per containerd namespace): in the node's work directory, not
        under /run/containerd, so that the clean-up reaches it from the host's mount namespace."""
        return containerd_dir / "runsc"

    def containerd_section(self, containerd_dir: Path) -> str:
        """The CRI runtime entry for containerd's config (version 3): the shim by path, its runsc.toml."""
        section = f"plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{HANDLER}"
        return (
            f"[{section}]\n"
            f'  runtime_type = "{RUNTIME_TYPE}"\n'
            f'  runtime_path = "{self.bin_dir / SHIMS[self.shim]}"\n'
            f"  [{section}.options]\n"
            '    TypeUrl = "io.containerd.runsc.v1.options"\n'
            f'    ConfigPath = "{containerd_dir / "runsc.toml"}"\n'
        )

    def write_files(self, containerd_dir: Path) -> None:
        """The shim's runsc.toml: which runsc, its state, and runsc's debug logs (a directory per
        container, a file per runsc command), where a failed sandbox says why."""
        (containerd_dir / "runsc.toml").write_text(
            f'binary_name = "{self.bin_dir / RUNSC}"\n'
            f'root = "{self.state_root(containerd_dir)}"\n'
            "[runsc_config]\n"
            f'  debug-log = "{containerd_dir / "runsc-logs"}/%ID%/"\n'
        )

    def containers(self, containerd_dir: Path) -> list[tuple[Path, str]]:
        """(state directory, id) of every container runsc holds for the node (a directory per
        containerd namespace)."""
        root = self.state_root(containerd_dir)
        found: list[tuple[Path, str]] = []
        for namespace in sorted(root.iterdir()) if root.is_dir() else []:
            if namespace.is_dir():
                listed = subprocess.run(
                    [str(self.bin_dir / RUNSC), "--root", str(namespace), "list", "--quiet"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                found += [(namespace, c) for c in listed.stdout.split()]
        return found

    def delete_containers(self, containerd_dir: Path) -> list[str]:
        """``runsc delete --force`` every container of the node (a sandbox's processes go with it);
        returns their ids (their cgroups are the caller's to remove)."""
        found = self.containers(containerd_dir)
        for namespace, container in found:
            subprocess.run(
                [str(self.bin_dir / RUNSC), "--root", str(namespace), "delete", "--force", container],
                capture_output=True,
                check=False,
            )
        return [container for _, container in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.gvisor",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("command", choices=["build", "probe"])
    args = parser.parse_args(argv)
    try:
        bin_dir = build(quiet=False)
    except BuildError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(bin_dir)
        return 0
    reason = unavailable(bin_dir)
    print(reason or f"ok: runsc runs sandboxes here; the node would use the shim {default_shim()!r}")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
