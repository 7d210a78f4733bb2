"""A real OCI registry for tests: Debian's ``docker-registry`` (distribution 2.x) on 127.0.0.1 (or the
address given, e.g. where a local Kubernetes node pulls from).

``ensure_tools`` installs ``docker-registry``, ``skopeo`` and ``umoci`` with apt when they are
missing and we are root, and otherwise skips the test with the reason. ``running_registry`` starts
the registry with a throwaway config (storage under the given directory, a free port), waits until
``/v2/`` answers, and stops it (and its process group) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import free_port

TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "umoci": "umoci"}


def ensure_tools(*commands: str) -> None:
    """Make sure ``commands`` (default: all of TOOLS) are on PATH, or skip the test."""
    wanted = commands or tuple(TOOLS)
    missing = [c for c in wanted if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing)} missing and not root to apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = [TOOLS[c] for c in missing]
    done = subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            *packages,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    still = [c for c in wanted if shutil.which(c) is None]
    if still:
        pytest.skip(f"could not apt-get install {' '.join(packages)}: {done.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class Registry:
    host: str  # HOST:PORT, what skopeo's docker:// references take
    root: Path  # the storage directory
    log: Path
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"


def htpasswd_auth(directory: Path, user: str, password: str) -> str:
    """An ``auth:`` section (for ``running_registry(auth=...)``) admitting ``user`` with HTTP Basic:
    an htpasswd file in ``directory`` (bcrypt, the only scheme the registry reads)."""
    import bcrypt

    path = directory / "htpasswd"
    path.write_bytes(
        user.encode() + b":" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)) + b"\n"
    )
    return f"htpasswd:\n  realm: test\n  path: {path}\n"


def _answers(url: str) -> bool:
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=1, context=context) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for credentials
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    *,
    timeout: float = 30,
    address: str = "127.0.0.1",
    auth: str = "",
    tls: tuple[Path, Path] | None = None,
    storage: Path | None = None,
) -> Iterator[Registry]:
    ensure_tools("docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    root = storage or workdir / "storage"
    root.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "config.yml"
    text = textwrap.dedent(
        f"""\
        version: 0.1
        log:
          level: info
        storage:
          filesystem:
            rootdirectory: {root}
          delete:
            enabled: true
        http:
          addr: {address}:{port}
        """
    )
    if tls is not None:
        text += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    if auth:
        text += "auth:\n" + textwrap.indent(textwrap.dedent(auth), "  ")
    config.write_text(text)
    log = workdir / "registry.log"
    registry = Registry(host=f"{address}:{port}", root=root, log=log, tls=tls is not None)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _answers(registry.url):
                if proc.poll() is not None:
                    raise AssertionError(f"docker-registry exited with {proc.returncode}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"docker-registry did not answer /v2/ in {timeout:.0f}s:\n{log.read_text()}"
                    )
                time.sleep(0.1)
            yield registry
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
