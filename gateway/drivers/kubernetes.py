"""The Kubernetes sandbox driver: one pod per sandbox, built by :mod:`gateway.drivers.podspec`.

Works from a kubeconfig or in-cluster, against any conformant cluster; on OpenShift the sandbox
pods leave their ids to the SCC (gateway.drivers.openshift, asked of discovery at start). It
creates a sandbox as a pod (its supervisor's credential is a projected ServiceAccount token the
kubelet writes and renews: no Secret), watches its pods by label, and deletes them. Everything it
needs is the namespaced Role in ``docs/rbac.md``, plus ``create`` on ``tokenreviews``
(cluster-scoped) for the gateway to check those tokens; a refusal by the API says which verb on
which resource was missing.

lightkube is imported here only, so a gateway on the local driver never loads it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, cast

import httpx2 as httpx  # lightkube's HTTP library (a maintained httpx fork)
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ConfigError, NotReadyError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret
from lightkube.types import PatchType

from gateway.config import KubernetesDriverSettings, SupervisorAuthSettings
from gateway.drivers.imageref import (
    BasicCredentials,
    CredentialEntry,
    DockerConfigError,
    ImageReference,
    ImageReferenceError,
    candidate_credentials,
    docker_config_entries,
)
from gateway.drivers.injection import InjectionChoice, choose_injection
from gateway.drivers.openshift import PlatformChoice, PlatformUnknown, choose_platform, platform_pod_settings
from gateway.drivers.podspec import (
    ANNOTATION_IMAGE_MANIFEST,
    ANNOTATION_SANDBOX_ID,
    GATEWAY_CA_CONFIGMAP,
    GATEWAY_CA_KEY,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PodSpecError,
    SandboxRequest,
    build_sandbox_pod,
    pod_name,
    selector_labels,
)
from gateway.drivers.registry import ImageCommand, Platform, RegistryClient, RegistryError

log = logging.getLogger(__name__)

FIELD_MANAGER = MANAGED_BY
#: A provisional injection choice (the cluster did not answer: gateway.drivers.injection) is asked
#: again at a creation at most this often, so a cluster that keeps failing is not asked per pod.
RETRY_UNSETTLED_S = 60.0

#: Everything the driver does, as the rules of a namespaced Role in the sandbox namespace: the
#: chart's Role and docs/rbac.md say exactly this, and the live tests show each verb is needed.
#: (No Secret verbs: the credential is a projected token now. The credential Secrets of sandboxes
#: created before are owned by their pods: the garbage collector removes them with the pod.)
RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete", "get", "list", "watch"]},
)

#: The one cluster-scoped permission, a ClusterRole's rule bound to the gateway's identity:
#: reviewing the sandbox pods' projected tokens (gateway/auth/kubernetes_tokens.py). TokenReview is
#: not namespaced, so a Role cannot grant it; it reads nothing and changes nothing in the cluster.
CLUSTER_RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
)


def pull_secret_rule(names: list[str]) -> dict[str, list[str]]:
    """The one more rule when the image's command is read from its registry with pull Secrets:
    ``get`` on those Secrets by name, nothing else."""
    return {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": list(names)}


def gateway_ca_rules() -> list[dict[str, list[str]]]:
    """The rules for publishing the gateway's CA (supervisor.gateway_ca_file): ``create`` on
    ConfigMaps (RBAC cannot limit a create by name: the name is not known when it is authorized),
    and ``get``/``update``/``patch`` on that one ConfigMap by name; nothing to read or change any
    other ConfigMap."""
    return [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "update", "patch"],
            "resourceNames": [GATEWAY_CA_CONFIGMAP],
        },
    ]


def rbac_rules(settings: KubernetesDriverSettings) -> list[dict[str, list[str]]]:
    """The namespaced Role's rules: RBAC_RULES, plus read access to the pull Secrets when the
    driver reads them, plus the CA ConfigMap's when it publishes one. (The ClusterRole's are
    CLUSTER_RBAC_RULES, whatever the settings.)"""
    rules = [dict(rule) for rule in RBAC_RULES]
    if settings.registry.resolve_commands and settings.pod.image_pull_secrets:
        rules.append(pull_secret_rule(settings.pod.image_pull_secrets))
    if settings.supervisor.gateway_ca_file is not None:
        rules += gateway_ca_rules()
    return rules


#: How often the gateway's CA file is checked for a change to publish (a renewal of a CA is rare;
#: the kubelet takes up to a minute or so more to bring the ConfigMap's update into the pods).
GATEWAY_CA_POLL_S = 30.0


_SELECTOR: dict[str, Any] = dict(selector_labels())


class KubernetesDriverError(RuntimeError):
    """The Kubernetes API refused or could not be reached; the message says what and what to do.

    ``status`` is the API's HTTP status code, None when the API was not reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CreatedSandbox:
    sandbox_id: str
    pod_name: str
    #: The pod's uid: its projected token names it, and it must be the sandbox row's (a pod
    #: re-created under the same name has another).
    pod_uid: str
    #: The image the pod runs (pinned to a digest when the command came from it; None: the default).
    image: str | None = None
    #: The command run under the supervisor: the request's, or the image's ENTRYPOINT + CMD.
    command: tuple[str, ...] = ()
    #: The manifest digest the command was read from, when it came from the image.
    command_from_image: str | None = None


