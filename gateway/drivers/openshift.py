"""Whether the sandbox namespace is OpenShift's, and what changes in sandbox pods when it is.

On OpenShift every pod is admitted through a SecurityContextConstraints (SCC); a ServiceAccount
without special grants gets ``restricted-v2``, whose ``runAsUser: MustRunAsRange`` and
``fsGroup: MustRunAs`` take their ranges from the namespace's annotations
(``openshift.io/sa.scc.uid-range``, ``openshift.io/sa.scc.supplemental-groups``, e.g.
``1000680000/10000``): a pod asking for 65534 is refused, a pod asking for nothing is given the
range's first id. So on OpenShift the sandbox pods leave those ids alone, unless the config names
them (an operator who knows the namespace's range may): :func:`platform_pod_settings`.

No code of the gateway needs the assigned numbers: the emptyDirs are world-writable, and the
projected token is mounted 0444 when the pod names no fsGroup. So the gateway does not read the
namespace's annotations, which would need ``get`` on namespaces, a cluster-scoped grant
(docs/rbac.md keeps the gateway to namespaced ones).

``drivers.kubernetes.platform: auto`` (the default) asks the API server's discovery at start
whether it serves the ``security.openshift.io`` group, the SCCs' (every OpenShift serves it, no
other distribution does). The answer is logged and shown on the ops ``/status`` with the
supervisor's injection, which it also feeds (gateway.drivers.injection.decide).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from lightkube import AsyncClient

from gateway.config import KubernetesDriverSettings
from gateway.drivers.kubeapi import NonResourceError, get_json

log = logging.getLogger(__name__)

Platform = Literal["kubernetes", "openshift"]
#: The API group of SecurityContextConstraints: served by every OpenShift API server.
SCC_GROUP = "security.openshift.io"
#: The pod ids OpenShift's SCC assigns when a pod leaves them unset.
SCC_ASSIGNED_IDS = ("run_as_user", "run_as_group", "fs_group")


class PlatformUnknown(RuntimeError):
    """Discovery did not answer; the platform is asked again at the first creation."""


@dataclass(frozen=True)
class PlatformChoice:
    configured: str
    platform: Platform
    #: Why, in a sentence.
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"configured": self.configured, "platform": self.platform, "reason": self.reason}


def serves_scc_group(group_list: Any) -> bool:
    """Whether a discovery ``APIGroupList`` (``GET /apis``) names the SCCs' group."""
    groups = group_list.get("groups") if isinstance(group_list, dict) else None
    return any(isinstance(g, dict) and g.get("name") == SCC_GROUP for g in groups or [])


async def api_groups(client: AsyncClient) -> dict[str, Any]:
    """The API server's ``GET /apis`` (discovery, readable by every authenticated identity).

    lightkube has no discovery call: gateway.drivers.kubeapi reads it."""
    try:
        doc = await get_json(client, "/apis")
    except NonResourceError as exc:
        raise PlatformUnknown(f"discovery (/apis) did not answer: {exc}") from None
    if not isinstance(doc, dict):
        raise PlatformUnknown("the API server's /apis is not an APIGroupList")
    return doc


async def choose_platform(client: AsyncClient, settings: KubernetesDriverSettings) -> PlatformChoice:
    """The platform for ``settings.platform``: as configured, or ``auto`` asked of discovery (see the
    module docstring); logs it. Raises :class:`PlatformUnknown` when ``auto`` cannot ask."""
    if settings.platform != "auto":
        platform: Platform = settings.platform
        choice = PlatformChoice(settings.platform, platform, f"{platform} as configured")
    elif serves_scc_group(await api_groups(client)):
        choice = PlatformChoice("auto", "openshift", f"the API server serves {SCC_GROUP} (SCC admission)")
    else:
        choice = PlatformChoice("auto", "kubernetes", f"the API server does not serve {SCC_GROUP}")
    log.info("kubernetes platform: %s (%s)", choice.platform, choice.reason, extra=choice.as_dict())
    if choice.platform == "openshift":
        given = sorted(
            f"pod.{name}={getattr(settings.pod, name)}"
            for name in SCC_ASSIGNED_IDS
            if name in settings.pod.model_fields_set and getattr(settings.pod, name) is not None
        )
        if given:
            log.warning(
                "on OpenShift the sandbox pods keep the configured %s: the SCC refuses ids outside the "
                "namespace's range (openshift.io/sa.scc.uid-range, sa.scc.supplemental-groups); "
                "leave them out of the config (or null) to let it assign them",
                ", ".join(given),
            )
    return choice


def platform_pod_settings(settings: KubernetesDriverSettings, platform: Platform) -> KubernetesDriverSettings:
    """``settings`` with the ids left to the SCC on OpenShift: those the config does not give
    (explicit values, null included, are kept). On Kubernetes, ``settings`` as they are."""
    pod = settings.pod
    if platform != "openshift":
        return settings
    unset = {name: None for name in SCC_ASSIGNED_IDS if name not in pod.model_fields_set}
    if not unset:
        return settings
    return settings.model_copy(update={"pod": pod.model_copy(update=unset)})
