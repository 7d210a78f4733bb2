"""The gateway reads an image's ENTRYPOINT and CMD from a real registry (Debian's docker-registry).

Images are built with umoci and pushed with skopeo to an open registry; registries that ask for
credentials (htpasswd Basic, a bearer-token service like Docker Hub's, TLS with a private CA)
serve the same storage. The token service is ours (PyJWT, ES256, the x5c chain the registry
verifies against its root bundle), so the handshake the gateway does is checked end to end by
the registry itself.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.drivers.imageref import BasicCredentials, ImageReference
from gateway.drivers.registry import Platform, RegistryClient, RegistryError
from tests.support import certs
from tests.support.agentimages import Pushed, push_agent_images
from tests.support.procs import free_port
from tests.support.registry import ensure_tools, htpasswd_auth, running_registry


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    ensure_tools("docker-registry", "skopeo", "umoci")
    work = tmp_path_factory.mktemp("lookup")
    with running_registry(work / "open") as reg:
        yield push_agent_images(reg, work)


def ref(pushed: Pushed, tag: str, host: str | None = None) -> ImageReference:
    return ImageReference.parse(pushed.reference(tag, host))


def client(pushed: Pushed, platform: str = "linux/amd64", **kwargs: object) -> RegistryClient:
    options: dict[str, object] = {"plain_http": frozenset({pushed.registry.host})} | kwargs
    return RegistryClient(platform=Platform.parse(platform), **options)  # type: ignore[arg-type]


async def test_entrypoint_and_cmd_by_tag_and_by_digest(pushed: Pushed) -> None:
    reg = client(pushed)
    try:
        by_tag = await reg.image_command(ref(pushed, "1"))
        assert by_tag.argv == ["/bin/agent", "--serve", "--port", "80"]
        assert by_tag.manifest_digest == pushed.digests["1"]
        by_digest = await reg.image_command(
            ImageReference.parse(f"{pushed.registry.host}/team/agent@{pushed.digests['1']}")
        )
        assert by_digest.argv == by_tag.argv
        assert (await reg.image_command(ref(pushed, "cmd-only"))).argv == ["python3", "main.py"]
        bare = await reg.image_command(ref(pushed, "bare"))
        assert bare.entrypoint == () and bare.cmd == ()
    finally:
        await reg.close()


@pytest.mark.parametrize(
    ("platform", "argv"),
    [("linux/amd64", ["/bin/agent", "--serve", "--port", "80"]), ("linux/arm64/v8", ["/bin/agent-arm"])],
)
async def test_an_index_is_narrowed_to_the_platform(pushed: Pushed, platform: str, argv: list[str]) -> None:
    reg = client(pushed, platform)
    try:
        found = await reg.image_command(ref(pushed, "multi"))
        assert found.argv == argv
        assert found.digest == pushed.digests["multi"], "the index's digest: what the pod is pinned to"
        assert found.manifest_digest == pushed.digests["1" if platform == "linux/amd64" else "arm"]
    finally:
        await reg.close()


async def test_an_index_without_the_platform_says_what_it_offers(pushed: Pushed) -> None:
    reg = client(pushed, "linux/s390x")
    try:
        with pytest.raises(RegistryError) as caught:
            await reg.image_command(ref(pushed, "multi"))
        assert caught.value.caller_fault
        assert "has no linux/s390x image (it offers: linux/amd64, linux/arm64, unknown/unknown)" in str(
            caught.value
        )
    finally:
        await reg.close()


async def test_a_missing_tag_is_the_callers_to_fix(pushed: Pushed) -> None:
    reg = client(pushed)
    try:
        with pytest.raises(RegistryError) as caught:
            await reg.image_command(ref(pushed, "no-such-tag"))
        assert caught.value.caller_fault
        assert f"{pushed.registry.host}/team/agent:no-such-tag: not found in registry" in str(caught.value)
    finally:
        await reg.close()


async def test_a_plain_http_registry_not_listed_is_named_in_the_error(pushed: Pushed) -> None:
    reg = client(pushed, plain_http=frozenset())
    try:
        with pytest.raises(RegistryError) as caught:
            await reg.image_command(ref(pushed, "1"))
        assert not caught.value.caller_fault
        assert "drivers.kubernetes.registry.plain_http" in str(caught.value)
    finally:
        await reg.close()


async def test_concurrent_lookups_share_one_request_and_the_result_is_cached(pushed: Pushed) -> None:
    reg = client(pushed)
    tag = "cmd-only"
    log = pushed.registry.log
    before = log.read_text().count(f"GET /v2/team/agent/manifests/{tag} ")
    try:
        found = await asyncio.gather(*(reg.image_command(ref(pushed, tag)) for _ in range(20)))
        assert {tuple(f.argv) for f in found} == {("python3", "main.py")}
        await reg.image_command(ref(pushed, tag))  # from the cache
    finally:
        await reg.close()
    await asyncio.sleep(0.2)  # the registry writes its access line after the response
    assert log.read_text().count(f"GET /v2/team/agent/manifests/{tag} ") - before == 1


async def test_a_config_of_a_mebibyte_is_read_whole(pushed: Pushed) -> None:
    reg = client(pushed)
    try:
        found = await reg.image_command(ref(pushed, "big"))
        assert found.argv == ["/bin/agent"] and found.digest == pushed.digests["big"]
    finally:
        await reg.close()


async def test_an_expired_tag_is_checked_with_a_head_and_reused_if_unchanged(pushed: Pushed) -> None:
    reg = client(pushed, cache_ttl_s=0)
    log = pushed.registry.log
    tag = "arm"

    def requests(method: str) -> int:
        return log.read_text().count(f'"{method} /v2/team/agent/manifests/{tag} ')

    before = requests("GET"), requests("HEAD")
    try:
        first = await reg.image_command(ref(pushed, tag))
        second = await reg.image_command(ref(pushed, tag))
        assert second == first
    finally:
        await reg.close()
    await asyncio.sleep(0.2)  # the registry writes its access line after the response
    assert (requests("GET") - before[0], requests("HEAD") - before[1]) == (1, 1)


async def test_registries_outside_the_allowed_list_are_refused(pushed: Pushed) -> None:
    reg = client(pushed, allowed=("*.example.com",))
    try:
        with pytest.raises(RegistryError) as caught:
            await reg.image_command(ref(pushed, "1"))
        assert caught.value.caller_fault
        assert "is not in drivers.kubernetes.registry.allowed (*.example.com)" in str(caught.value)
    finally:
        await reg.close()
    reg = client(pushed, allowed=("127.0.0.*:*",))
    try:
        assert (await reg.image_command(ref(pushed, "1"))).argv[0] == "/bin/agent"
    finally:
        await reg.close()


async def test_rate_limits_are_the_registrys_not_the_callers() -> None:
    """docker-registry never rate-limits, so this one answer comes from a stand-in: Docker Hub's 429."""

    async def limited(request: web.Request) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit."}]},
            status=429,
            headers={"Retry-After": "42"},
        )

    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", limited)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    host = f"127.0.0.1:{port}"
    reg = RegistryClient(platform=Platform.parse("linux/amd64"), plain_http=frozenset({host}))
    try:
        with pytest.raises(RegistryError) as caught:
            await reg.image_command(ImageReference.parse(f"{host}/team/agent:1"))
        assert not caught.value.caller_fault and caught.value.busy
        assert "HTTP 429" in str(caught.value) and "retry after 42 s" in str(caught.value)
    finally:
        await reg.close()
        await runner.cleanup()


