"""Reads an image's ENTRYPOINT and CMD from its registry (the OCI distribution API, read only).

The supervisor wraps the sandbox's command, and Kubernetes ignores an image's ENTRYPOINT and CMD
once a container sets ``command``; so when a request names no command the gateway looks them up,
as Argo's and Tekton's controllers do: the manifest (an index is narrowed to the configured
platform), then the config blob, both checked against their digests. Anonymous access, Basic
credentials and the bearer-token handshake (Docker Hub, GHCR, Harbor, Quay...) are handled.

Results are cached (a digest never changes; a tag for ``cache_ttl_s``) and concurrent lookups of
the same image share one request, so a thousand sandboxes of one image cost the registry one
lookup: Docker Hub counts manifest requests against its pull limits.

docker-registry-client-async was considered: untyped, its scheme comes from a process-wide
environment variable and it reads ~/.docker; the four requests needed here fit aiohttp directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.drivers.imageref import BasicCredentials, ImageReference

log = logging.getLogger(__name__)

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
#: containerd refuses manifests above 4 MiB; configs get more room (long histories).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
CACHE_ENTRIES = 1024


class RegistryError(RuntimeError):
    """A lookup failed. ``caller_fault``: the image or its access is wrong (the request's to fix),
    not the registry or the network."""

    def __init__(self, message: str, *, caller_fault: bool) -> None:
        super().__init__(message)
        self.caller_fault = caller_fault


@dataclass(frozen=True)
class ImageCommand:
    """What the runtime would run for the image: ENTRYPOINT followed by CMD."""

    image: str
    #: Digest of the platform's manifest the config was read from.
    manifest_digest: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
            raise ValueError(f"platform {text!r} is not os/architecture[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        return self.variant is None or entry.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in _CHALLENGE.findall(params)}


def _identity(credentials: BasicCredentials | None) -> str:
    """What caches are keyed by: a hash of the credentials (another password is another key, so a
    rotated or wrong password never gets an answer obtained with the right one)."""
    if credentials is None:
        return ""
    return hashlib.sha256(f"{credentials.username}\0{credentials.password}".encode()).hexdigest()


def _sha256(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class RegistryClient:
    """One per gateway; ``close()`` at shutdown."""

    platform: Platform
    plain_http: frozenset[str] = frozenset()
    ca_file: str | None = None
    timeout_s: float = 15.0
    cache_ttl_s: float = 600.0
    clock: Any = time.monotonic
    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    _tokens: dict[tuple[str, str, str], _Token] = field(default_factory=dict, init=False)
    _cache: OrderedDict[tuple[str, str], tuple[float, ImageCommand]] = field(
        default_factory=OrderedDict, init=False
    )
    _inflight: dict[tuple[str, str], asyncio.Task[ImageCommand]] = field(default_factory=dict, init=False)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=32),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def image_command(
        self, ref: ImageReference, credentials: BasicCredentials | None = None
    ) -> ImageCommand:
        """ENTRYPOINT and CMD of ``ref`` for the configured platform."""
        key = (str(ref), _identity(credentials))
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self.clock():
            self._cache.move_to_end(key)
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            # The lookup is a task of its own, not the first caller's: a caller that gives up
            # (its request cancelled) does not fail the others waiting for the same image.
            task = asyncio.create_task(self._look_up_and_keep(key, ref, credentials), name=f"registry {ref}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    def _settled(self, key: tuple[str, str], task: asyncio.Task[ImageCommand]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: when every caller has gone, nobody else will

    async def _look_up_and_keep(
        self, key: tuple[str, str], ref: ImageReference, credentials: BasicCredentials | None
    ) -> ImageCommand:
        found = await self._look_up(ref, credentials)
        ttl = float("inf") if ref.digest else self.cache_ttl_s
        self._cache[key] = (self.clock() + ttl, found)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return found

    async def _look_up(self, ref: ImageReference, credentials: BasicCredentials | None) -> ImageCommand:
        accept = (*INDEX_TYPES, *MANIFEST_TYPES)
        body, media_type = await self._manifest(ref, ref.reference, accept, credentials)
        manifest = self._json(body, f"the manifest of {ref}")
        media_type = manifest.get("mediaType") or media_type
        if media_type in INDEX_TYPES or "manifests" in manifest:
            digest = self._pick(ref, manifest)
            body, media_type = await self._manifest(ref, digest, MANIFEST_TYPES, credentials)
            manifest = self._json(body, f"the {self.platform} manifest of {ref}")
            media_type = manifest.get("mediaType") or media_type
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                f"{ref}: manifest type {media_type!r} is not an OCI or Docker v2 image manifest",
                caller_fault=True,
            )
        manifest_digest = _sha256(body)
        config = manifest.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("digest"), str):
            raise RegistryError(f"{ref}: its manifest names no config blob", caller_fault=True)
        blob = await self._blob(ref, config["digest"], credentials)
        image = self._json(blob, f"the config of {ref}")
        settings = image.get("config") or {}
        if not isinstance(settings, dict):
            raise RegistryError(f"{ref}: its config's config is not an object", caller_fault=True)
        return ImageCommand(
            image=str(ref),
            manifest_digest=manifest_digest,
            entrypoint=self._strings(settings.get("Entrypoint"), ref, "Entrypoint"),
            cmd=self._strings(settings.get("Cmd"), ref, "Cmd"),
        )

    def _pick(self, ref: ImageReference, index: Mapping[str, Any]) -> str:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"{ref}: its index lists no manifests", caller_fault=True)
        offered: list[str] = []
        for entry in entries:
            platform = entry.get("platform") if isinstance(entry, dict) else None
            if not isinstance(platform, dict):
                continue  # attestations and the like carry no platform (or unknown/unknown)
            if self.platform.matches(platform) and isinstance(entry.get("digest"), str):
                return str(entry["digest"])
            parts = (platform.get(k) for k in ("os", "architecture", "variant"))
            offered.append("/".join(str(p) for p in parts if p))
        raise RegistryError(
            f"{ref} has no {self.platform} image (it offers: {', '.join(offered) or 'none'}); "
            "set drivers.kubernetes.registry.platform to the nodes' platform",
            caller_fault=True,
        )

    @staticmethod
    def _strings(value: object, ref: ImageReference, what: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RegistryError(f"{ref}: its config's {what} is not a list of strings", caller_fault=True)
        return tuple(value)

    @staticmethod
    def _json(body: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"{what} is not JSON: {exc}", caller_fault=False) from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{what} is not a JSON object", caller_fault=False)
        return doc

    def _url(self, ref: ImageReference, tail: str) -> str:
        scheme = "http" if ref.registry in self.plain_http or ref.api_host in self.plain_http else "https"
        return f"{scheme}://{ref.api_host}/v2/{ref.repository}/{tail}"

    async def _manifest(
        self,
        ref: ImageReference,
        reference: str,
        accept: Sequence[str],
        credentials: BasicCredentials | None,
    ) -> tuple[bytes, str]:
        body, content_type = await self._get(
            ref, f"manifests/{reference}", accept, credentials, limit=MAX_MANIFEST_BYTES, what="manifest"
        )
        if reference.startswith("sha256:") and _sha256(body) != reference:
            raise RegistryError(
                f"{ref}: the manifest served for {reference} has another digest", caller_fault=False
            )
        return body, content_type

    async def _blob(self, ref: ImageReference, digest: str, credentials: BasicCredentials | None) -> bytes:
        body, _ = await self._get(
            ref, f"blobs/{digest}", ("*/*",), credentials, limit=MAX_CONFIG_BYTES, what="config"
        )
        if _sha256(body) != digest:
            raise RegistryError(
                f"{ref}: the config blob served for {digest} has another digest", caller_fault=False
            )
        return body

    async def _get(
        self,
        ref: ImageReference,
        tail: str,
        accept: Sequence[str],
        credentials: BasicCredentials | None,
        *,
        limit: int,
        what: str,
    ) -> tuple[bytes, str]:
        url = self._url(ref, tail)
        scope = f"repository:{ref.repository}:pull"
        token_key = (ref.api_host, scope, _identity(credentials))
        authorization: str | None = None
        token = self._tokens.get(token_key)
        if token is not None and token.expires > self.clock():
            authorization = f"Bearer {token.value}"
        for attempt in range(2):
            headers = {"Accept": ", ".join(accept)}
            if authorization:
                headers["Authorization"] = authorization
            try:
                async with self._client().get(url, headers=headers) as resp:
                    if resp.status == 401 and attempt == 0:
                        challenge = resp.headers.get("WWW-Authenticate", "")
                        authorization = await self._authorize(ref, challenge, scope, credentials, token_key)
                        continue
                    if resp.status != 200:
                        raise self._refusal(ref, what, resp.status, credentials)
                    body = await resp.content.read(limit + 1)
                    if len(body) > limit:
                        raise RegistryError(
                            f"{ref}: its {what} is larger than {limit} bytes", caller_fault=True
                        )
                    content_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
                    return body, content_type
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise RegistryError(
                    f"{ref}: registry {ref.api_host} could not be reached for its {what}: "
                    f"{exc!r}{self._hint(ref)}",
                    caller_fault=False,
                ) from None
        raise self._refusal(ref, what, 401, credentials)

    def _hint(self, ref: ImageReference) -> str:
        if ref.registry in self.plain_http or ref.api_host in self.plain_http:
            return ""
        return " (a registry served over plain HTTP must be listed in drivers.kubernetes.registry.plain_http)"

    @staticmethod
    def _refusal(
        ref: ImageReference, what: str, status: int, credentials: BasicCredentials | None
    ) -> RegistryError:
        if status in (401, 403):
            using = f"the pull secret's user {credentials.username!r}" if credentials else "no credentials"
            return RegistryError(
                f"{ref}: registry {ref.api_host} refused to serve its {what} (HTTP {status}) with {using}; "
                "name a pull Secret for it in drivers.kubernetes.pod.image_pull_secrets",
                caller_fault=True,
            )
        if status == 404:
            return RegistryError(
                f"{ref}: not found in registry {ref.api_host} (its {what}: HTTP 404)", caller_fault=True
            )
        return RegistryError(
            f"{ref}: registry {ref.api_host} answered HTTP {status} for its {what}", caller_fault=status < 500
        )

    async def _authorize(
        self,
        ref: ImageReference,
        challenge: str,
        scope: str,
        credentials: BasicCredentials | None,
        token_key: tuple[str, str, str],
    ) -> str:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if credentials is None:
                raise self._refusal(ref, "manifest", 401, None)
            return credentials.header
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(
                f"{ref}: registry {ref.api_host} asks for an unsupported authentication "
                f"({challenge[:100]!r})",
                caller_fault=False,
            )
        query = {"scope": params.get("scope", scope)}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Authorization": credentials.header} if credentials else {}
        try:
            async with self._client().get(params["realm"], params=query, headers=headers) as resp:
                if resp.status in (401, 403):
                    raise self._refusal(ref, "token", resp.status, credentials)
                if resp.status != 200:
                    raise RegistryError(
                        f"{ref}: token service {params['realm']} answered HTTP {resp.status}",
                        caller_fault=False,
                    )
                doc = self._json(await resp.content.read(MAX_MANIFEST_BYTES), f"the token for {ref}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RegistryError(
                f"{ref}: token service {params['realm']} could not be reached: {exc!r}", caller_fault=False
            ) from None
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(
                f"{ref}: token service {params['realm']} returned no token", caller_fault=False
            )
        expires_in = doc.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 60.0
        # Renewed a little early: a token that expires between the check and the request costs a retry.
        self._tokens[token_key] = _Token(value, self.clock() + max(lifetime - 10.0, 1.0))
        return f"Bearer {value}"
