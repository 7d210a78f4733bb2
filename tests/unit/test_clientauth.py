"""The CLI's tokens (gateway/clientauth.py) against a small issuer and API served here: the device
flow's polling rules (RFC 8628), the cache (0600, per API URL, damaged files kept aside), refresh
near expiry and after a 401 (once, one refresh for concurrent commands), token files and what the
CLI says when it cannot authenticate. The real Keycloak runs in tests/integration/test_keycloak.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clientauth import (
    DEVICE_GRANT,
    ApiClient,
    CachedCredentials,
    CachedLogin,
    ClientAuthError,
    NoCredentials,
    StaticToken,
    TokenCache,
    check_token,
    credentials_for,
    device_login,
    logout,
    read_token_file,
)
from tests.support.procs import REPO


@dataclass
class Issuer:
    """An OIDC issuer and a gateway API in one: what the CLI talks to."""

    #: What the device grant's polls answer, in turn (then success).
    polls: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)  # access tokens the API takes
    refresh_tokens: set[str] = field(default_factory=set)  # single use (rotation)
    issued: int = 0
    refresh_grants: int = 0
    device_polls: int = 0
    base: str = ""
    oidc: bool = True
    challenge: str = ""
    refuse_all: bool = False  # the API takes no token at all (e.g. the login lost its role)

    def issue(self) -> dict[str, Any]:
        self.issued += 1
        access, refresh = f"access-{self.issued}", f"refresh-{self.issued}"
        self.valid.add(access)
        self.refresh_tokens.add(refresh)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": refresh,
            "refresh_expires_in": 1800,
        }

    def app(self) -> web.Application:
        app = web.Application()

        async def auth(request: web.Request) -> web.Response:
            if not self.oidc:
                return web.json_response({"oidc": False})
            return web.json_response({"oidc": True, "issuer": f"{self.base}/issuer", "cli_client_id": "cli"})

        async def discovery(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "issuer": f"{self.base}/issuer",
                    "device_authorization_endpoint": f"{self.base}/issuer/device",
                    "token_endpoint": f"{self.base}/issuer/token",
                }
            )

        async def device(request: web.Request) -> web.Response:
            form = await request.post()
            assert form["client_id"] == "cli"
            assert form["code_challenge_method"] == "S256"
            self.challenge = str(form["code_challenge"])
            return web.json_response(
                {
                    "device_code": "dev-code",
                    "user_code": "ABCD-EFGH",
                    "verification_uri": f"{self.base}/verify",
                    "expires_in": 600,
                    "interval": 1,
                }
            )

        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            if form["grant_type"] == DEVICE_GRANT:
                self.device_polls += 1
                assert form["device_code"] == "dev-code"
                # PKCE (RFC 7636): the poll proves it holds the verifier of the device request's challenge.
                digest = hashlib.sha256(str(form["code_verifier"]).encode()).digest()
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != self.challenge:
                    return web.json_response({"error": "invalid_grant"}, status=400)
                if self.polls:
                    return web.json_response({"error": self.polls.pop(0)}, status=400)
                return web.json_response(self.issue())
            assert form["grant_type"] == "refresh_token"
            self.refresh_grants += 1
            await asyncio.sleep(0.05)  # a concurrent refresh would overlap this one
            if form["refresh_token"] not in self.refresh_tokens:
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "Token is not active"}, status=400
                )
            self.refresh_tokens.discard(str(form["refresh_token"]))  # used up: rotation
            return web.json_response(self.issue())

        async def sandboxes(request: web.Request) -> web.Response:
            header = request.headers.get("Authorization", "")
            if header == "Bearer no-role":
                return web.json_response({"error": "your token maps to no OpenShell role"}, status=403)
            if self.refuse_all or not header.startswith("Bearer ") or header[7:] not in self.valid:
                return web.json_response({"error": "missing or bad bearer token"}, status=401)
            return web.json_response({"sandboxes": []})

        app.router.add_get("/api/v1/auth", auth)
        app.router.add_get("/issuer/.well-known/openid-configuration", discovery)
        app.router.add_post("/issuer/device", device)
        app.router.add_post("/issuer/token", token)
        app.router.add_get("/api/v1/sandboxes", sandboxes)
        return app


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    state = Issuer()
    server = TestServer(state.app(), host="127.0.0.1")
    await server.start_server()
    state.base = str(server.make_url("")).rstrip("/")
    yield state
    await server.close()


@pytest.fixture
def cache(tmp_path: Path) -> TokenCache:
    return TokenCache(tmp_path / "config" / "openshell" / "tokens.json")


class FakeTime:
    """The device flow's clock and sleep: no real waiting, and every wait recorded."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