async def test_a_caller_that_gives_up_does_not_fail_the_others_waiting(pushed: Pushed) -> None:
    reg = client(pushed, cache_ttl_s=0)
    try:
        first = asyncio.create_task(reg.image_command(ref(pushed, "1")))
        second = asyncio.create_task(reg.image_command(ref(pushed, "1")))
        await asyncio.sleep(0)  # both wait on the one lookup now
        first.cancel()
        assert (await second).argv == ["/bin/agent", "--serve", "--port", "80"]
        assert first.cancelled()
    finally:
        await reg.close()


async def test_tls_with_a_private_ca(pushed: Pushed, tmp_path: Path) -> None:
    pki = certs.make_pki(tmp_path / "pki")
    with running_registry(
        tmp_path / "tls", tls=(pki.server.cert, pki.server.key), storage=pushed.registry.root
    ) as reg:
        untrusted = RegistryClient(platform=Platform.parse("linux/amd64"))
        trusted = RegistryClient(platform=Platform.parse("linux/amd64"), ca_file=str(pki.ca))
        try:
            with pytest.raises(RegistryError) as caught:
                await untrusted.image_command(ref(pushed, "1", reg.host))
            assert "certificate verify failed" in str(caught.value)
            assert (await trusted.image_command(ref(pushed, "1", reg.host))).argv[0] == "/bin/agent"
        finally:
            await untrusted.close()
            await trusted.close()


