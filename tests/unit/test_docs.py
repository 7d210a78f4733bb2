"""Generated documentation and stubs must match their sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    argv = [sys.executable, "docs/generate_config_reference.py", "--check"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_reference_is_current() -> None:
    argv = [sys.executable, "docs/generate_cli_reference.py", "--check"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
