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
import fnmatch
import hashlib
import json
import logging
import re
import ssl
import time
import urllib.parse
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
ACCEPT_ANY = (*INDEX_TYPES, *MANIFEST_TYPES)
#: containerd refuses manifests above 4 MiB; configs get more room (long histories).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
CACHE_ENTRIES = 1024
TOKEN_ENTRIES = 1024


class RegistryError(RuntimeError):
    """A lookup failed. ``caller_fault``: the image or its access is wrong (the request's to fix),
    not the registry or the network. ``refused``: the registry refused these credentials (401/403),
    so others may still be tried. ``busy``: rate limited or busy (429, 408), try again later."""

    def __init__(
        self, message: str, *, caller_fault: bool, refused: bool = False, busy: bool = False
    ) -> None:
        super().__init__(message)
        self.caller_fault = caller_fault
        self.refused = refused
        self.busy = busy


@dataclass(frozen=True)
class ImageCommand:
    """What the runtime would run for the image: ENTRYPOINT followed by CMD."""

    image: str
    #: Digest of what the reference names (the index for a multi-platform image): pinning the pod's
    #: image to it makes the pod run the image the command was read from.
    digest: str
    #: Digest of the platform's manifest the config was read from.
    manifest_digest: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]


def _normal_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's normalisation of an architecture and its variant (platforms/database.go), so
    ``linux/arm64/v8`` and an index entry of ``arm64`` with no variant are the same platform."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            return "arm64", ""
        if variant in ("9", "9.0", "v9.0"):
            return "arm64", "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.]+", p) for p in parts):
            raise ValueError(f"platform {text!r} is not os/architecture[/variant], e.g. linux/amd64")
        arch, variant = _normal_arch(parts[1], parts[2] if len(parts) == 3 else "")
        return cls(parts[0], arch, variant)

    def compatible_variants(self) -> list[str]:
        """Variants this platform runs, best first, as containerd's matcher orders them (an arm v7
        node runs v6 and v5 images; an amd64 v3 node runs v2 and baseline ones)."""
        if self.architecture == "arm" and self.variant in ("v5", "v6", "v7", "v8"):
            return [f"v{n}" for n in range(int(self.variant[1]), 4, -1)]
        if self.architecture == "amd64" and self.variant in ("v2", "v3", "v4"):
            return [*(f"v{n}" for n in range(int(self.variant[1]), 1, -1)), ""]
        if self.architecture == "arm64" and self.variant:
            return [self.variant, ""]
        return [self.variant]

    def rank(self, entry: Mapping[str, Any]) -> int | None:
        """Where an index entry's platform stands in :meth:`compatible_variants`; None: not runnable."""
        if str(entry.get("os", "")).lower() != self.os:
            return None
        arch, variant = _normal_arch(str(entry.get("architecture", "")), str(entry.get("variant") or ""))
        if arch != self.architecture:
            return None
        variants = self.compatible_variants()
        return variants.index(variant) if variant in variants else None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


