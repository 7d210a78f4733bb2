"""The main process gets the container's environment, not what the supervisor's bundle added to it."""

from __future__ import annotations

from supervisor.childenv import main_process_env

# What a pod's container had, then what PyInstaller's and staticx's bootloaders made of it (the
# variables as seen in a bundled supervisor's child under bubblewrap).
CONTAINER = {"PATH": "/usr/bin:/bin", "HOME": "/", "AGENT_MODE": "fast"}
BUNDLE_ADDED = {
    "_PYI_ARCHIVE_FILE": "/tmp/staticx-LnOGpi/openshell-supervisor",
    "_PYI_PARENT_PROCESS_LEVEL": "1",
    "_PYI_APPLICATION_HOME_DIR": "/tmp/_MEI00000003GAZ4Yw",
    "_PYI_LINUX_PROCESS_NAME": "openshell-super",
    "_MEIPASS2": "/tmp/_MEI00000003GAZ4Yw",
    "STATICX_PROG_PATH": "/opt/openshell/openshell-supervisor",
    "STATICX_BUNDLE_DIR": "/tmp/staticx-LnOGpi",
}


def test_the_bundles_variables_and_library_path_are_taken_out() -> None:
    bundled = {**CONTAINER, **BUNDLE_ADDED, "LD_LIBRARY_PATH": "/tmp/_MEI00000003GAZ4Yw"}
    assert main_process_env(bundled, bundled=True) == CONTAINER


def test_the_containers_own_library_path_is_put_back() -> None:
    bundled = {
        **CONTAINER,
        **BUNDLE_ADDED,
        "LD_LIBRARY_PATH": "/tmp/_MEI00000003GAZ4Yw:/usr/local/nvidia/lib64",
        "LD_LIBRARY_PATH_ORIG": "/usr/local/nvidia/lib64",
    }
    assert main_process_env(bundled, bundled=True) == {
        **CONTAINER,
        "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
    }


def test_an_unbundled_supervisor_passes_everything_on() -> None:
    environ = {**CONTAINER, "LD_LIBRARY_PATH": "/opt/lib", "LD_LIBRARY_PATH_ORIG": "/x", "STATICX_X": "1"}
    assert main_process_env(environ, bundled=False) == environ
