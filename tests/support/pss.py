"""An offline Pod Security Standards checker ("baseline" and "restricted") for a pod spec dict.

It follows the admission controller's checks (k8s.io/pod-security-admission/policy, the latest
policy version), not only the web page: e.g. ``image`` volumes are allowed by "restricted" from
v1.33 (kubernetes/kubernetes#130394), and the Linux-only checks are skipped for pods with
``spec.os.name: windows`` as the admission code does. Every container list counts: containers,
initContainers and ephemeralContainers.

``violations(spec)`` returns one line per problem, each starting with the check's id (the names
of the admission code's check files), e.g. ``"runAsNonRoot: pod or container \\"c\\" must set
securityContext.runAsNonRoot=true"``; an empty list means the pod would be admitted at that level.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

LEVELS = ("baseline", "restricted")

#: capabilities_baseline.go: what a container may add under "baseline".
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
#: capabilities_restricted.go: the one capability "restricted" lets a container add.
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})

#: sysctls.go, as of v1.32 (tcp_rmem/tcp_wmem added in 1.32, the keepalive ones in 1.29).
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
    }
)

#: selinuxoptions.go: the SELinux types a pod or container may ask for.
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})

#: restricted_volumes.go: the only volume sources "restricted" allows (image: from v1.33).
RESTRICTED_VOLUME_SOURCES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
        "image",
    }
)

_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(key) or []:
            yield str(container.get("name", "?")), container


def _sc(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


# --- baseline ---------------------------------------------------------------------------------------


def _host_namespaces(spec: Mapping[str, Any]) -> list[str]:
    return [
        f"hostNamespaces: pod must not set {key}=true"
        for key in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(key) is True
    ]


def _privileged(spec: Mapping[str, Any]) -> list[str]:
    return [
        f'privileged: container "{name}" must not set securityContext.privileged=true'
        for name, c in _containers(spec)
        if _sc(c).get("privileged") is True
    ]


def _capabilities_baseline(spec: Mapping[str, Any]) -> list[str]:
    out = []
    for name, c in _containers(spec):
        added = (_sc(c).get("capabilities") or {}).get("add") or []
        bad = sorted(set(added) - BASELINE_CAPABILITIES)
        if bad:
            out.append(f'capabilities: container "{name}" must not add {", ".join(bad)}')
    return out


def _host_path_volumes(spec: Mapping[str, Any]) -> list[str]:
    return [
        f'hostPathVolumes: volume "{v.get("name", "?")}" must not use hostPath'
        for v in spec.get("volumes") or []
        if v.get("hostPath") is not None
    ]


def _host_ports(spec: Mapping[str, Any]) -> list[str]:
    out = []
    for name, c in _containers(spec):
        ports = sorted({p["hostPort"] for p in c.get("ports") or [] if p.get("hostPort")})
        if ports:
            out.append(f'hostPorts: container "{name}" must not set hostPort {", ".join(map(str, ports))}')
    return out


def _app_armor(spec: Mapping[str, Any], annotations: Mapping[str, str]) -> list[str]:
    out = []
    for key, value in annotations.items():
        if key.startswith(_APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"appArmorProfile: annotation {key}={value!r} must be runtime/default or localhost/*")
    targets = [("pod", spec), *((f'container "{n}"', c) for n, c in _containers(spec))]
    for what, obj in targets:
        profile = _sc(obj).get("appArmorProfile") or {}
        if profile.get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"appArmorProfile: {what} must not set appArmorProfile.type={profile['type']}")
    return out


def _selinux(spec: Mapping[str, Any]) -> list[str]:
    out = []
    targets = [("pod", spec), *((f'container "{n}"', c) for n, c in _containers(spec))]
    for what, obj in targets:
        options = _sc(obj).get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            out.append(f"seLinuxOptions: {what} must not set seLinuxOptions.type={options['type']}")
        for key in ("user", "role"):
            if options.get(key):
                out.append(f"seLinuxOptions: {what} must not set seLinuxOptions.{key}")
    return out


def _proc_mount(spec: Mapping[str, Any]) -> list[str]:
    return [
        f'procMount: container "{name}" must not set procMount={_sc(c)["procMount"]}'
        for name, c in _containers(spec)
        if _sc(c).get("procMount") not in (None, "Default")
    ]


def _seccomp_baseline(spec: Mapping[str, Any]) -> list[str]:
    out = []
    targets = [("pod", spec), *((f'container "{n}"', c) for n, c in _containers(spec))]
    for what, obj in targets:
        if (_sc(obj).get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"seccompProfile: {what} must not set seccompProfile.type=Unconfined")
    return out


def _sysctls(spec: Mapping[str, Any]) -> list[str]:
    bad = [s.get("name") for s in _sc(spec).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]
    return [f"sysctls: pod must not set unsafe sysctls {', '.join(map(str, bad))}"] if bad else []


def _windows_host_process(spec: Mapping[str, Any]) -> list[str]:
    out = []
    targets = [("pod", spec), *((f'container "{n}"', c) for n, c in _containers(spec))]
    for what, obj in targets:
        if (_sc(obj).get("windowsOptions") or {}).get("hostProcess") is True:
            out.append(f"windowsHostProcess: {what} must not set windowsOptions.hostProcess=true")
    return out


# --- restricted -------------------------------------------------------------------------------------


def _allow_privilege_escalation(spec: Mapping[str, Any]) -> list[str]:
    return [
        f'allowPrivilegeEscalation: container "{name}" must set '
        "securityContext.allowPrivilegeEscalation=false"
        for name, c in _containers(spec)
        if _sc(c).get("allowPrivilegeEscalation") is not False
    ]


def _run_as_non_root(spec: Mapping[str, Any]) -> list[str]:
    pod_value = _sc(spec).get("runAsNonRoot")
    out = []
    if pod_value is False:
        out.append("runAsNonRoot: pod must not set securityContext.runAsNonRoot=false")
    for name, c in _containers(spec):
        value = _sc(c).get("runAsNonRoot")
        if value is False:
            out.append(f'runAsNonRoot: container "{name}" must not set securityContext.runAsNonRoot=false')
        elif value is None and pod_value is not True:
            out.append(f'runAsNonRoot: pod or container "{name}" must set securityContext.runAsNonRoot=true')
    return out


def _run_as_user(spec: Mapping[str, Any]) -> list[str]:
    targets = [("pod", spec), *((f'container "{n}"', c) for n, c in _containers(spec))]
    return [
        f"runAsUser: {what} must not set runAsUser=0"
        for what, obj in targets
        if _sc(obj).get("runAsUser") == 0
    ]


def _seccomp_restricted(spec: Mapping[str, Any]) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_type = (_sc(spec).get("seccompProfile") or {}).get("type")
    out = []
    if pod_type is not None and pod_type not in allowed:
        out.append(f"seccompProfile: pod must not set seccompProfile.type={pod_type}")
    for name, c in _containers(spec):
        own = (_sc(c).get("seccompProfile") or {}).get("type")
        if own is not None and own not in allowed:
            out.append(f'seccompProfile: container "{name}" must not set seccompProfile.type={own}')
        elif own is None and pod_type not in allowed:
            out.append(
                f'seccompProfile: pod or container "{name}" must set seccompProfile.type to '
                "RuntimeDefault or Localhost"
            )
    return out


def _capabilities_restricted(spec: Mapping[str, Any]) -> list[str]:
    out = []
    for name, c in _containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f'capabilities: container "{name}" must set securityContext.capabilities.drop=["ALL"]')
        bad = sorted(set(caps.get("add") or []) - RESTRICTED_CAPABILITIES)
        if bad:
            out.append(f'capabilities: container "{name}" must not add {", ".join(bad)}')
    return out


def _restricted_volumes(spec: Mapping[str, Any]) -> list[str]:
    out = []
    for volume in spec.get("volumes") or []:
        sources = [k for k in volume if k != "name"]
        bad = [s for s in sources if s not in RESTRICTED_VOLUME_SOURCES]
        if bad:
            out.append(f'restrictedVolumes: volume "{volume.get("name", "?")}" must not use {", ".join(bad)}')
    return out


def violations(
    pod_spec: Mapping[str, Any],
    level: str = "restricted",
    *,
    annotations: Mapping[str, str] | None = None,
) -> list[str]:
    """Every way ``pod_spec`` (a Pod's ``spec``) breaks the Pod Security Standard ``level``.

    ``annotations`` are the pod's metadata annotations (only the AppArmor ones are read).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    windows = (pod_spec.get("os") or {}).get("name") == "windows"
    found = [
        *_host_namespaces(pod_spec),
        *_privileged(pod_spec),
        *_host_path_volumes(pod_spec),
        *_host_ports(pod_spec),
        *_app_armor(pod_spec, annotations or {}),
        *_selinux(pod_spec),
        *_proc_mount(pod_spec),
        *_sysctls(pod_spec),
        *_windows_host_process(pod_spec),
    ]
    if level == "baseline":
        return [*found, *_capabilities_baseline(pod_spec), *_seccomp_baseline(pod_spec)]
    found += _restricted_volumes(pod_spec)
    found += _run_as_non_root(pod_spec)
    found += _run_as_user(pod_spec)
    if windows:
        # The admission code skips the Linux-only restricted checks for Windows pods (policy v1.25+);
        # they replace the baseline capability and seccomp checks, so those go too.
        return found
    return [
        *found,
        *_allow_privilege_escalation(pod_spec),
        *_capabilities_restricted(pod_spec),
        *_seccomp_restricted(pod_spec),
    ]
