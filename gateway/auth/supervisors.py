"""The one rule every supervisor call goes through: who is calling, and may it speak for this sandbox.

:meth:`SupervisorAuthenticator.authenticate` reads ``authorization: Bearer <token>`` from the
call's metadata, verifies the token with the verifier its (unverified) issuer picks (a sandbox
token this gateway minted, or else, with the Kubernetes driver, the pod's projected
ServiceAccount token), then binds it to the call:

* the credential's sandbox must be the one the call names (else ``OTHER_SANDBOX``);
* that sandbox must exist (``UNKNOWN_SANDBOX``), unless ``sessions.register_unknown``;
* the sandbox must not be deleted (``driver_state`` ``Deleted``, or a failed create that took its
  registration back, ``Failed`` + ``released``: ``STALE``): a deleted sandbox's row and generation
  stay, its credentials must not;
* a minted token must be of the sandbox's current generation, and a Kubernetes token's pod uid
  must be the sandbox's pod's, which must be recorded (``STALE``: a token of a deleted and
  re-created sandbox, of a replaced pod, or of a pod the gateway never recorded, is a replay); a
  minted token that was traded for a pod's token (``IssueSandboxToken``) carries that pod's uid
  and is held to it the same way.

A refusal is a :class:`gateway.auth.CredentialRefused`: the call ends with
``REFUSAL_STATUS[reason]`` and a message naming the reason (never the token), it is counted in
``openshell_gateway_supervisor_auth_refusals_total{reason}``, and logged (peer host, method,
reason, sandbox id and nothing of the token), rate-limited like malformed frames.

A verified token is cached by its hash until its expiry (so a reconnect storm does not verify each
signature again); the binding, which depends on the sandbox's row, is checked on every call.

``auth.supervisors.required: false`` skips all of it: any peer can then speak for any sandbox.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.auth import CredentialRefused, CredentialVerifier, Refusal, SandboxPrincipal
from gateway.auth.sandbox_tokens import SandboxTokens, unverified_issuer
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimitedLog, peer_host
from gateway.store import SandboxRow, SandboxStore

log = logging.getLogger(__name__)

#: Verified tokens kept at most (a bound on memory); the cache is emptied when full.
CACHE_MAX = 10_000

#: A call's invocation metadata (grpc.aio.Metadata, or pairs).
Metadata = Iterable[tuple[str, Any]] | None


def sandbox_deleted(row: SandboxRow) -> bool:
    """Whether the row's sandbox is deleted: what the drivers write when a sandbox is deleted
    (``Deleted``), or when a create failed and took its registration back (``Failed`` with
    ``released``). The same rule that frees an id for a new create (gateway.provisioner)."""
    state = row.driver_state or {}
    phase = state.get("phase")
    return phase == "Deleted" or (phase == "Failed" and state.get("released") is True)


def bearer_token(metadata: Metadata) -> str:
    """The token of the call's ``authorization: Bearer <token>`` (the scheme in any case)."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise CredentialRefused(Refusal.MISSING, "no authorization metadata")
    if len(values) > 1:
        raise CredentialRefused(Refusal.MALFORMED, "more than one authorization metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise CredentialRefused(Refusal.MALFORMED, "the authorization value is not ASCII") from None
    if not isinstance(value, str):
        raise CredentialRefused(Refusal.MALFORMED, "the authorization value is not text")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() or not c.isprintable() for c in token):
        raise CredentialRefused(Refusal.MALFORMED, "authorization is not 'Bearer <token>'")
    return token


