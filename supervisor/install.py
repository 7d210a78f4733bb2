"""``openshell-supervisor install DIR``: copy the supervisor's tree into ``DIR``.

For clusters without image volumes, an init container from the supervisor's image copies the
tree (``imagevolume/bundle.py``: the loader, the libraries, the interpreter, the packages) into an
emptyDir that the sandbox container then mounts where the image volume would be. The image is
``FROM scratch`` (no shell, no ``cp``), so the supervisor copies itself. Only a bundle can: from
a Python install the command says so and fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: What the tree holds at its top (imagevolume/bundle.py's layout); nothing else is copied, since
#: in the init container the tree is the image's root, next to /proc, /dev and the target itself.
TREE_ENTRIES = ("bin", "lib", "site", "openshell-supervisor.py", "bundle.json")
ENTRY = "openshell-supervisor.py"


class InstallError(Exception):
    pass


def bundle_root() -> Path | None:
    """The tree this process runs from (``ROOT/site/supervisor/install.py``), or None."""
    root = Path(__file__).resolve().parents[2]
    if (root / ENTRY).is_file() and (root / "lib" / "ld.so").is_file():
        return root
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def install(target_dir: Path) -> Path:
    """Copy the tree into ``target_dir`` (first into a hidden directory there, then each entry
    moved into place); return the entry script's path there."""
    source = bundle_root()
    if source is None:
        raise InstallError("not running from a bundle: install copies the supervisor's self-contained tree")
    if not target_dir.is_dir():
        raise InstallError(f"{target_dir} is not a directory")
    staging = target_dir / ".openshell-install.tmp"
    try:
        # A pod sandbox recreated on the node keeps its emptyDir and runs the installer again:
        # the earlier copy goes first (nothing runs from it during init), so the volume never
        # holds two trees against its size limit.
        for name in (*TREE_ENTRIES, staging.name):
            _remove(target_dir / name)
        staging.mkdir()
        for name in TREE_ENTRIES:
            path = source / name
            if path.is_dir():
                shutil.copytree(path, staging / name, symlinks=True)
            elif path.exists():
                shutil.copy2(path, staging / name)
        for name in TREE_ENTRIES:
            if (staging / name).exists():
                os.replace(staging / name, target_dir / name)
        staging.rmdir()
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InstallError(f"cannot copy {source} to {target_dir}: {exc.strerror or exc}") from None
    return target_dir / ENTRY
