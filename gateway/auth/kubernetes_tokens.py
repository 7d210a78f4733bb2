"""Sandbox pods' projected ServiceAccount tokens, checked with a TokenReview.

A sandbox pod carries no long-lived secret: the kubelet projects a ServiceAccount token with our
audience (``auth.supervisors.kubernetes_audience``) and a short expiry into it and renews it on its
own, whatever the gateway's state. The token is bound to the pod: the API server stops accepting
it once the pod is gone (a replayed token of a deleted pod is refused), and its review names the
pod (``authentication.kubernetes.io/pod-name`` and ``pod-uid`` in ``user.extra``). The pod name is
``podspec.pod_name(sandbox_id)``, which gives the sandbox; the uid is checked against the one the
driver recorded on the sandbox's row by ``gateway/auth/supervisors.py`` (a pod re-created under
the same name has another uid).

Only the API server can say whether a token is valid (its signing keys are its own), so each token
not seen before costs one TokenReview; its answer is kept, by the token's SHA-256 (never the token),
until ``auth.supervisors.review_cache_s`` or shortly before the token expires, whichever comes first,
and concurrent calls with one token share one review. The exp and aud read from the token before
the review are unverified hints used only to refuse early or to bound the cache; what is accepted
is what the API server's review says.

Any peer that reaches the gRPC port (a sandbox's agent included) can present tokens nobody has
seen, so what reviews cost is bounded: at most ``MAX_REVIEWS_IN_FLIGHT`` at once (a review waits
``REVIEW_WAIT_S`` at most for a slot), and new tokens are reviewed at ``REVIEWS_PER_S`` (bursts of
``REVIEW_BURST``) at most; beyond either the caller gets REVIEW_UNAVAILABLE (UNAVAILABLE: the
supervisor retries) and nothing is sent to the API server. The limit is global, not per peer (the
verifier does not see the peer): a flood delays other sandboxes' first reviews, but cannot overload
the API server through the gateway, and refusals are kept in a cache of their own, so they never
push accepted reviews out (a sandbox whose review is cached is not affected).

The token must be the configured ServiceAccount's (``drivers.kubernetes.pod.service_account_name``,
the namespace's ``default`` when unset): a pod of the sandbox namespace running as another
ServiceAccount speaks for no sandbox, whatever its name.

Such a token is useless against the Kubernetes API itself: its audience is ours, not the API
server's, so the API server's authenticator refuses it as a credential for API calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx  # lightkube's HTTP library
from lightkube import ApiError, AsyncClient
from lightkube.core.exceptions import ConfigError
from lightkube.models.authentication_v1 import TokenReviewSpec, TokenReviewStatus
from lightkube.resources.authentication_v1 import TokenReview

from gateway.auth import CredentialRefused, CredentialVerifier, Refusal, SandboxPrincipal
from gateway.config import GatewayConfig
from gateway.drivers.podspec import sandbox_of_pod

log = logging.getLogger(__name__)

EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
#: An accepted review is not reused closer than this to the token's expiry (the kubelet has
#: renewed the file long before: it does at 80 % of the lifetime).
EXPIRY_MARGIN_S = 30.0
#: A refusal is remembered this long (at most review_cache_s): enough to spare the API server a
#: supervisor retrying a dead token in a loop, short enough that a token refused while the API
#: server's caches had not yet seen its new pod is accepted moments later.
REFUSAL_CACHE_S = 5.0
#: Accepted reviews kept at most (the oldest go first): a sandbox holds one token at a time, two
#: around a renewal.
MAX_CACHE_ENTRIES = 8192
#: Refusals kept at most, apart from the accepted reviews so that a flood of bad tokens cannot push
#: those out.
MAX_REFUSAL_ENTRIES = 1024
#: TokenReviews sent at once at most; a review waits this long at most for a slot.
MAX_REVIEWS_IN_FLIGHT = 16
REVIEW_WAIT_S = 2.0
#: New tokens reviewed per second at most, with bursts of REVIEW_BURST (a whole gateway's
#: sandboxes reconnecting after a restart get through in a few retries).
REVIEWS_PER_S = 20.0
REVIEW_BURST = 200
#: The longest text of the API server's we pass on in a refusal.
MAX_DETAIL = 300

#: One TokenReview: the token in, the review's status out (the API's errors propagate).
Review = Callable[[str], Awaitable[TokenReviewStatus]]


def service_account_username(namespace: str, service_account: str | None) -> str:
    """The username the API server gives a ServiceAccount's tokens (``default`` when unset)."""
    return f"system:serviceaccount:{namespace}:{service_account or 'default'}"


