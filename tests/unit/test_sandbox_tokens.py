"""Minted sandbox tokens on a real (SQLite) database: claims, pinned algorithm, and key rotation
without a restart, with a clock the test moves instead of waiting."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth import CredentialRefused, Refusal, sandbox_tokens
from gateway.auth.sandbox_tokens import LEEWAY_S, SUBJECT_PREFIX, SandboxTokens
from gateway.config import SupervisorAuthSettings
from gateway.store import Database
from gateway.store.signing_keys import SigningKeyStore

SETTINGS = SupervisorAuthSettings(token_ttl_s=600, key_rotation_s=3600)


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    yield database
    await database.close()


@pytest.fixture(autouse=True)
def no_ring_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ring's cache is monotonic time; these tests move a clock of their own instead.
    monkeypatch.setattr(sandbox_tokens, "RING_CACHE_S", 0.0)


def tokens(db: Database, clock: Clock, settings: SupervisorAuthSettings = SETTINGS) -> SandboxTokens:
    return SandboxTokens(settings, SigningKeyStore(db), clock=clock)


async def refusal(verifier: SandboxTokens, token: str) -> Refusal:
    with pytest.raises(CredentialRefused) as caught:
        await verifier.verify(token)
    assert token not in str(caught.value)
    return caught.value.reason


def hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """An HS256 JWT made by hand (PyJWT refuses a PEM as an HMAC secret; an attacker would not)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        f"{part(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}.{part(json.dumps(claims).encode())}"
    )
    return f"{signing_input}.{part(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


async def test_a_minted_token_names_its_sandbox_and_generation(db: Database) -> None:
    clock = Clock()
    minter = tokens(db, clock)
    minted = await minter.mint("sb-1", generation=3)
    header = jwt.get_unverified_header(minted.token)
    assert header == {"alg": "EdDSA", "kid": minted.kid, "typ": "JWT"}
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["sub"] == SUBJECT_PREFIX + "sb-1" and claims["sandbox_id"] == "sb-1"
    assert (claims["iss"], claims["aud"], claims["gen"]) == ("openshell-gateway", "openshell-sandbox", 3)
    assert claims["exp"] - claims["iat"] == 600 and minted.expires_at == claims["exp"]
    principal = await minter.verify(minted.token)
    assert (principal.sandbox_id, principal.generation, principal.kind) == ("sb-1", 3, "sandbox-token")
    assert (await minter.mint("sb-1", generation=3)).token != minted.token  # a jti each


async def test_the_algorithm_is_pinned_and_claims_are_checked(db: Database) -> None:
    clock = Clock()
    minter = tokens(db, clock)
    minted = await minter.mint("sb", generation=1)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    public_pem = (await SigningKeyStore(db).usable(now=datetime.now(UTC)))[0].public_pem
    forger = Ed25519PrivateKey.generate()

    def signed(key: object, algorithm: str = "EdDSA", kid: str = minted.kid, **changes: object) -> str:
        return jwt.encode({**claims, **changes}, key, algorithm=algorithm, headers={"kid": kid})  # type: ignore[arg-type]

    private = (await SigningKeyStore(db).usable(now=datetime.now(UTC)))[0].private_pem
    assert await refusal(minter, signed(None, "none")) is Refusal.BAD_SIGNATURE
    # HS256 keyed with our public key: the classic confusion.
    assert await refusal(minter, hs256(claims, public_pem.encode(), minted.kid)) is Refusal.BAD_SIGNATURE
    assert await refusal(minter, signed(forger)) is Refusal.BAD_SIGNATURE
    assert await refusal(minter, signed(forger, kid="unknown")) is Refusal.BAD_SIGNATURE
    assert await refusal(minter, signed(private, aud="other")) is Refusal.WRONG_AUDIENCE
    assert await refusal(minter, signed(private, iss="other")) is Refusal.WRONG_ISSUER
    assert await refusal(minter, signed(private, sub="spiffe://openshell/sandbox/x")) is Refusal.MALFORMED
    assert await refusal(minter, signed(private, gen=True)) is Refusal.MALFORMED
    assert await refusal(minter, signed(private, sandbox_id="../etc")) is Refusal.MALFORMED
    assert await refusal(minter, minted.token[:-4]) in (Refusal.BAD_SIGNATURE, Refusal.MALFORMED)
    assert await refusal(minter, "x" * 5000) is Refusal.MALFORMED
    # exp is checked against the real time by PyJWT: one in the past beyond the leeway is expired.
    past = int(datetime.now(UTC).timestamp()) - LEEWAY_S - 60
    assert await refusal(minter, signed(private, iat=past - 600, exp=past)) is Refusal.EXPIRED


async def test_keys_rotate_without_a_restart_and_expire(db: Database) -> None:
    clock = Clock()
    settings = SupervisorAuthSettings(token_ttl_s=600, key_rotation_s=3600)
    minter = tokens(db, clock, settings)
    first = await minter.mint("sb", generation=1)
    clock.now += 3601  # the first key no longer signs
    second = await minter.mint("sb", generation=1)
    assert second.kid != first.kid
    # A token of the old key still verifies until it expires (its key verifies that long).
    store = SigningKeyStore(db)
    old_key = next(
        k for k in await store.usable(now=datetime.fromtimestamp(clock.now, UTC)) if k.kid == first.kid
    )
    assert old_key.verify_until.timestamp() == old_key.sign_until.timestamp() + 600 + LEEWAY_S
    clock.now += 3600 + 1  # the second key stops signing; the first verifies nothing any more
    third = await minter.mint("sb", generation=1)
    kids = {k.kid for k in await store.usable(now=datetime.fromtimestamp(0, UTC))}
    assert first.kid not in kids, "an expired key is deleted when the next one is made"
    assert {second.kid, third.kid} <= kids


