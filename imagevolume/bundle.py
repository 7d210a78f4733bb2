"""Build the self-contained supervisor: a directory that runs in any Linux image, with no Python,
no libc and nothing to unpack.

    python imagevolume/bundle.py [--out DIR] [--force]

The image volume is mounted read-only and executable, so the supervisor runs straight from it:

    OUT/tree/
      bin/openshell-supervisor   the launcher (static, from imagevolume/launcher.c): what a pod runs
      lib/ld.so                  the build machine's dynamic loader, under a name of its own
      lib/lib*.so*               every library the interpreter and the extension modules need (libc too)
      bin/python3                Debian's python3 (libpython is linked into it)
      lib/python3.11/            its standard library (what a supervisor never imports left out)
      site/                      the supervisor, openshell_wire and their dependencies (pip --target)
      openshell-supervisor.py    the entry: puts site/ on sys.path and calls supervisor.cli.main
      bundle.json                what was built from what

and the pod's command is ``/opt/openshell/bin/openshell-supervisor run ...``. The launcher moves
the image's ``LD_PRELOAD``/``LD_AUDIT`` aside (the supervisor gives them back to the sandbox's
programs) and executes ``/opt/openshell/lib/ld.so --library-path /opt/openshell/lib
/opt/openshell/bin/python3 -I -S /opt/openshell/openshell-supervisor.py run ...`` (see
:func:`direct`). Invoking the loader by path makes it load the carried libraries from ``lib/``
whatever the sandbox image holds, and the option is not inherited: the sandbox's own programs see
nothing of it (no ``LD_LIBRARY_PATH``). What the loader still takes from the image (its
``/etc/ld.so.preload``, NSS modules beyond files and dns) is in docs/image-volume.md. ``-I -S``
keep the interpreter away from the image's PYTHON* variables and site-packages. Every module is
compiled ahead (``unchecked-hash`` .pyc files: the volume is read-only, and a hash, unlike an
mtime, survives image layers).

This replaced a one-file PyInstaller build wrapped by staticx, which unpacked about 81 MB into
``$TMPDIR`` at every start (about 0.9 s before the first line), ran three processes deep and
leaked ``LD_LIBRARY_PATH`` into the sandbox's programs (docs/performance.md).

The output is keyed by a hash of the sources (``supervisor/``, ``openshell_wire/``,
``pyproject.toml``, this file) and of the interpreter: when nothing changed, a second call returns
at once. Builds run with ``PYTHONHASHSEED=0`` and ``SOURCE_DATE_EPOCH``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "bundle"  # build/ is git-ignored
SYSTEM_PYTHON = Path("/usr/bin/python3")
SOURCES = (
    "supervisor",
    "openshell_wire",
    "pyproject.toml",
    "imagevolume/bundle.py",
    "imagevolume/launcher.c",
)

# The tree's layout (gateway/drivers/podspec.py names the same paths; a unit test holds them equal).
LAUNCHER = "bin/openshell-supervisor"
LAUNCHER_SOURCE = REPO / "imagevolume" / "launcher.c"
LOADER = "lib/ld.so"
LIBRARY_DIR = "lib"
PYTHON = "bin/python3"
SITE = "site"
ENTRY = "openshell-supervisor.py"
ENTRY_TEXT = """\
# The supervisor's entry in the image volume (imagevolume/bundle.py): run by bin/python3 -I -S.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "site"))
from supervisor.cli import main  # noqa: E402

