"""The one rule every supervisor call goes through (gateway.auth.supervisors), on a real SQLite
store with real minted tokens: the bearer header, the binding to the call's sandbox and its
generation, the refusal metric and log line, the per-token cache."""

from __future__ import annotations

import asyncio
import logging
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import update

from gateway.auth import CredentialRefused, Refusal, SandboxPrincipal
from gateway.auth.sandbox_tokens import SandboxTokens
from gateway.auth.supervisors import SupervisorAuthenticator, bearer_token
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import Database, SandboxStore
from gateway.store.schema import sandboxes
from gateway.store.signing_keys import SigningKeyStore


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    yield database
    await database.close()


def auth(db: Database, *, register_unknown: bool = False) -> tuple[SupervisorAuthenticator, GatewayMetrics]:
    config = GatewayConfig.model_validate({"sessions": {"register_unknown": register_unknown}})
    metrics = GatewayMetrics(SessionRegistry())
    tokens = SandboxTokens(config.auth.supervisors, SigningKeyStore(db))
    return SupervisorAuthenticator(
        config, tokens=tokens, sandboxes=SandboxStore(db), metrics=metrics
    ), metrics


def count(metrics: GatewayMetrics, reason: Refusal) -> float:
    value = metrics.registry.get_sample_value(
        "openshell_gateway_supervisor_auth_refusals_total", {"reason": reason.value}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), Refusal.MISSING),
        ((("x-other", "Bearer a"),), Refusal.MISSING),
        ((("authorization", "Bearer"),), Refusal.MALFORMED),
        ((("authorization", "Basic abc"),), Refusal.MALFORMED),
        ((("authorization", "Bearer a b"),), Refusal.MALFORMED),
        ((("authorization", "Bearer a\x00"),), Refusal.MALFORMED),
        ((("authorization", b"Bearer \xff"),), Refusal.MALFORMED),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), Refusal.MALFORMED),
    ],
)
def test_a_missing_or_garbled_header_is_refused(
    metadata: tuple[tuple[str, object], ...], reason: Refusal
) -> None:
    with pytest.raises(CredentialRefused) as caught:
        bearer_token(metadata)
    assert caught.value.reason is reason


def test_the_scheme_is_case_insensitive() -> None:
    assert bearer_token((("Authorization", "bEaReR  tok.en.x "),)) == "tok.en.x"


async def test_the_credential_is_bound_to_the_sandbox_and_its_generation(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator, metrics = auth(db)
    store = SandboxStore(db)
    await store.create("one", driver="local")
    await store.create("two", driver="local")
    token = (await authenticator.tokens.mint("one", generation=1)).token
    meta = (("authorization", f"Bearer {token}"),)
    principal = await authenticator.authenticate(
        meta, sandbox_id="one", method="M", peer="ipv4:10.0.0.5:4000"
    )
    assert principal is not None and principal.sandbox_id == "one"

    async def reason_for(sandbox_id: str, metadata: object = meta) -> Refusal:
        with pytest.raises(CredentialRefused) as caught:
            await authenticator.authenticate(
                metadata, sandbox_id=sandbox_id, method="M", peer="ipv4:10.0.0.5:4000"
            )  # type: ignore[arg-type]
        return caught.value.reason

    with caplog.at_level(logging.WARNING):
        assert await reason_for("two") is Refusal.OTHER_SANDBOX
    assert token not in caplog.text and "other_sandbox" in caplog.text and "ipv4:10.0.0.5" in caplog.text
    stranger = (await authenticator.tokens.mint("three", generation=1)).token
    assert await reason_for("three", (("authorization", f"Bearer {stranger}"),)) is Refusal.UNKNOWN_SANDBOX
    # Deleted and created again: the old life's token is a replay.
    await store.set_driver_state("one", {"phase": "Deleted"})
    assert await store.create("one", driver="local", replaces=lambda row: True) == 2
    assert await reason_for("one") is Refusal.STALE
    assert count(metrics, Refusal.STALE) == 1 and count(metrics, Refusal.OTHER_SANDBOX) == 1
    assert count(metrics, Refusal.EXPIRED) == 0  # every reason's series exists from the start


async def test_register_unknown_lets_a_valid_token_of_an_unknown_sandbox_through(db: Database) -> None:
    authenticator, _ = auth(db, register_unknown=True)
    token = (await authenticator.tokens.mint("new", generation=1)).token
    meta = (("authorization", f"Bearer {token}"),)
    assert await authenticator.authenticate(meta, sandbox_id="new", method="M", peer="p") is not None
    with pytest.raises(CredentialRefused, match="other_sandbox"):
        await authenticator.authenticate(meta, sandbox_id="other", method="M", peer="p")


class PodTokens:
    """Stands in for the TokenReview verifier (the Kubernetes API is tested elsewhere)."""

    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, token: str) -> SandboxPrincipal:
        self.calls += 1
        return SandboxPrincipal(
            sandbox_id="pod-sb", kind="kubernetes", expires_at=4e9, pod_name="sandbox-pod-sb", pod_uid=token
        )


