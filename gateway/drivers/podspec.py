"""Sandbox pods, built from the gateway config: the one place the supervisor's pod wiring is written.

The Helm chart does not template sandbox pods: it renders the gateway config (``drivers.kubernetes``)
and the gateway builds every pod here, so the chart and the driver cannot drift apart. The wiring:

* the supervisor image mounted read-only at ``/opt/openshell`` as an image volume
  (``volumes[].image``), or, where the cluster lacks ImageVolume, an init container from the same
  image copying the supervisor's tree (``openshell-supervisor install``) into an emptyDir mounted
  there read-only;
* the container command is the supervisor, run from that tree by its launcher (:func:`launcher`),
  wrapping the sandbox's own command after ``--``;
* the journal on an emptyDir, ``/tmp`` on an emptyDir, so the image's root filesystem can stay
  read-only;
* the supervisor's credential: a projected ServiceAccount token with the gateway's audience
  (``auth.supervisors.kubernetes_audience``) and a short expiry, bound to the pod, which the
  kubelet renews and the supervisor re-reads when it changes (``gateway/auth/kubernetes_tokens.py``
  checks it with a TokenReview). The pod holds no long-lived secret, and the API token stays
  unmounted (``automountServiceAccountToken: false``); a token with our audience is refused by the
  Kubernetes API itself, so the projected one gives the sandbox no access to it;
* the Pod Security Standard "restricted" profile, always: non-root, no privilege escalation, every
  capability dropped, seccomp RuntimeDefault. No setting of ``drivers.kubernetes.pod`` weakens the
  security context; its free-form ``annotations`` and ``labels`` are the operator's (trusted) to
  set, and a request cannot set environment that reconfigures the supervisor (``env_problem``).

Functions here are pure (dicts in, dicts out) so tests can check them offline against the
Kubernetes schemas and the PSS rules, and a real API server can admit exactly the same objects.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import (
    KubernetesDriverSettings,
    SandboxPodSettings,
    SupervisorAuthSettings,
    SupervisorInjectionSettings,
)
from gateway.drivers.imageref import ImageReference, ImageReferenceError
from openshell_wire.records import sandbox_id_problem

SUPERVISOR_DIR = "/opt/openshell"
#: The supervisor tree's layout (imagevolume/bundle.py; tests/unit/test_podspec.py holds them equal).
TREE_LAUNCHER = "bin/openshell-supervisor"
TREE_ENTRY = "openshell-supervisor.py"
SUPERVISOR_TREE_LIMIT = "256Mi"
JOURNAL_DIR = "/var/lib/openshell/journal"
TMP_DIR = "/tmp"
CREDENTIAL_DIR = "/var/run/secrets/openshell"
CREDENTIAL_KEY = "token"
#: The gateway's CA (drivers.kubernetes.supervisor.gateway_ca_file), published by the driver as this
#: ConfigMap in the sandbox namespace and mounted read-only (not by subPath: updates reach the pod,
#: and the supervisor re-reads the file on every connection).
GATEWAY_CA_CONFIGMAP = "openshell-gateway-ca"
GATEWAY_CA_KEY = "ca.crt"
GATEWAY_CA_DIR = "/var/run/openshell/tls"

CONTAINER_NAME = "sandbox"
#: The container port of the supervisor's own endpoints (drivers.kubernetes.supervisor.metrics_port).
METRICS_PORT_NAME = "metrics"
INIT_CONTAINER_NAME = "openshell-supervisor-install"
VOLUME_SUPERVISOR = "openshell-supervisor"
VOLUME_JOURNAL = "openshell-journal"
VOLUME_TMP = "openshell-tmp"
VOLUME_CREDENTIAL = "openshell-credential"
VOLUME_GATEWAY_CA = "openshell-gateway-ca"

POD_PREFIX = "sandbox-"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "openshell-gateway"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_SANDBOX = "openshell.io/sandbox"
ANNOTATION_SANDBOX_ID = "openshell.io/sandbox-id"
#: On pods whose command was read from the image: the manifest digest it was read from.
ANNOTATION_IMAGE_MANIFEST = "openshell.io/command-from-image"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class PodSpecError(ValueError):
    """A sandbox request that cannot become a pod; the message says which field and why."""


@dataclass(frozen=True)
class SandboxRequest:
    sandbox_id: str
    command: Sequence[str]
    image: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


#: The per-sandbox credential Secret of sandboxes created before the projected token: no longer
#: made; the garbage collector removes an old one with its pod (it is owned by the pod).
CREDENTIAL_SUFFIX = "-credential"
#: The longest id whose pod name fits Kubernetes' 253 characters, with room for the old credential
#: Secret's suffix (kept so no id accepted before is refused now, nor one refused before accepted).
MAX_SANDBOX_ID = 253 - len(POD_PREFIX) - len(CREDENTIAL_SUFFIX)

#: Environment a request may not set: the container's environment is the supervisor's too (the
#: sandbox's command inherits it), and these would reconfigure the supervisor or its loader and
#: interpreter (its config, LD_PRELOAD, TMPDIR...; PYTHON* the interpreter ignores, as -I says).
RESERVED_ENV_PREFIXES = ("OPENSHELL_", "LD_", "PYTHON")
RESERVED_ENV = frozenset({"TMPDIR"})
#: Variable names as every Kubernetes version accepts them (before 1.34 made the relaxed rule,
#: "any printable ASCII but '='", the default, names had to be C-identifier-like) and as a shell can
#: read them: a stricter rule than the relaxed one, so one request works on every cluster. Matched
#: with ``fullmatch``: ``$`` would let a trailing newline through.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
MAX_ENV_NAME = 256
MAX_ENV = 1024
MAX_ARGS = 4096
#: Linux refuses (E2BIG) to exec a single argument or ``NAME=value`` string this long or longer
#: (MAX_ARG_STRLEN, 32 pages).
MAX_ARG_BYTES = 128 * 1024
#: Arguments and environment together: well under the kernel's ARG_MAX and the API server's
#: object size, leaving room for the supervisor's own arguments.
MAX_EXEC_BYTES = 1024 * 1024


def env_problem(name: str) -> str | None:
    """Why ``name`` may not be set by a sandbox request, or None."""
    if len(name) > MAX_ENV_NAME or not _ENV_NAME.fullmatch(name):
        return (
            f"env: {name[:80]!r} is not a valid variable name (a letter or '_', then letters, digits, "
            f"'_', '.' or '-'; at most {MAX_ENV_NAME} characters)"
        )
    if name in RESERVED_ENV or name.upper().startswith(RESERVED_ENV_PREFIXES):
        return f"env: {name!r} is reserved (it would reconfigure the supervisor, not only the sandbox)"
    return None


def _string_problem(value: str) -> str | None:
    """Why a string cannot be an argument or an environment value, or None."""
    if "\x00" in value:
        # execve takes C strings: a NUL would silently cut the value short.
        return "contains a NUL byte"
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    if size >= MAX_ARG_BYTES:
        return f"is {size} bytes; at most {MAX_ARG_BYTES - 1}"
    return None


def _id_problem(sandbox_id: str) -> str | None:
    """Why ``sandbox_id`` cannot name a sandbox pod: the wire protocol's rule, and a length its pod
    and credential Secret names fit in. Checked before anything is registered."""
    problem = sandbox_id_problem(sandbox_id)
    if problem is not None:
        return problem
    if len(sandbox_id) > MAX_SANDBOX_ID:
        return (
            f"sandbox_id is {len(sandbox_id)} characters; on Kubernetes at most {MAX_SANDBOX_ID} "
            "(its pod and credential Secret are named after it)"
        )
    return None


def request_problem(request: SandboxRequest) -> str | None:
    """Why ``request`` cannot become a sandbox, naming the field, or None.

    The one check every path that creates a sandbox applies (the HTTP API, the CLI, the pod
    builder): the id as the wire protocol takes it and short enough for its pod's names, the image
    through the registry reference parser (no path traversal, NUL, whitespace, uppercase repository
    or bad digest), environment names as above and reserved ones refused, and values and arguments
    that exec can carry.
    """
    problem = _id_problem(request.sandbox_id)
    if problem is not None:
        return f"id: {problem}"
    if request.image is not None:
        try:
            ImageReference.parse(request.image)
        except ImageReferenceError as exc:
            return f"image: {exc}"
    if len(request.command) > MAX_ARGS:
        return f"command: {len(request.command)} arguments; at most {MAX_ARGS}"
    if request.command and not request.command[0]:
        return "command[0]: the program to run is empty"
    total = 0
    for i, arg in enumerate(request.command):
        problem = _string_problem(arg)
        if problem is not None:
            return f"command[{i}]: {problem}"
        total += len(arg.encode()) + 1
    if len(request.env) > MAX_ENV:
        return f"env: {len(request.env)} variables; at most {MAX_ENV}"
    for name, value in request.env.items():
        problem = env_problem(name)
        if problem is not None:
            return problem
        problem = _string_problem(f"{name}={value}")
        if problem is not None:
            return f"env.{name}: value {problem}"
        total += len(name.encode()) + len(value.encode()) + 2
    if total > MAX_EXEC_BYTES:
        return f"command and env: {total} bytes together; at most {MAX_EXEC_BYTES}"
    return None


def check_request(request: SandboxRequest) -> None:
    """Raise :class:`PodSpecError` with :func:`request_problem`'s reason, if there is one."""
    problem = request_problem(request)
    if problem is not None:
        raise PodSpecError(problem)