sys.exit(main())
"""
#: Where pod specs mount the tree; .pyc files name their sources under it.
MOUNT = "/opt/openshell"
#: The project's dependencies only the gateway uses (pyproject.toml lists one set for both).
GATEWAY_ONLY = frozenset(
    {
        "sqlalchemy",
        "alembic",
        "aiosqlite",
        "asyncpg",
        "lightkube",
        "lightkube-models",
        "pyjwt",
        "cryptography",
    }
)
#: Standard library parts a supervisor never imports (and extension modules that would pull in
#: ncurses, readline, Berkeley DB, Kerberos, SQLite...).
STDLIB_LEFT_OUT = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "unittest", "venv", "config-*", "site-packages", "dist-packages",
)  # fmt: skip
DYNLOAD_LEFT_OUT = re.compile(r"^(_curses|_curses_panel|readline|_dbm|_gdbm|nis|_sqlite3|_crypt|_tkinter)\.")
APT_PACKAGES = ("python3-venv", "gcc", "libc6-dev")


class BundleError(RuntimeError):
    """The bundle cannot be built here (the message says why and what to install)."""


def launcher(root: str = MOUNT) -> list[str]:
    """The argv prefix that runs the supervisor from a tree at ``root`` (gateway/drivers/podspec.py
    has the same): the static launcher, which executes :func:`direct`'s command."""
    return [f"{root}/{LAUNCHER}"]


def direct(root: str = MOUNT) -> list[str]:
    """What the launcher executes for a tree at ``root`` (not at /), without the environment it
    also sets aside (imagevolume/launcher.c)."""
    return [
        f"{root}/{LOADER}",
        "--library-path",
        f"{root}/{LIBRARY_DIR}",
        f"{root}/{PYTHON}",
        "-I",
        "-S",
        f"{root}/{ENTRY}",
    ]


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


def _interpreter() -> Path:
    return SYSTEM_PYTHON.resolve()


def _python_version() -> str:
    """The interpreter's major.minor (3.11): where its standard library lives."""
    return subprocess.run(
        [str(_interpreter()), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def source_hash() -> str:
    """sha256 over the relative paths and bytes of every input, and the interpreter's bytes."""
    h = hashlib.sha256()
    for path in [*_source_files(), _interpreter()]:
        name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def host_inputs_hash(libraries: dict[str, str]) -> str:
    """sha256 over what the tree copies from this machine besides the interpreter: the standard
    library (paths, sizes, mtimes: a package upgrade changes them) and the libraries carried
    (``name -> path here``, bytes), so that an apt upgrade of libssl or libc rebuilds the tree."""
    h = hashlib.sha256()
    stdlib = Path(f"/usr/lib/python{_python_version()}")
    for path in sorted(stdlib.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for name, where in sorted(libraries.items()):
        h.update(f"{name}\0".encode())
        try:
            h.update(hashlib.sha256(Path(where).read_bytes()).digest())
        except OSError:
            h.update(b"missing")
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
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    missing = [] if probe.returncode == 0 else ["python3-venv"]
    if shutil.which("gcc") is None:
        missing.append("gcc")
    if not any(Path("/usr/lib").glob("*-linux-gnu*/libc.a")):
        missing.append("libc6-dev")  # the static libc the launcher links
    return missing


def check_prerequisites(*, install: bool = True) -> None:
    """Debian's python3 with venv (for pip), gcc and a static libc (for the launcher); apt-installs
    what is missing as root."""
    if not SYSTEM_PYTHON.exists() or _is_pyenv(SYSTEM_PYTHON):
        raise BundleError(
            f"{SYSTEM_PYTHON} is missing or not the distribution's Python: the bundle carries Debian's "
            "python3 and the libraries it links (pyenv's interpreter links to a tree of its own)"
        )
    if shutil.which("ldd") is None:
        raise BundleError("ldd (libc-bin) is missing: it lists the libraries to carry")
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


def _run(argv: list[str], *, env: dict[str, str], cwd: Path | None = None) -> str:
    _log("$ " + " ".join(argv))
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundleError(
            f"{argv[0]} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


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
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        TMPDIR=str(work / "tmp"),
    )
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def _pip(work: Path, env: dict[str, str]) -> list[str]:
    """pip of a venv of Debian's python3 (whose own pip, if any, refuses to install: PEP 668)."""
    venv = work / "venv"
    if not (venv / "bin" / "python").exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], env=env)
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]


