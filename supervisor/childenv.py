"""The main process's environment: the container's, as the runtime gave it.

Python's start-up can add ``LC_CTYPE`` to its own environment, also under ``-I`` (PEP 538 locale
coercion: when the locale is C or POSIX and a C.UTF-8 locale exists, as in Debian and Ubuntu
images), and the sandbox's programs would then inherit a locale their image did not choose. The
kernel keeps the environment the process started with in ``/proc/self/environ`` (later changes
live elsewhere), so what the interpreter added is told apart and left out. The image volume's
launcher moved the image's ``LD_PRELOAD``/``LD_AUDIT`` aside for the supervisor's own loader; they
are given back. Everything else the supervisor passes on as it is.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

#: What the interpreter's start-up may add to the environment.
ADDED_AT_START = ("LC_CTYPE",)
#: What the image volume's launcher (imagevolume/launcher.c) set aside so that the supervisor's own
#: loader would not preload the image's libraries: given back to the sandbox's programs.
SET_ASIDE = {"OPENSHELL_SANDBOX_LD_PRELOAD": "LD_PRELOAD", "OPENSHELL_SANDBOX_LD_AUDIT": "LD_AUDIT"}


def main_process_env(environ: Mapping[str, str], started_with: Collection[str]) -> dict[str, str]:
    """``environ`` without what start-up added (names in ADDED_AT_START not in ``started_with``)
    and with what the launcher set aside put back."""
    env = {
        k: v
        for k, v in environ.items()
        if k not in SET_ASIDE and (k not in ADDED_AT_START or k in started_with)
    }
    for saved, name in SET_ASIDE.items():
        if saved in environ:
            env[name] = environ[saved]
    return env


def names_started_with(path: Path = Path("/proc/self/environ")) -> set[str] | None:
    """The names of the environment this process started with, or None where /proc cannot say."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return {os.fsdecode(entry.partition(b"=")[0]) for entry in raw.split(b"\0") if entry}


def current_main_process_env() -> dict[str, str] | None:
    """The environment for the main process and readiness commands; None: inherit (nothing to
    take out or give back)."""
    started_with = names_started_with()
    added = started_with is not None and any(
        k in os.environ and k not in started_with for k in ADDED_AT_START
    )
    if not added and not any(k in os.environ for k in SET_ASIDE):
        return None
    return main_process_env(os.environ, started_with if started_with is not None else os.environ.keys())
