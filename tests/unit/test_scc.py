"""tests/support/scc.py: restricted-v2's admission admits a pod that leaves its ids to it, fills them
in from the namespace's ranges, and refuses each breach restricted-v2 refuses."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import scc

Spec = dict[str, Any]


def good_spec() -> Spec:
    """A pod restricted-v2 admits as it is: no ids, only what the SCC allows."""
    return {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [
            {"name": "init", "image": "x", "securityContext": {"allowPrivilegeEscalation": False}}
        ],
        "containers": [
            {
                "name": "app",
                "image": "x",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "ports": [{"containerPort": 8080}],
            }
        ],
        "volumes": [
            {"name": "a", "emptyDir": {}},
            {"name": "b", "projected": {"sources": []}},
            {"name": "c", "configMap": {"name": "x"}},
            {"name": "d", "image": {"reference": "x"}},
        ],
    }


def test_a_pod_without_ids_is_admitted_with_the_namespaces() -> None:
    result = scc.admit(good_spec())
    assert result.admitted, result.violations
    psc = result.spec["securityContext"]
    assert psc["fsGroup"] == 1000680000 and psc["seLinuxOptions"] == {"level": "s0:c26,c15"}
    for c in result.spec["containers"] + result.spec["initContainers"]:
        assert c["securityContext"]["runAsUser"] == 1000680000
        assert "ALL" in c["securityContext"]["capabilities"]["drop"]


def test_what_it_fills_in_it_does_not_refuse() -> None:
    """A missing seccomp profile, capability drop or allowPrivilegeEscalation is defaulted by
    restricted-v2 (its description: "default the seccomp profile to runtime/default if unset")."""
    spec = good_spec()
    del spec["securityContext"]["seccompProfile"]
    spec["containers"][0]["securityContext"] = {}
    result = scc.admit(spec)
    assert result.admitted, result.violations
    assert result.spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert result.spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_ids_inside_the_range_are_admitted() -> None:
    spec = good_spec()
    spec["securityContext"].update(runAsUser=1000680005, fsGroup=1000689999)
    assert scc.admit(spec).admitted


def _app(spec: Spec) -> Spec:
    sc: Spec = spec["containers"][0]["securityContext"]
    return sc


BREACHES: list[tuple[str, Callable[[Spec], Any], str]] = [
    ("uid-65534-pod", lambda s: s["securityContext"].update(runAsUser=65534), "runAsUser: 65534 must be in"),
    ("uid-65534-container", lambda s: _app(s).update(runAsUser=65534), "containers[0].runAsUser: 65534"),
    ("uid-past-the-range", lambda s: _app(s).update(runAsUser=1000690000), "runAsUser: 1000690000"),
    ("uid-0", lambda s: _app(s).update(runAsUser=0), "runAsUser: 0"),
    ("fsGroup-65534", lambda s: s["securityContext"].update(fsGroup=65534), "fsGroup: 65534"),
    (
        "seccomp-unconfined-pod",
        lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "Unconfined",
    ),
    ("seccomp-localhost", lambda s: _app(s).update(seccompProfile={"type": "Localhost"}), "Localhost"),
    (
        "selinux-other-level",
        lambda s: s["securityContext"].update(seLinuxOptions={"level": "s0:c1,c2"}),
        "seLinuxOptions",
    ),
    ("privileged", lambda s: _app(s).update(privileged=True), "privileged"),
    ("cap-add-net-admin", lambda s: _app(s).update(capabilities={"add": ["NET_ADMIN"]}), "capabilities.add"),
    ("privilege-escalation", lambda s: _app(s).update(allowPrivilegeEscalation=True), "privilege escalation"),
    ("hostPath", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath volumes"),
    ("nfs", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "nfs volumes"),
    ("hostNetwork", lambda s: s.update(hostNetwork=True), "hostNetwork"),
    ("hostPID", lambda s: s.update(hostPID=True), "hostPID"),
    ("hostIPC", lambda s: s.update(hostIPC=True), "hostIPC"),
    ("hostPort", lambda s: s["containers"][0]["ports"][0].update(hostPort=80), "hostPort"),
    (
        "init-uid-65534",
        lambda s: s["initContainers"][0]["securityContext"].update(runAsUser=65534),
        "initContainers[0]",
    ),
]


@pytest.mark.parametrize(("name", "breach", "expected"), BREACHES, ids=[b[0] for b in BREACHES])
def test_each_breach_is_refused(name: str, breach: Callable[[Spec], Any], expected: str) -> None:
    spec = copy.deepcopy(good_spec())
    breach(spec)
    violations = scc.admit(spec).violations
    assert violations and any(expected in v for v in violations), violations


def test_image_volumes_are_refused_before_openshift_4_20() -> None:
    violations = scc.admit(good_spec(), volumes=scc.RESTRICTED_V2_VOLUMES_BEFORE_4_20).violations
    assert violations == ["spec.volumes[3]: image volumes are not allowed to be used"]


def test_the_ranges_come_from_the_namespace() -> None:
    spec = good_spec()
    spec["securityContext"]["runAsUser"] = 65534
    other = {scc.UID_RANGE: "60000-70000", scc.MCS: "s0:c1,c2"}  # groups fall back to the uid range
    result = scc.admit(spec, other)
    assert result.admitted, result.violations
    assert result.spec["securityContext"]["fsGroup"] == 60000
    assert scc.admit(spec, {scc.MCS: "s0:c1,c2"}).violations == [f"namespace: no {scc.UID_RANGE} annotation"]
    assert scc.parse_blocks("1/10, 100-200") == [(1, 10), (100, 200)]