def supervisor_requirements() -> list[str]:
    """pyproject.toml's dependencies without the gateway's own."""
    with (REPO / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() not in GATEWAY_ONLY]


def _install_site(work: Path, tree: Path, env: dict[str, str]) -> None:
    site = tree / SITE
    pip = _pip(work, env)
    # Wheels only: the build stage has no compiler, and an sdist build would fail obscurely.
    _run([*pip, "--only-binary=:all:", "--target", str(site), *supervisor_requirements()], env=env)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for name in ("supervisor", "openshell_wire"):
        shutil.copytree(REPO / name, site / name, ignore=ignore)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts of dependencies: not run here


def _copy_python(tree: Path) -> str:
    """bin/python3 and the standard library; returns the version (3.11)."""
    python = _interpreter()
    version = _python_version()
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(python, tree / PYTHON)
    stdlib = Path(f"/usr/lib/python{version}")
    target = tree / LIBRARY_DIR / f"python{version}"
    left_out = shutil.ignore_patterns("__pycache__", *STDLIB_LEFT_OUT)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(left_out(directory, names))
        if Path(directory).name == "lib-dynload":
            skipped |= {n for n in names if DYNLOAD_LEFT_OUT.match(n)}
        return skipped

    shutil.copytree(stdlib, target, ignore=ignore, symlinks=False)
    return version


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)$")


def _elf_files(tree: Path) -> list[Path]:
    found = []
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


#: Libraries glibc itself dlopens at run time, which no ELF file names: libgcc_s for unwinding
#: (pthread_exit, pthread_cancel: daemon threads at interpreter shutdown).
ALWAYS_CARRIED = ("libgcc_s.so.1",)


def _copy_libraries(tree: Path) -> dict[str, str]:
    """Every shared library the tree's ELF files load, and the loader; returns name -> source."""
    lib = tree / LIBRARY_DIR
    carried: dict[str, Path] = {}
    loader: Path | None = None
    for elf in _elf_files(tree):
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            m = _LDD_LINE.match(line)
            if m is None:
                continue
            name, path = m.group(1), Path(m.group(2))
            if name is None:  # the loader's own line
                loader = path
            elif not path.is_relative_to(tree):
                carried.setdefault(name, path)
    if loader is None:
        raise BundleError("ldd named no dynamic loader for the interpreter")
    for name in ALWAYS_CARRIED:
        if name not in carried:
            found = sorted(Path("/").glob(f"lib/*-linux-gnu*/{name}")) or sorted(
                Path("/").glob(f"usr/lib/*-linux-gnu*/{name}")
            )
            if not found:
                raise BundleError(f"{name} (dlopened by glibc) not found on this machine")
            carried[name] = found[0]
    for name, path in sorted(carried.items()):
        shutil.copyfile(path, lib / name)  # the file itself, under the name the loader asks for
    shutil.copyfile(loader, tree / LOADER)
    os.chmod(tree / LOADER, 0o755)
    return {name: str(path) for name, path in sorted(carried.items())} | {"ld.so": str(loader)}


def _build_launcher(tree: Path, env: dict[str, str]) -> None:
    """The static launcher (no build id: the same bytes from the same compiler and libc)."""
    _run(
        [
            "gcc",
            "-Os",
            "-static",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
            "-s",
            "-o",
            str(tree / LAUNCHER),
            str(LAUNCHER_SOURCE),
        ],
        env=env,
    )


def _compile(tree: Path, env: dict[str, str]) -> None:
    """.pyc files for every module, naming sources as they will be mounted (MOUNT/...)."""
    _run(
        [
            str(_interpreter()),
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(tree),
            "-p",
            MOUNT,
            # Not the entry script: run as __main__, it is never loaded from a .pyc.
            str(tree / LIBRARY_DIR),
            str(tree / SITE),
        ],
        env=env,
    )