async def test_a_pod_token_must_be_of_the_sandbox_current_pod(
    db: Database,
) -> None:
    authenticator, _ = auth(db)
    pods = PodTokens()
    authenticator.use_kubernetes(pods)
    store = SandboxStore(db)
    await store.create("pod-sb", driver="kubernetes")
    async with db.engine.begin() as conn:  # what the Kubernetes driver records at the pod's creation
        await conn.execute(update(sandboxes).where(sandboxes.c.id == "pod-sb").values(pod_uid="uid-1"))
    for _ in range(3):
        assert await authenticator.authenticate(
            (("authorization", "Bearer uid-1"),), sandbox_id="pod-sb", method="M", peer="p"
        )
    # Not cached by the authenticator: the Kubernetes verifier reuses its reviews itself, only up
    # to review_cache_s (a deleted pod's token must stop getting in then, not at its exp).
    assert pods.calls == 3
    # A token of an earlier pod of the sandbox (replaced under the same name) is a replay.
    with pytest.raises(CredentialRefused, match="stale"):
        await authenticator.authenticate(
            (("authorization", "Bearer uid-0"),), sandbox_id="pod-sb", method="M", peer="p"
        )


async def test_not_required_lets_everything_through(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    config = GatewayConfig.model_validate({"auth": {"supervisors": {"required": False}}})
    with caplog.at_level(logging.WARNING):
        authenticator = SupervisorAuthenticator(
            config,
            tokens=SandboxTokens(config.auth.supervisors, SigningKeyStore(db)),
            sandboxes=SandboxStore(db),
        )
    assert "any peer" in caplog.text
    assert await authenticator.authenticate((), sandbox_id="x", method="M", peer="p") is None


async def test_local_sandboxes_get_a_token_file_renewed_before_it_expires(
    db: Database, tmp_path: Path
) -> None:
    from gateway.config import LocalDriverSettings
    from gateway.drivers.local import LocalProvisioner

    authenticator, _ = auth(db)
    # A real supervisor whose gateway is not there: it keeps retrying, its sandbox keeps running.
    provisioner = LocalProvisioner(
        LocalDriverSettings(work_dir=tmp_path / "sandboxes"),
        SandboxStore(db),
        gateway_address="127.0.0.1:9",
        tokens=authenticator.tokens,
        token_ttl_s=0.6,  # rewritten every 0.2 s
    )
    provisioner.start()
    try:
        created = await provisioner.create(
            "loc", [sys.executable, "-c", "import time; time.sleep(60)"], image=None, env={}
        )
        path = tmp_path / "sandboxes" / "loc" / "gateway-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        first = path.read_text().strip()
        principal = await authenticator.tokens.verify(first)
        assert (principal.sandbox_id, principal.generation) == ("loc", created["generation"])
        for _ in range(100):
            if path.read_text().strip() != first:
                break
            await asyncio.sleep(0.05)
        renewed = path.read_text().strip()
        assert renewed != first and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (await authenticator.tokens.verify(renewed)).sandbox_id == "loc"
        argv = psutil.Process(created["pid"]).cmdline()
        assert f"gateway.credential_file={path}" in argv and "gateway.credential_refresh=true" in argv
        assert first not in " ".join(argv)  # the token itself is never on a command line
    finally:
        await provisioner.close()
