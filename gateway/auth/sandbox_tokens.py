"""Sandbox tokens the gateway mints: Ed25519-signed JWTs (``alg: EdDSA``), one per sandbox life.

Claims: ``iss`` and ``aud`` (``auth.supervisors.issuer`` / ``audience``), ``sub`` in upstream's
SPIFFE shape (``spiffe://openshell/sandbox/<id>``) with the plain ``sandbox_id`` beside it, ``gen``
(the sandbox's generation: a token of a deleted and re-created sandbox is a replay, refused by the
binding in :mod:`gateway.auth.supervisors`), ``iat``, ``exp`` (``token_ttl_s``) and ``jti``; the
header names the signing key (``kid``). A token traded for a pod's ServiceAccount token
(``IssueSandboxToken``) also has ``pod_uid``, that pod's (the binding holds it to the sandbox's
recorded pod, and its renewals keep it), and expires no later than the pod's token.

Verification pins the algorithm (EdDSA only: ``none`` and HMAC-with-the-public-key confusions are
refused before any key is used) and looks the key up by kid in the key ring.

Keys (table ``signing_keys``, :mod:`gateway.store.signing_keys`) are shared by every replica and
rotated without a restart: the newest key signs until ``created_at + key_rotation_s``; then the
next signer reads the ring again (another replica may have made the next key already: it is
adopted) and only if it still has no signer makes a new one (a random kid, so replicas rotating at
the very same moment both succeed, and the newest of their keys signs). A key verifies until its
last token has expired (``sign_until + token_ttl_s + LEEWAY_S``) and is deleted after. The ring is
read from the database and cached for ``RING_CACHE_S``; a token naming a kid the ring lacks (a key
another replica just made) looks that one kid up at once (a primary-key read). A kid found in no
database is remembered for ``UNKNOWN_KID_NEGATIVE_S`` (at most ``UNKNOWN_KID_MAX`` of them), so
repeating a forged kid costs nothing, and no forged kid keeps another replica's real key out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.auth import CredentialRefused, Refusal, SandboxPrincipal
from gateway.config import SupervisorAuthSettings
from gateway.store.signing_keys import SigningKey, SigningKeyStore
from openshell_wire.records import sandbox_id_problem

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
SUBJECT_PREFIX = "spiffe://openshell/sandbox/"
#: Clock skew allowed on exp and iat (the gateway's replicas and nothing else sign these).
LEEWAY_S = 30
#: The key ring is read from the database again after this long.
RING_CACHE_S = 10.0
#: A kid the database does not have is not looked up again for this long...
UNKNOWN_KID_NEGATIVE_S = 2.0
#: ... and this many such kids are remembered at most (the oldest forgotten first).
UNKNOWN_KID_MAX = 4096
#: Longer than any token we mint (a few hundred bytes): refused without parsing.
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str
    #: Unix seconds.
    expires_at: float
    kid: str


@dataclass(slots=True)
class _RingKey:
    row: SigningKey
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None = None


def _at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims, unverified (to pick its verifier); None when it has none."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except Exception:  # any garbage: the verifier it goes to refuses it with a reason
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


class SandboxTokens:
    """Mints and verifies sandbox tokens (a :class:`gateway.auth.CredentialVerifier`)."""

    def __init__(
        self,
        settings: SupervisorAuthSettings,
        keys: SigningKeyStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._ring: dict[str, _RingKey] = {}
        self._newest: list[str] = []  # kids, newest first
        self._loaded_at = float("-inf")  # monotonic
        #: kid -> when (monotonic) the database was found not to have it.
        self._unknown: dict[str, float] = {}
        self._lock = asyncio.Lock()

    @property
    def token_ttl_s(self) -> int:
        return self._settings.token_ttl_s

    # -- the key ring ------------------------------------------------------------------

    async def _load(self) -> None:
        rows = await self._keys.usable(now=_at(self._clock()))
        ring: dict[str, _RingKey] = {}
        for row in rows:
            key = self._ring.get(row.kid) or self._ring_key(row)
            if key is not None:
                ring[row.kid] = key
        self._ring = ring
        self._newest = [row.kid for row in rows if row.kid in ring]
        self._loaded_at = time.monotonic()

    def _ring_key(self, row: SigningKey) -> _RingKey | None:
        try:
            public = serialization.load_pem_public_key(row.public_pem.encode())
        except ValueError:
            log.error("signing key %s has an unreadable public key; skipped", row.kid)
            return None
        if row.algorithm != ALGORITHM or not isinstance(public, Ed25519PublicKey):
            log.error("signing key %s is not an Ed25519 key; skipped", row.kid)
            return None
        return _RingKey(row=row, public=public)

    async def _fresh_ring(self) -> None:
        if time.monotonic() - self._loaded_at >= RING_CACHE_S:
            await self._load()

    def _current_signer(self) -> _RingKey | None:
        now = _at(self._clock())
        for kid in self._newest:  # newest first: of two replicas' simultaneous keys, both pick one
            key = self._ring[kid]
            if key.row.sign_until > now:
                return key
        return None

    async def _signer(self) -> _RingKey:
        async with self._lock:
            await self._fresh_ring()
            key = self._current_signer()
            if key is None:
                # Read again first: another replica may have made the next key since our cached
                # read (then it is adopted, rather than every replica making its own).
                await self._load()
                key = self._current_signer()
            if key is None:
                await self._rotate()
                key = self._current_signer()
            if key is None:  # only if the clock jumped by more than key_rotation_s meanwhile
                raise RuntimeError("no signing key is usable right after making one")
            if key.private is None:
                private = serialization.load_pem_private_key(key.row.private_pem.encode(), password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise RuntimeError(f"signing key {key.row.kid} is not an Ed25519 key")
                key.private = private
            return key

    async def _rotate(self) -> None:
        """Make a new signing key, drop the expired ones, and read the ring again."""
        s = self._settings
        now = self._clock()
        private = Ed25519PrivateKey.generate()
        sign_until = now + s.key_rotation_s
        row = SigningKey(
            kid=uuid.uuid4().hex,
            algorithm=ALGORITHM,
            private_pem=private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
            public_pem=private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode(),
            created_at=_at(now),
            sign_until=_at(sign_until),
            verify_until=_at(sign_until + s.token_ttl_s + LEEWAY_S),
        )
        deleted = await self._keys.delete_expired(now=_at(now))
        await self._keys.add(row)
        log.info("new sandbox token signing key", extra={"kid": row.kid, "expired_keys_deleted": deleted})
        await self._load()

    async def _verifying_key(self, kid: str) -> _RingKey | None:
        async with self._lock:
            await self._fresh_ring()
            key = self._ring.get(kid)
        if key is not None:
            return key
        # Perhaps a key another replica made since our last read: look that one kid up (outside
        # the lock, so a flood of forged kids does not hold up tokens of the keys we know).
        missed = self._unknown.get(kid)
        if missed is not None and time.monotonic() - missed < UNKNOWN_KID_NEGATIVE_S:
            return None
        row = await self._keys.get(kid)
        if row is not None and row.verify_until > _at(self._clock()):
            key = self._ring_key(row)
        if key is None:
            self._unknown.pop(kid, None)
            while len(self._unknown) >= UNKNOWN_KID_MAX:
                del self._unknown[next(iter(self._unknown))]
            self._unknown[kid] = time.monotonic()
            return None
        self._unknown.pop(kid, None)
        # Kept for verifying until the next ring read (which has it too, from then on).
        return self._ring.setdefault(kid, key)

    # -- minting and verifying -----------------------------------------------------------

    async def mint(
        self,
        sandbox_id: str,
        *,
        generation: int,
        pod_uid: str | None = None,
        not_after: float | None = None,
    ) -> MintedToken:
        """A new token for ``sandbox_id``'s life ``generation`` (and with ``pod_uid``, bound to that
        pod), expiring after ``token_ttl_s`` or at ``not_after``, whichever is first; StoreError
        if the keys cannot be read."""
        key = await self._signer()
        assert key.private is not None
        now = int(self._clock())
        expires_at = now + self._settings.token_ttl_s
        if not_after is not None:
            expires_at = min(expires_at, int(not_after))
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "sub": SUBJECT_PREFIX + sandbox_id,
            "sandbox_id": sandbox_id,
            "gen": generation,
            "iat": now,
            "exp": expires_at,
            "jti": uuid.uuid4().hex,
        }
        if pod_uid is not None:
            claims["pod_uid"] = pod_uid
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.row.kid})
        return MintedToken(token=token, expires_at=float(expires_at), kid=key.row.kid)

    async def verify(self, token: str) -> SandboxPrincipal:
        if len(token) > MAX_TOKEN_CHARS:
            raise CredentialRefused(Refusal.MALFORMED, "the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # any garbage (bad base64, JSON, types) is a malformed token, never a crash
            raise CredentialRefused(Refusal.MALFORMED, "not a JWT") from None
        if header.get("alg") != ALGORITHM:
            # Pinned before any key is touched: no "none", no HMAC keyed with our public key.
            raise CredentialRefused(Refusal.BAD_SIGNATURE, f"not signed with {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise CredentialRefused(Refusal.MALFORMED, "the token names no signing key (kid)")
        key = await self._verifying_key(kid)
        if key is None:
            raise CredentialRefused(Refusal.BAD_SIGNATURE, "signed by a key this gateway does not have")
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[ALGORITHM],
                audience=s.audience,
                issuer=s.issuer,
                # exp and iat are checked below against our clock (the one tokens are minted by).
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise CredentialRefused(Refusal.WRONG_AUDIENCE, f"the token is not for {s.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise CredentialRefused(
                Refusal.WRONG_ISSUER, f"the token is not issued by {s.issuer!r}"
            ) from None
        except jwt.InvalidSignatureError:
            raise CredentialRefused(Refusal.BAD_SIGNATURE, "the signature does not verify") from None
        except Exception:  # missing claims, bad types, iat in the future, undecodable parts
            raise CredentialRefused(Refusal.MALFORMED, "the token's claims are not valid") from None
        exp, iat = claims.get("exp"), claims.get("iat")
        if not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in (exp, iat)
        ):
            # Not finite: JSON's Infinity would be a token that never expires (and is cached so).
            raise CredentialRefused(Refusal.MALFORMED, "the token's exp or iat is not a time")
        assert isinstance(exp, int | float) and isinstance(iat, int | float)
        now = self._clock()
        if exp + LEEWAY_S <= now:
            raise CredentialRefused(Refusal.EXPIRED, "the token has expired")
        if iat - LEEWAY_S > now:
            raise CredentialRefused(Refusal.MALFORMED, "the token is issued in the future")
        sandbox_id = claims.get("sandbox_id")
        generation = claims.get("gen")
        if (
            not isinstance(sandbox_id, str)
            or sandbox_id_problem(sandbox_id) is not None
            or claims.get("sub") != SUBJECT_PREFIX + sandbox_id
            or not isinstance(generation, int)
            or isinstance(generation, bool)
            or generation < 1
        ):
            raise CredentialRefused(Refusal.MALFORMED, "the token names no valid sandbox and generation")
        pod_uid = claims.get("pod_uid")
        if pod_uid is not None and (not isinstance(pod_uid, str) or not pod_uid or len(pod_uid) > 128):
            raise CredentialRefused(Refusal.MALFORMED, "the token's pod_uid is not a pod uid")
        return SandboxPrincipal(
            sandbox_id=sandbox_id,
            kind="sandbox-token",
            expires_at=float(exp) + LEEWAY_S,
            generation=generation,
            pod_uid=pod_uid,
        )
