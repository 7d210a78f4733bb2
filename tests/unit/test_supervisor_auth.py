"""The one rule every supervisor call goes through (gateway.auth.supervisors), on a real SQLite
store with real minted tokens: the bearer header, the binding to the call's sandbox and its
generation, the refusal metric and log line, the per-token cache."""

from __future__ import annotations

import asyncio
import logging
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import psutil
import pytest
from sqlalchemy import select, update

from gateway.app import Gateway
from gateway.auth import CredentialRefused, Refusal, SandboxPrincipal
from gateway.auth.sandbox_tokens import SandboxTokens
from gateway.auth.supervisors import SupervisorAuthenticator, bearer_token
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.store import Database, SandboxStore
from gateway.store.schema import sandboxes, signing_keys
from gateway.store.signing_keys import SigningKeyStore
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.gateway import gateway_config


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

    def __init__(self, *, expires_at: float = 4e9) -> None:
        self.calls = 0
        self.expires_at = expires_at

    async def verify(self, token: str) -> SandboxPrincipal:
        self.calls += 1
        return SandboxPrincipal(
            sandbox_id="pod-sb",
            kind="kubernetes",
            expires_at=self.expires_at,
            pod_name="sandbox-pod-sb",
            pod_uid=token,
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


async def test_a_deleted_sandbox_s_credentials_are_stale_whatever_their_kind(db: Database) -> None:
    authenticator, _ = auth(db)
    authenticator.use_kubernetes(PodTokens())
    store = SandboxStore(db)
    await store.create("one", driver="local")
    await store.create("pod-sb", driver="kubernetes")
    await store.set_spec("pod-sb", {}, pod_uid="uid-1")
    minted = (("authorization", f"Bearer {(await authenticator.tokens.mint('one', generation=1)).token}"),)
    pod = (("authorization", "Bearer uid-1"),)

    async def outcome(metadata: object, sandbox_id: str) -> Refusal | None:
        try:
            await authenticator.authenticate(metadata, sandbox_id=sandbox_id, method="M", peer="p")  # type: ignore[arg-type]
        except CredentialRefused as exc:
            return exc.reason
        return None

    # A failed create that did not take its registration back still runs nothing: accepted.
    await store.set_driver_state("one", {"phase": "Failed", "reason": "x"})
    assert await outcome(minted, "one") is None and await outcome(pod, "pod-sb") is None
    for deleted in ({"phase": "Deleted"}, {"phase": "Failed", "released": True}):
        await store.set_driver_state("one", deleted)
        await store.set_driver_state("pod-sb", deleted)
        # The rows and their generations stay; their credentials do not.
        assert await outcome(minted, "one") is Refusal.STALE
        assert await outcome(pod, "pod-sb") is Refusal.STALE


async def test_a_pod_token_binds_nothing_while_the_sandbox_has_no_pod_recorded(db: Database) -> None:
    authenticator, _ = auth(db)
    authenticator.use_kubernetes(PodTokens())
    store = SandboxStore(db)
    # A failed re-create leaves the row without a pod uid: a pod of that name that is not the
    # gateway's (a squatter) must not speak for it.
    await store.create("pod-sb", driver="kubernetes")
    with pytest.raises(CredentialRefused, match="no pod is recorded") as caught:
        await authenticator.authenticate(
            (("authorization", "Bearer uid-squatter"),), sandbox_id="pod-sb", method="M", peer="p"
        )
    assert caught.value.reason is Refusal.STALE


async def test_a_pod_token_before_the_kubernetes_driver_is_up_is_an_outage_not_a_refusal(
    db: Database,
) -> None:
    config = GatewayConfig.model_validate(
        {"drivers": {"kind": "kubernetes", "kubernetes": {"gateway_address": "gw.example:7070"}}}
    )
    authenticator = SupervisorAuthenticator(
        config, tokens=SandboxTokens(config.auth.supervisors, SigningKeyStore(db)), sandboxes=SandboxStore(db)
    )
    claims = {"iss": "https://kubernetes.default.svc", "aud": "x"}
    pod_token = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(CredentialRefused) as caught:
        await authenticator.authenticate(
            (("authorization", f"Bearer {pod_token}"),), sandbox_id="sb", method="M", peer="p"
        )
    assert caught.value.reason is Refusal.REVIEW_UNAVAILABLE
    assert caught.value.status is grpc.StatusCode.UNAVAILABLE


async def test_a_token_traded_for_a_pod_token_is_bound_to_that_pod_and_lives_no_longer(
    tmp_path: Path,
) -> None:
    """IssueSandboxToken on a real gateway (gRPC), the TokenReview stood in for: the minted token
    carries the pod's uid (its renewals too) and expires with the pod's token; once the sandbox's
    pod is another, it is refused."""
    gw = Gateway(
        gateway_config(
            tmp_path, {"auth": {"supervisors": {"required": True}}, "sessions": {"register_unknown": False}}
        )
    )
    await gw.start()
    try:
        assert gw._authenticator is not None
        pods = PodTokens(expires_at=time.time() + 120)
        gw._authenticator.use_kubernetes(pods)
        assert gw.db is not None
        store = SandboxStore(gw.db)
        await store.create("pod-sb", driver="kubernetes")
        await store.set_spec("pod-sb", {}, pod_uid="uid-1")
        async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
            stub = pb_grpc.OpenShellStub(channel)
            issued = await stub.IssueSandboxToken(
                pb.IssueSandboxTokenRequest(), metadata=(("authorization", "Bearer uid-1"),)
            )
            claims = jwt.decode(issued.token, options={"verify_signature": False})
            assert claims["pod_uid"] == "uid-1" and claims["gen"] == 1
            assert claims["exp"] <= pods.expires_at < time.time() + 3600  # not token_ttl_s (1 h)
            minted = (("authorization", f"Bearer {issued.token}"),)
            renewed = await stub.RefreshSandboxToken(pb.RefreshSandboxTokenRequest(), metadata=minted)
            assert jwt.decode(renewed.token, options={"verify_signature": False})["pod_uid"] == "uid-1"
            report = pb.ReportMainProcessExitRequest(sandbox_id="pod-sb", exit_code=0)
            await stub.ReportMainProcessExit(report, metadata=minted)
            # The sandbox's pod is replaced: the trade and its renewal go with the old pod.
            async with gw.db.engine.begin() as conn:
                await conn.execute(
                    update(sandboxes).where(sandboxes.c.id == "pod-sb").values(pod_uid="uid-2")
                )
            for metadata in (minted, (("authorization", f"Bearer {renewed.token}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ReportMainProcessExit(report, metadata=metadata)
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert (caught.value.details() or "").startswith("stale:")
    finally:
        await gw.stop()


async def test_the_token_file_refresher_says_why_it_failed_and_keeps_going(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.auth import sandbox_tokens
    from gateway.config import LocalDriverSettings
    from gateway.drivers.local import LocalProvisioner

    monkeypatch.setattr(sandbox_tokens, "RING_CACHE_S", 0.0)  # the damaged key is read at once
    authenticator, _ = auth(db)
    provisioner = LocalProvisioner(
        LocalDriverSettings(work_dir=tmp_path / "sandboxes"),
        SandboxStore(db),
        gateway_address="127.0.0.1:9",
        tokens=authenticator.tokens,
        token_ttl_s=0.6,  # rewritten every 0.2 s
    )
    provisioner.start()
    try:
        await provisioner.create(
            "loc", [sys.executable, "-c", "import time; time.sleep(60)"], image=None, env={}
        )
        path = tmp_path / "sandboxes" / "loc" / "gateway-token"
        # The signing key becomes unreadable (a new kid, so nothing of it is cached).
        async with db.engine.begin() as conn:
            kid, pem = (await conn.execute(select(signing_keys.c.kid, signing_keys.c.private_pem))).one()
            await conn.execute(update(signing_keys).values(kid="damaged", private_pem="not a key"))
        with caplog.at_level(logging.ERROR):
            for _ in range(100):
                if "cannot renew the token file of sandbox loc" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
        stuck = path.read_text()
        # Mended: the next rounds renew the file again (the refresher kept going).
        async with db.engine.begin() as conn:
            await conn.execute(update(signing_keys).values(kid=kid, private_pem=pem))
        for _ in range(100):
            if path.read_text() != stuck:
                break
            await asyncio.sleep(0.05)
        assert path.read_text() != stuck
    finally:
        # (Its supervisor is of no interest here: killed, not given the 10 s SIGTERM grace.)
        sandbox = provisioner.driver.get("loc")
        if sandbox is not None and sandbox.running:
            sandbox.process.kill()
            await sandbox.process.wait()
        await provisioner.close()  # never raises what the refresher met
