"""Build the self-contained supervisor: one static executable that needs no Python in the sandbox image.

    python imagevolume/bundle.py [--out DIR] [--force]

Steps: a venv from Debian's ``/usr/bin/python3`` (not pyenv's: staticx refuses an interpreter with
a RUNPATH), the project installed into it (non-editable, from a copy of the sources so the repo
tree stays clean) with pinned PyInstaller and staticx, ``pyinstaller --onefile`` on a two-line
entry script that calls ``supervisor.cli.main``, then ``staticx`` so that even libc travels inside.

The result is ``OUT/openshell-supervisor`` with ``OUT/bundle.json`` beside it (source hash, sha256,
size, tool versions). The output is keyed by a hash of the sources (``supervisor/``,
``openshell_wire/``, ``pyproject.toml``, this file): when nothing changed, a second call returns at
once. Builds run with ``PYTHONHASHSEED=0`` and ``SOURCE_DATE_EPOCH`` = the last commit's time, in a
fixed work directory under OUT, so that two clean builds of the same sources give the same bytes
(see docs/performance.md, "Supervisor bundle", for what is and is not identical).

At run time the executable unpacks itself twice into ``$TMPDIR`` (staticx's libraries, then
PyInstaller's archive), so the pod needs a writable ``emptyDir`` there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "bundle"  # build/ is git-ignored
BUNDLE_NAME = "openshell-supervisor"
SYSTEM_PYTHON = Path("/usr/bin/python3")
# Pinned so that a given source hash always means the same tool chain (and the same bytes).
PYINSTALLER = "pyinstaller==6.22.3"
PYINSTALLER_HOOKS = "pyinstaller-hooks-contrib==2026.9"
STATICX = "staticx==0.14.2"
APT_PACKAGES = ("python3-venv", "patchelf", "binutils")
SOURCES = ("supervisor", "openshell_wire", "pyproject.toml", "README.md", "imagevolume/bundle.py")
ENTRY = "from supervisor.cli import main\n\nraise SystemExit(main())\n"
# staticx's archive is a tar of the patched libraries, stamped with the time it copied them: the
# only thing that differed between two clean builds. Run it with every tar entry normalised.
STATICX_WRAPPER = """\
import os, sys, tarfile
from staticx.__main__ import main

_epoch = int(os.environ["SOURCE_DATE_EPOCH"])
_addfile = tarfile.TarFile.addfile


def addfile(self, tarinfo, fileobj=None):
    tarinfo.mtime = _epoch
    tarinfo.uid = tarinfo.gid = 0
    tarinfo.uname = tarinfo.gname = ""
    return _addfile(self, tarinfo, fileobj)


tarfile.TarFile.addfile = addfile
sys.argv[0] = "staticx"
sys.exit(main())
"""


class BundleError(RuntimeError):
    """The bundle cannot be built here (the message says why and what to install)."""


def _log(msg: str) -> None:
    print(f"bundle: {msg}", file=sys.stderr, flush=True)


def _source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
            )
    return files


def source_hash() -> str:
    """sha256 over the relative paths and bytes of every input, plus the tool pins."""
    h = hashlib.sha256()
    h.update(f"{PYINSTALLER} {PYINSTALLER_HOOKS} {STATICX}\0".encode())
    for path in _source_files():
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def source_date_epoch() -> str:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return out or "0"


def _is_pyenv(python: Path) -> bool:
    return ".pyenv" in python.resolve().parts


def _missing_prereqs() -> list[str]:
    missing = []
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        missing.append("python3-venv")
    if shutil.which("patchelf") is None:
        missing.append("patchelf")
    if shutil.which("objdump") is None:
        missing.append("binutils")
    return missing


def check_prerequisites(*, install: bool = True) -> None:
    """Debian's python3 with venv, patchelf and objdump (binutils); apt-installs them as root."""
    if not SYSTEM_PYTHON.exists() or _is_pyenv(SYSTEM_PYTHON):
        raise BundleError(
            f"{SYSTEM_PYTHON} is missing or not the distribution's Python: the bundle must be built from "
            "Debian's python3 (staticx refuses pyenv's interpreter because of its RUNPATH)"
        )
    missing = _missing_prereqs()
    if not missing:
        return
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BundleError(
            f"missing {', '.join(missing)}: run `apt-get install -y {' '.join(APT_PACKAGES)}` as root "
            "(this script installs them itself only when it runs as root on a Debian system)"
        )
    _log(f"apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=True)
    still = _missing_prereqs()
    if still:
        raise BundleError(f"still missing after apt-get: {', '.join(still)}")


def _run(argv: list[str], *, env: dict[str, str], cwd: Path | None = None) -> None:
    _log("$ " + " ".join(argv))
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundleError(
            f"{argv[0]} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def _build_env(work: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION", "PYTHONSTARTUP")
    }
    env.update(
        PYTHONHASHSEED="0",
        SOURCE_DATE_EPOCH=source_date_epoch(),
        TZ="UTC",
        LC_ALL="C.UTF-8",
        PYTHONDONTWRITEBYTECODE="1",
        TMPDIR=str(work / "tmp"),
    )
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def _venv(work: Path, env: dict[str, str]) -> Path:
    """A venv from Debian's python3 with the build tools; reused while the tool pins stay the same."""
    venv = work / "venv"
    stamp = venv / ".openshell-tools"
    tools = f"{PYINSTALLER} {PYINSTALLER_HOOKS} {STATICX}"
    if stamp.exists() and stamp.read_text() == tools:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, PYINSTALLER, PYINSTALLER_HOOKS, STATICX], env=env)
    stamp.write_text(tools)
    return venv


