"""The injection rule (gateway/drivers/injection.decide): every combination of what a cluster says.
The live answers of real API servers are tests/e2e/test_injection_probe.py's."""

from __future__ import annotations

import httpx2 as httpx
import pytest
from lightkube import ApiError, AsyncClient, KubeConfig

from gateway.drivers.injection import _about_the_volume, _version_of, decide
from gateway.drivers.kubeapi import NonResourceError, lightkube_http


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


def _refusal(code: int, message: str) -> ApiError:
    request = httpx.Request("POST", "https://api.example/api/v1/namespaces/s/pods?dryRun=All")
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}
    return ApiError(request=request, response=httpx.Response(code, json=body, request=request))


@pytest.mark.parametrize(
    ("code", "message", "about"),
    [
        # OpenShift's SCC admission where no usable SCC lists the image volume type (before 4.20).
        (
            403,
            'pods "sandbox-openshell-injection-probe" is forbidden: unable to validate against any security '
            'context constraint: [provider "restricted-v2": Forbidden: spec.volumes[0]: Invalid value: '
            '"image": image volumes are not allowed to be used]',
            True,
        ),
        (422, 'Pod "x" is invalid: spec.volumes[0]: Required value: must specify a volume type', True),
        # Pod Security or an SCC refusing something else: not about the volume.
        (403, 'pods "x" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true', False),
        (
            403,
            'unable to validate against any security context constraint: [provider "restricted-v2": '
            "Forbidden: spec.containers[0].securityContext.runAsUser: Invalid value: 65534: must be in the "
            "ranges: [1000680000, 1000689999]]",
            False,
        ),
    ],
)
def test_which_refusals_are_about_the_image_volume(code: int, message: str, about: bool) -> None:
    # The probe pod's supervisor volume is its first (index 0) in these messages.
    assert _about_the_volume(_refusal(code, message), index=0) is about


def test_a_422_on_another_volume_is_not_about_the_supervisors() -> None:
    other = 'Pod "x" is invalid: spec.volumes[2].secret.secretName: Required value'
    assert _about_the_volume(_refusal(422, other), index=0) is False
    assert _about_the_volume(_refusal(422, other.replace("[2]", "[0]")), index=0) is True


def test_lightkubes_http_client_is_where_the_gateway_reads_it() -> None:
    """kubeapi reaches into lightkube for /version and /apis: an upgrade that moves the client
    fails here, not at a creation."""
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )
    assert isinstance(lightkube_http(AsyncClient(config)), httpx.AsyncClient)

    class Moved:
        pass

    with pytest.raises(NonResourceError, match="not where this gateway expects it"):
        lightkube_http(Moved())  # type: ignore[arg-type]


def test_on_openshift_auto_needs_the_dry_run_to_have_kept_the_volume() -> None:
    assert decide("auto", version=(1, 36), accepted=None, problem="p", platform="openshift").mode == (
        "init-container"
    )
    kept = decide("auto", version=(1, 36), accepted=True, problem=None, platform="openshift")
    assert (kept.mode, kept.platform) == ("image-volume", "openshift")
