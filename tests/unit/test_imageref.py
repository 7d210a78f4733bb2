"""Image references read as the kubelet reads them, and pull-Secret credentials matched to them."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.drivers.imageref import (
    BasicCredentials,
    DockerConfigError,
    ImageReference,
    ImageReferenceError,
    credentials_for,
    parse_docker_config,
)
from gateway.drivers.registry import Platform, parse_challenge

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),  # (registry, API host, repository, tag, digest)
    [
        ("python", ("docker.io", "registry-1.docker.io", "library/python", "latest", None)),
        ("python:3.12-slim", ("docker.io", "registry-1.docker.io", "library/python", "3.12-slim", None)),
        ("bitnami/redis:7", ("docker.io", "registry-1.docker.io", "bitnami/redis", "7", None)),
        (
            "docker.io/library/busybox",
            ("docker.io", "registry-1.docker.io", "library/busybox", "latest", None),
        ),
        ("ghcr.io/org/team/agent:v1", ("ghcr.io", "ghcr.io", "org/team/agent", "v1", None)),
        ("localhost/agent", ("localhost", "localhost", "agent", "latest", None)),
        ("127.0.0.1:5000/agent:dev", ("127.0.0.1:5000", "127.0.0.1:5000", "agent", "dev", None)),
        (f"quay.io/org/agent@{DIGEST}", ("quay.io", "quay.io", "org/agent", None, DIGEST)),
        (f"quay.io/org/agent:v2@{DIGEST}", ("quay.io", "quay.io", "org/agent", "v2", DIGEST)),
        (
            "my-registry:5000/a.b/c__d/e-f",
            ("my-registry:5000", "my-registry:5000", "a.b/c__d/e-f", "latest", None),
        ),
    ],
)
def test_references_are_normalised_like_the_kubelet_does(
    text: str, expected: tuple[str, str, str, str | None, str | None]
) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.api_host, ref.repository, ref.tag, ref.digest) == expected
    assert ref.reference == (ref.digest or ref.tag)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" python", "surrounding spaces"),
        ("Python", "must be lowercase"),
        ("python:bad tag", "is not a valid tag"),
        ("python@sha256:abc", "is not sha256:<64 hex digits>"),
        ("python@md5:" + "a" * 32, "is not sha256"),
        ("ghcr.io/org//agent", "must be lowercase letters"),
        ("ghcr.io/", "must be lowercase letters"),
    ],
)
def test_bad_references_say_which_part_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ImageReferenceError) as caught:
        ImageReference.parse(text)
    assert problem in str(caught.value)


def _config(auths: dict[str, dict[str, str]]) -> bytes:
    return json.dumps({"auths": auths}).encode()


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_docker_config_credentials_match_the_registry_host() -> None:
    known = parse_docker_config(
        _config(
            {
                "https://index.docker.io/v1/": {"auth": _auth("hub", "pw:with:colons")},
                "ghcr.io": {"username": "gh", "password": "tok"},
                "http://127.0.0.1:5000/v2/": {"auth": _auth("local", "x")},
                "quay.io": {"email": "someone@example.com"},  # nothing usable: skipped
            }
        )
    )
    assert credentials_for(ImageReference.parse("python"), known) == BasicCredentials("hub", "pw:with:colons")
    assert credentials_for(ImageReference.parse("ghcr.io/o/a"), known) == BasicCredentials("gh", "tok")
    assert credentials_for(ImageReference.parse("127.0.0.1:5000/a"), known) == BasicCredentials("local", "x")
    assert credentials_for(ImageReference.parse("quay.io/o/a"), known) is None
    assert credentials_for(ImageReference.parse("ghcr.io:443/o/a"), known) is None  # another host:port


def test_legacy_dockercfg_is_the_auths_map_itself() -> None:
    raw = json.dumps({"registry.example": {"auth": _auth("u", "p")}}).encode()
    assert parse_docker_config(raw, legacy=True) == {"registry.example": BasicCredentials("u", "p")}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not JSON"),
        (b'{"other": {}}', 'no "auths" object'),
        (_config({"r": "x"}), "the entry for 'r' is not an object"),  # type: ignore[dict-item]
        (_config({"r": {"auth": "%%%"}}), "is not base64"),
        (_config({"r": {"auth": base64.b64encode(b"nocolon").decode()}}), 'has no ":"'),
    ],
)
def test_bad_docker_configs_are_explained(raw: bytes, problem: str) -> None:
    with pytest.raises(DockerConfigError) as caught:
        parse_docker_config(raw)
    assert problem in str(caught.value)


def test_credentials_never_print_their_password() -> None:
    creds = BasicCredentials("u", "hunter2")
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    assert creds.header == "Basic " + _auth("u", "hunter2")


def test_challenges_and_platforms() -> None:
    assert parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"') == (
        "bearer",
        {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"},
    )
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    arm = Platform.parse("linux/arm64/v8")
    assert arm.matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not arm.matches({"os": "linux", "architecture": "arm64", "variant": "v7"})
    assert Platform.parse("linux/amd64").matches({"os": "linux", "architecture": "amd64", "variant": "v3"})
    with pytest.raises(ValueError, match="is not os/architecture"):
        Platform.parse("amd64")
