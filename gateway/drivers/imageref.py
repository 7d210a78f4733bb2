"""Image references as Kubernetes and containerd read them, and the registry credentials that match.

``python:3.12`` means ``docker.io/library/python:3.12``, served by ``registry-1.docker.io``; a
first component with a dot or a colon, or ``localhost``, is a registry host. These are the rules
of the distribution project's reference package (the ones the kubelet applies), kept to what a
lookup of the image's configuration needs.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: The kubelet's key of ``docker login``'s ``https://index.docker.io/v1/``: Docker Hub's fallback.
DOCKER_HUB_INDEX = "index.docker.io"

# Matched with fullmatch: a "$" would let a trailing newline through.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
#: The distribution project's limit on a name (registry and repository, without tag or digest).
MAX_NAME = 255
#: A name, a tag (128) and a digest (71) with their separators.
MAX_REFERENCE = MAX_NAME + 1 + 128 + 1 + 71


def _shown(text: str) -> str:
    """The reference for an error message: quoted, control characters escaped, cut short."""
    return repr(text) if len(text) <= 100 else repr(text[:100]) + "..."


class ImageReferenceError(ValueError):
    """The reference cannot name an image; the message says which part and why."""


@dataclass(frozen=True)
class ImageReference:
    registry: str  # as written (docker.io for Docker Hub), host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        if not text or text != text.strip():
            raise ImageReferenceError(f"image reference {_shown(text)} is empty or has surrounding spaces")
        if len(text) > MAX_REFERENCE:
            raise ImageReferenceError(
                f"image reference {_shown(text)} is {len(text)} characters; at most {MAX_REFERENCE}"
            )
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise ImageReferenceError(
                    f"image reference {_shown(text)}: digest {digest!r} is not sha256:<64 hex digits>"
                )
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.fullmatch(tag):
                raise ImageReferenceError(f"image reference {_shown(text)}: tag {tag!r} is not a valid tag")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, remainder
            if not _HOST.fullmatch(registry):
                raise ImageReferenceError(
                    f"image reference {_shown(text)}: {registry!r} is not a registry host"
                )
        else:
            registry, repository = DOCKER_HUB, rest
        if registry == DOCKER_HUB_INDEX:  # distribution's reference package says docker.io for both
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if len(rest) > MAX_NAME:
            raise ImageReferenceError(
                f"image reference {_shown(text)}: the name is {len(rest)} characters; at most {MAX_NAME}"
            )
        if not _REPOSITORY.fullmatch(repository):
            raise ImageReferenceError(
                f"image reference {_shown(text)}: repository {repository!r} must be lowercase letters, "
                "digits and separators (. _ __ -) between slashes"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def api_host(self) -> str:
        """The host the registry API is served from."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: str

    @property
    def header(self) -> str:
        """The Authorization header value (HTTP Basic)."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def __repr__(self) -> str:  # never print a password into a log
        return f"BasicCredentials(username={self.username!r}, password=<hidden>)"


class DockerConfigError(ValueError):
    """A pull secret's docker config cannot be read; the message names the problem, not the secret."""


@dataclass(frozen=True)
class CredentialEntry:
    """One ``auths`` entry, keyed as the kubelet keys it: host[:port] and an optional path, the
    scheme and a ``/v1/`` or ``/v2/`` prefix of the path dropped; the host may hold globs."""

    key: str
    credentials: BasicCredentials


def kubelet_key(location: str) -> str:
    """The kubelet's key for a docker config location (``https://index.docker.io/v1/`` -> ``index.docker.io``,
    ``quay.io/org-a`` -> ``quay.io/org-a``)."""
    value = location.strip()
    if not value.startswith(("https://", "http://")):
        value = "https://" + value
    parsed = urllib.parse.urlsplit(value)
    path = parsed.path
    if path.startswith(("/v2/", "/v1/")):
        path = path[3:]
    return parsed.netloc + path if path and path != "/" else parsed.netloc


def docker_config_entries(raw: bytes, *, legacy: bool = False) -> list[CredentialEntry]:
    """Every usable entry of ``.dockerconfigjson`` (``{"auths": {...}}``) or, with ``legacy``,
    ``.dockercfg`` (the map itself), in the file's order."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DockerConfigError(f"not JSON: {exc}") from None
    auths = doc if legacy else (doc.get("auths") if isinstance(doc, dict) else None)
    if not isinstance(auths, dict):
        raise DockerConfigError('no "auths" object')
    found: list[CredentialEntry] = []
    for location, entry in auths.items():
        if not isinstance(entry, dict):
            raise DockerConfigError(f"the entry for {location!r} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"].strip():
            try:
                # Go's decoder, which the kubelet uses, takes the value wrapped over lines too.
                decoded = base64.b64decode("".join(entry["auth"].split()), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise DockerConfigError(
                    f'the "auth" of {location!r} is not base64 of user:password'
                ) from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise DockerConfigError(f'the "auth" of {location!r} has no ":" between user and password')
        if isinstance(username, str) and isinstance(password, str) and username:
            found.append(CredentialEntry(kubelet_key(location), BasicCredentials(username, password)))
    return found


def _split(schemeless: str) -> tuple[list[str], str, str]:
    """Host parts, port and path of ``host[:port][/path]``."""
    parsed = urllib.parse.urlsplit("https://" + schemeless)
    host, port = parsed.netloc, ""
    if ":" in host and not host.endswith("]"):
        host, port = host.rsplit(":", 1)
    return host.split("."), port, parsed.path


def key_matches(key: str, target: str) -> bool:
    """The kubelet's match of a credential key (globs in host parts, e.g. ``*.gcr.io``) against an
    image's ``registry/repository``: same port, same number of host parts, each matching, and the
    key's path a prefix of the image's."""
    key_parts, key_port, key_path = _split(key)
    parts, port, path = _split(target)
    if key_port != port or len(key_parts) != len(parts) or not path.startswith(key_path):
        return False
    return all(fnmatch.fnmatchcase(part, glob) for glob, part in zip(key_parts, parts, strict=True))


def candidate_credentials(ref: ImageReference, entries: Sequence[CredentialEntry]) -> list[BasicCredentials]:
    """Every credential the kubelet would try for ``ref``, in its order: the most specific key first
    (keys sorted in reverse), entries of one key in the order given; for Docker Hub images, the
    ``index.docker.io`` entries when nothing else matched."""
    by_key: dict[str, list[BasicCredentials]] = {}
    for entry in entries:
        by_key.setdefault(entry.key, []).append(entry.credentials)
    target = f"{ref.registry}/{ref.repository}"
    found = [c for key in sorted(by_key, reverse=True) if key_matches(key, target) for c in by_key[key]]
    if not found and ref.registry == DOCKER_HUB:
        found = list(by_key.get(DOCKER_HUB_INDEX, []))
    unique: list[BasicCredentials] = []
    for credentials in found:
        if credentials not in unique:
            unique.append(credentials)
    return unique
