"""An offline reproduction of OpenShift's SCC admission of a pod under ``restricted-v2``.

The SCC a ServiceAccount without special grants gets on OpenShift 4.11 and later. Its definition
(openshift/cluster-kube-apiserver-operator, bindata/bootkube/scc-manifests/...scc-restricted-v2.yaml)
and what admission does with it (openshift/apiserver-library-go, pkg/securitycontextconstraints:
sccmatching/provider.go, user/mustrunasrange.go, group/mustrunas.go, selinux/mustrunas.go,
seccomp/strategy.go, capabilities/mustrunas.go), read on 2026-12-07:

- admission first **fills in** what the pod leaves unset: fsGroup (the first id of the namespace's
  ``openshift.io/sa.scc.supplemental-groups`` range), each container's runAsUser (the first of
  ``openshift.io/sa.scc.uid-range``), SELinux level (``openshift.io/sa.scc.mcs``), the seccomp
  profile (``runtime/default``), the required capability drop (ALL), allowPrivilegeEscalation
  (false); then it **validates** the result:
- runAsUser ``MustRunAsRange``: every container's effective uid inside the namespace's range;
- fsGroup ``MustRunAs``: inside the supplemental-groups ranges; supplementalGroups ``RunAsAny``;
- seLinuxContext ``MustRunAs``: a level the pod or a container sets must be the namespace's;
- seccompProfiles ``[runtime/default]``: RuntimeDefault only (Unconfined, Localhost refused);
- no privileged containers, no added capability but NET_BIND_SERVICE, no privilege escalation;
- no hostNetwork, hostPID, hostIPC, hostPorts; no hostPath (allowHostDirVolumePlugin false);
- volumes: configMap, csi, downwardAPI, emptyDir, ephemeral, image (from OpenShift 4.20),
  persistentVolumeClaim, projected, secret.

What it does not model: the choice among several SCCs a user may use (the pod is checked against
restricted-v2 alone, as a plain ServiceAccount's would be), sysctls and the user-namespace level
(restricted-v2 sets neither), and the Kubernetes API validation that follows admission.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

UID_RANGE = "openshift.io/sa.scc.uid-range"
SUPPLEMENTAL_GROUPS = "openshift.io/sa.scc.supplemental-groups"
MCS = "openshift.io/sa.scc.mcs"

#: restricted-v2's volumes from OpenShift 4.20 (before: without "image").
RESTRICTED_V2_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
RESTRICTED_V2_VOLUMES_BEFORE_4_20 = RESTRICTED_V2_VOLUMES - {"image"}
ALLOWED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
#: Pod volume source fields (util.GetVolumeFSType's names).
VOLUME_TYPES = [
    *("hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs"),
    *("iscsi", "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker"),
    *("downwardAPI", "fc", "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk"),
    *("photonPersistentDisk", "projected", "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral"),
    "image",
]

#: A namespace as OpenShift's namespace controller annotates it (the first project of a cluster).
TYPICAL_NAMESPACE = {
    UID_RANGE: "1000680000/10000",
    SUPPLEMENTAL_GROUPS: "1000680000/10000",
    MCS: "s0:c26,c15",
}


def parse_blocks(value: str) -> list[tuple[int, int]]:
    """``start/size`` or ``start-end`` blocks, comma-separated, as inclusive (min, max) pairs."""
    blocks = []
    for raw in value.split(","):
        part = raw.strip()
        if "/" in part:
            start, size = part.split("/", 1)
            blocks.append((int(start), int(start) + int(size) - 1))
        elif "-" in part:
            start, end = part.split("-", 1)
            blocks.append((int(start), int(end)))
        else:
            raise ValueError(f"not a range block: {part!r}")
    return blocks


def _mcs(level: str) -> tuple[str, frozenset[str]]:
    sensitivity, _, categories = level.partition(":")
    return sensitivity, frozenset(c for c in categories.split(",") if c)


@dataclass
class Admission:
    """What admission did: the violations (empty: admitted) and the pod as admitted."""

    violations: list[str]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def admitted(self) -> bool:
        return not self.violations


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(key) or []):
            yield f"spec.{key}[{i}]", c


def admit(
    spec: Mapping[str, Any],
    namespace_annotations: Mapping[str, str] = TYPICAL_NAMESPACE,
    *,
    volumes: frozenset[str] = RESTRICTED_V2_VOLUMES,
) -> Admission:
    """Admit a pod spec under restricted-v2 in a namespace with these annotations."""
    missing = [a for a in (UID_RANGE, MCS) if a not in namespace_annotations]
    if missing:
        # MustRunAsRange and MustRunAs without ranges in the SCC need the namespace's.
        return Admission([f"namespace: no {', '.join(missing)} annotation"])
    uids = parse_blocks(namespace_annotations[UID_RANGE])[:1]  # MustRunAsRange takes the first block
    # No supplemental-groups annotation: the uid range (matcher.getSupplementalGroupsAnnotation).
    groups = parse_blocks(namespace_annotations.get(SUPPLEMENTAL_GROUPS, namespace_annotations[UID_RANGE]))
    level = namespace_annotations[MCS]
    pod = copy.deepcopy(dict(spec))
    errors: list[str] = []
    psc = pod.setdefault("securityContext", {})

    # Fill in (provider.CreatePodSecurityContext / CreateContainerSecurityContext).
    psc.setdefault("fsGroup", groups[0][0])
    psc.setdefault("seLinuxOptions", {"level": level})
    if "seccompProfile" not in psc:
        psc["seccompProfile"] = {"type": "RuntimeDefault"}
    for _, c in _containers(pod):
        sc = c.setdefault("securityContext", {})
        if sc.get("runAsUser", psc.get("runAsUser")) is None:
            sc["runAsUser"] = uids[0][0]
        if sc.get("runAsNonRoot") is None and psc.get("runAsNonRoot") is None and sc["runAsUser"] > 0:
            sc["runAsNonRoot"] = True
        drop = sc.setdefault("capabilities", {}).setdefault("drop", [])
        if "ALL" not in drop:
            drop.append("ALL")
        sc.setdefault("allowPrivilegeEscalation", False)

    # Validate (provider.ValidatePodSecurityContext).
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            errors.append(f"spec.{key}: host namespaces are not allowed to be used")
    fs_group = psc.get("fsGroup")
    if not any(lo <= fs_group <= hi for lo, hi in groups):
        errors.append(f"spec.securityContext.fsGroup: {fs_group} is not an allowed group (ranges {groups})")
    errors += _selinux("spec.securityContext", psc, level)
    errors += _seccomp("spec.securityContext", psc)
    for i, volume in enumerate(pod.get("volumes") or []):
        kinds = [k for k in VOLUME_TYPES if k in volume]
        kind = kinds[0] if kinds else "unknown"
        if kind not in volumes:
            errors.append(f"spec.volumes[{i}]: {kind} volumes are not allowed to be used")

    # Validate each container (ValidateContainerSecurityContext and the strategies).
    for where, c in _containers(pod):
        sc = c["securityContext"]
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        lo, hi = uids[0]
        if uid is None or not lo <= uid <= hi:
            errors.append(f"{where}.runAsUser: {uid} must be in the ranges: [{lo}, {hi}]")
        if sc.get("privileged"):
            errors.append(f"{where}.privileged: privileged containers are not allowed")
        added = set((sc.get("capabilities") or {}).get("add") or []) - ALLOWED_CAPABILITIES
        if added:
            errors.append(f"{where}.capabilities.add: {sorted(added)} are not allowed to be used")
        if sc.get("allowPrivilegeEscalation"):
            errors.append(f"{where}.allowPrivilegeEscalation: allowing privilege escalation is not allowed")
        errors += _selinux(f"{where}.securityContext", sc, level)
        errors += _seccomp(f"{where}.securityContext", sc)
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                errors.append(f"{where}.hostPort: host ports are not allowed to be used")
    return Admission(errors, pod)


def _selinux(where: str, sc: Mapping[str, Any], level: str) -> list[str]:
    options = sc.get("seLinuxOptions")
    if options and options.get("level") and _mcs(options["level"]) != _mcs(level):
        return [f"{where}.seLinuxOptions.level: {options['level']!r} does not match required level {level!r}"]
    return []


def _seccomp(where: str, sc: Mapping[str, Any]) -> list[str]:
    profile = sc.get("seccompProfile")
    if profile is not None and profile.get("type") != "RuntimeDefault":
        kind = profile.get("type")
        return [f"{where}.seccompProfile: {kind} is not an allowed seccomp profile (runtime/default)"]
    return []
