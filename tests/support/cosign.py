"""cosign for the tests: the binary (built once from the Go module proxy when it is not on PATH) and a
key pair, for key-based signing and verification against a local registry with no transparency log."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

VERSION = "v2.6.5"
MODULE = "github.com/sigstore/cosign/v2/cmd/cosign"
TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openshell" / "tools" / VERSION
PASSWORD = "openshell-test"


class CosignError(RuntimeError):
    pass


def binary() -> str | None:
    """cosign: on PATH, in the cache, or built into the cache with ``go install`` (a few minutes once)."""
    found = shutil.which("cosign")
    if found:
        return found
    cached = TOOLS / "cosign"
    if cached.exists():
        return str(cached)
    if shutil.which("go") is None:
        return None
    done = subprocess.run(
        ["go", "install", f"{MODULE}@{VERSION}"],
        env={**os.environ, "GOBIN": str(TOOLS)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return str(cached) if done.returncode == 0 and cached.exists() else None


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, "COSIGN_PASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def key_pair(cosign: str, directory: Path) -> tuple[Path, Path]:
    """A new cosign key pair in ``directory``: (private key, public key)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = _run(
        [cosign, "generate-key-pair", "--output-key-prefix", str(directory / "cosign")], cwd=directory
    )
    if done.returncode != 0:
        raise CosignError(f"cosign generate-key-pair failed: {done.stderr.strip()[-1000:]}")
    return directory / "cosign.key", directory / "cosign.pub"


def verify(cosign: str, reference: str, public_key: Path) -> subprocess.CompletedProcess[str]:
    """``cosign verify`` of ``reference`` against ``public_key`` (no transparency log: key-based)."""
    return _run(
        [
            cosign,
            "verify",
            "--key",
            str(public_key),
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            reference,
        ]
    )


def environment() -> dict[str, str]:
    """What a process that signs with :func:`key_pair`'s key needs in its environment."""
    return {**os.environ, "COSIGN_PASSWORD": PASSWORD}


def go_tool(module: str, version: str, name: str) -> str | None:
    """A Go tool (``name``) on PATH, or built once into ``~/.cache/openshell/tools`` from the module proxy."""
    found = shutil.which(name)
    if found:
        return found
    where = TOOLS.parent / f"{name}-{version}"
    if not (where / name).exists():
        if shutil.which("go") is None:
            return None
        subprocess.run(
            ["go", "install", f"{module}@{version}"],
            env={**os.environ, "GOBIN": str(where)},
            capture_output=True,
            timeout=1800,
            check=False,
        )
    return str(where / name) if (where / name).exists() else None