#: The API server ends each watch request after this long (lightkube then opens the next).
WATCH_SERVER_TIMEOUT_S = 300


@dataclass(frozen=True)
class PodState:
    sandbox_id: str
    pod_name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown; "Deleted" once it is gone
    reason: str | None = None
    exit_code: int | None = None
    pod_uid: str | None = None
    #: The pod's resourceVersion in a watch event: to resume the watch after it.
    resource_version: str | None = None

    @property
    def deleted(self) -> bool:
        return self.phase == "Deleted"


@dataclass(frozen=True)
class Snapshot:
    states: list[PodState]
    resource_version: str | None


def _pod_state(pod: Pod, *, deleted: bool = False) -> PodState | None:
    meta = pod.metadata
    if meta is None or meta.name is None:
        return None
    sandbox_id = (meta.annotations or {}).get(ANNOTATION_SANDBOX_ID)
    if sandbox_id is None:
        return None
    status = pod.status
    phase = "Deleted" if deleted else (status.phase if status and status.phase else "Unknown")
    reason = status.reason if status else None
    exit_code = None
    for cs in (status.containerStatuses or []) if status else []:
        terminated = cs.state.terminated if cs.state else None
        if terminated is not None:
            exit_code = terminated.exitCode
            reason = reason or terminated.reason
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason:
            reason = reason or waiting.reason
    return PodState(
        sandbox_id=sandbox_id,
        pod_name=meta.name,
        phase=phase,
        reason=reason,
        exit_code=exit_code,
        pod_uid=meta.uid or None,
    )