#: ``scheme params`` of one challenge; params may be quoted (with commas inside) or tokens.
_PARAM = re.compile(r'([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, params = header.strip().partition(" ")
    found = {m[1].lower(): (m[2] if m[2] or not m[3] else m[3]) for m in _PARAM.finditer(params)}
    return scheme.lower(), {k: v.replace('\\"', '"') for k, v in found.items()}


def pick_challenge(headers: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Of the WWW-Authenticate headers a 401 carries, Bearer if offered, else the first."""
    parsed = [parse_challenge(h) for h in headers if h.strip()]
    for challenge in parsed:
        if challenge[0] == "bearer":
            return challenge
    return parsed[0] if parsed else ("", {})


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
class _Cached:
    expires: float
    found: ImageCommand


class _Refusal(Exception):
    """The registry refused these credentials; the lookup stops, the caller may try others."""


@dataclass
class RegistryClient:
    """One per gateway; ``close()`` at shutdown."""

    platform: Platform
    plain_http: frozenset[str] = frozenset()
    #: Registry hosts lookups may go to (globs, e.g. ``*.example.com``); empty: any.
    allowed: tuple[str, ...] = ()
    ca_file: str | None = None
    timeout_s: float = 15.0
    cache_ttl_s: float = 600.0
    clock: Any = time.monotonic
    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _tokens: dict[tuple[str, str, str], _Token] = field(default_factory=dict, init=False)
    _cache: OrderedDict[tuple[str, str], _Cached] = field(default_factory=OrderedDict, init=False)
    _inflight: dict[tuple[str, str], asyncio.Task[ImageCommand]] = field(default_factory=dict, init=False)

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RegistryError("the gateway is shutting down", caller_fault=False)
        if self._session is None:
            context = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=32),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                # No cookies: one user's registry session must not carry into another's lookup.
                cookie_jar=aiohttp.DummyCookieJar(),
                # HTTPS_PROXY / NO_PROXY, as clusters that reach registries through a proxy set them.
                trust_env=True,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _plain(self, host: str) -> bool:
        return host in self.plain_http

    def _plain_registry(self, ref: ImageReference) -> bool:
        """Whether ``ref``'s registry is spoken to over plain HTTP (listed by name or API host)."""
        return self._plain(ref.registry) or self._plain(ref.api_host)

    def _check_allowed(self, ref: ImageReference) -> None:
        if self.allowed and not any(fnmatch.fnmatchcase(ref.registry, glob) for glob in self.allowed):
            raise RegistryError(
                f"{ref}: registry {ref.registry} is not in drivers.kubernetes.registry.allowed "
                f"({', '.join(self.allowed)})",
                caller_fault=True,
            )

    async def image_command(
        self, ref: ImageReference, credentials: BasicCredentials | None = None
    ) -> ImageCommand:
        """ENTRYPOINT and CMD of ``ref`` for the configured platform. Raises RegistryError, with
        ``refused`` set when the registry refused these credentials."""
        self._check_allowed(ref)
        key = (str(ref), _identity(credentials))
        cached = self._cache.get(key)
        if cached is not None and cached.expires > self.clock():
            self._cache.move_to_end(key)
            return cached.found
        task = self._inflight.get(key)
        if task is None:
            # The lookup is a task of its own, not the first caller's: a caller that gives up
            # (its request cancelled) does not fail the others waiting for the same image.
            stale = cached.found if cached is not None else None
            task = asyncio.create_task(
                self._look_up_and_keep(key, ref, credentials, stale), name=f"registry {ref}"
            )
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    def _settled(self, key: tuple[str, str], task: asyncio.Task[ImageCommand]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: when every caller has gone, nobody else will

    async def _look_up_and_keep(
        self,
        key: tuple[str, str],
        ref: ImageReference,
        credentials: BasicCredentials | None,
        stale: ImageCommand | None,
    ) -> ImageCommand:
        found = None
        # A HEAD says whether the tag still names the same image; registries (Docker Hub) do not
        # count it against pull limits, the GETs of a full lookup they do.
        if (
            stale is not None
            and ref.digest is None
            and await self._head_digest(ref, credentials) == stale.digest
        ):
            found = stale
        if found is None:
            found = await self._look_up(ref, credentials)
        ttl = float("inf") if ref.digest else self.cache_ttl_s
        self._cache[key] = _Cached(self.clock() + ttl, found)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return found

    async def _head_digest(self, ref: ImageReference, credentials: BasicCredentials | None) -> str | None:
        try:
            _, headers = await self._request(
                ref, f"manifests/{ref.reference}", ACCEPT_ANY, credentials, what="manifest", method="HEAD"
            )
        except RegistryError:
            return None  # the full lookup says what is wrong
        return headers.get("Docker-Content-Digest")

    async def _look_up(self, ref: ImageReference, credentials: BasicCredentials | None) -> ImageCommand:
        body, media_type = await self._manifest(ref, ref.reference, ACCEPT_ANY, credentials)
        digest = ref.digest or _sha256(body)
        manifest = self._json(body, f"the manifest of {ref}")
        kind = _kind(manifest, media_type)
        if kind == "index":
            platform_digest = self._pick(ref, manifest)
            body, media_type = await self._manifest(ref, platform_digest, MANIFEST_TYPES, credentials)
            manifest = self._json(body, f"the {self.platform} manifest of {ref}")
            kind = _kind(manifest, media_type)
        if kind == "schema1":
            raise RegistryError(
                f"{ref}: a Docker schema 1 manifest (deprecated, pushed by Docker before 1.10); push the "
                "image again with a current client",
                caller_fault=True,
            )
        if kind != "manifest":
            raise RegistryError(
                f"{ref}: manifest type {media_type!r} is not an OCI or Docker v2 image manifest",
                caller_fault=True,
            )
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
            digest=digest,
            manifest_digest=_sha256(body),
            entrypoint=self._strings(settings.get("Entrypoint"), ref, "Entrypoint"),
            cmd=self._strings(settings.get("Cmd"), ref, "Cmd"),
        )

    def _pick(self, ref: ImageReference, index: Mapping[str, Any]) -> str:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"{ref}: its index lists no manifests", caller_fault=True)
        best: tuple[int, str] | None = None
        offered: list[str] = []
        for entry in entries:
            platform = entry.get("platform") if isinstance(entry, dict) else None
            if not isinstance(platform, dict) or not isinstance(entry.get("digest"), str):
                continue  # attestations and the like carry no platform (or unknown/unknown)
            rank = self.platform.rank(platform)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, str(entry["digest"]))
            parts = (platform.get(k) for k in ("os", "architecture", "variant"))
            offered.append("/".join(str(p) for p in parts if p))
        if best is None:
            raise RegistryError(
                f"{ref} has no {self.platform} image (it offers: {', '.join(offered) or 'none'}); "
                "set drivers.kubernetes.registry.platform to the nodes' platform",
                caller_fault=True,
            )
        return best[1]

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
        scheme = "http" if self._plain_registry(ref) else "https"
        return f"{scheme}://{ref.api_host}/v2/{ref.repository}/{tail}"

    async def _manifest(
        self,
        ref: ImageReference,
        reference: str,
        accept: Sequence[str],
        credentials: BasicCredentials | None,
    ) -> tuple[bytes, str]:
        body, headers = await self._request(
            ref, f"manifests/{reference}", accept, credentials, what="manifest", limit=MAX_MANIFEST_BYTES
        )
        if reference.startswith("sha256:") and _sha256(body) != reference:
            raise RegistryError(
                f"{ref}: the manifest served for {reference} has another digest", caller_fault=False
            )
        return body, headers.get("Content-Type", "").split(";", 1)[0].strip()

    async def _blob(self, ref: ImageReference, digest: str, credentials: BasicCredentials | None) -> bytes:
        body, _ = await self._request(
            ref, f"blobs/{digest}", ("*/*",), credentials, what="config", limit=MAX_CONFIG_BYTES
        )
        if _sha256(body) != digest:
            raise RegistryError(
                f"{ref}: the config blob served for {digest} has another digest", caller_fault=False
            )
        return body

    async def _request(
        self,
        ref: ImageReference,
        tail: str,
        accept: Sequence[str],
        credentials: BasicCredentials | None,
        *,
        what: str,
        limit: int = 0,
        method: str = "GET",
    ) -> tuple[bytes, Mapping[str, str]]:
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
                async with self._client().request(method, url, headers=headers) as resp:
                    if resp.status == 401 and attempt == 0:
                        challenge = pick_challenge(resp.headers.getall("WWW-Authenticate", []))
                        authorization = await self._authorize(
                            ref, challenge, scope, credentials, token_key=token_key, what=what
                        )
                        continue
                    if resp.status != 200:
                        raise self._refusal(
                            ref, what, resp.status, credentials, resp.headers.get("Retry-After")
                        )
                    body = await _read_at_most(resp, limit, f"{ref}: its {what}") if method == "GET" else b""
                    return body, resp.headers
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise RegistryError(
                    f"{ref}: registry {ref.api_host} could not be reached for its {what}: "
                    f"{exc!r}{self._hint(ref)}",
                    caller_fault=False,
                ) from None
        raise self._refusal(ref, what, 401, credentials, None)

    def _hint(self, ref: ImageReference) -> str:
        if self._plain_registry(ref):
            return ""
        return " (a registry served over plain HTTP must be listed in drivers.kubernetes.registry.plain_http)"

    @staticmethod
    def _refusal(
        ref: ImageReference,
        what: str,
        status: int,
        credentials: BasicCredentials | None,
        retry_after: str | None,
    ) -> RegistryError:
        if status in (401, 403):
            using = f"the pull secret's user {credentials.username!r}" if credentials else "no credentials"
            hub = (
                " (Docker Hub also answers so for a repository that does not exist)"
                if ref.registry == "docker.io"
                else ""
            )
            return RegistryError(
                f"{ref}: registry {ref.api_host} refused to serve its {what} (HTTP {status}) with {using}"
                f"{hub}; name a pull Secret for it in drivers.kubernetes.pod.image_pull_secrets",
                caller_fault=True,
                refused=True,
            )
        if status == 404:
            return RegistryError(
                f"{ref}: not found in registry {ref.api_host} (its {what}: HTTP 404)", caller_fault=True
            )
        if status in (408, 429):
            wait = _seconds(retry_after)
            later = f"; it asks to retry after {wait:.0f} s" if wait is not None else ""
            return RegistryError(
                f"{ref}: registry {ref.api_host} answered HTTP {status} for its {what} (rate limited or "
                f"busy){later}",
                caller_fault=False,
                busy=True,
            )
        return RegistryError(
            f"{ref}: registry {ref.api_host} answered HTTP {status} for its {what}", caller_fault=status < 500
        )

    async def _authorize(
        self,
        ref: ImageReference,
        challenge: tuple[str, dict[str, str]],
        scope: str,
        credentials: BasicCredentials | None,
        *,
        token_key: tuple[str, str, str],
        what: str,
    ) -> str:
        scheme, params = challenge
        if scheme == "basic":
            if credentials is None:
                raise self._refusal(ref, what, 401, None, None)
            return credentials.header
        realm = params.get("realm", "")
        if scheme != "bearer" or not realm:
            raise RegistryError(
                f"{ref}: registry {ref.api_host} asks for an unsupported authentication ({scheme or 'none'})",
                caller_fault=False,
            )
        realm_url = urllib.parse.urlsplit(realm)
        if realm_url.scheme != "https" and not (
            realm_url.scheme == "http" and (self._plain(ref.registry) or self._plain(realm_url.netloc))
        ):
            # Credentials go to the realm: never in clear text, and never to a place the registry
            # names unless it is HTTPS (or the operator listed it as plain HTTP).
            raise RegistryError(
                f"{ref}: registry {ref.api_host} names a token service that is not HTTPS ({realm[:100]}); "
                "list its host in drivers.kubernetes.registry.plain_http if that is intended",
                caller_fault=False,
            )
        query = {"scope": params.get("scope", scope)}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Authorization": credentials.header} if credentials else {}
        try:
            async with self._client().get(realm, params=query, headers=headers) as resp:
                if resp.status in (401, 403):
                    raise self._refusal(ref, "token", resp.status, credentials, None)
                if resp.status != 200:
                    raise RegistryError(
                        f"{ref}: token service {realm_url.netloc} answered HTTP {resp.status}",
                        caller_fault=False,
                    )
                raw = await _read_at_most(resp, MAX_MANIFEST_BYTES, f"{ref}: the token")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RegistryError(
                f"{ref}: token service {realm_url.netloc} could not be reached: {exc!r}", caller_fault=False
            ) from None
        doc = self._json(raw, f"the token for {ref}")
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(
                f"{ref}: token service {realm_url.netloc} returned no token", caller_fault=False
            )
        expires_in = doc.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 60.0
        # Renewed a little early: a token that expires between the check and the request costs a retry.
        now = self.clock()
        if len(self._tokens) >= TOKEN_ENTRIES:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires > now}
        self._tokens[token_key] = _Token(value, now + max(lifetime - 10.0, 1.0))
        return f"Bearer {value}"


def _kind(doc: Mapping[str, Any], content_type: str) -> str:
    """index, manifest, schema1 or unknown: by mediaType, else the Content-Type, else the shape
    (OCI makes mediaType optional; some registries serve application/json)."""
    media_type = doc.get("mediaType") or content_type
    if media_type in INDEX_TYPES:
        return "index"
    if media_type in MANIFEST_TYPES:
        return "manifest"
    if doc.get("schemaVersion") == 1 or str(media_type).startswith(
        "application/vnd.docker.distribution.manifest.v1"
    ):
        return "schema1"
    if isinstance(doc.get("manifests"), list):
        return "index"
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return "manifest"
    return "unknown"


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body (``content.read(n)`` returns what has arrived so far, not n bytes), refused
    past ``limit`` bytes without reading further."""
    length = resp.content_length
    if length is not None and length > limit:
        raise RegistryError(f"{what} is {length} bytes, more than {limit}", caller_fault=True)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes", caller_fault=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After as seconds (its HTTP-date form is taken as unknown)."""
    try:
        return max(float(retry_after), 0.0) if retry_after else None
    except ValueError:
        return None
