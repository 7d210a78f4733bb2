"""``openshell-supervisor install DIR``: copy the running bundle into ``DIR``.

For clusters without image volumes, an init container from the supervisor's image copies the
bundle into an emptyDir that the sandbox container then mounts. The image is ``FROM scratch``
(no shell, no ``cp``), so the bundle copies itself. Only a bundle can: from a Python install the
command says so and fails.

Inside the bundle the running file is not the bundle itself: staticx unpacks the program into a
temporary directory and tells it where the original is (``STATICX_PROG_PATH``); a plain
PyInstaller one-file build is ``sys.executable``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

BUNDLE_NAME = "openshell-supervisor"


class InstallError(Exception):
    pass


def bundle_path() -> Path | None:
    """The bundle this process runs from, or None when it is not a bundle."""
    staticx = os.environ.get("STATICX_PROG_PATH")
    if staticx:
        return Path(staticx)
    if getattr(sys, "frozen", False):
        return Path(sys.executable)
    return None


def install(target_dir: Path) -> Path:
    """Copy the bundle to ``target_dir/openshell-supervisor`` (atomically, mode 0555)."""
    source = bundle_path()
    if source is None:
        raise InstallError("not running from a bundle: install copies the self-contained executable")
    if not target_dir.is_dir():
        raise InstallError(f"{target_dir} is not a directory")
    target = target_dir / BUNDLE_NAME
    tmp = target_dir / f".{BUNDLE_NAME}.tmp"
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o555)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot copy {source} to {target}: {exc.strerror or exc}") from None
    return target
