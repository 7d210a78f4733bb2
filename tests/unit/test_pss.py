"""tests/support/pss.py: each Pod Security Standards check passes a compliant pod and fires on its breach."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from gateway.config import KubernetesDriverSettings
from gateway.drivers.podspec import SandboxRequest, build_sandbox_pod
from tests.support import pss

Spec = dict[str, Any]


def restricted_spec() -> Spec:
    """A pod that "restricted" admits, with an init and an ephemeral container too."""
    sc = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
        },
        "initContainers": [{"name": "init", "image": "x", "securityContext": copy.deepcopy(sc)}],
        "containers": [
            {
                "name": "app",
                "image": "x",
                "securityContext": copy.deepcopy(sc),
                "ports": [{"containerPort": 80}],
            }
        ],
        "ephemeralContainers": [{"name": "debug", "image": "x", "securityContext": copy.deepcopy(sc)}],
        "volumes": [
            {"name": "a", "emptyDir": {}},
            {"name": "b", "configMap": {"name": "c"}},
            {"name": "c", "secret": {"secretName": "s"}},
            {"name": "d", "projected": {"sources": []}},
            {"name": "e", "downwardAPI": {"items": []}},
            {"name": "f", "persistentVolumeClaim": {"claimName": "p"}},
            {"name": "g", "csi": {"driver": "d"}},
            {"name": "h", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
            {"name": "i", "image": {"reference": "registry.example/bundle:1"}},
        ],
    }


def test_a_compliant_pod_passes_both_levels() -> None:
    assert pss.violations(restricted_spec(), "restricted") == []
    assert pss.violations(restricted_spec(), "baseline") == []


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        pss.violations(restricted_spec(), "privileged-ish")


def _app(spec: Spec) -> Spec:
    context: Spec = spec["containers"][0]["securityContext"]
    return context


def _init(spec: Spec) -> Spec:
    context: Spec = spec["initContainers"][0]["securityContext"]
    return context


def _ephemeral(spec: Spec) -> Spec:
    context: Spec = spec["ephemeralContainers"][0]["securityContext"]
    return context


# (id, mutation, check id expected first in the message, levels it fires at)
BASELINE_AND_RESTRICTED = ("baseline", "restricted")
RESTRICTED = ("restricted",)
CASES: list[tuple[str, Callable[[Spec], object], str, tuple[str, ...]]] = [
    ("hostNetwork", lambda s: s.update(hostNetwork=True), "hostNamespaces", BASELINE_AND_RESTRICTED),
    ("hostPID", lambda s: s.update(hostPID=True), "hostNamespaces", BASELINE_AND_RESTRICTED),
    ("hostIPC", lambda s: s.update(hostIPC=True), "hostNamespaces", BASELINE_AND_RESTRICTED),
    ("privileged", lambda s: _app(s).update(privileged=True), "privileged", BASELINE_AND_RESTRICTED),
    (
        "privileged-init",
        lambda s: _init(s).update(privileged=True),
        "privileged",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "cap-sys-admin",
        lambda s: _app(s)["capabilities"].update(add=["SYS_ADMIN"]),
        "capabilities",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "cap-chown-restricted-only",
        lambda s: _app(s)["capabilities"].update(add=["CHOWN"]),
        "capabilities",
        RESTRICTED,
    ),
    (
        "cap-no-drop-all",
        lambda s: _ephemeral(s)["capabilities"].update(drop=["NET_RAW"]),
        "capabilities",
        RESTRICTED,
    ),
    (
        "hostPath",
        lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostPathVolumes",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "hostPort",
        lambda s: s["containers"][0]["ports"].append({"containerPort": 81, "hostPort": 8081}),
        "hostPorts",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "apparmor-unconfined-field",
        lambda s: _app(s).update(appArmorProfile={"type": "Unconfined"}),
        "appArmorProfile",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "apparmor-unconfined-pod-field",
        lambda s: s["securityContext"].update(appArmorProfile={"type": "Unconfined"}),
        "appArmorProfile",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "selinux-type",
        lambda s: _app(s).update(seLinuxOptions={"type": "spc_t"}),
        "seLinuxOptions",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "selinux-user",
        lambda s: s["securityContext"].update(seLinuxOptions={"user": "system_u"}),
        "seLinuxOptions",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "procMount",
        lambda s: _app(s).update(procMount="Unmasked"),
        "procMount",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "seccomp-unconfined",
        lambda s: _init(s).update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "seccomp-missing",
        lambda s: (s["securityContext"].pop("seccompProfile"), _app(s).pop("seccompProfile")),
        "seccompProfile",
        RESTRICTED,
    ),
    (
        "sysctl-unsafe",
        lambda s: s["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "1"}),
        "sysctls",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "windows-hostProcess",
        lambda s: _app(s).update(windowsOptions={"hostProcess": True}),
        "windowsHostProcess",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "hostProcess-pod",
        lambda s: s["securityContext"].update(windowsOptions={"hostProcess": True}),
        "windowsHostProcess",
        BASELINE_AND_RESTRICTED,
    ),
    (
        "volume-nfs",
        lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
        "restrictedVolumes",
        RESTRICTED,
    ),
    (
        "privilege-escalation-unset",
        lambda s: _ephemeral(s).pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
        RESTRICTED,
    ),
    (
        "privilege-escalation-true",
        lambda s: _app(s).update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
        RESTRICTED,
    ),
    (
        "runAsNonRoot-false-container",
        lambda s: _init(s).update(runAsNonRoot=False),
        "runAsNonRoot",
        RESTRICTED,
    ),
    (
        "runAsNonRoot-unset-everywhere",
        lambda s: (s["securityContext"].pop("runAsNonRoot"), _app(s).pop("runAsNonRoot")),
        "runAsNonRoot",
        RESTRICTED,
    ),
    (
        "runAsNonRoot-false-pod",
        lambda s: s["securityContext"].update(runAsNonRoot=False),
        "runAsNonRoot",
        RESTRICTED,
    ),
    ("runAsUser-0-pod", lambda s: s["securityContext"].update(runAsUser=0), "runAsUser", RESTRICTED),
    ("runAsUser-0-container", lambda s: _app(s).update(runAsUser=0), "runAsUser", RESTRICTED),
]


@pytest.mark.parametrize(("mutate", "check", "levels"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_check_fires(mutate: Callable[[Spec], object], check: str, levels: tuple[str, ...]) -> None:
    spec = restricted_spec()
    mutate(spec)
    for level in pss.LEVELS:
        found = pss.violations(spec, level)
        if level in levels:
            expected = {check}
            if check == "hostPathVolumes" and level == "restricted":
                expected.add("restrictedVolumes")  # hostPath is not an allowed volume type either
            assert {v.split(": ", 1)[0] for v in found} == expected, found
        else:
            assert found == [], f"{level} should admit it: {found}"


def test_apparmor_annotation_is_checked() -> None:
    key = "container.apparmor.security.beta.kubernetes.io/app"
    bad = pss.violations(restricted_spec(), "baseline", annotations={key: "unconfined"})
    assert bad and bad[0].startswith("appArmorProfile: ")
    assert pss.violations(restricted_spec(), annotations={key: "runtime/default"}) == []
    assert pss.violations(restricted_spec(), annotations={key: "localhost/my-profile"}) == []


def test_runasnonroot_on_every_container_instead_of_the_pod_passes() -> None:
    spec = restricted_spec()
    del spec["securityContext"]["runAsNonRoot"]
    assert pss.violations(spec) == []  # every container sets it itself


def test_seccomp_on_every_container_instead_of_the_pod_passes_and_localhost_is_allowed() -> None:
    spec = restricted_spec()
    del spec["securityContext"]["seccompProfile"]
    _app(spec)["seccompProfile"] = {"type": "Localhost", "localhostProfile": "p.json"}
    assert pss.violations(spec) == []


def test_net_bind_service_is_the_one_capability_restricted_allows() -> None:
    spec = restricted_spec()
    _app(spec)["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert pss.violations(spec) == []


def test_windows_pods_skip_the_linux_only_restricted_checks() -> None:
    spec = restricted_spec()
    spec["os"] = {"name": "windows"}
    del spec["securityContext"]["seccompProfile"]
    for _, c in pss._containers(spec):
        del c["securityContext"]["allowPrivilegeEscalation"]
        del c["securityContext"]["capabilities"]
        del c["securityContext"]["seccompProfile"]
    assert pss.violations(spec) == []
    spec["hostNetwork"] = True  # still checked for Windows
    assert pss.violations(spec) == ["hostNamespaces: pod must not set hostNetwork=true"]


def test_the_gateways_sandbox_pods_pass_restricted_with_either_injection() -> None:
    for injection in ("image-volume", "init-container"):
        settings = KubernetesDriverSettings.model_validate(
            {"gateway_address": "gw:7070", "supervisor": {"injection": injection}}
        )
        pod = build_sandbox_pod(settings, SandboxRequest("t", ["sleep", "1"], image="busybox"))
        assert pss.violations(pod["spec"]) == [], injection