def pod_name(sandbox_id: str) -> str:
    problem = _id_problem(sandbox_id)
    if problem is not None:
        raise PodSpecError(problem)
    return POD_PREFIX + sandbox_id


def sandbox_of_pod(name: str) -> str | None:
    """The sandbox id whose pod is named ``name`` (the reverse of :func:`pod_name`), or None when
    no sandbox's pod could have that name."""
    if not name.startswith(POD_PREFIX):
        return None
    sandbox_id = name[len(POD_PREFIX) :]
    return sandbox_id if _id_problem(sandbox_id) is None else None


def sandbox_label(sandbox_id: str) -> str:
    """The id itself when it fits a label value (63 characters), else a stable digest of it."""
    if len(sandbox_id) <= 63 and _LABEL_VALUE.match(sandbox_id):
        return sandbox_id
    return "h-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:40]


def selector_labels() -> dict[str, str]:
    """What every sandbox pod of this gateway carries: the driver lists and watches by it."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: "sandbox"}


def _labels(settings: SandboxPodSettings, sandbox_id: str) -> dict[str, str]:
    return {**settings.labels, **selector_labels(), LABEL_SANDBOX: sandbox_label(sandbox_id)}


def _ids(pod: SandboxPodSettings) -> dict[str, int]:
    """The ids the settings give; an unset one is left to the platform (the image's USER, or on
    OpenShift the SCC, which fills it from the namespace's range and refuses one outside it)."""
    ids = {"runAsUser": pod.run_as_user, "runAsGroup": pod.run_as_group}
    return {key: value for key, value in ids.items() if value is not None}


def container_security_context(pod: SandboxPodSettings, *, read_only_root: bool) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        **_ids(pod),
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(pod: SandboxPodSettings) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        **_ids(pod),
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if pod.fs_group is not None:
        context["fsGroup"] = pod.fs_group
    return context


def _resources(requests: Mapping[str, str], limits: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = dict(requests)
    if limits:
        out["limits"] = dict(limits)
    return out


def launcher(root: str = SUPERVISOR_DIR) -> list[str]:
    """The argv prefix that runs the supervisor from its tree at ``root`` ("" for the image's own
    root, in the init container): the tree's static launcher, which starts the tree's loader,
    libraries and interpreter (imagevolume/launcher.c says how, and what it sets aside)."""
    return [f"{root}/{TREE_LAUNCHER}"]


def supervisor_command(
    settings: KubernetesDriverSettings, sandbox_id: str, command: Sequence[str]
) -> list[str]:
    """The container command: the supervisor as init, the sandbox's own command after ``--``."""
    argv = [
        *launcher(), "run",
        "--sandbox-id", sandbox_id,
        "--gateway", settings.gateway_address,
        "--journal-dir", JOURNAL_DIR,
        "--set", f"gateway.credential_file={CREDENTIAL_DIR}/{CREDENTIAL_KEY}",
        # The kubelet renews the projected token; the gateway's RefreshSandboxToken is for its own.
        "--set", "gateway.credential_refresh=false",
    ]  # fmt: skip
    if settings.supervisor.gateway_ca_file is not None:
        # The gateway's private CA, from the ConfigMap the driver publishes (settings may still
        # override either: they come after).
        argv += ["--set", "gateway.tls=true", "--set", f"gateway.ca_file={GATEWAY_CA_DIR}/{GATEWAY_CA_KEY}"]
    if settings.supervisor.metrics_port is not None:
        # The supervisor's own endpoints on the pod's IP, for a PodMonitor (settings may override).
        argv += [
            "--set",
            "http.enabled=true",
            "--set",
            f"http.listen=0.0.0.0:{settings.supervisor.metrics_port}",
        ]
    for key, value in sorted(settings.supervisor.settings.items()):
        argv += ["--set", f"{key}={value}"]
    return [*argv, "--", *(kubernetes_literal(arg) for arg in command)]


def kubernetes_literal(value: str) -> str:
    """``value`` escaped for a container's command or an env value, where the kubelet expands
    ``$(NAME)`` to the env variable NAME and turns ``$$`` into ``$``: the sandbox's command and env
    must reach its process as written, as they do with the local driver."""
    return value.replace("$", "$$")


def injection_mode(supervisor: SupervisorInjectionSettings) -> str:
    """``image-volume`` or ``init-container``. The Kubernetes driver decides ``auto`` by asking the
    cluster (gateway.drivers.injection) and builds pods with the decided mode; a caller that did not
    ask (a test, an offline rendering) gets the image volume, what clusters from 1.35 mount."""
    return "image-volume" if supervisor.injection == "auto" else supervisor.injection


def supervisor_volume(supervisor: SupervisorInjectionSettings) -> dict[str, Any]:
    if injection_mode(supervisor) == "image-volume":
        return {
            "name": VOLUME_SUPERVISOR,
            "image": {"reference": supervisor.image, "pullPolicy": supervisor.pull_policy},
        }
    # The tree is about 100 MB (docs/image-volume.md).
    return {"name": VOLUME_SUPERVISOR, "emptyDir": {"sizeLimit": SUPERVISOR_TREE_LIMIT}}


def install_init_container(settings: KubernetesDriverSettings) -> dict[str, Any]:
    """The fallback without ImageVolume: the tree copies itself (a FROM scratch image has no cp)."""
    supervisor, pod = settings.supervisor, settings.pod
    container: dict[str, Any] = {
        "name": INIT_CONTAINER_NAME,
        "image": supervisor.image,
        "imagePullPolicy": supervisor.pull_policy,
        "command": [*launcher(""), "install", SUPERVISOR_DIR],
        "securityContext": container_security_context(pod, read_only_root=True),
        "volumeMounts": [
            {"name": VOLUME_SUPERVISOR, "mountPath": SUPERVISOR_DIR},
            {"name": VOLUME_TMP, "mountPath": TMP_DIR},
        ],
    }
    resources = _resources(supervisor.init_resources.requests, supervisor.init_resources.limits)
    if resources:
        container["resources"] = resources
    return container


def credential_volume(pod: SandboxPodSettings, auth: SupervisorAuthSettings) -> dict[str, Any]:
    """The projected ServiceAccount token the supervisor presents: our audience, a short expiry,
    bound to the pod (the API server refuses it once the pod is gone), renewed by the kubelet."""
    return {
        "name": VOLUME_CREDENTIAL,
        "projected": {
            # Group-readable through fsGroup; world-readable only when there is no fsGroup (also
            # on OpenShift, whose SCC adds one the gateway does not know: 0444 needs no id).
            "defaultMode": 0o440 if pod.fs_group is not None else 0o444,
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": auth.kubernetes_audience,
                        "expirationSeconds": auth.kubernetes_token_expiry_s,
                        "path": CREDENTIAL_KEY,
                    }
                }
            ],
        },
    }


