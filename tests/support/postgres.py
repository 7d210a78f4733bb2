"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary directory, ``pg_ctl start`` on a
free port, stopped and removed after.

PostgreSQL refuses to run as root, so under root the server's commands run as the ``postgres`` user (or
``nobody``) through ``runuser``. Authentication is ``trust``: 127.0.0.1 always, plus ``trust_cidrs`` (e.g.
the pod range of a local Kubernetes node, whose pods reach the server on ``listen``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import free_port


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (no server binaries, no user to run it as): a reason to skip."""


def pg_bindir() -> Path | None:
    candidates: list[Path] = []
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(Path(which).parent)
    # Debian keeps the server binaries out of PATH, one directory per major version; newest first.
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    #: Set by running_postgres, for stop() and start() (a database outage under a running gateway).
    control: tuple[Path, Path, str | None, str] | None = None  # (bindir, data dir, run as, options)

    def url(self, database: str, *, host: str | None = None) -> str:
        return f"postgresql+asyncpg://{self.user}@{host or self.host}:{self.port}/{database}"

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (fast: sessions ended, a clean shutdown; immediate: a crash)."""
        assert self.control is not None
        bindir, data, run_as, _ = self.control
        done = _run_as(run_as, [str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "stop"])
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        """Start it again, on the same port and data, after stop()."""
        assert self.control is not None
        bindir, data, run_as, options = self.control
        log = data.parent / "server.log"
        argv = [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        ]
        done = _run_as(run_as, argv)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}")


def _run_as(user: str | None, argv: list[str]) -> subprocess.CompletedProcess[str]:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresUnavailable("running as root and there is no postgres or nobody user to run PostgreSQL as")


@contextlib.contextmanager
def running_postgres(
    *, listen: str = "127.0.0.1", trust_cidrs: Sequence[str] = (), fsync: bool = False
) -> Iterator[PgServer]:
    """Raises PostgresUnavailable when it cannot run here, RuntimeError when it failed to start.

    ``fsync=True`` keeps PostgreSQL's durable default (benchmarks/ha_store.py compares stores as
    deployed); tests leave it off."""
    bindir = pg_bindir()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root without runuser: cannot start PostgreSQL as another user")
    run_as = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="openshell-pg-"))
    data = root / "data"
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    port = free_port()
    superuser = "openshell"
    init = _run_as(
        run_as,
        [str(bindir / "initdb"), "-D", str(data), "-U", superuser, "--auth=trust", "-E", "UTF8", "--no-sync"],
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    if trust_cidrs:
        with (data / "pg_hba.conf").open("a") as hba:
            for cidr in trust_cidrs:
                hba.write(f"host all all {cidr} trust\n")
    listen_addresses = ",".join(dict.fromkeys(["127.0.0.1", listen]))
    # fsync off unless asked: the cluster is thrown away, and the tests are not about durability.
    durability = "on" if fsync else "off"
    options = f"-c listen_addresses={listen_addresses} -p {port} -k {root} -c fsync={durability}"
    start = _run_as(
        run_as,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        ],
    )
    if start.returncode != 0:
        log = root / "server.log"
        server_log = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{server_log}")
    try:
        yield PgServer(host=listen, port=port, user=superuser, control=(bindir, data, run_as, options))
    finally:
        _run_as(run_as, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
