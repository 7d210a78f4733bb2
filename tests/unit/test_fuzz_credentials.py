"""Property-based fuzzing of supervisor credentials (issue 19 point 6), with a fixed budget and a
derandomized search so CI runs the same examples every time:

* arbitrary ``authorization`` values, JWT-shaped garbage (any header and claims, any signature)
  and mutations of a valid token never crash the authenticator and are never accepted (a mutated
  token is accepted only if it decodes to exactly the original's bytes: base64's unused bits);
* claims signed with the gateway's own key (what a leaked key, or a bug in minting, would give):
  a token is accepted only if every claim is sound (its sandbox, subject, generation, finite
  times, no pod it is not bound to), and its principal expires at a finite time;
* the hello path of a real gateway process with auth required: whatever the metadata, the
  call ends UNAUTHENTICATED or PERMISSION_DENIED with a reason, never another status (UNKNOWN,
  INTERNAL) and never a session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.auth import CredentialRefused, Refusal
from gateway.auth.sandbox_tokens import LEEWAY_S, SandboxTokens
from gateway.auth.supervisors import SupervisorAuthenticator
from gateway.config import GatewayConfig
from gateway.store import Database, SandboxStore
from gateway.store.signing_keys import SigningKeyStore
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess

BUDGET = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REASONS = {r.value for r in Refusal}


class Harness:
    """A real authenticator on a real SQLite store, driven from synchronous hypothesis tests."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.db = self.loop.run_until_complete(Database.open(f"sqlite+aiosqlite:///{tmp / 'gw.db'}"))
        config = GatewayConfig()
        store = SandboxStore(self.db)
        self.auth = SupervisorAuthenticator(
            config, tokens=SandboxTokens(config.auth.supervisors, SigningKeyStore(self.db)), sandboxes=store
        )
        self.loop.run_until_complete(store.create("sb", driver="local"))
        self.valid = self.loop.run_until_complete(self.auth.tokens.mint("sb", generation=1)).token
        key = self.loop.run_until_complete(SigningKeyStore(self.db).usable(now=datetime.now(UTC)))[0]
        self.kid, self.private_pem = key.kid, key.private_pem

    def refused(self, metadata: Any) -> Refusal:
        """The refusal for ``metadata``; fails the test on acceptance or any other exception."""
        try:
            self.loop.run_until_complete(
                self.auth.authenticate(metadata, sandbox_id="sb", method="M", peer="p")
            )
        except CredentialRefused as exc:
            return exc.reason
        raise AssertionError(f"accepted: {metadata!r}")

    def close(self) -> None:
        self.loop.run_until_complete(self.db.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> list[bytes] | None:
    try:
        return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]
    except (binascii.Error, ValueError):
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
claim_sets = st.fixed_dictionaries(
    {},
    optional={
        key: json_values | st.just(value)
        for key, value in {
            "iss": "openshell-gateway",
            "aud": "openshell-sandbox",
            "sub": "spiffe://openshell/sandbox/sb",
            "sandbox_id": "sb",
            "gen": 1,
            "iat": 1_700_000_000,
            "exp": 4_000_000_000,
            "jti": "x",
        }.items()
    },
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["EdDSA", "none", "HS256", "RS256", "ES256"]) | json_values,
        "kid": json_values,
    },
)


@BUDGET
@given(
    value=st.text(max_size=300) | st.binary(max_size=300),
    key=st.sampled_from(["authorization", "Authorization"]),
)
def test_arbitrary_authorization_values_are_refused(harness: Harness, value: str | bytes, key: str) -> None:
    harness.refused(((key, value),))
    if isinstance(value, str):
        harness.refused(((key, f"Bearer {value}"),))


@BUDGET
@given(header=headers, claims=claim_sets, signature=st.binary(max_size=80))
def test_jwt_shaped_garbage_is_refused(
    harness: Harness, header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    token = ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])
    harness.refused((("authorization", f"Bearer {token}"),))


