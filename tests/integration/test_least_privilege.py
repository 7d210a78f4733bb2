"""Least privilege: a real supervisor as uid 65534 without any capability, on a read-only root.

DESIGN asks that the supervisor run as uid 65534 with no capabilities, on a read-only root
filesystem, with its journal in a configured writable directory (an emptyDir in a pod). Here a
real supervisor process is started by root through ``setpriv`` (uid and gid 65534, no
supplementary groups, empty inheritable, ambient and bounding sets, so nothing permitted or
effective either, and no_new_privs) against a real gateway, with its journal in a directory of
its own and its working directory ``/`` (not writable by it). Three views of it:

* **uid and capabilities**: the kernel's view of the running supervisor (``/proc/<pid>/status``)
  and of its main process (which prints its own status lines), the lines stored exactly once,
  a forwarded signal, the exit code passed through;
* **read-only root**: the same, in a private mount namespace (``unshare --mount``) whose root,
  and so ``/tmp``, is remounted read-only, with only the journal directory bind-mounted writable,
  as a pod's ``readOnlyRootFilesystem`` with an emptyDir; the namespace and its mounts vanish
  with the process, nothing on the host changes;
* **write audit**: under ``strace -f -y``, every open for writing, create, mkdir, rename, unlink
  or truncate made by the supervisor and its main process is under the journal directory (or a
  terminal, a pipe, ``/dev/null``): it never even tries to write elsewhere.

The interpreter must be one uid 65534 can reach. Where the test's own Python is not (a pyenv
install under a 0700 ``/root``), the system's ``python3.X`` of the same version runs the
supervisor and the main process instead, with this repository and the virtualenv's
``site-packages`` on ``PYTHONPATH``; a probe as uid 65534 decides, and the module skips when
neither works. (Started straight by ``setpriv`` the unreachable interpreter would even start,
since ``setpriv`` still holds its capabilities at ``execve``, but with the system's standard
library, and its own children could not start it at all.)

Bytecode caching is off in these runs (``PYTHONDONTWRITEBYTECODE=1``), as in an image with a
read-only root: otherwise the interpreter itself may try (and harmlessly fail) to write ``.pyc``
files next to sources that other work has just changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support.procs import PYTHON, REPO, GatewayProcess, wait_until

NOBODY = 65534
LINES = 50
EXIT_CODE = 7

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux credentials and /proc"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as uid 65534"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

DROP_PRIVILEGES = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
]

# The main process: LINES lines, then its own credentials and the mount options of / and of the
# journal directory as the kernel shows them, then "ready"; SIGUSR1 (sent to the supervisor and
# forwarded) makes it say "done" and exit with EXIT_CODE.
MAIN = textwrap.dedent(
    """
    import signal, sys, time
    n, journal = int(sys.argv[1]), sys.argv[2]
    for i in range(n):
        print(f"line {i}", flush=True)
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(("Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:")):
            print("main " + " ".join(line.split()), flush=True)
    for mount in open("/proc/self/mounts").read().splitlines():
        _dev, target, _fs, options = mount.split()[:4]
        if target in ("/", journal):
            print(f"mount {target} {options.split(',')[0]}", flush=True)
    def done(signum, frame):
        print("done", flush=True)
        sys.exit(int(sys.argv[3]))
    signal.signal(signal.SIGUSR1, done)
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
    """
)


@dataclass
class Sandbox:
    """A directory readable by everyone whose ``journal`` subdirectory belongs to uid 65534."""

    root: Path

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def log_path(self) -> Path:
        return self.root / "supervisor.log"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # pytest's tmp_path lives under a 0700 root directory that uid 65534 cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="openshell-least-privilege-", dir="/tmp"))
    try:
        root.chmod(0o755)
        box = Sandbox(root)
        box.journal.mkdir(mode=0o700)
        os.chown(box.journal, NOBODY, NOBODY)
        yield box
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _supervisor_argv(py: Interpreter, gw: GatewayProcess, sandbox_id: str, box: Sandbox) -> list[str]:
    return [
        *DROP_PRIVILEGES,
        py.python, "-m", "supervisor", "run",
        "--sandbox-id", sandbox_id,
        "--gateway", gw.address,
        "--journal-dir", str(box.journal),
        "--log-level", "debug",
        "--set", "capture.echo=false",
        "--set", "session.reconnect_initial_s=0.2",
        "--set", "session.exit_flush_timeout_s=20",
        "--",
        py.python, "-u", "-c", MAIN, str(LINES), str(box.journal), str(EXIT_CODE),
    ]  # fmt: skip


@dataclass(frozen=True)
class Interpreter:
    """A Python that uid 65534 can run, and the environment that finds this project with it."""

    python: str
    env: dict[str, str]


_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import supervisor.agent
    exe = os.path.realpath(sys.executable)
    print(json.dumps({
        "exe": exe,
        "executable": os.access(exe, os.X_OK),
        "own_stdlib": os.path.realpath(os.__file__).startswith(os.path.realpath(sys.base_prefix) + "/")
        and exe.startswith(os.path.realpath(sys.base_prefix) + "/"),
    }))
    """
)


