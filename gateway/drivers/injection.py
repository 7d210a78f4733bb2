"""How the supervisor gets into sandbox pods on this cluster: an image volume or an init container.

``drivers.kubernetes.supervisor.injection`` is ``auto`` by default: the gateway asks the cluster at
start, once, and every sandbox pod it builds uses the answer. Two facts decide it:

- **the API server's version**, from ``/version`` (the emulated version when the server emulates
  an older one, ``--emulated-version``: that is the version whose features it serves). Image
  volumes are on by default from Kubernetes 1.35 (beta, default on; GA in 1.36). Before that the
  ``ImageVolume`` feature gate is off unless an administrator turned it on, and node runtimes
  (containerd before 2.1, CRI-O before 1.31) do not mount them;
- **a server-side dry run** (``dryRun=All``: admitted, validated, never stored) of a sandbox pod
  built as the driver builds them, with the image volume. An API server whose ``ImageVolume``
  gate is off drops the field (Kubernetes drops the fields of disabled features on create), and the
  pod is then refused as a volume without a source: proof that image volumes cannot be mounted.
  The same dry run also runs the namespace's admission (Pod Security, quotas, policy engines): a
  refusal for any other reason is said in the log at start, before the first sandbox meets it.

``auto`` picks the image volume when the server is 1.35 or newer and the dry run keeps the volume;
otherwise the init container, which works on every version. When the cluster does not answer (the
version unread, the dry run timed out, throttled or failed with a 5xx) the choice is provisional
(``settled`` false, the init container unless the version alone says otherwise, "provisional" in
its reason) and asked again at a creation, at most every minute, until the cluster answers: a
transient failure at start does not decide for the process's life. A 422 is about the image
volume only when it names the supervisor's volume (by name or its ``spec.volumes[i]``); an
operator's bad extra volume is another problem. A refusal the server does not tie to the volume
(a policy engine's own list of volume types) makes ``auto`` dry-run the init container's pod too,
and take the init container when that one is admitted. A configured ``image-volume`` is kept as
configured, and a probe that says the cluster cannot mount image volumes is logged as an error
(every sandbox would fail to start).

On OpenShift (gateway.drivers.openshift) the dry run also passes the namespace's SCC admission,
which decides image volumes on its own: ``restricted-v2`` lists the ``image`` volume type from
OpenShift 4.20 (openshift/cluster-kube-apiserver-operator, 2025-11), earlier releases and custom
SCCs may not. A refusal by the SCC of the image volume ("image volumes are not allowed to be used")
counts as the server dropping it, and ``auto`` takes the image volume there only when the dry run
kept it: the version alone is not enough.

The node's runtime is not checked: what it runs is in ``Node.status.nodeInfo``, readable only with a
cluster-scoped permission the gateway does not ask for (docs/rbac.md). A 1.35 cluster whose nodes
run an older containerd is the one case ``auto`` gets wrong; set ``init-container`` there.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import httpx2 as httpx
from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod

from gateway.config import KubernetesDriverSettings, SupervisorAuthSettings
from gateway.drivers.kubeapi import NonResourceError, get_json
from gateway.drivers.podspec import VOLUME_SUPERVISOR, SandboxRequest, build_sandbox_pod

log = logging.getLogger(__name__)

Mode = Literal["image-volume", "init-container"]
#: The first release whose API servers and kubelets mount image volumes by default.
IMAGE_VOLUME_DEFAULT_FROM = (1, 35)
#: How a dry run the server did not answer is said (the choice is then not settled).
UNANSWERED = "the API server did not answer the dry run"
#: The dry run's sandbox id (its pod is never stored).
PROBE_SANDBOX_ID = "openshell-injection-probe"

_MINOR = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class InjectionChoice:
    """What the gateway uses, and what it found out: shown in its log and on the ops ``/status``."""

    configured: str
    mode: Mode
    #: The API server's version as it serves features ("1.36"), None when it could not be read.
    server_version: str | None
    #: True: the dry run kept the image volume; False: the server dropped or refused it; None: the
    #: dry run failed for another reason (``problem`` says which) or was not made.
    image_volume_accepted: bool | None
    #: Why this mode, in a sentence.
    reason: str
    #: A dry-run refusal that is not about the image volume: the sandbox pods may be refused too.
    problem: str | None = None
    #: kubernetes or openshift (gateway.drivers.openshift): the SCC's say weighs on openshift.
    platform: str = "kubernetes"
    #: False when the cluster did not answer (the version unread, the dry run unanswered: a
    #: timeout, a 429 or 5xx): the choice is provisional and asked again (the driver's
    #: ``RETRY_UNSETTLED_S``), so a transient failure at start does not decide for the process's life.
    settled: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "settled": self.settled,
            "configured": self.configured,
            "mode": self.mode,
            "server_version": self.server_version,
            "image_volume_accepted": self.image_volume_accepted,
            "reason": self.reason,
            "problem": self.problem,
            "platform": self.platform,
        }


def _version_of(doc: dict[str, Any]) -> tuple[int, int] | None:
    """``(major, minor)`` of a ``/version`` document: the emulated version when there is one."""
    for major_key, minor_key in (("emulationMajor", "emulationMinor"), ("major", "minor")):
        major, minor = str(doc.get(major_key) or ""), _MINOR.match(str(doc.get(minor_key) or ""))
        if major.isdigit() and minor is not None:
            return int(major), int(minor.group(1))
    return None


async def server_version(client: AsyncClient) -> tuple[int, int] | None:
    """The API server's ``/version``, or None (logged) when it cannot be read."""
    try:
        doc = await get_json(client, "/version")
    except NonResourceError as exc:
        log.warning("%s", exc)
        return None
    return _version_of(doc) if isinstance(doc, dict) else None