@BUDGET
@given(data=st.data())
def test_mutated_valid_tokens_are_refused(harness: Harness, data: st.DataObject) -> None:
    token = harness.valid
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate", "swap-parts"]))
    at = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from("ABCabc0189-_.=+/ "))
    if kind == "replace":
        mutated = token[:at] + char + token[at + 1 :]
    elif kind == "delete":
        mutated = token[:at] + token[at + 1 :]
    elif kind == "insert":
        mutated = token[:at] + char + token[at:]
    elif kind == "truncate":
        mutated = token[:at]
    else:
        head, body, sig = token.split(".")
        mutated = ".".join(data.draw(st.permutations([head, body, sig])))
    if mutated == token:
        return
    try:
        harness.loop.run_until_complete(
            harness.auth.authenticate(
                (("authorization", f"Bearer {mutated}"),), sandbox_id="sb", method="M", peer="p"
            )
        )
    except CredentialRefused:
        return
    # Accepted: only a spelling of the same bytes (base64's unused low bits) may be.
    assert segments(mutated) == segments(token), mutated


SOUND_CLAIMS: dict[str, Any] = {
    "iss": "openshell-gateway",
    "aud": "openshell-sandbox",
    "sub": "spiffe://openshell/sandbox/sb",
    "sandbox_id": "sb",
    "gen": 1,
    "iat": 1_700_000_000,
    "exp": 4_000_000_000,
    "jti": "x",
}
times = st.sampled_from([math.inf, -math.inf, 1e308, -1e308, 0, 2**63, 4_000_000_000.5]) | st.floats(
    allow_nan=False
)


@BUDGET
@example(changes={"exp": math.inf}, dropped=set())
@example(changes={"pod_uid": "uid-1"}, dropped=set())
@given(
    changes=st.dictionaries(
        st.sampled_from([*SOUND_CLAIMS, "pod_uid"]),
        json_values | times | st.sampled_from(["sb", "other", "spiffe://openshell/sandbox/other", 2]),
        max_size=2,
    ),
    dropped=st.sets(st.sampled_from(list(SOUND_CLAIMS)), max_size=1),
)
def test_claims_signed_with_the_gateway_s_own_key_are_accepted_only_when_sound(
    harness: Harness, changes: dict[str, Any], dropped: set[str]
) -> None:
    claims = {k: v for k, v in {**SOUND_CLAIMS, **changes}.items() if k not in dropped}
    # Signed by hand: PyJWT's encode refuses some claim types an attacker's encoder would not.
    key = serialization.load_pem_private_key(harness.private_pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    signing_input = ".".join(
        [b64(json.dumps({"alg": "EdDSA", "kid": harness.kid}).encode()), b64(json.dumps(claims).encode())]
    )
    token = f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
    try:
        principal = harness.loop.run_until_complete(
            harness.auth.authenticate(
                (("authorization", f"Bearer {token}"),), sandbox_id="sb", method="M", peer="p"
            )
        )
    except CredentialRefused as exc:
        assert token not in exc.detail
        return
    assert principal is not None
    assert claims["sandbox_id"] == "sb" and claims["sub"] == "spiffe://openshell/sandbox/sb"
    assert type(claims["gen"]) is int and claims["gen"] == 1
    for name in ("exp", "iat"):
        value = claims[name]
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    assert claims["exp"] + LEEWAY_S > time.time() and claims["iat"] - LEEWAY_S <= time.time()
    assert "pod_uid" not in claims  # the row records no pod: no pod-bound token binds to it
    assert math.isfinite(principal.expires_at)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("fuzz-gw") / "gateway", auth=True)
    gw.start()
    yield gw
    gw.stop()


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@settings(BUDGET, max_examples=60)
@given(
    value=printable
    | printable.map(lambda v: f"Bearer {v}")
    | claim_sets.map(
        lambda c: (
            "Bearer "
            + ".".join([b64(b'{"alg":"EdDSA","kid":"k"}'), b64(json.dumps(c).encode()), b64(b"s" * 64)])
        )
    ),
    sandbox_id=st.sampled_from(["sb", "other", "x" * 60]),
)
def test_the_hello_path_refuses_any_bad_credential_with_a_reason(
    gateway: GatewayProcess, value: str, sandbox_id: str
) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.OpenShellStub(channel)
        msg = pb.SupervisorMessage()
        msg.hello.sandbox_id = sandbox_id
        msg.hello.instance_id = "fuzz"
        call = stub.ConnectSupervisor(iter([msg]), metadata=(("authorization", value),), timeout=10)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                exc.code(),
                exc.details(),
            )
            assert (exc.details() or "").split(":", 1)[0] in REASONS
            assert value.removeprefix("Bearer ") not in (exc.details() or "") or len(value) < 8
            return
        raise AssertionError(f"a session for a bad credential: {first!r}")