async def test_replicas_share_the_keys_and_the_newest_signs(db: Database) -> None:
    clock = Clock()
    one, two = tokens(db, clock), tokens(db, clock)
    minted = await one.mint("sb", generation=1)
    assert (await two.verify(minted.token)).sandbox_id == "sb"  # found in the shared table
    assert (await two.mint("sb", generation=1)).kid == minted.kid  # no second key made
    # Two replicas that rotate at once both insert a key; both then sign with the newest.
    clock.now += 3601
    a, b = await one.mint("sb", generation=1), await two.mint("sb", generation=1)
    later_a, later_b = await one.mint("sb", generation=1), await two.mint("sb", generation=1)
    assert later_a.kid == later_b.kid
    assert {a.kid, b.kid} >= {later_a.kid}
    for token in (a, b, later_a, later_b):
        await one.verify(token.token)
        await two.verify(token.token)


async def test_a_key_that_is_not_ed25519_is_skipped(db: Database) -> None:
    clock = Clock()
    minter = tokens(db, clock)
    minted = await minter.mint("sb", generation=1)
    rsa_pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    async with db.engine.begin() as conn:
        from sqlalchemy import update

        from gateway.store.schema import signing_keys

        await conn.execute(update(signing_keys).values(algorithm="RS256", public_pem=rsa_pem))
    fresh = tokens(db, clock)
    assert await refusal(fresh, minted.token) is Refusal.BAD_SIGNATURE


async def test_a_pod_bound_token_carries_its_pod_and_expires_no_later_than_asked(db: Database) -> None:
    clock = Clock()
    minter = tokens(db, clock)
    minted = await minter.mint("sb", generation=2, pod_uid="uid-1", not_after=clock.now + 100)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["pod_uid"] == "uid-1" and claims["exp"] == int(clock.now) + 100 == minted.expires_at
    principal = await minter.verify(minted.token)
    assert (principal.kind, principal.generation, principal.pod_uid) == ("sandbox-token", 2, "uid-1")
    # token_ttl_s still bounds it when the pod's token lives longer.
    assert (await minter.mint("sb", generation=2, not_after=clock.now + 10**6)).expires_at == int(
        clock.now
    ) + 600
    assert (await minter.verify((await minter.mint("sb", generation=2)).token)).pod_uid is None
    # A pod_uid claim that is no uid is malformed (only reachable with our key: pinned anyway).
    kid = minted.kid
    private = (await SigningKeyStore(db).usable(now=datetime.now(UTC)))[0].private_pem
    for bad in ("", 5, ["uid"], "u" * 200):
        forged = jwt.encode({**claims, "pod_uid": bad}, private, algorithm="EdDSA", headers={"kid": kid})
        assert await refusal(minter, forged) is Refusal.MALFORMED


async def test_a_time_that_is_not_finite_is_malformed(db: Database) -> None:
    clock = Clock()
    minter = tokens(db, clock)
    minted = await minter.mint("sb", generation=1)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    private = (await SigningKeyStore(db).usable(now=datetime.now(UTC)))[0].private_pem
    for changes in ({"exp": float("inf")}, {"iat": float("-inf")}):
        # JSON's Infinity: a token that would never expire, and be cached so.
        forged = jwt.encode({**claims, **changes}, private, algorithm="EdDSA", headers={"kid": minted.kid})
        assert await refusal(minter, forged) is Refusal.MALFORMED


async def test_three_replicas_rotate_to_one_key_and_find_each_other_s_new_keys(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real ring cache: each replica's cached ring is stale for a while after a rotation.
    monkeypatch.setattr(sandbox_tokens, "RING_CACHE_S", 10.0)
    clock = Clock()
    a, b, c = tokens(db, clock), tokens(db, clock), tokens(db, clock)
    first = await a.mint("sb", generation=1)
    for replica in (b, c):
        await replica.verify(first.token)  # every ring read and cached
    clock.now += 3601  # the key no longer signs
    made_by_a = await a.mint("sb", generation=1)
    assert made_by_a.kid != first.kid
    await c.verify(made_by_a.token)
    # b's cached ring shows no signer: it reads the ring again and adopts a's key, rather than
    # making one more of its own.
    assert (await b.mint("sb", generation=1)).kid == made_by_a.kid
    # A made-up kid (anyone can send one) does not keep a real new key out: another replica's
    # key made just after is found at once.
    forger = Ed25519PrivateKey.generate()
    made_up = jwt.encode(
        jwt.decode(first.token, options={"verify_signature": False}),
        forger,
        algorithm="EdDSA",
        headers={"kid": "made-up"},
    )
    assert await refusal(c, made_up) is Refusal.BAD_SIGNATURE
    clock.now += 1
    d = tokens(db, clock)
    await d._rotate()  # a replica that rotated moments later (it had read no key yet): a newer key
    made_by_d = await d.mint("sb", generation=1)
    assert made_by_d.kid not in (made_by_a.kid, first.kid)
    assert (await c.verify(made_by_d.token)).sandbox_id == "sb"
    assert (await a.verify(made_by_d.token)).sandbox_id == "sb"
    # The made-up kid is remembered: asking again does not read the database.
    reads = 0
    store_get = SigningKeyStore.get

    async def counting(self: SigningKeyStore, kid: str) -> object:
        nonlocal reads
        reads += 1
        return await store_get(self, kid)

    monkeypatch.setattr(SigningKeyStore, "get", counting)
    for _ in range(5):
        assert await refusal(c, made_up) is Refusal.BAD_SIGNATURE
    assert reads == 0
