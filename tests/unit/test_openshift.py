"""OpenShift (issue 24 point 3): sandbox pods and the gateway pod as restricted-v2 admits them.

Pods are checked against tests/support/scc.py (the SCC admission's rules, offline) and against the
Pod Security Standard "restricted" (tests/support/pss.py); tests/e2e/test_openshift_live.py has a
real API server admit the same sandbox pod and the platform detection answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config import GatewayConfig, KubernetesDriverSettings
from gateway.drivers.injection import SCC_REFUSED_IMAGE_VOLUME, decide
from gateway.drivers.kubernetes import KubernetesDriver, KubernetesDriverError
from gateway.drivers.openshift import platform_pod_settings, serves_scc_group
from gateway.drivers.podspec import SandboxRequest, build_sandbox_pod
from openshell_wire.configfile import load_settings
from tests.support import pss, scc
from tests.unit.test_chart import _chart, ci_values, deployment, load_config, one, render, rendered

REQUEST = SandboxRequest("t", ["sleep", "1"], image="busybox")


def openshift_settings(**pod: Any) -> KubernetesDriverSettings:
    settings = KubernetesDriverSettings(gateway_address="gw:7070", platform="openshift", pod=pod)
    return platform_pod_settings(settings, "openshift")


@pytest.mark.parametrize("injection", ["image-volume", "init-container"])
def test_openshift_sandbox_pods_pass_restricted_v2_and_pss_restricted(injection: str) -> None:
    settings = openshift_settings()
    settings = settings.model_copy(
        update={"supervisor": settings.supervisor.model_copy(update={"injection": injection})}
    )
    pod = build_sandbox_pod(settings, REQUEST)
    admission = scc.admit(pod["spec"])
    assert admission.admitted, admission.violations
    assert pss.violations(pod["spec"], "restricted") == []
    # The SCC gives every container the range's first uid and the pod its fsGroup.
    for c in admission.spec["containers"] + admission.spec.get("initContainers", []):
        assert c["securityContext"]["runAsUser"] == 1000680000
    assert admission.spec["securityContext"]["fsGroup"] == 1000680000
    # Nothing the gateway wrote needs the assigned numbers: the token is world-readable (0444).
    credential = next(v for v in pod["spec"]["volumes"] if "projected" in v)
    assert credential["projected"]["defaultMode"] == 0o444


def test_image_volume_sandbox_pods_are_refused_before_openshift_4_20() -> None:
    pod = build_sandbox_pod(openshift_settings(), REQUEST)
    violations = scc.admit(pod["spec"], volumes=scc.RESTRICTED_V2_VOLUMES_BEFORE_4_20).violations
    assert violations == ["spec.volumes[0]: image volumes are not allowed to be used"]


def test_the_default_kubernetes_pods_are_refused_by_restricted_v2() -> None:
    """The checker bites: 65534 is outside a namespace's range (the issue's report)."""
    settings = KubernetesDriverSettings(gateway_address="gw:7070")
    pod = build_sandbox_pod(platform_pod_settings(settings, "kubernetes"), REQUEST)
    violations = scc.admit(pod["spec"]).violations
    assert any("runAsUser: 65534 must be in" in v for v in violations), violations
    assert any("fsGroup: 65534" in v for v in violations), violations


def test_null_ids_are_accepted_and_left_out_of_the_pod(tmp_path: Path) -> None:
    """Fails before: run_as_user/run_as_group were ``int`` (null refused at start: the crash loop)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "drivers:\n  kind: kubernetes\n  kubernetes:\n    gateway_address: gw:7070\n"
        "    pod: {run_as_user: null, run_as_group: null, fs_group: null}\n"
    )
    config = load_settings(GatewayConfig, file=path, use_env=False)
    pod = build_sandbox_pod(config.drivers.kubernetes, REQUEST)
    contexts = [pod["spec"]["securityContext"], pod["spec"]["containers"][0]["securityContext"]]
    for context in contexts:
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), context
        assert context["runAsNonRoot"] is True
    # On Kubernetes too (then the image's USER, which runAsNonRoot checks); 0 is still refused.
    with pytest.raises(ValidationError, match="run_as_user"):
        KubernetesDriverSettings(pod={"run_as_user": 0})