@dataclass(frozen=True, slots=True)
class UnverifiedClaims:
    """What a token says about itself before anyone checked it: hints, never trusted alone."""

    exp: float | None
    audiences: tuple[str, ...] | None


def unverified_claims(token: str) -> UnverifiedClaims:
    """The exp and aud of a JWT's payload, unverified; :class:`CredentialRefused` MALFORMED when
    the token is not a JWT whose payload is a JSON object with well-typed exp and aud."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise CredentialRefused(Refusal.MALFORMED, "not a JWT (three base64url parts separated by dots)")
    payload_b64 = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
        payload: Any = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise CredentialRefused(Refusal.MALFORMED, "the JWT's payload is not base64url JSON") from None
    if not isinstance(payload, dict):
        raise CredentialRefused(Refusal.MALFORMED, "the JWT's payload is not a JSON object")
    exp = payload.get("exp")
    if exp is not None:
        try:
            # bool is an int to Python, and JSON allows NaN, Infinity and ints float cannot hold.
            if (
                isinstance(exp, bool)
                or not isinstance(exp, int | float)
                or not math.isfinite(exp := float(exp))
            ):
                raise ValueError
        except (ValueError, OverflowError):
            raise CredentialRefused(Refusal.MALFORMED, "the JWT's exp is not a finite number") from None
    aud = payload.get("aud")
    audiences: tuple[str, ...] | None
    if aud is None:
        audiences = None
    elif isinstance(aud, str):
        audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        raise CredentialRefused(Refusal.MALFORMED, "the JWT's aud is neither a string nor a list of strings")
    return UnverifiedClaims(exp=exp, audiences=audiences)


def _one(extra: dict[str, Any], key: str) -> str | None:
    """A single non-empty string of a review's ``user.extra`` (a list of strings there)."""
    value = extra.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0]:
        return value[0]
    return None