async def _login(issuer: Issuer, cache: TokenCache, fake: FakeTime) -> tuple[CachedLogin, list[str]]:
    printed: list[str] = []
    login = await device_login(
        issuer.base, cache=cache, out=printed.append, clock=fake.clock, sleep=fake.sleep
    )
    return login, printed


async def test_device_flow_polls_as_told_and_keeps_the_tokens_0600(issuer: Issuer, cache: TokenCache) -> None:
    issuer.polls = ["authorization_pending", "slow_down", "authorization_pending"]
    fake = FakeTime()
    login, printed = await _login(issuer, cache, fake)
    assert "ABCD-EFGH" in printed[0] and f"{issuer.base}/verify" in printed[0]
    # interval 1 s; slow_down adds 5 s for every poll after it (RFC 8628 section 3.5)
    assert fake.waits == [1, 1, 6, 6]
    assert login.access_token == "access-1" and login.refresh_token == "refresh-1"
    assert login.expires_at == fake.now + 300
    assert cache.path.stat().st_mode & 0o777 == 0o600
    assert cache.path.parent.stat().st_mode & 0o777 == 0o700
    stored = json.loads(cache.path.read_text())["logins"][issuer.base]
    assert stored["issuer"] == f"{issuer.base}/issuer" and stored["client_id"] == "cli"


@pytest.mark.parametrize(
    ("error", "said"),
    [("expired_token", "expired before the login was approved"), ("access_denied", "refused")],
)
async def test_device_flow_ends_on_expired_or_denied(
    issuer: Issuer, cache: TokenCache, error: str, said: str
) -> None:
    issuer.polls = ["authorization_pending", error]
    with pytest.raises(ClientAuthError, match=said):
        await _login(issuer, cache, FakeTime())
    assert not cache.path.exists()


async def test_device_flow_gives_up_when_the_code_expires(issuer: Issuer, cache: TokenCache) -> None:
    issuer.polls = ["authorization_pending"] * 1000
    fake = FakeTime()
    with pytest.raises(ClientAuthError, match="code expired"):
        await _login(issuer, cache, fake)
    assert sum(fake.waits) <= 601  # the device code's expires_in


async def test_login_against_a_gateway_without_oidc_says_so(issuer: Issuer, cache: TokenCache) -> None:
    issuer.oidc = False
    with pytest.raises(ClientAuthError, match="takes no OIDC tokens"):
        await _login(issuer, cache, FakeTime())


async def test_a_token_near_expiry_is_refreshed_before_the_call(issuer: Issuer, cache: TokenCache) -> None:
    login, _ = await _login(issuer, cache, FakeTime())
    clock = [login.expires_at - 10]  # within the 30 s margin
    creds = CachedCredentials(cache, login, clock=lambda: clock[0])
    async with ApiClient(issuer.base, creds) as api:
        status, doc = await api.request("GET", "/sandboxes")
    assert status == 200, doc
    assert issuer.refresh_grants == 1
    stored = cache.load(issuer.base)
    assert stored is not None and stored.access_token == "access-2" and stored.refresh_token == "refresh-2"


async def test_a_401_refreshes_once_and_retries(issuer: Issuer, cache: TokenCache) -> None:
    login, _ = await _login(issuer, cache, FakeTime())
    issuer.valid.discard(login.access_token)  # revoked at the API, not expired here
    creds = CachedCredentials(cache, login, clock=lambda: login.expires_at - 200)
    async with ApiClient(issuer.base, creds) as api:
        status, _ = await api.request("GET", "/sandboxes")
        assert status == 200 and issuer.refresh_grants == 1
        issuer.refuse_all = True  # now nothing is taken: one more refresh, then the CLI gives up
        with pytest.raises(ClientAuthError, match="openshell-gateway login --api"):
            await api.request("GET", "/sandboxes")
    assert issuer.refresh_grants == 2


