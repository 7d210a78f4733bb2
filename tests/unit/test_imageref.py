"""Image references read as the kubelet reads them, and pull-Secret credentials matched to them."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.drivers.imageref import (
    BasicCredentials,
    CredentialEntry,
    DockerConfigError,
    ImageReference,
    ImageReferenceError,
    candidate_credentials,
    docker_config_entries,
    kubelet_key,
)
from gateway.drivers.registry import Platform, parse_challenge, pick_challenge

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
        ("index.docker.io/python", ("docker.io", "registry-1.docker.io", "library/python", "latest", None)),
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
        ("python:lätest", "is not a valid tag"),
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


def _entries(auths: dict[str, dict[str, str]]) -> list[CredentialEntry]:
    return docker_config_entries(_config(auths))


def _users(image: str, entries: list[CredentialEntry]) -> list[str]:
    return [c.username for c in candidate_credentials(ImageReference.parse(image), entries)]


@pytest.mark.parametrize(
    ("location", "key"),
    [
        ("https://index.docker.io/v1/", "index.docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
        ("quay.io/org-a", "quay.io/org-a"),
        ("https://quay.io/v2/org-b/", "quay.io/org-b/"),
        ("*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com"),
    ],
)
def test_locations_are_keyed_as_the_kubelet_keys_them(location: str, key: str) -> None:
    assert kubelet_key(location) == key


def test_the_most_specific_key_comes_first_and_paths_keep_orgs_apart() -> None:
    entries = _entries(
        {
            "quay.io": {"auth": _auth("any-org", "x")},
            "quay.io/org-a": {"auth": _auth("org-a", "x")},
            "quay.io/org-b": {"username": "org-b", "password": "y"},
        }
    )
    assert _users("quay.io/org-a/agent:1", entries) == ["org-a", "any-org"]
    assert _users("quay.io/org-b/agent:1", entries) == ["org-b", "any-org"]
    assert _users("quay.io/org-c/agent:1", entries) == ["any-org"]


def test_globs_in_hosts_match_part_by_part_and_ports_must_agree() -> None:
    entries = _entries(
        {
            "*.dkr.ecr.*.amazonaws.com": {"auth": _auth("ecr", "x")},
            "*.gcr.io": {"auth": _auth("gcr", "x")},
            "registry.local:5000": {"auth": _auth("local", "x")},
        }
    )
    assert _users("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/agent:1", entries) == ["ecr"]
    assert _users("eu.gcr.io/p/agent", entries) == ["gcr"]
    assert _users("gcr.io/p/agent", entries) == []  # one host part fewer than the glob
    assert _users("registry.local:5000/agent", entries) == ["local"]
    assert _users("registry.local/agent", entries) == []
    assert _users("registry.local:5001/agent", entries) == []


def test_several_secrets_for_one_registry_are_all_tried_in_order() -> None:
    first = _entries({"ghcr.io": {"auth": _auth("old", "rotated-away")}})
    second = _entries({"https://ghcr.io/v2/": {"auth": _auth("new", "current")}})
    assert _users("ghcr.io/o/a", first + second) == ["old", "new"]


def test_docker_hub_takes_docker_io_keys_and_falls_back_to_docker_logins_key() -> None:
    login = _entries({"https://index.docker.io/v1/": {"auth": _auth("hub", "pw:with:colons")}})
    assert candidate_credentials(ImageReference.parse("python"), login) == [
        BasicCredentials("hub", "pw:with:colons")
    ]
    both = login + _entries({"docker.io": {"auth": _auth("docker-io", "x")}})
    assert _users("bitnami/redis", both) == ["docker-io"], "the fallback only when nothing else matches"
    assert _users("index.docker.io/library/python", both) == ["docker-io"]
    assert _users("ghcr.io/o/a", login) == []
    # Not a key the kubelet reads for Docker Hub.
    assert _users("python", _entries({"registry-1.docker.io": {"auth": _auth("r1", "x")}})) == []


def test_entries_without_usable_credentials_are_skipped() -> None:
    assert (
        _entries({"quay.io": {"email": "someone@example.com"}, "ghcr.io": {"username": "", "password": "x"}})
        == []
    )


def test_legacy_dockercfg_is_the_auths_map_itself() -> None:
    raw = json.dumps({"registry.example": {"auth": _auth("u", "p")}}).encode()
    assert docker_config_entries(raw, legacy=True) == [
        CredentialEntry("registry.example", BasicCredentials("u", "p"))
    ]


def test_an_auth_wrapped_over_lines_is_read_as_go_reads_it() -> None:
    wrapped = _auth("user", "a-long-password-" * 4)
    wrapped = wrapped[:20] + "\n" + wrapped[20:]
    assert _entries({"r.example": {"auth": wrapped}})[0].credentials.username == "user"


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
        docker_config_entries(raw)
    assert problem in str(caught.value)


def test_credentials_never_print_their_password() -> None:
    creds = BasicCredentials("u", "hunter2")
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    assert creds.header == "Basic " + _auth("u", "hunter2")


def test_challenges() -> None:
    assert parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"') == (
        "bearer",
        {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"},
    )
    assert parse_challenge('Bearer realm="https://r/token",scope="repository:a/b:pull,push"')[1]["scope"] == (
        "repository:a/b:pull,push"
    )
    assert parse_challenge("Bearer realm=https://r/token, service=reg") == (
        "bearer",
        {"realm": "https://r/token", "service": "reg"},
    )
    assert pick_challenge(['Basic realm="x"', 'Bearer realm="https://r/t"']) == (
        "bearer",
        {"realm": "https://r/t"},
    )
    assert pick_challenge(['Basic realm="Registry Realm"']) == ("basic", {"realm": "Registry Realm"})


@pytest.mark.parametrize(
    ("platform", "entry", "rank"),
    [
        ("linux/amd64", {"os": "linux", "architecture": "amd64"}, 0),
        ("linux/amd64", {"os": "linux", "architecture": "x86_64", "variant": "v1"}, 0),
        ("linux/amd64", {"os": "linux", "architecture": "amd64", "variant": "v3"}, None),
        ("linux/amd64/v3", {"os": "linux", "architecture": "amd64", "variant": "v2"}, 1),
        ("linux/amd64/v3", {"os": "linux", "architecture": "amd64"}, 2),
        # containerd says arm64 and arm64/v8 are one platform, whichever side names the variant.
        ("linux/arm64/v8", {"os": "linux", "architecture": "arm64"}, 0),
        ("linux/arm64", {"os": "linux", "architecture": "aarch64", "variant": "v8"}, 0),
        ("linux/arm64", {"os": "linux", "architecture": "arm64", "variant": "v9"}, None),
        ("linux/arm/v7", {"os": "linux", "architecture": "arm", "variant": "v6"}, 1),
        ("linux/arm", {"os": "linux", "architecture": "arm", "variant": "v7"}, 0),
        ("linux/arm/v6", {"os": "linux", "architecture": "arm", "variant": "v7"}, None),
        ("linux/amd64", {"os": "windows", "architecture": "amd64"}, None),
    ],
)
def test_platforms_match_as_containerd_matches_them(
    platform: str, entry: dict[str, str], rank: int | None
) -> None:
    assert Platform.parse(platform).rank(entry) == rank


def test_bad_platforms_are_refused() -> None:
    with pytest.raises(ValueError, match="is not os/architecture"):
        Platform.parse("amd64")