def _keeps_image_volume(pod: Pod) -> bool:
    volumes = pod.spec.volumes if pod.spec is not None and pod.spec.volumes else []
    return any(v.name == VOLUME_SUPERVISOR and v.image is not None for v in volumes)


#: What OpenShift's SCC admission says of a volume type its SCCs do not list (403 Forbidden;
#: apiserver-library-go, sccmatching/provider.go).
SCC_REFUSED_IMAGE_VOLUME = "image volumes are not allowed to be used"


def _about_the_volume(exc: ApiError, *, index: int = -1) -> bool:
    """A 422 on the supervisor's volume (``spec.volumes[index]``, the position of the supervisor's
    volume in the probe pod; a volume without a source is what a server that dropped the disabled
    field sees), or one naming the volume; or an SCC's 403 refusing image volumes (it forbids what
    every other SCC check may pass). A 422 on another volume (an operator's) is not about it."""
    message = exc.status.message or ""
    if exc.status.code == 403 and SCC_REFUSED_IMAGE_VOLUME in message:
        return True
    return exc.status.code == 422 and (VOLUME_SUPERVISOR in message or f"spec.volumes[{index}]" in message)


def _unanswered(exc: ApiError) -> bool:
    """A refusal that says nothing of the pod: throttled or the server's own failure."""
    return exc.status.code == 429 or (exc.status.code or 0) >= 500


def _probe_pod(
    settings: KubernetesDriverSettings, *, auth: SupervisorAuthSettings | None, injection: Mode
) -> dict[str, Any]:
    """A sandbox pod built as the driver builds them, with ``injection``, for a dry run."""
    probe_settings = settings.model_copy(
        update={"supervisor": settings.supervisor.model_copy(update={"injection": injection})}
    )
    image = settings.pod.default_image or settings.supervisor.image
    request = SandboxRequest(sandbox_id=PROBE_SANDBOX_ID, command=["true"], image=image, env={})
    return build_sandbox_pod(probe_settings, request, auth=auth)


async def dry_run_admits_init_container(
    client: AsyncClient, settings: KubernetesDriverSettings, *, auth: SupervisorAuthSettings | None
) -> bool:
    """Whether the namespace's admission takes a sandbox pod with the init container (dry run)."""
    try:
        await client.create(
            cast(Pod, Pod.from_dict(_probe_pod(settings, auth=auth, injection="init-container"))),
            dry_run=True,
        )
    except (ApiError, httpx.HTTPError, OSError):
        return False
    return True


async def dry_run_image_volume(
    client: AsyncClient,
    settings: KubernetesDriverSettings,
    *,
    auth: SupervisorAuthSettings | None,
) -> tuple[bool | None, str | None]:
    """Whether the API server keeps a sandbox pod's image volume (dry run), and a refusal that is
    about something else."""
    doc = _probe_pod(settings, auth=auth, injection="image-volume")
    index = next(i for i, v in enumerate(doc["spec"]["volumes"]) if v["name"] == VOLUME_SUPERVISOR)
    try:
        # The driver's client names the sandbox namespace (as for every sandbox pod).
        created = await client.create(cast(Pod, Pod.from_dict(doc)), dry_run=True)
    except ApiError as exc:
        if _about_the_volume(exc, index=index):
            return False, None
        if _unanswered(exc):
            return None, f"{UNANSWERED} ({exc.status.code}): {exc.status.message}"
        return None, f"a sandbox pod was refused by the API server ({exc.status.code}): {exc.status.message}"
    except (httpx.HTTPError, OSError) as exc:
        return None, f"{UNANSWERED}: {exc}"
    return _keeps_image_volume(created), None


