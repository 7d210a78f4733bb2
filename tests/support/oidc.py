"""An OIDC issuer made in the test: real keys (cryptography), a real aiohttp server on 127.0.0.1
serving the discovery document and the JWKS, and tokens signed by it.

The keys it publishes can be changed while it runs (rotation), it counts the JWKS requests, it
can hold each answer for a while (to make callers overlap), and it can be stopped (issuer down).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "openshell"


@dataclass
class SigningKey:
    kid: str
    algorithm: str  # RS256 or ES256
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class TestIssuer:
    """Serves ``/.well-known/openid-configuration`` and ``/jwks`` for the keys in ``published``."""

    __test__ = False  # not a pytest class

    published: list[SigningKey] = field(default_factory=list)
    #: Each JWKS answer waits this long first (so that concurrent verifiers overlap).
    delay_s: float = 0.0
    jwks_requests: int = 0
    url: str = ""
    #: What the discovery document says the issuer is (default: the real URL).
    claimed_issuer: str | None = None
    #: What the discovery document names as the JWKS (default: this server's).
    jwks_uri: str | None = None
    _runner: web.AppRunner | None = None
    #: Answers being held back (delay_s): cut short by stop(), which would otherwise wait them out.
    _held: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> TestIssuer:
        app = web.Application()
        app.router.add_get("/realms/test/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/realms/test/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/realms/test"
        return self

    async def stop(self) -> None:
        for task in self._held:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"issuer": self.claimed_issuer or self.url, "jwks_uri": self.jwks_uri or f"{self.url}/jwks"}
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        if self.delay_s:
            task = asyncio.current_task()
            assert task is not None
            self._held.add(task)
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self._held.discard(task)
        return web.json_response({"keys": [k.jwk() for k in self.published]})

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "f3c1-user",
            "azp": "openshell-cli",
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, key: SigningKey | None = None, *, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        """A token signed by ``key`` (the first published one by default) with the default claims,
        ``claims`` overriding them (None removes one)."""
        key = key or self.published[0]
        return jwt.encode(
            self.claims(**claims),
            key.private,
            algorithm=key.algorithm,
            headers={"kid": key.kid, **(headers or {})},
        )

    def unsigned_token(self, *, alg: str, secret: bytes = b"", kid: str | None = None, **claims: Any) -> str:
        """A token PyJWT would refuse to make: ``alg: none`` (no signature), or HS256 keyed with
        ``secret`` (a public key's PEM: the algorithm confusion attack)."""
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if kid is not None:
            header["kid"] = kid
        signing_input = (
            f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(self.claims(**claims)).encode())}"
        )
        signature = (
            b"" if alg == "none" else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        )
        return f"{signing_input}.{_b64(signature)}"
