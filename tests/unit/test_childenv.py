"""The main process gets the container's environment, not what the interpreter's start-up added."""

from __future__ import annotations

from pathlib import Path

from supervisor.childenv import main_process_env, names_started_with


def test_a_coerced_locale_is_left_out() -> None:
    environ = {"PATH": "/bin", "LC_CTYPE": "C.UTF-8", "LANG": "C"}
    assert main_process_env(environ, {"PATH", "LANG"}) == {"PATH": "/bin", "LANG": "C"}


def test_a_locale_the_container_set_is_kept() -> None:
    environ = {"PATH": "/bin", "LC_CTYPE": "de_DE.UTF-8"}
    assert main_process_env(environ, {"PATH", "LC_CTYPE"}) == environ


def test_the_names_come_from_the_kernels_copy(tmp_path: Path) -> None:
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/bin\0LANG=C\0EMPTY=\0WITH=EQUALS=SIGN\0")
    assert names_started_with(environ) == {"PATH", "LANG", "EMPTY", "WITH"}
    assert names_started_with(tmp_path / "missing") is None


def test_what_the_launcher_set_aside_is_given_back() -> None:
    environ = {"PATH": "/bin", "OPENSHELL_SANDBOX_LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert main_process_env(environ, set(environ)) == {
        "PATH": "/bin",
        "LD_PRELOAD": "/usr/lib/libjemalloc.so.2",
    }
