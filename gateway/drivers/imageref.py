"""Image references as Kubernetes and containerd read them, and the registry credentials that match.

``python:3.12`` means ``docker.io/library/python:3.12``, served by ``registry-1.docker.io``; a
first component with a dot or a colon, or ``localhost``, is a registry host. These are the rules
of the distribution project's reference package (the ones the kubelet applies), kept to what a
lookup of the image's configuration needs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: Keys Docker Hub's credentials are found under in a docker config (``docker login`` writes the first).
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


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
            raise ImageReferenceError(f"image reference {text!r} is empty or has surrounding spaces")
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.match(digest):
                raise ImageReferenceError(
                    f"image reference {text!r}: digest {digest!r} is not sha256:<64 hex digits>"
                )
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.match(tag):
                raise ImageReferenceError(f"image reference {text!r}: tag {tag!r} is not a valid tag")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, remainder
            if not _HOST.match(registry):
                raise ImageReferenceError(f"image reference {text!r}: {registry!r} is not a registry host")
        else:
            registry, repository = DOCKER_HUB, rest
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not _REPOSITORY.match(repository):
            raise ImageReferenceError(
                f"image reference {text!r}: repository {repository!r} must be lowercase letters, digits "
                "and separators (. _ __ -) between slashes"
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


def _host_of(key: str) -> str:
    """A docker config ``auths`` key (a host, or a URL as old clients wrote them) as host[:port]."""
    host = re.sub(r"^[a-z]+://", "", key.strip()).split("/", 1)[0]
    return host.lower()


def parse_docker_config(raw: bytes, *, legacy: bool = False) -> dict[str, BasicCredentials]:
    """Credentials by registry host from ``.dockerconfigjson`` (``{"auths": {...}}``) or, with
    ``legacy``, ``.dockercfg`` (the map itself)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DockerConfigError(f"not JSON: {exc}") from None
    auths = doc if legacy else (doc.get("auths") if isinstance(doc, dict) else None)
    if not isinstance(auths, dict):
        raise DockerConfigError('no "auths" object')
    found: dict[str, BasicCredentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise DockerConfigError(f"the entry for {key!r} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise DockerConfigError(f'the "auth" of {key!r} is not base64 of user:password') from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise DockerConfigError(f'the "auth" of {key!r} has no ":" between user and password')
        if isinstance(username, str) and isinstance(password, str) and username:
            found[_host_of(key)] = BasicCredentials(username, password)
    return found


def credentials_for(ref: ImageReference, known: Mapping[str, BasicCredentials]) -> BasicCredentials | None:
    """The credentials a docker config holds for ``ref``'s registry (Docker Hub under any of its names)."""
    keys = DOCKER_HUB_KEYS if ref.registry == DOCKER_HUB else (ref.registry,)
    for key in keys:
        found = known.get(_host_of(key))
        if found is not None:
            return found
    return None