async def test_a_refused_refresh_says_to_log_in(issuer: Issuer, cache: TokenCache) -> None:
    login, _ = await _login(issuer, cache, FakeTime())
    issuer.refresh_tokens.clear()  # the session ended at the issuer
    creds = CachedCredentials(cache, login, clock=lambda: login.expires_at + 1)
    async with ApiClient(issuer.base, creds) as api:
        with pytest.raises(ClientAuthError, match=r"invalid_grant.*openshell-gateway login --api"):
            await api.request("GET", "/sandboxes")


async def test_concurrent_commands_refresh_once(issuer: Issuer, cache: TokenCache) -> None:
    """Rotation makes a refresh token single-use: two commands refreshing at once must not both
    spend it (the second would fail and, at Keycloak, revoke the login)."""
    login, _ = await _login(issuer, cache, FakeTime())
    clocks = [lambda: login.expires_at - 1, lambda: login.expires_at - 1]
    creds = [CachedCredentials(cache, login, clock=c) for c in clocks]

    async def one(c: CachedCredentials) -> int:
        async with ApiClient(issuer.base, c) as api:
            return (await api.request("GET", "/sandboxes"))[0]

    assert await asyncio.gather(*(one(c) for c in creds)) == [200, 200]
    assert issuer.refresh_grants == 1


async def test_without_any_token_a_401_says_to_log_in(issuer: Issuer) -> None:
    async with ApiClient(issuer.base, NoCredentials(issuer.base)) as api:
        with pytest.raises(ClientAuthError, match=f"openshell-gateway login --api {issuer.base}"):
            await api.request("GET", "/sandboxes")


async def test_a_given_token_is_never_refreshed(issuer: Issuer) -> None:
    creds = StaticToken("stale", origin="OPENSHELL_TOKEN", api_url=issuer.base)
    async with ApiClient(issuer.base, creds) as api:
        with pytest.raises(ClientAuthError, match="refused the token from OPENSHELL_TOKEN"):
            await api.request("GET", "/sandboxes")
    assert issuer.refresh_grants == 0


def test_token_sources_in_order(tmp_path: Path, cache: TokenCache) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {"OPENSHELL_TOKEN": "from-env"}
    api = "https://gw:7080"
    first = credentials_for(api, token_file=token_file, env=env, cache=cache)
    assert isinstance(first, StaticToken) and first.origin.startswith("--token-file")
    second = credentials_for(api, env=env, cache=cache)
    assert isinstance(second, StaticToken) and second.origin == "OPENSHELL_TOKEN"
    assert isinstance(credentials_for(api, env={}, cache=cache), NoCredentials)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"eyJ.abc.def\n", "eyJ.abc.def"),
        (b"Bearer eyJ.abc.def", "eyJ.abc.def"),
        (b'{"access_token": "eyJ.abc.def", "expires_in": 300}', "eyJ.abc.def"),
        (b"", "empty"),
        (b"two words", "not a bearer token"),
        (b"\xff\xfe\x00", "not text"),
        (b'{"token": 1}', "without a string access_token"),
        (b"{not json", "does not parse"),
    ],
)
def test_token_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    if expected.startswith("eyJ"):
        assert read_token_file(path) == expected
    else:
        with pytest.raises(ClientAuthError, match=expected) as raised:
            read_token_file(path)
        assert "abc" not in str(raised.value)


def test_a_missing_or_directory_token_file(tmp_path: Path) -> None:
    with pytest.raises(ClientAuthError, match="no such file"):
        read_token_file(tmp_path / "absent")
    with pytest.raises(ClientAuthError, match="is a directory"):
        read_token_file(tmp_path)


