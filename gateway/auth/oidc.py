"""People's bearer tokens: OIDC access tokens verified against the issuer's published keys.

The issuer (``auth.oidc.issuer_url``, Keycloak's realm URL, say) is asked once for its discovery
document (``<issuer>/.well-known/openid-configuration``), whose ``issuer`` must be the configured
one exactly (a proxy or a typo that serves another realm's keys is refused, not trusted), and then
for its JWKS (``jwks_uri``). The keys are kept ``jwks_cache_s``; a token signed with a key id they
do not hold makes the verifier fetch them again (the issuer rotated its key), but at most every
``jwks_min_refetch_s``, so a stream of tokens with invented key ids cannot turn the gateway into a
load generator against the issuer. Concurrent callers that need a fetch share one. Stale keys still
verify while one background fetch renews them (a hanging issuer holds up nobody whose key is
known); only a token whose key id is unknown waits for a fetch, at most ``UNKNOWN_KEY_WAIT_S``, and
one that arrives within ``jwks_min_refetch_s`` of the last fetch is answered 503 (retry), not a
final 401, since the issuer may have just rotated. The issuer and its ``jwks_uri`` must be https
(or http to a loopback host) unless ``auth.oidc.allow_insecure_issuer``.

A token is accepted when its signature verifies with one of those keys under an asymmetric
algorithm the key itself allows (the header's ``alg`` is never trusted alone: ``none``, HMAC and an
algorithm of another key type are refused, so a public key cannot be used as an HMAC secret), its
``iss`` is the issuer, its ``aud`` holds one of ``auth.oidc.audience``, and ``exp``, ``nbf`` and
``iat`` hold within ``leeway_s`` of this clock, and its ``azp`` (the client it was issued to) is
one of ``auth.oidc.allowed_clients``. Keycloak puts a client in ``aud`` through an audience mapper
(docs/auth.md), but also, by its default audience-resolve mapper, in every client's token for a
person holding that client's roles: so the audience alone does not say which application asks.

Failures are :class:`TokenRefused`: a bad token is 401 with its reason (a fixed set, the metric's
label); an issuer that cannot be asked (down, its TLS refused, a malformed answer) is 503, because
the caller's token may well be good (so is an unknown key id within the refetch bound). No
message ever holds the token or a part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from gateway.config import OidcSettings

log = logging.getLogger(__name__)

#: The signature algorithms a person's token may use: asymmetric ones only. HS* would let anyone
#: holding the (public) JWKS forge tokens; ``none`` needs no forging at all.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: Which algorithms each key type can verify, when the key itself declares none (Keycloak's keys
#: carry ``alg``; others may not).
_KEY_TYPE_ALGORITHMS: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
_EC_CURVE_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
#: One request to the issuer (discovery or JWKS) is given up after this long.
FETCH_TIMEOUT_S = 10.0
#: A token whose key id is unknown waits this long at most for the keys to be fetched again.
UNKNOWN_KEY_WAIT_S = 5.0
#: Largest discovery document or JWKS read (a few kilobytes in practice).
MAX_DOCUMENT_BYTES = 1024 * 1024


class TokenProblem(StrEnum):
    """Why a person's token was refused: the ``reason`` label of the API's auth failure metric."""

    MISSING = "missing"  # no Authorization header
    MALFORMED = "malformed"  # not "Bearer <jwt>", not a JWT, a claim of the wrong type or missing
    BAD_ALGORITHM = "bad_algorithm"  # none, HMAC, or not an algorithm of the key
    UNKNOWN_KEY = "unknown_key"  # a key id the issuer does not publish (after a refetch)
    UNKNOWN_KEY_RETRY = "unknown_key_retry"  # not in the keys fetched a moment ago: 503, retry
    WRONG_CLIENT = "wrong_client"  # azp is not one of auth.oidc.allowed_clients
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  # nbf or iat in the future, beyond the leeway
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    ISSUER_UNAVAILABLE = "issuer_unavailable"  # discovery or JWKS could not be fetched: 503


class TokenRefused(Exception):
    """A bearer token that does not let the call through. ``detail`` is safe to show the caller
    and to log: it never holds the token."""

    def __init__(self, problem: TokenProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail

    @property
    def status(self) -> int:
        transient = (TokenProblem.ISSUER_UNAVAILABLE, TokenProblem.UNKNOWN_KEY_RETRY)
        return 503 if self.problem in transient else 401


class _Keys:
    """One fetch's signing keys by key id, with the algorithms each may verify."""

    def __init__(self, jwks: object) -> None:
        self.by_kid: dict[str | None, tuple[PyJWK, frozenset[str]]] = {}
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError("the JWKS is not an object with a list of keys")
        for data in jwks["keys"]:
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue  # encryption keys (Keycloak publishes an RSA-OAEP one) verify nothing
            allowed = _algorithms_of(data)
            if not allowed:
                continue  # symmetric or unknown key types: never a person's signature
            try:
                key = PyJWK(data, algorithm=sorted(allowed)[0])
            except jwt.PyJWTError as exc:
                log.warning("OIDC: skipping the issuer's key %r: %s", data.get("kid"), exc)
                continue
            kid = data.get("kid")
            self.by_kid[kid if isinstance(kid, str) else None] = (key, allowed)

    def find(self, kid: str | None) -> tuple[PyJWK, frozenset[str]] | None:
        if kid is None and len(self.by_kid) == 1:
            # A token without a key id is verified only against an issuer with one key: with
            # several, trying each would be guessing.
            return next(iter(self.by_kid.values()))
        return self.by_kid.get(kid)


