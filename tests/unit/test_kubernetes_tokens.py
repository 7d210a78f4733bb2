"""The Kubernetes token verifier's own rules: what a TokenReview answer must say for a sandbox, the
unverified hints read from the token, and the review cache (its bounds, sharing, and what is never
cached). The reviews here are answers the test writes (the real API server answers them in
tests/e2e/test_kubernetes_identity.py); the clock is the test's.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightkube import AsyncClient, KubeConfig
from lightkube.models.authentication_v1 import TokenReviewStatus, UserInfo
from pydantic import ValidationError

from gateway.auth import CredentialRefused, Refusal
from gateway.auth.kubernetes_tokens import (
    EXPIRY_MARGIN_S,
    REFUSAL_CACHE_S,
    KubernetesTokenVerifier,
    api_review,
    principal_of_review,
    service_account_username,
    unverified_claims,
)
from gateway.config import GatewayConfig

AUDIENCE = "openshell-gateway"
USERNAME = service_account_username("sandboxes", None)
T0 = 1_800_000_000.0


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_payload(payload: bytes) -> str:
    return f"{b64({})}.{b64(payload)}.{b64(b's')}"


def token(**claims: Any) -> str:
    claims = {"aud": [AUDIENCE], "exp": T0 + 3600, **claims}
    return f"{b64({'alg': 'RS256', 'kid': 'k'})}.{b64(claims)}.{b64(b'signature')}"


def answer(
    *,
    authenticated: bool = True,
    audiences: list[str] | None = None,
    username: str = USERNAME,
    pod: str | None = "sandbox-sb-1",
    uid: str | None = "uid-1",
    error: str | None = None,
) -> TokenReviewStatus:
    extra: dict[str, list[str]] = {}
    if pod is not None:
        extra["authentication.kubernetes.io/pod-name"] = [pod]
    if uid is not None:
        extra["authentication.kubernetes.io/pod-uid"] = [uid]
    return TokenReviewStatus(
        authenticated=authenticated,
        audiences=[AUDIENCE] if audiences is None else audiences,
        user=UserInfo(username=username, extra=extra) if authenticated else None,
        error=error,
    )


class Api:
    """Answers reviews as told, counting them; ``gate`` holds them until set."""

    def __init__(self, status: TokenReviewStatus | None = None) -> None:
        self.status = status or answer()
        self.calls = 0
        self.failure: CredentialRefused | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def review(self, _token: str) -> TokenReviewStatus:
        self.calls += 1
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.status


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def verifier(
    api: Api, clock: Clock, *, cache_s: float = 300.0, max_entries: int = 100
) -> KubernetesTokenVerifier:
    return KubernetesTokenVerifier(
        api.review,
        audience=AUDIENCE,
        username=USERNAME,
        cache_s=cache_s,
        clock=clock,
        max_entries=max_entries,
    )


def review_of(status: TokenReviewStatus, *, tok: str = "t.o.k") -> Refusal | str:
    try:
        principal = principal_of_review(
            status, token=tok, audience=AUDIENCE, username=USERNAME, expires_at=T0
        )
    except CredentialRefused as exc:
        return exc.reason
    return principal.sandbox_id


# --- what a review must say ------------------------------------------------------------------------


def test_a_review_naming_a_sandbox_pod_gives_that_sandbox_and_pod() -> None:
    principal = principal_of_review(answer(), token="t", audience=AUDIENCE, username=USERNAME, expires_at=T0)
    assert (principal.kind, principal.sandbox_id, principal.pod_name, principal.pod_uid) == (
        "kubernetes",
        "sb-1",
        "sandbox-sb-1",
        "uid-1",
    )
    assert principal.expires_at == T0 and principal.generation is None


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (answer(authenticated=False, error="token has expired"), Refusal.REVIEW_FAILED),
        (answer(audiences=["https://kubernetes.default.svc"]), Refusal.WRONG_AUDIENCE),
        (answer(audiences=[]), Refusal.WRONG_AUDIENCE),
        (answer(username="system:serviceaccount:other:default"), Refusal.NOT_A_SANDBOX),
        (answer(username="system:serviceaccount:sandboxes:gateway"), Refusal.NOT_A_SANDBOX),
        (answer(username="admin"), Refusal.NOT_A_SANDBOX),
        (answer(pod=None), Refusal.NOT_A_SANDBOX),
        (answer(uid=None), Refusal.NOT_A_SANDBOX),
        (answer(pod="gateway-0"), Refusal.NOT_A_SANDBOX),
        (answer(pod="sandbox-"), Refusal.NOT_A_SANDBOX),
        (answer(pod="sandbox-Not_A_Valid_Id"), Refusal.NOT_A_SANDBOX),
        (answer(pod=""), Refusal.NOT_A_SANDBOX),
    ],
)
def test_each_review_that_is_not_a_sandbox_pods_is_refused_with_its_reason(
    status: TokenReviewStatus, reason: Refusal
) -> None:
    assert review_of(status) is reason


def test_a_pod_named_twice_is_no_pod() -> None:
    status = answer()
    assert status.user is not None and status.user.extra is not None
    status.user.extra["authentication.kubernetes.io/pod-name"] = ["sandbox-a", "sandbox-b"]
    assert review_of(status) is Refusal.NOT_A_SANDBOX


def test_the_api_servers_reason_is_passed_on_without_the_token() -> None:
    tok = token()
    with pytest.raises(CredentialRefused) as raised:
        principal_of_review(
            answer(authenticated=False, error=f"invalid bearer token {tok}: " + "x" * 1000),
            token=tok,
            audience=AUDIENCE,
            username=USERNAME,
            expires_at=T0,
        )
    assert raised.value.reason is Refusal.REVIEW_FAILED and raised.value.status.name == "UNAUTHENTICATED"
    assert "invalid bearer token" in raised.value.detail and tok not in str(raised.value)
    assert len(raised.value.detail) < 400


def test_the_service_account_is_the_pods_or_the_namespaces_default() -> None:
    assert service_account_username("ns", None) == "system:serviceaccount:ns:default"
    assert service_account_username("ns", "sandbox") == "system:serviceaccount:ns:sandbox"


# --- the unverified hints --------------------------------------------------------------------------


def test_exp_and_aud_are_read_from_the_payload() -> None:
    claims = unverified_claims(token(aud="one", exp=T0))
    assert claims.exp == T0 and claims.audiences == ("one",)
    claims = unverified_claims(f"{b64({})}.{b64({'aud': ['a', 'b']})}.{b64(b's')}")
    assert claims.exp is None and claims.audiences == ("a", "b")


@pytest.mark.parametrize(
    "tok",
    [
        "",
        "abc",
        "a.b",
        "a..c",
        "a.b.c.d",
        f"{b64({})}.!!!.{b64(b's')}",
        f"{b64({})}.{b64(b'not json')}.{b64(b's')}",
        f"{b64({})}.{b64([1, 2])}.{b64(b's')}",
        token(exp="soon"),
        token(exp=True),
        token(exp=None, aud=5),
        token(aud=["a", 5]),
        raw_payload(b'{"exp": NaN}'),
        raw_payload(b'{"exp": 1e999}'),
        raw_payload(b'{"exp": 1' + b"0" * 400 + b"}"),
    ],
)
def test_a_token_that_is_no_jwt_is_malformed(tok: str) -> None:
    with pytest.raises(CredentialRefused) as raised:
        unverified_claims(tok)
    assert raised.value.reason is Refusal.MALFORMED


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: f"{b64({})}.{b64(b)}.{b64(b's')}"))
def test_any_text_is_either_read_or_refused_as_malformed(tok: str) -> None:
    try:
        unverified_claims(tok)
    except CredentialRefused as exc:
        assert exc.reason is Refusal.MALFORMED


# --- the cache -------------------------------------------------------------------------------------


async def test_one_review_per_token_until_the_cache_time() -> None:
    api, clock = Api(), Clock()
    v = verifier(api, clock, cache_s=300)
    tok = token()
    assert (await v.verify(tok)).sandbox_id == "sb-1"
    clock.now += 299
    assert (await v.verify(tok)).pod_uid == "uid-1"
    assert api.calls == 1
    clock.now += 2
    await v.verify(tok)
    assert api.calls == 2, "reviewed again after review_cache_s"


async def test_the_cache_ends_before_the_token_expires() -> None:
    api, clock = Api(), Clock()
    v = verifier(api, clock, cache_s=3000)
    tok = token(exp=T0 + 100)
    principal = await v.verify(tok)
    assert principal.expires_at == T0 + 100
    clock.now = T0 + 100 - EXPIRY_MARGIN_S - 1
    await v.verify(tok)
    assert api.calls == 1
    clock.now = T0 + 100 - EXPIRY_MARGIN_S + 1
    await v.verify(tok)
    assert api.calls == 2, "not reused within the margin of its expiry"
    clock.now = T0 + 100
    with pytest.raises(CredentialRefused) as raised:
        await v.verify(tok)
    assert raised.value.reason is Refusal.EXPIRED
    assert api.calls == 2, "an expired token is refused without a review"


async def test_a_cached_principal_is_never_used_past_its_expiry() -> None:
    # With a review cache longer than the margin allows, the principal itself still expires.
    api, clock = Api(), Clock()
    v = verifier(api, clock, cache_s=3000)
    tok = token(exp=T0 + 10)  # inside the margin: not cached at all, but accepted now
    assert (await v.verify(tok)).expires_at == T0 + 10
    clock.now = T0 + 11
    with pytest.raises(CredentialRefused) as raised:
        await v.verify(tok)
    assert raised.value.reason is Refusal.EXPIRED


async def test_a_wrong_audience_or_expired_token_costs_no_review() -> None:
    api, clock = Api(), Clock()
    v = verifier(api, clock)
    for tok, reason in (
        (token(aud=["https://kubernetes.default.svc"]), Refusal.WRONG_AUDIENCE),
        (token(exp=T0 - 1), Refusal.EXPIRED),
        ("garbage", Refusal.MALFORMED),
    ):
        with pytest.raises(CredentialRefused) as raised:
            await v.verify(tok)
        assert raised.value.reason is reason
    assert api.calls == 0


async def test_a_refusal_is_remembered_briefly_and_an_outage_not_at_all() -> None:
    api, clock = Api(answer(authenticated=False, error="pod not found")), Clock()
    v = verifier(api, clock)
    tok = token()
    for _ in range(3):
        with pytest.raises(CredentialRefused):
            await v.verify(tok)
    assert api.calls == 1
    clock.now += REFUSAL_CACHE_S + 1
    api.status = answer()
    assert (await v.verify(tok)).sandbox_id == "sb-1", "asked again after the refusal's short cache"
    assert api.calls == 2

    other = token(exp=T0 + 7200)
    api.failure = CredentialRefused(Refusal.REVIEW_UNAVAILABLE, "503")
    for _ in range(2):
        with pytest.raises(CredentialRefused) as raised:
            await v.verify(other)
        assert raised.value.reason is Refusal.REVIEW_UNAVAILABLE
        assert raised.value.status.name == "UNAVAILABLE"
    assert api.calls == 4, "an outage is never cached"
    api.failure = None
    assert (await v.verify(other)).sandbox_id == "sb-1"


async def test_concurrent_calls_with_one_token_share_one_review_and_survive_a_cancelled_one() -> None:
    api, clock = Api(), Clock()
    api.gate.clear()
    v = verifier(api, clock)
    tok = token()
    first = asyncio.create_task(v.verify(tok))
    others = [asyncio.create_task(v.verify(tok)) for _ in range(4)]
    await asyncio.sleep(0.01)
    first.cancel()  # the caller that started the review goes away
    await asyncio.sleep(0.01)
    api.gate.set()
    assert [p.sandbox_id for p in await asyncio.gather(*others)] == ["sb-1"] * 4
    assert api.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_cache_is_bounded_and_keeps_the_recently_used() -> None:
    api, clock = Api(), Clock()
    v = verifier(api, clock, max_entries=2)
    a, b, c = (token(jti=n) for n in "abc")
    await v.verify(a)
    await v.verify(b)
    await v.verify(a)  # a is the most recently used
    await v.verify(c)  # b goes
    assert api.calls == 3
    await v.verify(a)
    assert api.calls == 3
    await v.verify(b)
    assert api.calls == 4


async def test_close_cancels_reviews_in_flight() -> None:
    api, clock = Api(), Clock()
    api.gate.clear()
    v = verifier(api, clock)
    waiting = asyncio.create_task(v.verify(token()))
    await asyncio.sleep(0.01)
    await v.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting


# --- the API -------------------------------------------------------------------------------------


async def test_an_unreachable_api_is_an_outage_not_a_bad_token() -> None:
    # A real client and a port nobody listens on.
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
            "users": [{"name": "u", "user": {"token": "gateway-token"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )
    client = AsyncClient(config, timeout=2)
    try:
        tok = token()
        with pytest.raises(CredentialRefused) as raised:
            await api_review(client, AUDIENCE)(tok)
        assert raised.value.reason is Refusal.REVIEW_UNAVAILABLE
        assert "cannot reach the Kubernetes API" in raised.value.detail and tok not in str(raised.value)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (503, {"kind": "Status", "code": 503, "message": "etcd is down"}, "could not review the token: 503"),
        (403, {"kind": "Status", "code": 403, "message": "forbidden"}, "needs create on tokenreviews"),
        (201, "not json at all", "could not be read"),
        (
            201,
            {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "spec": {"token": "x"}},
            "without status",
        ),
    ],
)
async def test_an_api_that_fails_or_answers_nonsense_is_an_outage(
    status: int, body: Any, expected: str
) -> None:
    """A real HTTP server standing in for the API server's TokenReview endpoint."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def review(request: web.Request) -> web.Response:
        assert (await request.json())["spec"]["audiences"] == [AUDIENCE]
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, content_type="application/json")

    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", review)
    async with TestServer(app) as server:
        config = KubeConfig.from_dict(
            {
                "clusters": [{"name": "c", "cluster": {"server": str(server.make_url("")).rstrip("/")}}],
                "users": [{"name": "u", "user": {"token": "gateway-token"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
        client = AsyncClient(config, timeout=5)
        try:
            tok = token()
            with pytest.raises(CredentialRefused) as raised:
                await api_review(client, AUDIENCE)(tok)
            assert raised.value.reason is Refusal.REVIEW_UNAVAILABLE
            assert expected in raised.value.detail and tok not in str(raised.value)
        finally:
            await client.close()


# --- what a flood of unseen tokens costs ---------------------------------------------------------


async def test_a_flood_of_refused_tokens_never_pushes_an_accepted_review_out() -> None:
    api, clock = Api(), Clock()
    v = KubernetesTokenVerifier(
        api.review,
        audience=AUDIENCE,
        username=USERNAME,
        cache_s=300,
        clock=clock,
        max_entries=10,
    )
    good = token(jti="good")
    await v.verify(good)
    api.status = answer(authenticated=False, error="invalid bearer token")
    for n in range(50):
        clock.now += 1.0  # within the rate: every one of them is reviewed (and refused)
        with pytest.raises(CredentialRefused) as raised:
            await v.verify(token(jti=f"garbage-{n}"))
        assert raised.value.reason is Refusal.REVIEW_FAILED
    assert api.calls == 51
    api.status = answer()
    assert (await v.verify(good)).sandbox_id == "sb-1"
    assert api.calls == 51, "the accepted review is still cached"


async def test_unseen_tokens_are_reviewed_at_a_bounded_rate_and_the_rest_are_unavailable() -> None:
    api, clock = Api(), Clock()
    v = KubernetesTokenVerifier(
        api.review, audience=AUDIENCE, username=USERNAME, cache_s=300, clock=clock, reviews_per_s=2, burst=5
    )
    cached = token(jti="cached")
    await v.verify(cached)
    refusals = []
    for n in range(20):
        try:
            await v.verify(token(jti=str(n)))
        except CredentialRefused as exc:
            refusals.append(exc)
    assert api.calls == 5, "the burst, then nothing more reaches the API server"
    assert len(refusals) == 16
    assert {r.reason for r in refusals} == {Refusal.REVIEW_UNAVAILABLE}
    assert all(r.status.name == "UNAVAILABLE" for r in refusals), "the supervisor retries"
    assert (await v.verify(cached)).sandbox_id == "sb-1", "a cached review needs no budget"
    clock.now += 1.0
    await v.verify(token(jti="19"))  # the limit is not cached: asked again once the rate allows
    await v.verify(token(jti="18"))
    with pytest.raises(CredentialRefused):
        await v.verify(token(jti="17"))
    assert api.calls == 7


async def test_reviews_in_flight_are_bounded_and_a_caller_waits_only_briefly_for_a_slot() -> None:
    api, clock = Api(), Clock()
    api.gate.clear()
    v = KubernetesTokenVerifier(
        api.review,
        audience=AUDIENCE,
        username=USERNAME,
        cache_s=300,
        clock=clock,
        max_in_flight=3,
        wait_s=0.2,
    )
    calls = [asyncio.create_task(v.verify(token(jti=str(n)))) for n in range(40)]
    refused: list[CredentialRefused] = []
    async with asyncio.timeout(10):  # the waiting ones give up after wait_s, not the test's timeout
        for next_done in asyncio.as_completed(calls):
            with pytest.raises(CredentialRefused) as raised:
                await next_done
            refused.append(raised.value)
            if len(refused) == 37:
                break
    assert api.calls == 3, "three reviews at once, the others never sent"
    assert {r.reason for r in refused} == {Refusal.REVIEW_UNAVAILABLE}
    api.gate.set()
    held = [call for call in calls if not call.done()]
    assert [p.sandbox_id for p in await asyncio.gather(*held)] == ["sb-1"] * 3


async def test_a_token_of_another_service_account_of_the_namespace_is_no_sandbox() -> None:
    # Pods of the sandbox namespace that run as another ServiceAccount (the default one, when the
    # sandboxes have their own) speak for no sandbox, whatever their name.
    api, clock = Api(answer(username="system:serviceaccount:sandboxes:default")), Clock()
    v = KubernetesTokenVerifier(
        api.review,
        audience=AUDIENCE,
        username=service_account_username("sandboxes", "openshell-sandbox"),
        cache_s=300,
        clock=clock,
    )
    with pytest.raises(CredentialRefused) as raised:
        await v.verify(token())
    assert raised.value.reason is Refusal.NOT_A_SANDBOX and "openshell-sandbox" in raised.value.detail


# --- the audience's configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"kubernetes_audience": ""}, True),
        ({"kubernetes_audience": " openshell-gateway"}, True),
        ({"kubernetes_audience": "https://kubernetes.default.svc"}, True),
        ({"kubernetes_audience": "https://kubernetes.default.svc.cluster.local"}, True),
        ({"kubernetes_audience": "kubernetes"}, True),
        ({"kubernetes_audience": "api"}, True),
        (
            {
                "kubernetes_audience": "https://oidc.example",
                "kubernetes_api_audiences": ["https://oidc.example"],
            },
            True,
        ),
        (
            {
                "kubernetes_audience": "openshell-gateway",
                "kubernetes_api_audiences": ["https://oidc.example"],
            },
            False,
        ),
        ({}, False),
    ],
)
def test_the_pods_audience_is_never_one_of_the_api_servers(settings: dict[str, Any], refused: bool) -> None:
    raw = {"auth": {"supervisors": settings}}
    if not refused:
        assert GatewayConfig.model_validate(raw).auth.supervisors.kubernetes_audience
        return
    with pytest.raises(ValidationError) as raised:
        GatewayConfig.model_validate(raw)
    assert "kubernetes_audience" in str(raised.value)