def build_sandbox_pod(
    settings: KubernetesDriverSettings,
    request: SandboxRequest,
    *,
    auth: SupervisorAuthSettings | None = None,
) -> dict[str, Any]:
    """The Pod object (a JSON-ready dict) for one sandbox; ``auth`` gives its token's audience and
    expiry (unset: the defaults of ``auth.supervisors``)."""
    pod, supervisor = settings.pod, settings.supervisor
    auth = auth if auth is not None else SupervisorAuthSettings()
    name = pod_name(request.sandbox_id)
    if not request.command:
        raise PodSpecError(
            "command is empty and drivers.kubernetes.registry.resolve_commands is off: the supervisor "
            "wraps the sandbox's command, and Kubernetes ignores the image's ENTRYPOINT/CMD once a "
            "command is set, so name the command or turn the registry lookup on"
        )
    image = request.image or pod.default_image
    if not image:
        raise PodSpecError("image is empty and drivers.kubernetes.pod.default_image is not set")
    if not settings.gateway_address:
        raise PodSpecError(
            "drivers.kubernetes.gateway_address is empty: supervisors would not know where to dial"
        )
    # Again here, after the image's own command was read from its registry: every pod is checked.
    check_request(replace(request, image=image))

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": pod.image_pull_policy,
        "command": supervisor_command(settings, request.sandbox_id, request.command),
        "env": [{"name": k, "value": kubernetes_literal(v)} for k, v in sorted(request.env.items())],
        "securityContext": container_security_context(pod, read_only_root=pod.read_only_root_filesystem),
        "volumeMounts": [
            {"name": VOLUME_SUPERVISOR, "mountPath": SUPERVISOR_DIR, "readOnly": True},
            {"name": VOLUME_JOURNAL, "mountPath": JOURNAL_DIR},
            {"name": VOLUME_TMP, "mountPath": TMP_DIR},
            {"name": VOLUME_CREDENTIAL, "mountPath": CREDENTIAL_DIR, "readOnly": True},
        ],
    }
    if not container["env"]:
        del container["env"]
    if settings.supervisor.metrics_port is not None:
        container["ports"] = [
            {"name": METRICS_PORT_NAME, "containerPort": settings.supervisor.metrics_port, "protocol": "TCP"}
        ]
    resources = _resources(pod.resources.requests, pod.resources.limits)
    if resources:
        container["resources"] = resources

    spec: dict[str, Any] = {
        # The supervisor is the sandbox's init and applies its own restart policy; when it exits,
        # the sandbox has ended, and the pod stays for its status and logs until deleted.
        "restartPolicy": "Never",
        "automountServiceAccountToken": pod.automount_service_account_token,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": pod.termination_grace_period_s,
        "securityContext": pod_security_context(pod),
        "containers": [container],
        "volumes": [
            supervisor_volume(supervisor),
            {"name": VOLUME_JOURNAL, "emptyDir": {"sizeLimit": supervisor.journal_size_limit}},
            {"name": VOLUME_TMP, "emptyDir": {"sizeLimit": supervisor.tmp_size_limit}},
            credential_volume(pod, auth),
        ],
    }
    if supervisor.gateway_ca_file is not None:
        container["volumeMounts"].append(
            {"name": VOLUME_GATEWAY_CA, "mountPath": GATEWAY_CA_DIR, "readOnly": True}
        )
        spec["volumes"].append(
            {
                "name": VOLUME_GATEWAY_CA,
                "configMap": {
                    "name": GATEWAY_CA_CONFIGMAP,
                    "items": [{"key": GATEWAY_CA_KEY, "path": GATEWAY_CA_KEY}],
                },
            }
        )
    if injection_mode(supervisor) == "init-container":
        spec["initContainers"] = [install_init_container(settings)]
    optional: dict[str, Any] = {
        "serviceAccountName": pod.service_account_name,
        "runtimeClassName": pod.runtime_class_name,
        "priorityClassName": pod.priority_class_name,
        "nodeSelector": dict(pod.node_selector) or None,
        "tolerations": list(pod.tolerations) or None,
        "affinity": dict(pod.affinity) or None,
        "imagePullSecrets": [{"name": s} for s in pod.image_pull_secrets] or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": _labels(pod, request.sandbox_id),
            "annotations": {**pod.annotations, ANNOTATION_SANDBOX_ID: request.sandbox_id},
        },
        "spec": spec,
    }