def decide(
    configured: str,
    *,
    version: tuple[int, int] | None,
    accepted: bool | None,
    problem: str | None,
    platform: str = "kubernetes",
) -> InjectionChoice:
    """The mode for ``configured`` given what the cluster said (pure: the rule in one place)."""
    choice = _decide(configured, version=version, accepted=accepted, problem=problem)
    if (
        platform == "openshift"
        and configured == "auto"
        and choice.mode == "image-volume"
        and accepted is not True
    ):
        # The SCC decides image volumes whatever the version: only a dry run it admitted proves them.
        why = f"on OpenShift the SCC's say on image volumes is unknown (the dry run failed): {choice.reason}"
        choice = replace(choice, mode="init-container", reason=why)
    return replace(choice, platform=platform)


def _decide(
    configured: str,
    *,
    version: tuple[int, int] | None,
    accepted: bool | None,
    problem: str | None,
) -> InjectionChoice:
    shown = None if version is None else f"{version[0]}.{version[1]}"
    recent = version is not None and version >= IMAGE_VOLUME_DEFAULT_FROM
    floor = "{}.{}".format(*IMAGE_VOLUME_DEFAULT_FROM)
    if configured != "auto":
        mode = cast(Mode, configured)
        reason = f"{mode} as configured (drivers.kubernetes.supervisor.injection)"
        if mode == "image-volume" and accepted is False:
            reason += "; the API server drops image volumes: every sandbox pod will be refused"
        return InjectionChoice(configured, mode, shown, accepted, reason, problem)
    if accepted is False:
        why = f"the API server ({shown or 'version unknown'}) drops image volumes (ImageVolume off)"
        return InjectionChoice(configured, "init-container", shown, accepted, why, problem)
    if not recent:
        why = (
            f"the API server is {shown}, before {floor} (image volumes on by default)"
            if shown
            else "the API server's version is unknown"
        )
        return InjectionChoice(configured, "init-container", shown, accepted, why, problem)
    if accepted is None:
        why = f"the API server is {shown} (image volumes on by default), the dry run did not say otherwise"
        return InjectionChoice(configured, "image-volume", shown, accepted, why, problem)
    why = f"the API server is {shown} and keeps a sandbox pod's image volume (dry run)"
    return InjectionChoice(configured, "image-volume", shown, accepted, why, problem)


async def choose_injection(
    client: AsyncClient,
    settings: KubernetesDriverSettings,
    *,
    auth: SupervisorAuthSettings | None,
    platform: str = "kubernetes",
) -> InjectionChoice:
    """Ask the cluster and decide (see the module docstring); logs the choice. ``settings`` are the
    ones sandbox pods are built from on ``platform`` (gateway.drivers.openshift.platform_pod_settings)."""
    version = await server_version(client)
    accepted, problem = await dry_run_image_volume(client, settings, auth=auth)
    choice = decide(
        settings.supervisor.injection, version=version, accepted=accepted, problem=problem, platform=platform
    )
    unanswered = version is None or (problem is not None and problem.startswith(UNANSWERED))
    refused = accepted is None and problem is not None and not problem.startswith(UNANSWERED)
    # Refused for a reason the server did not tie to the volume (a policy engine's own list of
    # volume types, a webhook): if the init container's pod is admitted, the volume was the
    # difference, and the pods that would be admitted are the init container's.
    if (
        refused
        and settings.supervisor.injection == "auto"
        and choice.mode == "image-volume"
        and await dry_run_admits_init_container(client, settings, auth=auth)
    ):
        why = (
            "the namespace's admission refuses a sandbox pod with the image volume and admits "
            "it with the init container"
        )
        choice = replace(choice, mode="init-container", reason=why)
    if unanswered and settings.supervisor.injection == "auto":
        choice = replace(choice, settled=False, reason=f"{choice.reason} (provisional: asked again)")
    level = logging.ERROR if choice.mode == "image-volume" and accepted is False else logging.INFO
    log.log(level, "supervisor injection: %s (%s)", choice.mode, choice.reason, extra=choice.as_dict())
    if problem is not None:
        log.error(
            "%s; sandboxes created in namespace %s may be refused the same way", problem, settings.namespace
        )
    return choice