def _algorithms_of(data: Mapping[str, Any]) -> frozenset[str]:
    declared = data.get("alg")
    kty = data.get("kty")
    if not isinstance(kty, str) or kty not in _KEY_TYPE_ALGORITHMS:
        return frozenset()
    if isinstance(declared, str):
        return frozenset({declared}) & _KEY_TYPE_ALGORITHMS[kty] & ASYMMETRIC_ALGORITHMS
    if kty == "EC":
        curve = _EC_CURVE_ALGORITHM.get(str(data.get("crv")))
        return frozenset({curve}) if curve else frozenset()
    return _KEY_TYPE_ALGORITHMS[kty]


class OidcVerifier:
    """Verifies people's access tokens against ``settings.issuer_url``; see the module docstring.

    Owns an aiohttp client session and at most one fetch task: :meth:`close` ends both."""

    def __init__(self, settings: OidcSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.issuer_url:
            raise ValueError("auth.oidc.issuer_url is unset")
        self.settings = settings
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._keys: _Keys | None = None
        self._fetched_at: float | None = None  # when the keys held now were fetched
        self._attempted_at: float | None = None  # the last fetch, failed or not
        self._last_error: str | None = None
        self._fetch: asyncio.Task[None] | None = None
        #: How many times the keys were fetched (discovery and JWKS together); for tests and logs.
        self.fetches = 0

    async def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetch
            self._fetch = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`TokenRefused` saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused(TokenProblem.MALFORMED, "the bearer token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise TokenRefused(
                TokenProblem.BAD_ALGORITHM,
                f"algorithm {shown!r} is not accepted (only the issuer's asymmetric signatures are)",
            )
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else None
        key, allowed = await self._key(kid)
        if alg not in allowed:
            raise TokenRefused(
                TokenProblem.BAD_ALGORITHM, f"algorithm {alg!r} is not one the signing key allows"
            )
        s = self.settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(s.audience),
                issuer=s.issuer_url,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused(TokenProblem.EXPIRED, "the token has expired") from None
        except jwt.ImmatureSignatureError as exc:
            claim = "iat" if "iat" in str(exc) else "nbf"
            raise TokenRefused(
                TokenProblem.NOT_YET_VALID, f"the token is not valid yet ({claim} is in the future)"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            problem = TokenProblem.WRONG_AUDIENCE if exc.claim == "aud" else TokenProblem.MALFORMED
            raise TokenRefused(problem, f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(
                TokenProblem.WRONG_AUDIENCE,
                f"the token's audience is none of {', '.join(s.audience)} (auth.oidc.audience)",
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRefused(
                TokenProblem.WRONG_ISSUER, f"the token was not issued by {s.issuer_url}"
            ) from None
        except jwt.InvalidSignatureError:
            raise TokenRefused(TokenProblem.BAD_SIGNATURE, "the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            # The remaining ones name a claim of the wrong type or a token that does not parse.
            raise TokenRefused(TokenProblem.MALFORMED, f"the token is malformed: {exc}") from None
        azp = claims.get("azp")
        if s.allowed_clients and azp not in s.allowed_clients:
            # Keycloak's audience-resolve mapper puts openshell in the aud of ANY client's token
            # for a person holding an openshell client role: the audience alone does not say the
            # token was meant for this API.
            shown = azp if isinstance(azp, str) and len(azp) <= 100 else "none"
            raise TokenRefused(
                TokenProblem.WRONG_CLIENT,
                f"the token was issued to client {shown!r}, not one of {', '.join(s.allowed_clients)} "
                "(auth.oidc.allowed_clients)",
            )
        return claims

    async def _key(self, kid: str | None) -> tuple[PyJWK, frozenset[str]]:
        s = self.settings
        now = self._clock()
        found = self._keys.find(kid) if self._keys is not None else None
        if found is not None:
            stale = self._fetched_at is None or now - self._fetched_at >= s.jwks_cache_s
            if stale and self._fetch is None and self._may_fetch(now):
                # Stale-while-revalidate: the key verifies now, and one fetch renews the keys in
                # the background. A hanging issuer then holds up nobody whose key is known.
                self._start_fetch()
            return found
        # An unknown key id (the issuer may have rotated), or no keys yet: this caller waits for a
        # fetch, a bounded time, but no sooner than jwks_min_refetch_s after the last one ended.
        if self._fetch is not None or self._may_fetch(now):
            self._start_fetch()
            assert self._fetch is not None
            try:
                # Shielded: one caller giving up (its client went, or the bound) must not cancel
                # the fetch the others wait on.
                await asyncio.wait_for(asyncio.shield(self._fetch), UNKNOWN_KEY_WAIT_S)
            except TimeoutError:
                raise TokenRefused(
                    TokenProblem.ISSUER_UNAVAILABLE,
                    f"the OIDC issuer did not answer within {UNKNOWN_KEY_WAIT_S:g} s",
                ) from None
            found = self._keys.find(kid) if self._keys is not None else None
        elif self._keys is None:
            raise TokenRefused(
                TokenProblem.ISSUER_UNAVAILABLE,
                f"the OIDC issuer's keys could not be fetched: {self._last_error or 'not yet fetched'}",
            )
        else:
            # The keys were fetched a moment ago, before this key may have been published: the
            # token may be good, so this is "retry", not a final refusal.
            raise TokenRefused(
                TokenProblem.UNKNOWN_KEY_RETRY,
                "the token's key id is not among the issuer's keys fetched a moment ago; they are "
                f"fetched again at most every {s.jwks_min_refetch_s:g} s (auth.oidc.jwks_min_refetch_s)",
            )
        if found is None:
            raise TokenRefused(
                TokenProblem.UNKNOWN_KEY,
                "the token's key id is not among the issuer's keys"
                if kid is not None
                else "the token names no key id and the issuer has several keys",
            )
        return found

    def _may_fetch(self, now: float) -> bool:
        # Measured from the end of the last attempt: a fetch that took long (a hanging issuer)
        # is not followed straight away by the next.
        return self._attempted_at is None or now - self._attempted_at >= self.settings.jwks_min_refetch_s

    def _start_fetch(self) -> None:
        if self._fetch is None:
            self._fetch = asyncio.create_task(self._fetch_keys(), name="oidc-jwks-fetch")
            self._fetch.add_done_callback(self._fetch_done)

    async def refreshed(self) -> None:
        """Wait for the fetch under way, if any (a background refresh; tests and shutdown)."""
        fetch = self._fetch
        if fetch is not None:
            with contextlib.suppress(TokenRefused):
                await asyncio.shield(fetch)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._fetch is task:
            self._fetch = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch_keys(self) -> None:
        started = self._attempted_at = self._clock()
        self.fetches += 1
        issuer = self.settings.issuer_url
        try:
            discovery = await self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
            if not isinstance(discovery, dict):
                raise ValueError("the discovery document is not a JSON object")
            if discovery.get("issuer") != issuer:
                raise ValueError(
                    f"the discovery document names issuer {str(discovery.get('issuer'))[:200]!r}, not "
                    f"{issuer!r} (auth.oidc.issuer_url must be the issuer exactly)"
                )
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                raise ValueError("the discovery document has no jwks_uri")
            if self.settings.insecure_url(jwks_uri):
                raise ValueError(
                    f"the discovery document's jwks_uri {jwks_uri[:200]!r} is not https: keys fetched "
                    "over plain http could be anyone's (auth.oidc.allow_insecure_issuer)"
                )
            keys = _Keys(await self._get_json(jwks_uri))
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            self._attempted_at = self._clock()
            self._last_error = str(exc) or type(exc).__name__
            log.warning("OIDC: cannot fetch the signing keys of %s: %s", issuer, self._last_error)
            raise TokenRefused(
                TokenProblem.ISSUER_UNAVAILABLE,
                f"the OIDC issuer's keys could not be fetched: {self._last_error}",
            ) from None
        if not keys.by_kid:
            log.warning("OIDC: the issuer %s publishes no usable signing key", issuer)
        self._keys = keys
        self._fetched_at = started
        self._attempted_at = self._clock()
        self._last_error = None
        log.info("OIDC: fetched %d signing key(s) of %s", len(keys.by_kid), issuer)

    async def _get_json(self, url: str) -> object:
        session = self._client()
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url}: HTTP {resp.status}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ValueError(f"GET {url}: the answer is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ValueError(f"GET {url}: the answer is not JSON") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context: ssl.SSLContext | bool = True
            if self.settings.ca_file is not None:
                context = ssl.create_default_context(cafile=str(self.settings.ca_file))
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return self._session