def _install_project(work: Path, venv: Path, env: dict[str, str]) -> None:
    """Install the project non-editably from a copy of its sources (pip builds in-tree otherwise)."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for name in ("supervisor", "openshell_wire"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--quiet", str(src)], env=env)
    # The same version number would otherwise count as "already satisfied" after a source change.
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(src)], env=env)


def _pyinstaller(work: Path, venv: Path, env: dict[str, str]) -> Path:
    entry = work / "entry" / "openshell_supervisor_main.py"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(ENTRY)
    for d in ("pyi-dist", "pyi-work"):
        shutil.rmtree(work / d, ignore_errors=True)
    _run(
        [
            str(venv / "bin" / "pyinstaller"),
            "--onefile",
            "--noconfirm",
            "--clean",
            "--log-level=WARN",
            f"--name={BUNDLE_NAME}",
            # cli imports supervisor.agent lazily; take every module of both packages regardless.
            "--collect-submodules=supervisor",
            "--collect-submodules=openshell_wire",
            # grpc's roots.pem and the health-checking package come from the contrib hooks;
            # pydantic's from PyInstaller's own. Exclude what a sandbox supervisor never needs.
            "--exclude-module=tkinter",
            "--exclude-module=gateway",
            "--exclude-module=sqlalchemy",
            "--exclude-module=alembic",
            "--exclude-module=asyncpg",
            "--exclude-module=aiosqlite",
            f"--distpath={work / 'pyi-dist'}",
            f"--workpath={work / 'pyi-work'}",
            f"--specpath={work / 'entry'}",
            str(entry),
        ],
        env=env,
        cwd=work,
    )
    return work / "pyi-dist" / BUNDLE_NAME


def _staticx(work: Path, venv: Path, env: dict[str, str], program: Path) -> Path:
    out = work / f"{BUNDLE_NAME}.static"
    out.unlink(missing_ok=True)
    wrapper = work / "entry" / "staticx_reproducible.py"
    wrapper.write_text(STATICX_WRAPPER)
    _run([str(venv / "bin" / "python"), str(wrapper), "--strip", str(program), str(out)], env=env, cwd=work)
    return out


def _smoke(exe: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [str(exe), "config", "schema"],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "TMPDIR": tmp},
            check=False,
        )
    if result.returncode != 0:
        raise BundleError(f"the bundle failed `config schema` ({result.returncode}): {result.stderr[-4000:]}")
    schema = json.loads(result.stdout)
    if "properties" not in schema:
        raise BundleError("the bundle's `config schema` printed no schema")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_bundle(out_dir: Path, *, force: bool = False) -> Path:
    """Build (or reuse) the static supervisor under ``out_dir``; return the executable's path."""
    out_dir = Path(out_dir).resolve()
    exe = out_dir / BUNDLE_NAME
    manifest = out_dir / "bundle.json"
    key = source_hash()
    if not force and exe.exists() and manifest.exists():
        try:
            meta = json.loads(manifest.read_text())
        except ValueError:
            meta = {}
        if meta.get("source_hash") == key and meta.get("sha256") == _sha256(exe):
            print(f"bundle: up to date: {exe}", file=sys.stderr, flush=True)
            return exe
    check_prerequisites()
    work = out_dir / ".work"  # a fixed path: PyInstaller and staticx may record build paths
    work.mkdir(parents=True, exist_ok=True)
    env = _build_env(work)
    venv = _venv(work, env)
    _install_project(work, venv, env)
    onefile = _pyinstaller(work, venv, env)
    static = _staticx(work, venv, env, onefile)
    _smoke(static)
    tmp = out_dir / f".{BUNDLE_NAME}.tmp"
    shutil.copyfile(static, tmp)
    os.chmod(tmp, 0o755)  # staticx writes 0700; the sandbox runs it as another uid
    epoch = int(env["SOURCE_DATE_EPOCH"])
    os.utime(tmp, (epoch, epoch))
    os.replace(tmp, exe)
    meta = {
        "source_hash": key,
        "sha256": _sha256(exe),
        "size": exe.stat().st_size,
        "source_date_epoch": epoch,
        "python": subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "tools": [PYINSTALLER, PYINSTALLER_HOOKS, STATICX],
    }
    manifest.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"bundle: built {exe} ({meta['size']} bytes, sha256 {meta['sha256']})", file=sys.stderr, flush=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the sources did not change")
    args = parser.parse_args(argv)
    try:
        exe = build_bundle(args.out, force=args.force)
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    print(exe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