def test_on_openshift_given_ids_are_kept_and_others_left_to_the_scc() -> None:
    settings = openshift_settings(run_as_user=1000680005)
    assert (settings.pod.run_as_user, settings.pod.run_as_group, settings.pod.fs_group) == (
        1000680005,
        None,
        None,
    )
    pod = build_sandbox_pod(settings, REQUEST)
    assert scc.admit(pod["spec"]).admitted
    # Kubernetes keeps the defaults; so does OpenShift for ids the config gives, 65534 included.
    plain = KubernetesDriverSettings()
    assert platform_pod_settings(plain, "kubernetes") is plain
    assert (
        platform_pod_settings(KubernetesDriverSettings(pod={"fs_group": 65534}), "openshift").pod.fs_group
        == 65534
    )


def test_detection_reads_the_scc_group_from_discovery() -> None:
    assert serves_scc_group(
        {"kind": "APIGroupList", "groups": [{"name": "apps"}, {"name": "security.openshift.io"}]}
    )
    assert not serves_scc_group({"kind": "APIGroupList", "groups": [{"name": "apps"}]})
    assert not serves_scc_group({"groups": None}) and not serves_scc_group([])


@pytest.mark.parametrize(
    ("version", "accepted", "kubernetes", "openshift"),
    [
        ((1, 35), True, "image-volume", "image-volume"),  # the dry run passed the SCC too
        ((1, 35), None, "image-volume", "init-container"),  # the SCC's say unknown: not on OpenShift
        ((1, 35), False, "init-container", "init-container"),  # e.g. the SCC refused image volumes
        ((1, 34), True, "init-container", "init-container"),
    ],
)
def test_openshift_takes_the_image_volume_only_when_a_dry_run_proved_it(
    version: tuple[int, int], accepted: bool | None, kubernetes: str, openshift: str
) -> None:
    assert decide("auto", version=version, accepted=accepted, problem=None).mode == kubernetes
    choice = decide("auto", version=version, accepted=accepted, problem=None, platform="openshift")
    assert (choice.mode, choice.platform, choice.as_dict()["platform"]) == (
        openshift,
        "openshift",
        "openshift",
    )
    # A configured mode is kept on OpenShift too.
    kept = decide("image-volume", version=version, accepted=None, problem=None, platform="openshift")
    assert kept.mode == "image-volume"


def test_the_scc_refusal_text_is_the_one_admission_writes() -> None:
    refused = scc.admit(
        build_sandbox_pod(openshift_settings(), REQUEST)["spec"],
        volumes=scc.RESTRICTED_V2_VOLUMES_BEFORE_4_20,
    )
    assert any(SCC_REFUSED_IMAGE_VOLUME in v for v in refused.violations)


def test_the_chart_on_openshift_passes_restricted_v2(tmp_path: Path) -> None:
    objects = rendered("openshift-values.yaml")
    spec = deployment(objects)["spec"]["template"]["spec"]
    admission = scc.admit(spec)
    assert admission.admitted, admission.violations
    assert pss.violations(spec, "restricted") == []
    config = load_config(objects, tmp_path)
    kube = config.drivers.kubernetes
    assert kube.platform == "openshift"
    assert (kube.pod.run_as_user, kube.pod.run_as_group, kube.pod.fs_group) == (None, None, None)
    pod = build_sandbox_pod(platform_pod_settings(kube, "openshift"), REQUEST)
    assert scc.admit(pod["spec"]).admitted
    # Without openshift.enabled the chart's pods are refused (10001 for the gateway, 65534 sandboxes).
    default = deployment(rendered("default-values.yaml"))["spec"]["template"]["spec"]
    assert any("runAsUser: 10001" in v for v in scc.admit(default).violations)


def test_the_chart_keeps_sandbox_ids_named_in_extra_config(tmp_path: Path) -> None:
    values = ci_values("openshift-values.yaml")
    values["gateway"]["extraConfig"] = {"drivers": {"kubernetes": {"pod": {"run_as_user": 1000680001}}}}
    kube = load_config(render(values), tmp_path).drivers.kubernetes
    assert (kube.pod.run_as_user, kube.pod.fs_group) == (1000680001, None)


