"""People's bearer tokens against an issuer made in the test (tests/support/oidc.py): real keys, a
real HTTP server for discovery and JWKS; what is accepted, what is refused and why, key rotation,
the refetch bound, and an issuer that cannot be asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.auth import oidc
from gateway.auth.oidc import OidcVerifier, TokenProblem, TokenRefused
from gateway.config import OidcSettings
from tests.support.oidc import AUDIENCE, SigningKey, TestIssuer

LEEWAY_S = 30


class Clock:
    """The verifier's monotonic clock (cache ages, refetch bound), moved by the test."""

    def __init__(self) -> None:
        self.at = 1000.0

    def __call__(self) -> float:
        return self.at


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    issuer = await TestIssuer(published=[SigningKey.rsa("k1"), SigningKey.ec("k-ec")]).start()
    try:
        yield issuer
    finally:
        await issuer.stop()


def settings(issuer: TestIssuer, **overrides: Any) -> OidcSettings:
    return OidcSettings.model_validate(
        {
            "issuer_url": issuer.url,
            "audience": [AUDIENCE, "other-api"],
            "leeway_s": LEEWAY_S,
            "jwks_min_refetch_s": 10,
            **overrides,
        }
    )


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def verifier(issuer: TestIssuer, clock: Clock) -> AsyncIterator[OidcVerifier]:
    verifier = OidcVerifier(settings(issuer), clock=clock)
    try:
        yield verifier
    finally:
        await verifier.close()


async def refused(verifier: OidcVerifier, token: str) -> TokenRefused:
    with pytest.raises(TokenRefused) as caught:
        await verifier.verify(token)
    # Nothing of the token, not even its signature, is ever shown back.
    for part in token.split("."):
        if len(part) > 8:
            assert part not in caught.value.detail
    return caught.value


async def test_tokens_of_the_issuers_rsa_and_ec_keys_are_accepted(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    rsa_key, ec_key = issuer.published
    assert (await verifier.verify(issuer.token(rsa_key, preferred_username="alice")))[
        "preferred_username"
    ] == "alice"
    assert (await verifier.verify(issuer.token(ec_key)))["sub"] == "f3c1-user"
    # aud may be a list: one accepted value is enough.
    assert await verifier.verify(issuer.token(aud=["account", "other-api"]))
    assert issuer.jwks_requests == 1  # the keys are cached


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"exp": -(LEEWAY_S + 30)}, TokenProblem.EXPIRED),
        ({"nbf": LEEWAY_S + 60}, TokenProblem.NOT_YET_VALID),
        ({"iat": LEEWAY_S + 60}, TokenProblem.NOT_YET_VALID),
        ({"aud": "account"}, TokenProblem.WRONG_AUDIENCE),
        ({"aud": None}, TokenProblem.WRONG_AUDIENCE),  # Keycloak without an audience mapper
        ({"iss": "https://elsewhere.example/realms/test"}, TokenProblem.WRONG_ISSUER),
        ({"exp": None}, TokenProblem.MALFORMED),  # a token that never expires is refused
    ],
    ids=["expired", "nbf-future", "iat-future", "wrong-aud", "no-aud", "wrong-iss", "no-exp"],
)
async def test_bad_claims_are_refused_with_the_reason(
    issuer: TestIssuer, verifier: OidcVerifier, claims: dict[str, Any], problem: TokenProblem
) -> None:
    now = int(time.time())
    times = {k: now + v for k, v in claims.items() if k in ("exp", "nbf", "iat") and v is not None}
    exc = await refused(verifier, issuer.token(**{**claims, **times}))
    assert (exc.problem, exc.status) == (problem, 401)