def _clean(text: str | None, token: str) -> str:
    """The API server's text, never with the token in it, bounded."""
    text = (text or "no reason given").replace(token, "***")
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def principal_of_review(
    status: TokenReviewStatus,
    *,
    token: str,
    audience: str,
    username: str,
    expires_at: float,
) -> SandboxPrincipal:
    """The sandbox a reviewed token speaks for, or :class:`CredentialRefused` with why not."""
    if not status.authenticated:
        raise CredentialRefused(
            Refusal.REVIEW_FAILED,
            f"the Kubernetes API did not authenticate the token: {_clean(status.error, token)}",
        )
    if audience not in (status.audiences or []):
        raise CredentialRefused(Refusal.WRONG_AUDIENCE, f"the token is not for audience {audience!r}")
    user = status.user
    if user is None or user.username != username:
        who = user.username if user is not None else None
        raise CredentialRefused(
            Refusal.NOT_A_SANDBOX,
            f"the token is {who!r}'s, not the sandbox pods' ServiceAccount {username!r}",
        )
    extra = user.extra or {}
    pod = _one(extra, EXTRA_POD_NAME)
    uid = _one(extra, EXTRA_POD_UID)
    if pod is None or uid is None:
        raise CredentialRefused(Refusal.NOT_A_SANDBOX, "the token is not bound to a pod")
    sandbox_id = sandbox_of_pod(pod)
    if sandbox_id is None:
        raise CredentialRefused(Refusal.NOT_A_SANDBOX, f"pod {pod[:80]!r} is not a sandbox pod")
    return SandboxPrincipal(
        sandbox_id=sandbox_id, kind="kubernetes", expires_at=expires_at, pod_name=pod, pod_uid=uid
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    until: float  # time.time() after which the entry is not used
    principal: SandboxPrincipal | None
    refusal: CredentialRefused | None


class KubernetesTokenVerifier:
    """Implements :class:`gateway.auth.CredentialVerifier` for projected ServiceAccount tokens.

    :meth:`close` cancels reviews still in flight (the gateway's shutdown)."""

    def __init__(
        self,
        review: Review,
        *,
        audience: str,
        username: str,
        cache_s: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_CACHE_ENTRIES,
        max_refusals: int = MAX_REFUSAL_ENTRIES,
        max_in_flight: int = MAX_REVIEWS_IN_FLIGHT,
        wait_s: float = REVIEW_WAIT_S,
        reviews_per_s: float = REVIEWS_PER_S,
        burst: int = REVIEW_BURST,
    ) -> None:
        self._review = review
        self._audience = audience
        self._username = username
        self._cache_s = cache_s
        self._clock = clock
        self._max_entries = max_entries
        self._max_refusals = max_refusals
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._refusals: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._wait_s = wait_s
        self._reviews_per_s = reviews_per_s
        self._burst = float(burst)
        self._budget = float(burst)
        self._budget_at = clock()
        self._busy_logged_at = -math.inf

    def _cached(self, key: str, now: float) -> _Entry | None:
        for cache in (self._cache, self._refusals):
            entry = cache.get(key)
            if entry is None:
                continue
            if entry.until <= now:
                del cache[key]
                return None
            cache.move_to_end(key)  # the least recently used go first
            return entry
        return None

    def _keep(self, key: str, entry: _Entry) -> None:
        if entry.until <= self._clock():
            return
        cache, limit = (
            (self._cache, self._max_entries)
            if entry.principal is not None
            else (self._refusals, self._max_refusals)
        )
        if key in cache:
            return
        cache[key] = entry
        while len(cache) > limit:
            cache.popitem(last=False)

    async def verify(self, token: str) -> SandboxPrincipal:
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        entry = self._cached(key, self._clock())
        if entry is None:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._check(token), name="kubernetes-token-review")
                self._inflight[key] = task
                task.add_done_callback(functools.partial(self._reviewed, key))
            # Shielded: one caller giving up (its call cancelled) does not cancel the review the
            # others wait on.
            entry = await asyncio.shield(task)
            self._keep(key, entry)
        if entry.refusal is not None:
            raise CredentialRefused(entry.refusal.reason, entry.refusal.detail)
        assert entry.principal is not None
        if entry.principal.expires_at <= self._clock():
            raise CredentialRefused(Refusal.EXPIRED, "the token has expired")
        return entry.principal

    def _reviewed(self, key: str, task: asyncio.Task[_Entry]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up

    async def _check(self, token: str) -> _Entry:
        """Review ``token``: an entry to cache (a refusal is one too), or REVIEW_UNAVAILABLE raised
        (never cached: the supervisor retries, and the next try asks again)."""
        now = self._clock()
        refused_until = now + min(self._cache_s, REFUSAL_CACHE_S)
        try:
            claims = unverified_claims(token)
            if claims.exp is not None and claims.exp <= now:
                raise CredentialRefused(Refusal.EXPIRED, "the token has expired")
            if claims.audiences is not None and self._audience not in claims.audiences:
                raise CredentialRefused(
                    Refusal.WRONG_AUDIENCE, f"the token is not for audience {self._audience!r}"
                )
        except CredentialRefused as refusal:
            return _Entry(until=refused_until, principal=None, refusal=refusal)
        self._take_budget(now)
        try:
            async with asyncio.timeout(self._wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise self._busy(
                f"all {self._max_in_flight} review slots stayed taken for {self._wait_s:g} s"
            ) from None
        try:
            status = await self._review(token)
        finally:
            self._slots.release()
        # A token without exp (not a projected one) is refused below as bound to no pod; bound
        # the principal's life anyway.
        expires_at = claims.exp if claims.exp is not None else now + self._cache_s
        try:
            principal = principal_of_review(
                status, token=token, audience=self._audience, username=self._username, expires_at=expires_at
            )
        except CredentialRefused as refusal:
            return _Entry(until=refused_until, principal=None, refusal=refusal)
        until = min(now + self._cache_s, expires_at - EXPIRY_MARGIN_S)
        return _Entry(until=until, principal=principal, refusal=None)

    def _take_budget(self, now: float) -> None:
        """One review of the rate's budget (a token bucket), or REVIEW_UNAVAILABLE when spent."""
        elapsed = max(0.0, now - self._budget_at)
        self._budget = min(self._burst, self._budget + elapsed * self._reviews_per_s)
        self._budget_at = now
        if self._budget < 1.0:
            raise self._busy(f"more than {self._reviews_per_s:g} new tokens a second")
        self._budget -= 1.0

    def _busy(self, why: str) -> CredentialRefused:
        now = self._clock()
        if now - self._busy_logged_at >= 10.0:  # a flood is logged, not every token of it
            self._busy_logged_at = now
            log.warning("TokenReviews limited (%s): new pod tokens are refused as unavailable", why)
        return CredentialRefused(
            Refusal.REVIEW_UNAVAILABLE,
            f"the gateway is reviewing too many new tokens ({why}); try again shortly",
        )

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()
        self._refusals.clear()


def _refused(code: int | None, message: str | None) -> CredentialRefused:
    """REVIEW_UNAVAILABLE for an error answer of the API server; a refusal of the gateway itself
    names the rule it lacks and is logged as an error (its operator must act)."""
    if code == 403:
        detail = (
            f"the Kubernetes API refused the gateway a TokenReview (403 Forbidden: {message}); the "
            "gateway's identity needs create on tokenreviews.authentication.k8s.io (docs/rbac.md)"
        )
        log.error("%s", detail)
    else:
        detail = f"the Kubernetes API could not review the token: {code} {message}"
        log.warning("%s", detail)
    return CredentialRefused(Refusal.REVIEW_UNAVAILABLE, detail)


def api_review(client: AsyncClient, audience: str) -> Review:
    """A :data:`Review` through ``client``: a TokenReview for ``audience``; any failure to get an
    answer is REVIEW_UNAVAILABLE (the supervisor retries), saying what the gateway's operator must
    fix when the API refused the gateway itself."""

    async def review(token: str) -> TokenReviewStatus:
        body = TokenReview(spec=TokenReviewSpec(token=token, audiences=[audience]))
        try:
            answer = await client.create(body)
        except ApiError as exc:
            raise _refused(exc.status.code, _clean(exc.status.message, token)) from None
        except httpx.HTTPStatusError as exc:  # an error answer that is no Kubernetes Status
            raise _refused(exc.response.status_code, exc.response.reason_phrase) from None
        except (TimeoutError, httpx.HTTPError, OSError, ConfigError) as exc:
            reason = _clean(str(exc) or type(exc).__name__, token)
            detail = f"cannot reach the Kubernetes API for a TokenReview: {reason}"
            log.warning("%s", detail)
            raise CredentialRefused(Refusal.REVIEW_UNAVAILABLE, detail) from None
        except Exception as exc:  # an answer the client cannot read: an outage, never UNKNOWN
            detail = f"the Kubernetes API's TokenReview answer could not be read: {type(exc).__name__}"
            log.error("%s", detail)
            raise CredentialRefused(Refusal.REVIEW_UNAVAILABLE, detail) from None
        if answer.status is None:
            raise CredentialRefused(
                Refusal.REVIEW_UNAVAILABLE, "the Kubernetes API answered a TokenReview without status"
            )
        return answer.status

    return review


def kubernetes_verifier(config: GatewayConfig, client: AsyncClient) -> CredentialVerifier:
    """The verifier of sandbox pods' projected tokens for this gateway's config, reviewing through
    ``client`` (the Kubernetes driver's)."""
    kubernetes = config.drivers.kubernetes
    supervisors = config.auth.supervisors
    return KubernetesTokenVerifier(
        api_review(client, supervisors.kubernetes_audience),
        audience=supervisors.kubernetes_audience,
        username=service_account_username(kubernetes.namespace, kubernetes.pod.service_account_name),
        cache_s=supervisors.review_cache_s,
    )