async def test_basic_credentials(pushed: Pushed, tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path, "puller", "s3cret")
    with running_registry(tmp_path / "basic", auth=auth, storage=pushed.registry.root) as reg:
        lookups = client(pushed, plain_http=frozenset({reg.host}))
        try:
            with pytest.raises(RegistryError) as anonymous:
                await lookups.image_command(ref(pushed, "1", reg.host))
            assert anonymous.value.caller_fault and "HTTP 401) with no credentials" in str(anonymous.value)
            with pytest.raises(RegistryError) as wrong:
                await lookups.image_command(ref(pushed, "1", reg.host), BasicCredentials("puller", "nope"))
            assert "with the pull secret's user 'puller'" in str(wrong.value)
            assert "nope" not in str(wrong.value)
            found = await lookups.image_command(
                ref(pushed, "1", reg.host), BasicCredentials("puller", "s3cret")
            )
            assert found.argv == ["/bin/agent", "--serve", "--port", "80"]
            # The answer is cached for those credentials only: a wrong password after it is still refused.
            with pytest.raises(RegistryError, match="HTTP 401"):
                await lookups.image_command(ref(pushed, "1", reg.host), BasicCredentials("puller", "nope"))
        finally:
            await lookups.close()


@dataclass
class TokenService:
    """Docker's token protocol: Basic credentials in, a JWT the registry verifies out."""

    key_pem: bytes
    chain: list[str]
    users: dict[str, str]
    url: str = ""
    issued: list[tuple[str, str]] = field(default_factory=list)  # (user, scope)

    async def token(self, request: web.Request) -> web.Response:
        user = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                return web.json_response({"details": "bad credentials"}, status=401)
            user = name
        scope = request.query.get("scope", "")
        kind, repository, actions = scope.split(":")
        granted = ["pull"] if user and "pull" in actions.split(",") else []
        now = int(time.time())
        claims = {
            "iss": "test-issuer",
            "sub": user,
            "aud": request.query.get("service"),
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": kind, "name": repository, "actions": granted}],
        }
        self.issued.append((user, scope))
        token = jwt.encode(claims, self.key_pem, algorithm="ES256", headers={"x5c": self.chain})
        return web.json_response({"token": token, "expires_in": 300})


@pytest.fixture
async def token_service(tmp_path: Path) -> AsyncIterator[tuple[TokenService, certs.Pki]]:
    pki = certs.make_pki(tmp_path / "token-pki")
    leaf = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    service = TokenService(
        key_pem=pki.client.key.read_bytes(),
        chain=[base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()],
        users={"puller": "s3cret"},
    )
    app = web.Application()
    app.router.add_get("/token", service.token)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service.url = f"http://127.0.0.1:{port}/token"
    try:
        yield service, pki
    finally:
        await runner.cleanup()


async def test_bearer_token_handshake(
    pushed: Pushed, tmp_path: Path, token_service: tuple[TokenService, certs.Pki]
) -> None:
    service, pki = token_service
    auth = (
        f"token:\n  realm: {service.url}\n  service: test-registry\n  issuer: test-issuer\n"
        f"  rootcertbundle: {pki.ca}\n"
    )
    with running_registry(tmp_path / "token", auth=auth, storage=pushed.registry.root) as reg:
        lookups = client(pushed, plain_http=frozenset({reg.host}))
        try:
            with pytest.raises(RegistryError) as anonymous:
                await lookups.image_command(ref(pushed, "1", reg.host))
            assert anonymous.value.caller_fault and "with no credentials" in str(anonymous.value)
            creds = BasicCredentials("puller", "s3cret")
            first = await lookups.image_command(ref(pushed, "1", reg.host), creds)
            assert first.argv == ["/bin/agent", "--serve", "--port", "80"]
            other = await lookups.image_command(ref(pushed, "cmd-only", reg.host), creds)
            assert other.argv == ["python3", "main.py"]
        finally:
            await lookups.close()
    scope = "repository:team/agent:pull"
    # The anonymous token granted nothing; one token for the user served both images (cached).
    assert service.issued == [("", scope), ("puller", scope)]