async def test_clock_skew_within_the_leeway_is_accepted(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    now = int(time.time())
    within = LEEWAY_S - 10
    assert await verifier.verify(issuer.token(exp=now - within))
    assert await verifier.verify(issuer.token(nbf=now + within, iat=now + within))


async def test_none_hmac_and_foreign_algorithms_are_refused(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    rsa_key, ec_key = issuer.published
    assert (
        await refused(verifier, issuer.unsigned_token(alg="none", kid="k1"))
    ).problem is TokenProblem.BAD_ALGORITHM
    # The algorithm confusion attack: HS256 keyed with the issuer's public key (anyone can fetch it).
    for secret in (rsa_key.public_pem(), ec_key.public_pem()):
        confused = issuer.unsigned_token(alg="HS256", secret=secret, kid=rsa_key.kid)
        assert (await refused(verifier, confused)).problem is TokenProblem.BAD_ALGORITHM
    # An algorithm of the key's type that the key does not declare (its JWK says RS256).
    exc = await refused(verifier, issuer.token(SigningKey("k1", "RS384", rsa_key.private)))
    assert exc.problem is TokenProblem.BAD_ALGORITHM


async def test_forged_and_malformed_tokens_are_refused(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    forger = SigningKey.rsa("k1")  # the issuer's key id, another key
    assert (await refused(verifier, issuer.token(forger))).problem is TokenProblem.BAD_SIGNATURE
    for junk in ("", "abc", "a.b.c", "e30.e30.", issuer.token()[:-30]):
        exc = await refused(verifier, junk)
        assert exc.problem in (TokenProblem.MALFORMED, TokenProblem.BAD_ALGORITHM, TokenProblem.BAD_SIGNATURE)
        assert exc.status == 401


async def test_a_rotated_key_is_fetched_and_unknown_key_ids_refetch_at_most_every_min_refetch(
    issuer: TestIssuer, verifier: OidcVerifier, clock: Clock
) -> None:
    assert await verifier.verify(issuer.token())
    assert issuer.jwks_requests == 1
    # The issuer rotates: a new key, the old one gone. A token of the new key is accepted at once.
    new = SigningKey.rsa("k2")
    issuer.published = [new]
    clock.at += 11
    assert await verifier.verify(issuer.token(new))
    assert issuer.jwks_requests == 2
    # Invented key ids within jwks_min_refetch_s: refused without asking the issuer again.
    for n in range(20):
        exc = await refused(verifier, issuer.token(SigningKey(f"made-up-{n}", "RS256", new.private)))
        # Not final: the keys were fetched a moment ago, and the issuer may have rotated since.
        assert (exc.problem, exc.status) == (TokenProblem.UNKNOWN_KEY_RETRY, 503)
    assert issuer.jwks_requests == 2
    # After it, one more fetch; a key id still unknown after it is refused for good.
    clock.at += 11
    exc = await refused(verifier, issuer.token(SigningKey("made-up", "RS256", new.private)))
    assert (exc.problem, exc.status) == (TokenProblem.UNKNOWN_KEY, 401)
    assert issuer.jwks_requests == 3


async def test_a_rotation_within_min_refetch_is_seen_once_the_bound_passes(
    issuer: TestIssuer, verifier: OidcVerifier, clock: Clock
) -> None:
    assert await verifier.verify(issuer.token())
    new = SigningKey.ec("k3")
    issuer.published.append(new)
    # Within the refetch bound: 503, retry (a real rotation a made-up key id cannot make final).
    assert (await refused(verifier, issuer.token(new))).status == 503
    clock.at += 10
    assert await verifier.verify(issuer.token(new))


async def test_the_keys_are_fetched_again_after_jwks_cache_s(issuer: TestIssuer, clock: Clock) -> None:
    verifier = OidcVerifier(settings(issuer, jwks_cache_s=60), clock=clock)
    try:
        token = issuer.token()
        await verifier.verify(token)
        clock.at += 59
        await verifier.verify(token)
        await verifier.refreshed()
        assert issuer.jwks_requests == 1
        clock.at += 2
        await verifier.verify(token)  # verified with the stale keys, renewed in the background
        await verifier.refreshed()
        assert issuer.jwks_requests == 2
    finally:
        await verifier.close()


async def test_concurrent_callers_share_one_fetch(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    issuer.delay_s = 0.2
    tokens = [issuer.token(preferred_username=f"u{n}") for n in range(20)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert [r["preferred_username"] for r in results] == [f"u{n}" for n in range(20)]
    assert issuer.jwks_requests == 1


async def test_an_issuer_that_cannot_be_asked_is_503_not_401(
    issuer: TestIssuer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.token()
    await issuer.stop()
    verifier = OidcVerifier(settings(issuer), clock=clock)
    try:
        exc = await refused(verifier, token)
        assert (exc.problem, exc.status) == (TokenProblem.ISSUER_UNAVAILABLE, 503)
        assert "cannot fetch the signing keys" in caplog.text
        # Within the refetch bound it is not asked again, and still answered 503.
        assert (await refused(verifier, token)).status == 503
    finally:
        await verifier.close()


async def test_keys_already_fetched_still_verify_while_the_issuer_is_down(
    issuer: TestIssuer, verifier: OidcVerifier, clock: Clock
) -> None:
    token = issuer.token()
    await verifier.verify(token)
    await issuer.stop()
    clock.at += 7200  # past jwks_cache_s: a refetch is due, and fails
    assert await verifier.verify(token)
    await verifier.refreshed()
    # A key it never saw: 503 either way (the token may be good): within the refetch bound (the
    # issuer was just tried), then once the issuer is tried again and still cannot be asked.
    unseen = issuer.token(SigningKey.rsa("k9"))
    assert (await refused(verifier, unseen)).problem is TokenProblem.UNKNOWN_KEY_RETRY
    clock.at += 10
    assert (await refused(verifier, unseen)).problem is TokenProblem.ISSUER_UNAVAILABLE


async def test_a_discovery_document_of_another_issuer_is_refused(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    issuer.claimed_issuer = issuer.url + "-evil"
    exc = await refused(verifier, issuer.token())
    assert exc.status == 503
    assert "must be the issuer exactly" in exc.detail


async def test_a_hanging_issuer_holds_up_no_token_whose_key_is_known(
    issuer: TestIssuer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past jwks_cache_s the keys are renewed by ONE background fetch; meanwhile tokens of known
    keys verify at once with the stale keys, however long the issuer takes to answer."""
    monkeypatch.setattr(oidc, "FETCH_TIMEOUT_S", 3.0)  # the old code waited this out on every call
    verifier = OidcVerifier(settings(issuer, jwks_cache_s=60), clock=clock)
    try:
        await verifier.verify(issuer.token())
        issuer.delay_s = 30  # accepts the connection, does not answer
        clock.at += 61
        renewal = None
        for n in range(3):
            claims = await verifier.verify(issuer.token(preferred_username=f"u{n}"))
            assert claims["preferred_username"] == f"u{n}"
            # Answered while the renewal is still under way: nobody waited for it, and it is the
            # one renewal, past jwks_min_refetch_s too.
            assert verifier._fetch is not None and not verifier._fetch.done()
            assert renewal in (None, verifier._fetch)
            renewal = verifier._fetch
            clock.at += 11
        await asyncio.sleep(0.2)
        assert (verifier.fetches, issuer.jwks_requests) == (2, 2)
    finally:
        await verifier.close()


async def test_only_the_allowed_clients_tokens_are_accepted(issuer: TestIssuer, clock: Clock) -> None:
    """Keycloak's audience-resolve mapper puts openshell in the aud of any client's token for a
    person holding an openshell client role: azp says which application the token was issued to."""
    verifier = OidcVerifier(settings(issuer), clock=clock)  # allowed_clients: the default
    try:
        assert await verifier.verify(issuer.token(azp="openshell-cli"))
        for azp in ("unrelated-app", None, 7):
            exc = await refused(verifier, issuer.token(azp=azp))
            assert (exc.problem, exc.status) == (TokenProblem.WRONG_CLIENT, 401)
        assert "'unrelated-app'" in (await refused(verifier, issuer.token(azp="unrelated-app"))).detail
    finally:
        await verifier.close()
    anyone = OidcVerifier(settings(issuer, allowed_clients=[]), clock=clock)
    try:
        assert await anyone.verify(issuer.token(azp="unrelated-app"))
    finally:
        await anyone.close()


def test_an_issuer_over_plain_http_to_another_host_is_refused() -> None:
    with pytest.raises(ValidationError, match="allow_insecure_issuer"):
        OidcSettings.model_validate({"issuer_url": "http://keycloak.example.com/realms/o"})
    for fine in (
        {"issuer_url": "https://keycloak.example.com/realms/o"},
        {"issuer_url": "http://127.0.0.1:8080/realms/o"},
        {"issuer_url": "http://localhost:8080/realms/o"},
        {"issuer_url": "http://keycloak.example.com/realms/o", "allow_insecure_issuer": True},
    ):
        OidcSettings.model_validate(fine)


async def test_a_jwks_uri_over_plain_http_is_refused(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    issuer.jwks_uri = "http://keys.invalid/jwks"  # never asked: refused before
    exc = await refused(verifier, issuer.token())
    assert exc.status == 503 and "is not https" in exc.detail
    assert issuer.jwks_requests == 0
