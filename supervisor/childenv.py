"""The main process's environment: the container's own, without what the supervisor's bundle added.

The bundle (``imagevolume/bundle.py``: PyInstaller one-file inside staticx) runs the supervisor
with its unpacked libraries first on ``LD_LIBRARY_PATH`` and its bookkeeping in ``_PYI_*`` and
``STATICX_*`` variables. Inherited, they would make the sandbox's programs load our libssl,
libstdc++, libz... instead of their image's (a symbol-version mismatch crashes them), and would
confuse a main process that is itself a PyInstaller application. PyInstaller keeps the value it
replaced in ``LD_LIBRARY_PATH_ORIG`` (only when there was one), so it is put back, or the variable
removed. An unbundled supervisor (``python -m supervisor``) passes its environment on unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

BUNDLE_PREFIXES = ("_PYI_", "_MEI", "STATICX_")
LIBRARY_PATH = "LD_LIBRARY_PATH"
LIBRARY_PATH_ORIG = "LD_LIBRARY_PATH_ORIG"


def running_bundled() -> bool:
    return bool(getattr(sys, "frozen", False))


def main_process_env(environ: Mapping[str, str], *, bundled: bool) -> dict[str, str]:
    """``environ`` as the container gave it, before the bundle's bootloaders changed it."""
    env = dict(environ)
    if not bundled:
        return env
    for name in list(env):
        if name.startswith(BUNDLE_PREFIXES):
            del env[name]
    original = env.pop(LIBRARY_PATH_ORIG, None)
    if original is not None:
        env[LIBRARY_PATH] = original
    else:
        env.pop(LIBRARY_PATH, None)
    return env


def current_main_process_env() -> dict[str, str] | None:
    """What the main process gets here: None (inherit as is) unless bundled."""
    return main_process_env(os.environ, bundled=True) if running_bundled() else None