async def test_a_damaged_cache_is_said_and_kept_aside(issuer: Issuer, cache: TokenCache) -> None:
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{ damaged")
    with pytest.raises(ClientAuthError, match=r"damaged.*openshell-gateway login --api"):
        cache.load(issuer.base)
    await _login(issuer, cache, FakeTime())  # a login still works ...
    aside = list(cache.path.parent.glob("tokens.json.damaged-*"))
    assert [p.read_text() for p in aside] == ["{ damaged"]  # ... and loses nothing
    assert cache.load(issuer.base) is not None


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_sends_the_token_and_says_what_to_do(
    issuer: Issuer, tmp_path: Path, cache: TokenCache
) -> None:
    """The real command line, as a subprocess: a token from the environment or a file is sent as
    a bearer token, and every failure is one sentence with what to run, never a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "OPENSHELL_TOKEN"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    issuer.valid.add("good-token")

    code, out, err = await _cli({**env, "OPENSHELL_TOKEN": "good-token"}, "status", "--api", issuer.base)
    assert (code, out.strip()) == (0, "no sandboxes"), err

    code, _, err = await _cli(env, "status", "--api", issuer.base)
    assert code == 77 and f"openshell-gateway login --api {issuer.base}" in err and "Traceback" not in err

    code, _, err = await _cli({**env, "OPENSHELL_TOKEN": "no-role"}, "status", "--api", issuer.base)
    assert code == 77 and "no OpenShell role" in err and "Traceback" not in err

    (tmp_path / "token").write_bytes(b"\x00\x01 binary")
    code, _, err = await _cli(env, "status", "--api", issuer.base, "--token-file", str(tmp_path / "token"))
    assert code == 77 and "--token-file" in err and "Traceback" not in err

    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("[]")
    code, _, err = await _cli(env, "sandbox", "delete", "--api", issuer.base, "x")
    assert code == 77 and "damaged" in err and "Traceback" not in err


async def test_logout_forgets_one_api_url_only(issuer: Issuer, cache: TokenCache) -> None:
    login, _ = await _login(issuer, cache, FakeTime())
    other = CachedLogin(**{**login.to_json(), "api_url": "http://other:7080"})
    async with cache.locked():
        cache.store(other)
    assert await logout(issuer.base, cache=cache)
    assert cache.load(issuer.base) is None
    assert cache.load("http://other:7080") == other
    assert not await logout(issuer.base, cache=cache)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_token_text_is_a_token_or_a_clear_refusal(text: str) -> None:
    try:
        token = check_token(text, origin="OPENSHELL_TOKEN")
    except ClientAuthError as exc:
        # One of the fixed sentences: the value itself is never echoed.
        assert str(exc) in {
            "OPENSHELL_TOKEN: looks like JSON but does not parse",
            "OPENSHELL_TOKEN: a JSON object without a string access_token",
            "OPENSHELL_TOKEN: empty: it should hold an access token",
            "OPENSHELL_TOKEN: not a bearer token (one word of printable ASCII characters expected)",
        }
    else:
        assert token and token.isascii() and token.isprintable() and not any(c.isspace() for c in token)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, st.fixed_dictionaries({"logins": st.dictionaries(st.just("http://gw"), _JSON)})))
def test_any_cache_document_loads_or_is_called_damaged(doc: object) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cache = TokenCache(Path(tmp) / "tokens.json")
        cache.path.write_text(json.dumps(doc))
        try:
            login = cache.load("http://gw")
        except ClientAuthError as exc:
            assert "damaged" in str(exc) and "openshell-gateway login --api http://gw" in str(exc)
        else:
            assert login is None or isinstance(login.access_token, str)


# Deep enough that json.loads raises RecursionError rather than ValueError.
_DEEP = '{"a":' + "[" * 100_000


def test_deeply_nested_json_is_a_clean_refusal_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ClientAuthError, match=r"^OPENSHELL_TOKEN: looks like JSON but does not parse$"):
        check_token(_DEEP, origin="OPENSHELL_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(_DEEP)
    with pytest.raises(ClientAuthError, match="does not parse"):
        read_token_file(token_file)
    cache = TokenCache(tmp_path / "openshell" / "tokens.json")
    cache.path.parent.mkdir(mode=0o700)
    cache.path.write_text('{"logins":' + "[" * 100_000)
    with pytest.raises(ClientAuthError, match=r"damaged.*openshell-gateway login --api https://gw"):
        cache.load("https://gw")


async def test_a_deeply_nested_cache_is_kept_aside_by_a_login(issuer: Issuer, cache: TokenCache) -> None:
    cache.path.parent.mkdir(parents=True, mode=0o700)
    cache.path.write_text('{"logins":' + "[" * 100_000)
    await _login(issuer, cache, FakeTime())
    assert cache.load(issuer.base) is not None
    assert len(list(cache.path.parent.glob("tokens.json.damaged-*"))) == 1


async def test_a_logout_sticks_when_a_command_refreshes_meanwhile(issuer: Issuer, cache: TokenCache) -> None:
    login, _ = await _login(issuer, cache, FakeTime())
    # A command loaded the login, then the user logged out; the command's token is near expiry.
    creds = CachedCredentials(cache, login, clock=lambda: login.expires_at - 1)
    assert await logout(issuer.base, cache=cache)
    async with ApiClient(issuer.base, creds) as api:
        with pytest.raises(ClientAuthError, match=r"logged out of .* meanwhile.*openshell-gateway login"):
            await api.request("GET", "/sandboxes")
    assert cache.load(issuer.base) is None  # not written back
    assert issuer.refresh_grants == 0


async def test_the_cache_directory_is_tightened_and_the_temporary_file_never_follows_a_link(
    issuer: Issuer, cache: TokenCache, tmp_path: Path
) -> None:
    cache.path.parent.mkdir(parents=True, mode=0o755)
    os.chmod(cache.path.parent, 0o755)  # whatever the umask: made by someone else, say
    # A link planted where the temporary file goes: the tokens must not land at its target.
    target = tmp_path / "planted"
    target.write_text("")
    (cache.path.parent / f".tokens.json.{os.getpid()}.tmp").symlink_to(target)
    await _login(issuer, cache, FakeTime())
    assert cache.path.parent.stat().st_mode & 0o777 == 0o700
    assert cache.path.stat().st_mode & 0o777 == 0o600 and not cache.path.is_symlink()
    assert target.read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
async def test_a_cache_directory_of_another_user_is_refused(issuer: Issuer, cache: TokenCache) -> None:
    cache.path.parent.mkdir(parents=True, mode=0o700)
    os.chown(cache.path.parent, 65534, 65534)
    with pytest.raises(ClientAuthError, match="belongs to another user"):
        await _login(issuer, cache, FakeTime())
    assert not cache.path.exists()


def test_a_token_is_not_sent_over_plain_http_to_another_host_unless_insecure(tmp_path: Path) -> None:
    env = {"OPENSHELL_TOKEN": "a-token"}
    cache = TokenCache(tmp_path / "tokens.json")
    with pytest.raises(ClientAuthError, match=r"plain http to gw\.example\.com.*--insecure"):
        credentials_for("http://gw.example.com:7080", env=env, cache=cache)
    assert isinstance(
        credentials_for("http://gw.example.com:7080", env=env, cache=cache, insecure=True), StaticToken
    )
    for fine in (
        "https://gw.example.com",
        "http://127.0.0.1:7080",
        "http://localhost:7080",
        "http://[::1]:7080",
    ):
        assert isinstance(credentials_for(fine, env=env, cache=cache), StaticToken)
    # Without a token nothing is at stake: the call goes (a gateway without OIDC).
    assert isinstance(credentials_for("http://gw.example.com", env={}, cache=cache), NoCredentials)


async def test_a_login_over_plain_http_to_another_host_is_refused_unless_insecure(cache: TokenCache) -> None:
    # Refused before anything is asked: gw.invalid does not resolve, and is never looked up.
    with pytest.raises(
        ClientAuthError, match=r"refusing to ask which issuer .*plain http to gw\.invalid.*--issuer"
    ):
        await device_login("http://gw.invalid:7080", cache=cache, out=print)
    with pytest.raises(ClientAuthError, match=r"plain http to keycloak\.invalid"):
        await device_login(
            "https://gw.invalid",
            cache=cache,
            out=print,
            issuer="http://keycloak.invalid/realms/o",
            client_id="c",
        )
    assert not cache.path.exists()