def _probe(python: str, env: dict[str, str]) -> str | None:
    """Why ``python`` will not do as uid 65534 (with its own standard library), or None."""
    done = subprocess.run(
        [*DROP_PRIVILEGES, python, "-c", _PROBE], capture_output=True, text=True, env=env, cwd="/"
    )
    if done.returncode != 0:
        return f"{python} as uid {NOBODY}: {done.stderr.strip().splitlines()[-1:]}"
    found = json.loads(done.stdout)
    if not found["executable"]:
        return f"{found['exe']} is not executable by uid {NOBODY}"
    if not found["own_stdlib"]:
        return f"{found['exe']} cannot reach its own standard library as uid {NOBODY}"
    return None


def _readable_tree() -> Path | None:
    """Our packages and the venv's site-packages, hard-linked under a 0755 directory.

    The checkout (and the venv in it) may sit below a directory only root can enter (a CI
    clone in a 0700 temporary directory, say), where uid 65534 cannot read its own code; in a
    pod the supervisor comes from an image volume everyone can read. Hard links make this copy
    cost no data; None where they cannot be made (another filesystem).
    """
    tree = Path(tempfile.mkdtemp(prefix="openshell-lp-code-", dir="/tmp"))
    tree.chmod(0o755)
    site = sysconfig.get_paths()["purelib"]
    for src, dst in (
        (REPO / "supervisor", tree / "code" / "supervisor"),
        (REPO / "openshell_wire", tree / "code" / "openshell_wire"),
        (Path(site), tree / "site"),
    ):
        dst.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        done = subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(tree, ignore_errors=True)
            return None
    return tree


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Interpreter]:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    problem = _probe(PYTHON, env)
    if problem is None:
        yield Interpreter(PYTHON, env)
        return
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        pytest.skip(f"{problem}, and there is no system {version}")
    system_env = dict(env)
    system_env["PYTHONPATH"] = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    system_env["PYTHONNOUSERSITE"] = "1"
    fallback = _probe(system, system_env)
    if fallback is None:
        yield Interpreter(system, system_env)
        return
    tree = _readable_tree()
    if tree is None:
        pytest.skip(f"{problem}; {fallback}; and no readable copy of the code could be made")
    try:
        system_env["PYTHONPATH"] = os.pathsep.join([str(tree / "code"), str(tree / "site")])
        copied = _probe(system, system_env)
        if copied is not None:
            pytest.skip(f"{problem}; {fallback}; {copied}")
        yield Interpreter(system, system_env)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = " ".join(value.split())
    return fields


def _find_supervisor(root: psutil.Process) -> psutil.Process | None:
    """The ``python -m supervisor run`` process: ``root`` itself after its execs, or a descendant."""
    for proc in [root, *root.children(recursive=True)]:
        try:
            if proc.cmdline()[1:4] == ["-m", "supervisor", "run"]:
                return proc
        except psutil.Error:
            continue
    return None


@dataclass
class Run:
    exit_code: int
    supervisor_status: dict[str, str]
    lines: list[str]
    exit_record: dict[str, object]


def _run(py: Interpreter, gw: GatewayProcess, sandbox_id: str, box: Sandbox, argv: list[str]) -> Run:
    """Start ``argv`` (it execs or forks the supervisor), check it while it runs, stop it by USR1."""
    with box.log_path.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd="/", env=py.env)

    def log() -> str:
        return box.log_path.read_text(errors="replace")[-4000:]

    try:
        wait_until(
            lambda: proc.poll() is not None or "ready" in gw.log_lines(sandbox_id),
            timeout=60,
            what="the main process is up",
        )
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log()}"
        supervisor = _find_supervisor(psutil.Process(proc.pid))
        assert supervisor is not None, log()
        status = _status(supervisor.pid)
        supervisor.send_signal(signal.SIGUSR1)  # forwarded to the main process
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    exits = [e["data"] for e in gw.events(sandbox_id, "lifecycle") if e["data"]["kind"] == "exited"]
    assert len(exits) == 1, exits
    return Run(code, status, gw.log_lines(sandbox_id), exits[0])