class KubernetesDriver:
    name = "kubernetes"

    def __init__(
        self,
        settings: KubernetesDriverSettings,
        *,
        auth: SupervisorAuthSettings | None = None,
        client: AsyncClient | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._client = client
        self._registry = registry
        #: The CA text last published (or found already published), and the task keeping it so.
        self._published_ca: str | None = None
        self._ca_publisher: asyncio.Task[None] | None = None
        #: How the supervisor gets into pods here (gateway.drivers.injection): decided by
        #: choose_injection() at start, or at the first creation when the API did not answer then.
        self.injection: InjectionChoice | None = None
        #: Kubernetes or OpenShift (gateway.drivers.openshift): decided with the injection.
        self.platform: PlatformChoice | None = None
        self._choosing = asyncio.Lock()
        #: When the injection was last asked (monotonic): a provisional one is asked again after
        #: RETRY_UNSETTLED_S, at a creation.
        self._injection_asked = 0.0

    @property
    def namespace(self) -> str:
        return self._settings.namespace

    def _load_config(self) -> SingleConfig:
        s = self._settings
        try:
            config = KubeConfig.from_file(s.kubeconfig) if s.kubeconfig is not None else KubeConfig.from_env()
            single = config.get(context_name=s.context)
            if single is None:
                raise ConfigError("no context selected: set drivers.kubernetes.context")
            return single
        except (ConfigError, OSError) as exc:
            where = s.kubeconfig or "in-cluster credentials, $KUBECONFIG or ~/.kube/config"
            raise KubernetesDriverError(
                f"cannot load the Kubernetes client config from {where}: {exc}"
            ) from None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(
                self._load_config(),
                namespace=self.namespace,
                timeout=httpx.Timeout(self._settings.request_timeout_s),
                field_manager=FIELD_MANAGER,
            )
        return self._client

    async def check_access(self) -> None:
        """List one pod: fails early, with the reason, when the API is unreachable or refuses."""
        with self._explained("list", "pods"):
            async for _ in self.client.list(Pod, namespace=self.namespace, labels=_SELECTOR, chunk_size=1):
                break

    async def choose_injection(self) -> InjectionChoice:
        """Ask the cluster which platform it is and how to inject the supervisor (once each; see
        gateway.drivers.openshift and gateway.drivers.injection). The dry run of the injection's
        probe is built for the platform: on OpenShift, with the ids left to the SCC."""
        async with self._choosing:
            if self.platform is None:
                try:
                    self.platform = await choose_platform(self.client, self._settings)
                except PlatformUnknown as exc:
                    # Not cached: asked again at start's retry or the next creation (a 502 meanwhile).
                    raise KubernetesDriverError(f"{exc}; drivers.kubernetes.platform is auto") from None
            unsettled = self.injection is not None and not self.injection.settled
            if unsettled and time.monotonic() - self._injection_asked >= RETRY_UNSETTLED_S:
                self.injection = None  # the cluster did not answer last time: ask again
            if self.injection is None:
                self._injection_asked = time.monotonic()
                self.injection = await choose_injection(
                    self.client,
                    platform_pod_settings(self._settings, self.platform.platform),
                    auth=self._auth,
                    platform=self.platform.platform,
                )
            return self.injection

    async def _pod_settings(self) -> KubernetesDriverSettings:
        """The settings a sandbox pod is built from: for the platform, with the injection mode
        decided, never ``auto`` (a provisional choice is asked again, see choose_injection)."""
        choice = self.injection
        if choice is None or not choice.settled:
            choice = await self.choose_injection()
        assert self.platform is not None  # decided before the injection
        settings = platform_pod_settings(self._settings, self.platform.platform)
        if choice.mode == settings.supervisor.injection:
            return settings
        supervisor = settings.supervisor.model_copy(update={"injection": choice.mode})
        return settings.model_copy(update={"supervisor": supervisor})

    def _read_gateway_ca(self) -> str:
        path = self._settings.supervisor.gateway_ca_file
        assert path is not None
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KubernetesDriverError(
                f"cannot read drivers.kubernetes.supervisor.gateway_ca_file {str(path)!r} to publish it to "
                f"supervisors: {exc} (with the chart: the TLS Secret must carry ca.crt)"
            ) from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise KubernetesDriverError(
                f"drivers.kubernetes.supervisor.gateway_ca_file {str(path)!r} holds no PEM certificate: "
                "supervisors could verify nothing against it; not published"
            )
        return text

    async def publish_gateway_ca(self) -> bool:
        """Publish supervisor.gateway_ca_file as the ConfigMap sandbox pods mount, unless it already
        says the same; True when it was created or changed. Raises KubernetesDriverError."""
        text = self._read_gateway_ca()
        if text == self._published_ca:
            return False
        body = {"data": {GATEWAY_CA_KEY: text}}
        with self._explained("get", "configmaps"):
            try:
                current = await self.client.get(ConfigMap, GATEWAY_CA_CONFIGMAP, namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                current = None
        if current is not None and (current.data or {}).get(GATEWAY_CA_KEY) == text:
            self._published_ca = text
            return False
        if current is None:
            created = ConfigMap(
                metadata=ObjectMeta(
                    name=GATEWAY_CA_CONFIGMAP,
                    namespace=self.namespace,
                    labels={LABEL_MANAGED_BY: MANAGED_BY},
                ),
                data={GATEWAY_CA_KEY: text},
            )
            try:
                with self._explained("create", "configmaps"):
                    await self.client.create(created)
            except KubernetesDriverError as exc:
                if exc.status != 409:  # else another replica created it meanwhile: patch it below
                    raise
            else:
                self._published_ca = text
                log.info("gateway CA published to supervisors", extra={"namespace": self.namespace})
                return True
        # A merge patch of the one key: no resourceVersion to race on between replicas.
        with self._explained("patch", "configmaps"):
            await self.client.patch(
                ConfigMap, GATEWAY_CA_CONFIGMAP, body, namespace=self.namespace, patch_type=PatchType.MERGE
            )
        self._published_ca = text
        log.info("gateway CA published to supervisors (changed)", extra={"namespace": self.namespace})
        return True

    def start_gateway_ca_publisher(self, *, interval_s: float = GATEWAY_CA_POLL_S) -> None:
        """With supervisor.gateway_ca_file: publish it now and whenever it changes, in a task this
        driver owns (cancelled by :meth:`close`). A failure is logged and tried again next time:
        the file may appear later (a Certificate being issued), the API may come back."""
        if self._settings.supervisor.gateway_ca_file is None or self._ca_publisher is not None:
            return
        self._ca_publisher = asyncio.create_task(
            self._keep_gateway_ca(interval_s), name="gateway-ca-publisher"
        )

    async def _keep_gateway_ca(self, interval_s: float) -> None:
        failing: str | None = None
        while True:
            try:
                await self.publish_gateway_ca()
                failing = None
            except KubernetesDriverError as exc:
                if str(exc) != failing:  # once per distinct failure, not every poll
                    log.error("gateway CA not published to supervisors: %s", exc)
                failing = str(exc)
            except Exception:
                log.exception("gateway CA publisher failed unexpectedly; trying again")
            await asyncio.sleep(interval_s)

    @property
    def registry(self) -> RegistryClient:
        if self._registry is None:
            r = self._settings.registry
            self._registry = RegistryClient(
                platform=Platform.parse(r.platform),
                plain_http=frozenset(r.plain_http),
                allowed=tuple(r.allowed),
                ca_file=str(r.ca_file) if r.ca_file else None,
                timeout_s=r.timeout_s,
                cache_ttl_s=r.cache_ttl_s,
            )
        return self._registry

    async def pull_credentials(self, ref: ImageReference) -> tuple[list[BasicCredentials], list[str]]:
        """Every credential the kubelet would try for ``ref`` from the pod's pull Secrets (all of
        them, merged as the kubelet merges them; the most specific key first), and a note for each
        Secret that could not be read (skipped, as the kubelet skips it)."""
        entries: list[CredentialEntry] = []
        notes: list[str] = []
        for name in self._settings.pod.image_pull_secrets:
            try:
                with self._explained("get", "secrets"):
                    secret = await self.client.get(Secret, name, namespace=self.namespace)
            except KubernetesDriverError as exc:
                notes.append(f"pull Secret {name!r} could not be read: {exc}")
                continue
            data = secret.data or {}
            legacy = ".dockerconfigjson" not in data
            key = ".dockercfg" if legacy else ".dockerconfigjson"
            if key not in data:
                notes.append(f"pull Secret {name!r} has neither .dockerconfigjson nor .dockercfg")
                continue
            try:
                entries += docker_config_entries(base64.b64decode(data[key]), legacy=legacy)
            except (DockerConfigError, ValueError) as exc:
                notes.append(f"pull Secret {name!r}: {key}: {exc}")
        for note in notes:
            log.warning("%s", note)
        return candidate_credentials(ref, entries), notes

    async def image_command(self, image: str) -> ImageCommand:
        """ENTRYPOINT and CMD of ``image``, read from its registry with each matching credential in
        turn (the next when the registry refuses one), or anonymously when none matches."""
        try:
            ref = ImageReference.parse(image)
        except ImageReferenceError as exc:
            raise PodSpecError(str(exc)) from None
        candidates, notes = await self.pull_credentials(ref)
        refusal: RegistryError | None = None
        tries: list[BasicCredentials | None] = [*candidates] or [None]
        for credentials in tries:
            try:
                return await self.registry.image_command(ref, credentials)
            except RegistryError as exc:
                if not exc.refused:
                    raise
                refusal = exc
        assert refusal is not None
        if len(candidates) > 1:
            refusal.args = (f"{refusal} (each of the {len(candidates)} matching credentials was refused)",)
        if notes:
            refusal.args = (f"{refusal}; {'; '.join(notes)}",)
        raise refusal

    async def _with_command(self, request: SandboxRequest) -> tuple[SandboxRequest, ImageCommand | None]:
        """The request with the image's own command when it names none, and its image pinned to the
        digest the command was read from (a tag that moves later cannot pair the old command with
        a new image)."""
        if request.command or not self._settings.registry.resolve_commands:
            return request, None  # build_sandbox_pod says what is missing
        image = request.image or self._settings.pod.default_image
        if not image:
            raise PodSpecError(
                "the request names neither a command nor an image, and drivers.kubernetes.pod.default_image "
                "is not set"
            )
        found = await self.image_command(image)
        if not found.argv:
            raise PodSpecError(f"image {found.image} has neither ENTRYPOINT nor CMD: name the command to run")
        pinned = image if "@" in image else f"{image}@{found.digest}"
        return replace(request, command=found.argv, image=pinned), found

    async def create(self, request: SandboxRequest) -> CreatedSandbox:
        request, from_image = await self._with_command(request)
        pod_obj = build_sandbox_pod(await self._pod_settings(), request, auth=self._auth)
        if from_image is not None:
            pod_obj["metadata"]["annotations"][ANNOTATION_IMAGE_MANIFEST] = from_image.manifest_digest
        with self._explained("create", "pods", request.sandbox_id):
            created = await self.client.create(cast(Pod, Pod.from_dict(pod_obj)))
        uid = created.metadata.uid if created.metadata and created.metadata.uid else ""
        log.info(
            "sandbox pod created",
            extra={
                "sandbox_id": request.sandbox_id,
                "pod": pod_obj["metadata"]["name"],
                "namespace": self.namespace,
            },
        )
        return CreatedSandbox(
            sandbox_id=request.sandbox_id,
            pod_name=pod_obj["metadata"]["name"],
            pod_uid=uid,
            image=request.image,
            command=tuple(request.command),
            command_from_image=from_image.manifest_digest if from_image else None,
        )

    async def get(self, sandbox_id: str) -> PodState | None:
        try:
            with self._explained("get", "pods", sandbox_id):
                pod = await self.client.get(Pod, pod_name(sandbox_id), namespace=self.namespace)
        except KubernetesDriverError as exc:
            if exc.status == 404:
                return None
            raise
        return _pod_state(pod)

    async def delete(self, sandbox_id: str, *, grace_s: int | None = None) -> bool:
        """Delete a sandbox's pod; False when there was no pod."""
        try:
            with self._explained("delete", "pods", sandbox_id):
                await self.client.delete(
                    Pod, pod_name(sandbox_id), namespace=self.namespace, grace_period=grace_s
                )
        except KubernetesDriverError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def states(self) -> list[PodState]:
        return (await self.snapshot()).states

    async def snapshot(self) -> Snapshot:
        """Every sandbox pod now, and the resourceVersion to watch from so no change is missed."""
        with self._explained("list", "pods"):
            listing = self.client.list(Pod, namespace=self.namespace, labels=_SELECTOR)
            pods = [p async for p in listing]
        states = [s for s in map(_pod_state, pods) if s is not None]
        try:
            version: str | None = listing.resourceVersion
        except NotReadyError:  # nothing came back at all
            version = None
        return Snapshot(states=states, resource_version=version)

    async def watch(self, resource_version: str | None = None) -> AsyncIterator[PodState]:
        """Every change of every sandbox pod after ``resource_version`` (a :meth:`snapshot`'s), for
        as long as the caller iterates.

        Each request asks the server to end it after ``WATCH_SERVER_TIMEOUT_S``; a connection that
        stays silent well beyond that (dropped by a load balancer or NAT without a reset) is given
        up and re-opened from the last version seen, so a half-open stream cannot hang the watch.
        A refusal, or a version too old to resume from (410 Gone: list again), ends the iteration
        with :class:`KubernetesDriverError`.
        """
        version = resource_version
        while True:
            with self._explained("watch", "pods"):
                stream = self.client.watch(
                    Pod,
                    namespace=self.namespace,
                    labels=_SELECTOR,
                    resource_version=version,
                    server_timeout=WATCH_SERVER_TIMEOUT_S,
                ).__aiter__()
                try:
                    while True:
                        try:
                            op, pod = await asyncio.wait_for(anext(stream), WATCH_SERVER_TIMEOUT_S + 30)
                        except TimeoutError:
                            log.info("sandbox pod watch silent too long; re-opening it from %s", version)
                            break
                        if pod.metadata is not None and pod.metadata.resourceVersion:
                            version = pod.metadata.resourceVersion
                        state = _pod_state(pod, deleted=op == "DELETED")
                        if state is not None:
                            yield replace(state, resource_version=version)
                finally:
                    close = getattr(stream, "aclose", None)
                    if close is not None:
                        with contextlib.suppress(Exception):
                            await close()

    async def close(self) -> None:
        if self._ca_publisher is not None:
            self._ca_publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ca_publisher
            self._ca_publisher = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    @contextlib.contextmanager
    def _explained(self, verb: str, resource: str, sandbox_id: str | None = None) -> Any:
        """Turn API and transport errors into one clear sentence (the original kept as __cause__)."""
        what = f"{verb} {resource} in namespace {self.namespace!r}"
        try:
            yield
        except ApiError as exc:
            raise self._refusal(
                what, verb, resource, sandbox_id, code=exc.status.code, message=exc.status.message
            ) from exc
        except httpx.HTTPStatusError as exc:  # a watch's refusal arrives as a bare HTTP status
            code = exc.response.status_code
            raise self._refusal(
                what, verb, resource, sandbox_id, code=code, message=exc.response.reason_phrase
            ) from exc
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            raise KubernetesDriverError(f"cannot reach the Kubernetes API to {what}: {exc}") from exc
        except ConfigError as exc:  # e.g. a token file or exec credential plugin failing mid-request
            raise KubernetesDriverError(f"the Kubernetes client credentials failed to {what}: {exc}") from exc

    def _refusal(
        self,
        what: str,
        verb: str,
        resource: str,
        sandbox_id: str | None,
        *,
        code: int | None,
        message: str | None,
    ) -> KubernetesDriverError:
        message = message or "no message"
        if code == 403:
            text = (
                f"the Kubernetes API refused to {what} (403 Forbidden: {message}); the gateway's "
                "identity needs the Role in docs/rbac.md"
            )
        elif code == 409 and verb == "create":
            text = f"sandbox {sandbox_id!r} already has {resource} in namespace {self.namespace!r}"
        elif code == 422:
            text = f"the Kubernetes API rejected the object to {what} (422 Invalid): {message}"
        else:
            text = f"cannot {what}: {code} {message}"
        return KubernetesDriverError(text, code)
