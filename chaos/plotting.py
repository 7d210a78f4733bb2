"""matplotlib for the chaos reports' plots, optional (the ``chaos`` extra): imported by name so the
reports work, and type-check, without it."""

from __future__ import annotations

import importlib
from typing import Any


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None when matplotlib is not
    installed (``pip install -e '.[chaos]'``)."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return None