def _check_unprivileged(run: Run, box: Sandbox) -> None:
    """uid/gid 65534, no groups, no capability at all, no_new_privs; every line once; exit 7."""
    s = run.supervisor_status
    assert s["Uid"] == s["Gid"] == f"{NOBODY} {NOBODY} {NOBODY} {NOBODY}", s
    assert s["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(s[cap], 16) == 0, (cap, s[cap])
    assert s["NoNewPrivs"] == "1"
    zero = "0" * 16
    main = [line for line in run.lines if line.startswith("main ")]
    assert main == [
        f"main Uid: {NOBODY} {NOBODY} {NOBODY} {NOBODY}",
        f"main Gid: {NOBODY} {NOBODY} {NOBODY} {NOBODY}",
        "main Groups:",
        f"main CapInh: {zero}",
        f"main CapPrm: {zero}",
        f"main CapEff: {zero}",
        f"main CapBnd: {zero}",
        f"main CapAmb: {zero}",
        "main NoNewPrivs: 1",
    ], main
    mounts = [line for line in run.lines if line.startswith("mount ")]
    assert run.lines == [f"line {i}" for i in range(LINES)] + main + mounts + ["ready", "done"]
    assert run.exit_code == EXIT_CODE
    assert run.exit_record["exit_code"] == EXIT_CODE
    # The journal is the supervisor's own: it created its files as 65534.
    owned = {p.name: p.stat().st_uid for p in box.journal.iterdir()}
    assert owned, "the journal directory is empty"
    assert set(owned.values()) == {NOBODY}, owned


def test_runs_as_uid_65534_without_capabilities(
    interpreter: Interpreter, gateway: GatewayProcess, sandbox: Sandbox
) -> None:
    gateway.start()
    argv = _supervisor_argv(interpreter, gateway, "nobody", sandbox)
    run = _run(interpreter, gateway, "nobody", sandbox, argv)
    _check_unprivileged(run, sandbox)


# -- a read-only root filesystem ---------------------------------------------------------------


def _mount_namespace_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-o", "remount,bind,ro", "/"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot remount / read-only in a private mount namespace: {probe.stderr.strip()}"
    return None


def test_runs_on_a_read_only_root_with_only_its_journal_writable(
    interpreter: Interpreter, gateway: GatewayProcess, sandbox: Sandbox
) -> None:
    problem = _mount_namespace_problem()
    if problem is not None:
        pytest.skip(problem)
    gateway.start()
    journal = str(sandbox.journal)
    # Inside a private mount namespace: the journal directory becomes a mount of its own (it
    # stays writable), then the root mount (and with it /tmp) is made read-only, then privileges
    # go and the supervisor starts. /proc, /sys and /dev keep their own mounts, as in a pod.
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro / && shift && exec "$@"'
    argv = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", script, "sh", journal, *_supervisor_argv(interpreter, gateway, "readonly", sandbox),
    ]  # fmt: skip
    run = _run(interpreter, gateway, "readonly", sandbox, argv)
    _check_unprivileged(run, sandbox)
    assert [line for line in run.lines if line.startswith("mount ")] == [
        "mount / ro",
        f"mount {journal} rw",
    ]


# -- the write audit ---------------------------------------------------------------------------

_WRITE_CALLS = (
    "open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,"
    "unlink,unlinkat,rmdir,truncate,mknod,mknodat"
)
# "pid name(args) = result", or "pid name(args <unfinished ...>" when another thread's call
# came in between (the arguments are all printed on entry; the "resumed" line adds only the result).
_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*?)(?:\)\s+=.*| <unfinished \.\.\.>)$")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_DIRFD = re.compile(r"^(?:AT_FDCWD|\d+)(?:<(?P<dir>[^>]*)>)?")
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def _written_paths(trace: str) -> list[tuple[str, str]]:
    """(call, absolute path) of every call in ``trace`` that writes, or tries to write, a path."""
    found: list[tuple[str, str]] = []
    for line in trace.splitlines():
        m = _CALL.match(line)
        if m is None:
            continue
        name, args = m["name"], m["args"]
        if name in ("open", "openat", "openat2") and not any(flag in args for flag in _WRITE_FLAGS):
            continue
        at = _DIRFD.match(args) if name.endswith("at") or name in ("openat2", "renameat2") else None
        base = at["dir"] if at is not None and at["dir"] else "/"  # the working directory is /
        for path in _STRING.findall(args):
            found.append((name, os.path.normpath(os.path.join(base, path))))
    return found


def test_writes_nothing_outside_its_journal_directory(
    interpreter: Interpreter, gateway: GatewayProcess, sandbox: Sandbox
) -> None:
    if shutil.which("strace") is None:
        pytest.skip("needs strace (apt install strace) for the write audit")
    gateway.start()
    trace = sandbox.root / "strace.out"  # written by strace, which stays root
    argv = [
        "strace", "-f", "-qq", "-y", "-s", "4096", "-e", f"trace={_WRITE_CALLS}", "-e", "signal=none",
        "-o", str(trace),
        *_supervisor_argv(interpreter, gateway, "audit", sandbox),
    ]  # fmt: skip
    run = _run(interpreter, gateway, "audit", sandbox, argv)
    _check_unprivileged(run, sandbox)
    writes = _written_paths(trace.read_text(errors="replace"))
    journal = str(sandbox.journal)
    assert any(path.startswith(journal + "/") for _call, path in writes), "the trace saw no journal write"
    elsewhere = [
        (call, path)
        for call, path in writes
        if path != journal
        and not path.startswith(journal + "/")
        and path not in ("/dev/null", "/dev/tty")
        and not path.startswith(("/dev/pts/", "pipe:", "socket:"))
    ]
    assert not elsewhere, f"writes outside {journal}: {elsewhere}"
