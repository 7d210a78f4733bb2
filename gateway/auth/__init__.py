"""Who is calling: supervisors (a credential bound to one sandbox) and people (OIDC bearer tokens).

The types every caller shares live here; the verifiers in their own modules:

* ``sandbox_tokens``: the sandbox tokens this gateway mints (EdDSA JWTs, keys in the database,
  rotated without a restart), for the local driver and other runtimes;
* ``kubernetes_tokens``: the sandbox pods' projected ServiceAccount tokens, checked with a
  TokenReview and bound to the sandbox through the pod name and uid the token names;
* ``supervisors``: the one rule every supervisor call goes through (which verifier, the binding of
  the credential to the sandbox id the call names, the refusal metric and log line);
* ``oidc`` and ``people``: people's bearer tokens and what their roles let them do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

import grpc


class Refusal(StrEnum):
    """Why a supervisor credential was refused: the metric's ``reason`` label (a fixed set)."""

    MISSING = "missing"  # no authorization metadata
    MALFORMED = "malformed"  # not a bearer token, not a JWT
    BAD_SIGNATURE = "bad_signature"  # forged, or signed by a key this gateway never had
    EXPIRED = "expired"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    REVIEW_FAILED = "review_failed"  # TokenReview said not authenticated
    REVIEW_UNAVAILABLE = "review_unavailable"  # the Kubernetes API could not be asked
    NOT_A_SANDBOX = "not_a_sandbox"  # a valid token, but of no sandbox pod
    OTHER_SANDBOX = "other_sandbox"  # valid, for another sandbox than the call names
    STALE = "stale"  # valid, for an earlier life of the sandbox (deleted and created again, pod replaced)
    UNKNOWN_SANDBOX = "unknown_sandbox"  # the sandbox does not exist (and register_unknown is off)


#: The status each refusal ends a call with: the credential itself is bad (UNAUTHENTICATED), or it
#: is good but does not allow this call (PERMISSION_DENIED).
REFUSAL_STATUS: dict[Refusal, grpc.StatusCode] = {
    Refusal.MISSING: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.MALFORMED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.WRONG_AUDIENCE: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.WRONG_ISSUER: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.REVIEW_FAILED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.REVIEW_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Refusal.NOT_A_SANDBOX: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.OTHER_SANDBOX: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.STALE: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.UNKNOWN_SANDBOX: grpc.StatusCode.PERMISSION_DENIED,
}


class CredentialRefused(Exception):
    """A supervisor credential that does not let the call through. ``detail`` is for the peer and
    the log: it never holds the token or any part of it."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def status(self) -> grpc.StatusCode:
        return REFUSAL_STATUS[self.reason]


@dataclass(frozen=True, slots=True)
class SandboxPrincipal:
    """A verified supervisor credential: the one sandbox it speaks for."""

    sandbox_id: str
    kind: Literal["sandbox-token", "kubernetes"]
    #: Unix seconds after which the credential is no longer accepted.
    expires_at: float
    #: The sandbox's generation a minted token was issued for (None: a Kubernetes token, bound
    #: through the pod's uid instead).
    generation: int | None = None
    #: The pod a Kubernetes token names (its uid is checked against the sandbox's pod).
    pod_name: str | None = None
    pod_uid: str | None = None


class CredentialVerifier(Protocol):
    """Checks one kind of supervisor credential; raises :class:`CredentialRefused`."""

    async def verify(self, token: str) -> SandboxPrincipal: ...