def test_the_route_exposes_the_api_only_with_oidc() -> None:
    values = ci_values("openshift-values.yaml")
    values["openshift"]["route"] = {"enabled": True, "host": "openshell.apps.example.com"}
    with pytest.raises(Exception, match=r"openshift\.route\.enabled without auth\.oidc\.issuerUrl"):
        render(values)
    values["auth"] = {"oidc": {"issuerUrl": "https://idp.example.com/realms/x"}}
    route = one(render(values), "Route")
    assert route["apiVersion"] == "route.openshift.io/v1"
    assert route["spec"]["to"] == {"kind": "Service", "name": "openshell-gateway", "weight": 100}
    assert route["spec"]["port"] == {"targetPort": "http"}
    assert route["spec"]["host"] == "openshell.apps.example.com"
    assert route["spec"]["tls"]["termination"] == "edge"
    values["openshift"]["route"]["tls"] = {"termination": "passthrough"}
    with pytest.raises(Exception, match=r"needs tls\.enabled"):
        render(values)


def test_what_the_loader_was_given_counts_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """platform_pod_settings reads which ids the config gave (model_fields_set): through the real
    loader, from the file and from the environment alike, never from the defaults."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "drivers:\n  kind: kubernetes\n  kubernetes:\n    gateway_address: gw:7070\n"
        "    pod: {run_as_group: 1000680000}\n"
    )
    monkeypatch.setenv("OPENSHELL_GATEWAY_DRIVERS__KUBERNETES__POD__FS_GROUP", "1000680001")
    kube = load_settings(GatewayConfig, file=path).drivers.kubernetes
    pod = platform_pod_settings(kube, "openshift").pod
    assert (pod.run_as_user, pod.run_as_group, pod.fs_group) == (None, 1000680000, 1000680001)
    assert platform_pod_settings(kube, "kubernetes").pod.run_as_user == 65534


def test_the_notes_say_where_the_ids_come_from() -> None:
    """(The warning for an OpenShift cluster without openshift.enabled reads .Capabilities, which
    this renderer cannot set: not tested.)"""
    values = ci_values("openshift-values.yaml")
    values["openshift"]["route"] = {"enabled": True}
    values["auth"] = {"oidc": {"issuerUrl": "https://idp.example.com/realms/x"}}
    manifests = _chart().render(values, name="openshell", namespace="openshell")
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert "take their ids from the SCC" in notes and "get route openshell-gateway-http" in notes
    default = _chart().render(ci_values("default-values.yaml"), name="openshell", namespace="openshell")
    assert "SCC" not in next(text for path, text in default.items() if path.endswith("NOTES.txt"))


async def test_discovery_that_does_not_answer_is_a_driver_error_and_not_kept(tmp_path: Path) -> None:
    """An API server that does not answer (a closed port): auto cannot say, the driver says why
    (a KubernetesDriverError: the provisioner logs it at start, a creation answers 502) and asks again."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    settings = KubernetesDriverSettings(gateway_address="gw:7070", kubeconfig=kubeconfig, request_timeout_s=2)
    driver = KubernetesDriver(settings)
    try:
        for _ in range(2):
            with pytest.raises(KubernetesDriverError, match=r"discovery \(/apis\).*platform is auto"):
                await driver.choose_injection()
            assert driver.platform is None and driver.injection is None
    finally:
        await driver.close()


def test_openshift_enabled_alone_leaves_every_pods_ids_to_the_scc() -> None:
    """openshift.enabled is the one setting: the gateway, the migration Job and both helm test pods
    are admitted by restricted-v2 without nulling gateway.podSecurityContext or tests.runAsUser
    (the migration Job and the sandbox test kept 10001 before, and were refused)."""
    objects = render(
        {
            "openshift": {"enabled": True},
            "database": {"existingSecret": "openshell-database"},
            "auth": {"oidc": {"issuerUrl": "https://keycloak.example.com/realms/openshell"}},
            "tests": {"sandbox": {"enabled": True, "tokenSecret": {"name": "sandbox-test-token"}}},
        }
    )
    specs = {
        f"{o['kind']}/{o['metadata']['name']}": (
            o["spec"]["template"]["spec"] if o["kind"] in ("Deployment", "Job") else o["spec"]
        )
        for o in objects
        if o["kind"] in ("Deployment", "Job", "Pod")
    }
    assert any(k.startswith("Job/") for k in specs) and sum(k.startswith("Pod/") for k in specs) == 2, specs
    for name, spec in specs.items():
        admission = scc.admit(spec)
        assert admission.admitted, (name, admission.violations)