class SupervisorAuthenticator:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokens: SandboxTokens,
        sandboxes: SandboxStore,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._settings = config.auth.supervisors
        self.tokens = tokens
        self._sandboxes = sandboxes
        self._metrics = metrics
        self._clock = clock
        #: The Kubernetes TokenReview verifier, set once the Kubernetes driver is up.
        self._kubernetes: CredentialVerifier | None = None
        self._cache: dict[bytes, SandboxPrincipal] = {}
        self._log = RateLimitedLog(log, concern="supervisor-auth")
        if metrics is not None:
            for reason in Refusal:  # every series exists from the start, at 0
                metrics.supervisor_auth_refusals.labels(reason.value)
        if not self.required:
            log.warning(
                "auth.supervisors.required is false: supervisor calls are not authenticated, any peer "
                "that reaches the gRPC port can speak for any sandbox (development only)"
            )

    @property
    def required(self) -> bool:
        return self._settings.required

    def use_kubernetes(self, verifier: CredentialVerifier) -> None:
        """Accept the sandbox pods' projected ServiceAccount tokens, checked by ``verifier``."""
        self._kubernetes = verifier

    @property
    def kubernetes(self) -> CredentialVerifier | None:
        return self._kubernetes

    def close(self) -> None:
        self._log.close()

    async def authenticate(
        self, metadata: Metadata, *, sandbox_id: str, method: str, peer: str
    ) -> SandboxPrincipal | None:
        """The caller's principal, bound to ``sandbox_id``; None when auth is not required.
        Raises :class:`CredentialRefused` (already counted and logged)."""
        bound = await self.authenticate_bound(metadata, sandbox_id=sandbox_id, method=method, peer=peer)
        return None if bound is None else bound[0]

    async def authenticate_bound(
        self, metadata: Metadata, *, sandbox_id: str, method: str, peer: str
    ) -> tuple[SandboxPrincipal, SandboxRow | None] | None:
        """:meth:`authenticate`, with the sandbox row the binding was checked against (None: an
        unknown sandbox let through by ``register_unknown``), whose generation a caller pins."""
        if not self.required:
            return None
        try:
            principal = await self.verify(metadata)
            row = await self.bind(principal, sandbox_id)
        except CredentialRefused as exc:
            self.refused(exc, method=method, peer=peer, sandbox_id=sandbox_id)
            raise
        return principal, row

    async def verify(self, metadata: Metadata) -> SandboxPrincipal:
        """The principal of the call's bearer token, not yet bound to any sandbox."""
        token = bearer_token(metadata)
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at > now:
                return cached
            del self._cache[digest]
        principal = await self._verifier(token).verify(token)
        if principal.expires_at <= now:
            raise CredentialRefused(Refusal.EXPIRED, "the token has expired")
        if principal.kind == "kubernetes":
            # Not kept here until its exp: the Kubernetes verifier reuses a review only up to
            # review_cache_s, so a token whose pod was deleted stops getting in then.
            return principal
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = principal
        return principal

    def _verifier(self, token: str) -> CredentialVerifier:
        issuer = unverified_issuer(token)
        if issuer == self._settings.issuer:
            return self.tokens
        if self._kubernetes is not None:
            return self._kubernetes
        if self._config.drivers.kind == "kubernetes" and issuer is not None:
            # The gateway is starting: the Kubernetes driver (whose client checks pod tokens) is
            # not up yet. An outage the supervisor retries soon, not a refusal of its credential.
            raise CredentialRefused(
                Refusal.REVIEW_UNAVAILABLE,
                "the gateway is starting: pod tokens are checked once its Kubernetes driver is up",
            )
        if issuer is None:
            # No claims to read: the minted tokens' verifier says why (not a JWT, malformed).
            return self.tokens
        raise CredentialRefused(
            Refusal.WRONG_ISSUER,
            f"the token is not issued by {self._settings.issuer!r} (and this gateway does not run "
            "the Kubernetes driver, whose pod tokens it would check)",
        )

    async def bind(self, principal: SandboxPrincipal, sandbox_id: str) -> SandboxRow | None:
        """Whether ``principal`` may act for ``sandbox_id`` as the sandbox is now; returns the row
        it was checked against (None: unknown, let through by ``register_unknown``)."""
        if principal.sandbox_id != sandbox_id:
            raise CredentialRefused(
                Refusal.OTHER_SANDBOX,
                f"the credential is sandbox {principal.sandbox_id}'s, the call names {sandbox_id}",
            )
        row = await self._sandboxes.get(sandbox_id)
        if row is None:
            if self._config.sessions.register_unknown:
                return None
            raise CredentialRefused(Refusal.UNKNOWN_SANDBOX, f"sandbox {sandbox_id} is not known")
        if sandbox_deleted(row):
            # Its row and generation stay (its events are readable), its credentials must not.
            raise CredentialRefused(Refusal.STALE, f"sandbox {sandbox_id} was deleted")
        if principal.kind == "sandbox-token" and principal.generation != row.generation:
            raise CredentialRefused(
                Refusal.STALE,
                f"the token is for generation {principal.generation} of sandbox {sandbox_id}, "
                f"which is now at generation {row.generation}",
            )
        # A Kubernetes token, and a minted one traded for it, are bound to the pod: the row must
        # name that pod. A row naming none (a failed re-create, a row from before pod uids were
        # recorded) binds no pod: the pod name alone would let in any pod of that name.
        if principal.kind == "kubernetes" or principal.pod_uid is not None:
            if row.pod_uid is None:
                raise CredentialRefused(
                    Refusal.STALE, f"no pod is recorded for sandbox {sandbox_id}: a pod token binds nothing"
                )
            if principal.pod_uid != row.pod_uid:
                raise CredentialRefused(
                    Refusal.STALE, f"the token is of another pod than sandbox {sandbox_id}'s current one"
                )
        return row

    def refused(self, exc: CredentialRefused, *, method: str, peer: str, sandbox_id: str) -> None:
        """Count and log a refusal (never the token)."""
        if self._metrics is not None:
            self._metrics.supervisor_auth_refusals.labels(exc.reason.value).inc()
        host = peer_host(peer)
        self._log.log(
            logging.WARNING,
            ("refused", host, method, exc.reason),
            f"{method} from {host} for sandbox {sandbox_id} refused ({exc.reason.value}): {exc.detail}",
            extra={"peer": peer, "method": method, "reason": exc.reason.value, "sandbox_id": sandbox_id},
        )
