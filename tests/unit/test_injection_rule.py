"""The injection rule (gateway/drivers/injection.decide): every combination of what a cluster says.
The live answers of real API servers are tests/e2e/test_injection_probe.py's."""

from __future__ import annotations

import pytest

from gateway.drivers.injection import _version_of, decide


@pytest.mark.parametrize(
    ("version", "accepted", "mode"),
    [
        ((1, 36), True, "image-volume"),
        ((1, 35), True, "image-volume"),
        ((1, 35), None, "image-volume"),  # the dry run failed otherwise: the version decides
        ((1, 35), False, "init-container"),  # the gate turned off on a 1.35 server
        ((1, 34), True, "init-container"),  # gate on, but runtimes before 1.35 may not mount
        ((1, 34), False, "init-container"),
        ((1, 29), None, "init-container"),
        (None, True, "init-container"),  # version unknown: the choice that works everywhere
        (None, None, "init-container"),
    ],
)
def test_auto(version: tuple[int, int] | None, accepted: bool | None, mode: str) -> None:
    choice = decide("auto", version=version, accepted=accepted, problem=None)
    assert choice.mode == mode and choice.configured == "auto" and choice.reason


@pytest.mark.parametrize("configured", ["image-volume", "init-container"])
@pytest.mark.parametrize("accepted", [True, False, None])
def test_a_configured_mode_is_kept_and_a_doomed_one_said(configured: str, accepted: bool | None) -> None:
    choice = decide(configured, version=(1, 34), accepted=accepted, problem="p")
    assert (choice.mode, choice.problem) == (configured, "p")
    doomed = configured == "image-volume" and accepted is False
    assert ("every sandbox pod will be refused" in choice.reason) is doomed


def test_the_version_read_is_the_emulated_one_when_there_is_one() -> None:
    assert _version_of({"major": "1", "minor": "36"}) == (1, 36)
    assert _version_of({"major": "1", "minor": "30+"}) == (1, 30)  # EKS/GKE write "30+"
    assert _version_of({"major": "1", "minor": "36", "emulationMajor": "1", "emulationMinor": "34"}) == (
        1,
        34,
    )
    assert _version_of({"gitVersion": "v1.36.0"}) is None