def _normalise(tree: Path, epoch: int) -> None:
    """Read-only for everyone, executable where it was, one mtime: the same bytes from every build."""
    for path in [tree, *sorted(tree.rglob("*"))]:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            os.chmod(path, 0o755)
        else:
            os.chmod(path, 0o555 if mode & 0o111 else 0o444)
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def tree_digest(tree: Path) -> str:
    """sha256 over every path, mode and content of the tree (what the image layer will hold)."""
    h = hashlib.sha256()
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        mode = stat.S_IMODE(path.lstat().st_mode)
        h.update(f"{rel}\0{mode:o}\0".encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


#: Run by the tree's interpreter: import what the supervisor runs with, then list the shared
#: objects mapped. On this machine a library missing from lib/ would be found in /lib silently.
_MAPS_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import asyncio, ssl, uuid, lzma, bz2, zlib, ctypes, hashlib, json
import grpc, grpc.aio, google.protobuf, pydantic, pydantic_settings, yaml, psutil, aiohttp
import prometheus_client, opentelemetry.sdk, tenacity
import supervisor.agent, supervisor.cli, supervisor.http, supervisor.metrics, supervisor.telemetry
with open("/proc/self/maps") as maps:
    print("\\n".join(sorted({l.split()[-1] for l in maps if ".so" in l.split()[-1]})))
"""


def _smoke(tree: Path) -> None:
    probe = subprocess.run(
        [*direct(str(tree))[:-1], "-c", _MAPS_PROBE, str(tree / SITE)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    if probe.returncode != 0:
        raise BundleError(
            f"the tree cannot import the supervisor ({probe.returncode}): {probe.stderr[-4000:]}"
        )
    outside = [p for p in probe.stdout.split() if not Path(p).resolve().is_relative_to(tree.resolve())]
    if outside:
        raise BundleError(f"the tree loads shared objects from this machine, not from lib/: {outside}")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [*launcher(str(tree)), "config", "schema"],
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


def build_bundle(out_dir: Path, *, force: bool = False) -> Path:
    """Build (or reuse) the supervisor tree under ``out_dir``; return the tree's path."""
    out_dir = Path(out_dir).resolve()
    tree = out_dir / "tree"
    manifest = out_dir / "bundle.json"
    check_prerequisites()
    key = source_hash()
    if not force and tree.is_dir() and manifest.exists():
        try:
            meta = json.loads(manifest.read_text())
        except ValueError:
            meta = {}
        if (
            meta.get("source_hash") == key
            and meta.get("host_inputs_hash") == host_inputs_hash(meta.get("libraries") or {})
            and meta.get("tree_sha256") == tree_digest(tree)
        ):
            _log(f"up to date: {tree}")
            return tree
    work = out_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    env = _build_env(work)
    epoch = int(env["SOURCE_DATE_EPOCH"])
    staging = out_dir / ".tree.tmp"
    if staging.exists():
        _make_writable(staging)
        shutil.rmtree(staging)
    version = _copy_python(staging)
    _install_site(work, staging, env)
    (staging / ENTRY).write_text(ENTRY_TEXT)
    libraries = _copy_libraries(staging)
    _build_launcher(staging, env)
    _compile(staging, env)
    meta = {
        "source_hash": key,
        "host_inputs_hash": host_inputs_hash(libraries),
        "python": version,
        "interpreter": str(_interpreter()),
        "libraries": libraries,
        "requirements": supervisor_requirements(),
        "source_date_epoch": epoch,
    }
    (staging / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    _normalise(staging, epoch)
    _smoke(staging)
    if tree.exists():
        _make_writable(tree)
        shutil.rmtree(tree)
    os.replace(staging, tree)
    meta["tree_sha256"] = tree_digest(tree)
    meta["size"] = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    manifest.write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"built {tree} ({meta['size']} bytes, tree sha256 {meta['tree_sha256']})")
    return tree


def _make_writable(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the sources did not change")
    args = parser.parse_args(argv)
    try:
        tree = build_bundle(args.out, force=args.force)
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    print(tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
