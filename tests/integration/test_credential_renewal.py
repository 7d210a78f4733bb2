"""The supervisor's sandbox token over real gRPC: renewed over the session (RefreshSandboxToken)
and used after the original one expired, the renewal stopped by a gateway that cannot renew, and a
refused credential treated as a refusal, not an outage (long backoff, a fixed file used at once,
nothing lost).

Most cases run against a small in-process gateway that mints JWT-shaped tokens with a lifetime of
seconds (the real gateway's least is 60 s); the last one runs against the real gateway process
with enforcement on, with a token minted from its own keys near the end of its life.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc import aio

from gateway.auth.sandbox_tokens import LEEWAY_S, SandboxTokens
from gateway.config import SupervisorAuthSettings
from gateway.store.db import Database
from gateway.store.signing_keys import SigningKeyStore
from openshell_wire.configfile import load_settings
from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from supervisor.agent import journal_options
from supervisor.config import SupervisorConfig
from supervisor.credentials import RENEWED_TOKEN_FILE, jwt_times
from supervisor.journal import Journal
from supervisor.session import Session
from tests.support.procs import GatewayProcess, SupervisorProcess, free_port

SANDBOX = "renewal"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bearer(context: aio.ServicerContext[object, object]) -> str:
    value = dict(context.invocation_metadata() or ()).get("authorization", "")
    text = value.decode() if isinstance(value, bytes) else value
    return text.removeprefix("Bearer ")


class _MintingGateway(pb_grpc.OpenShellServicer):
    """Mints JWT-shaped tokens living ``ttl_s`` and accepts a call only with one of them that has
    not expired (by its own record, not the token's claims). ``refresh_code`` set: RefreshSandboxToken
    ends with it instead. ``upstream``: a gateway without the events capability, whose
    PushSandboxLogs ends with ``push_code`` when that is set."""

    def __init__(
        self,
        *,
        ttl_s: float,
        refresh_code: grpc.StatusCode | None = None,
        refuse: str = "",
        upstream: bool = False,
        push_code: grpc.StatusCode | None = None,
        on_refusal: Callable[[], None] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        #: Called before each refusal of a token (the test rotates the file while it is on).
        self.on_refusal = on_refusal
        self.refresh_code = refresh_code
        self.refuse = refuse
        self.upstream = upstream
        self.push_code = push_code
        self.expiry: dict[str, float] = {}
        #: (time, token) of every ConnectSupervisor and RefreshSandboxToken call.
        self.connects: list[tuple[float, str]] = []
        self.refreshes: list[tuple[float, str]] = []
        self.pushes = 0
        self.end_stream = asyncio.Event()
        self.delivered: list[str] = []

    def mint(self, *, issued_ago_s: float = 0.0) -> str:
        now = time.time()
        exp = now - issued_ago_s + self.ttl_s
        claims = {"sandbox_id": SANDBOX, "iat": now - issued_ago_s, "exp": exp, "jti": uuid.uuid4().hex}
        header = _b64(json.dumps({"alg": "none"}).encode())
        token = f"{header}.{_b64(json.dumps(claims).encode())}.sig"
        self.expiry[token] = exp
        return token

    async def _check(self, context: aio.ServicerContext[object, object]) -> str:
        token = _bearer(context)
        if self.on_refusal is not None and (self.refuse or token not in self.expiry):
            self.on_refusal()
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.refuse)
        if token not in self.expiry:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a token of ours")
        if self.expiry[token] <= time.time():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token has expired")
        return token

    async def RefreshSandboxToken(
        self, request: pb.RefreshSandboxTokenRequest, context: aio.ServicerContext[object, object]
    ) -> pb.RefreshSandboxTokenResponse:
        self.refreshes.append((time.time(), _bearer(context)))
        if self.refresh_code is not None:
            await context.abort(self.refresh_code, "this gateway does not renew sandbox tokens")
        await self._check(context)
        token = self.mint()
        return pb.RefreshSandboxTokenResponse(token=token, expires_at_ms=int(self.expiry[token] * 1000))

    async def ConnectSupervisor(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GatewayMessage]:
        self.connects.append((time.time(), _bearer(context)))
        await self._check(context)
        hello = await anext(request_iterator)
        accepted = pb.GatewayMessage()
        accepted.session_accepted.session_id = f"s{len(self.connects)}"
        accepted.session_accepted.heartbeat_interval_ms = 300
        if not self.upstream:
            accepted.session_accepted.capabilities.extend(["events", "resume"])
        yield accepted
        reader = asyncio.ensure_future(anext(request_iterator))
        ender = asyncio.ensure_future(self.end_stream.wait())
        try:
            while True:
                await asyncio.wait({reader, ender}, return_when=asyncio.FIRST_COMPLETED)
                if ender.done():
                    self.end_stream.clear()
                    return
                try:
                    msg = reader.result()
                except StopAsyncIteration:
                    return
                if msg.WhichOneof("payload") == "events":
                    self.delivered.extend(e.log.message for e in msg.events.events if e.HasField("log"))
                    ack = pb.GatewayMessage()
                    ack.event_ack.journal_epoch = hello.hello.journal_epoch
                    ack.event_ack.acked_through_sequence = msg.events.events[-1].sequence
                    yield ack
                elif msg.WhichOneof("payload") == "heartbeat":
                    beat = pb.GatewayMessage()
                    beat.heartbeat.echo_unix_ms = msg.heartbeat.sent_unix_ms
                    yield beat
                reader = asyncio.ensure_future(anext(request_iterator))
        finally:
            for task in (reader, ender):
                task.cancel()

    async def PushSandboxLogs(
        self,
        request_iterator: AsyncIterator[pb.PushSandboxLogsRequest],
        context: aio.ServicerContext[object, object],
    ) -> pb.PushSandboxLogsResponse:
        self.pushes += 1
        if self.push_code is not None:
            await context.abort(self.push_code, "sandbox renewal is not yours")
        await self._check(context)
        async for request in request_iterator:
            self.delivered.extend(line.message for line in request.logs)
        return pb.PushSandboxLogsResponse()


def _config(tmp_path: Path, address: str, **session: object) -> SupervisorConfig:
    return load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": SANDBOX,
            "gateway": {
                "address": address,
                "connect_timeout_s": 2,
                "credential_file": str(tmp_path / "token"),
            },
            "journal": {"directory": str(tmp_path / "journal")},
            "session": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.5, **session},
        },
        use_env=False,
    )


def _replace(path: Path, text: str) -> None:
    """Write like a secret rotation: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def _running(config: SupervisorConfig) -> AsyncIterator[tuple[Session, Journal]]:
    journal = Journal.open(journal_options(config))
    session = Session(config=config, journal=journal, instance_id="i1")
    runner = asyncio.create_task(session.run())
    try:
        yield session, journal
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        journal.close()


@contextlib.asynccontextmanager
async def _serving(servicer: _MintingGateway) -> AsyncIterator[str]:
    server = aio.server()
    pb_grpc.add_OpenShellServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _until(predicate: Callable[[], object], what: str, limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _delivered(session: Session, journal: Journal, message: str, limit_s: float = 15) -> None:
    journal.append(LogRecord(LogStream.STDOUT, message))
    await asyncio.wait_for(session.wait_acked(journal.last_sequence), limit_s)


# -- renewal -----------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", [False, True], ids=["events", "upstream"])
async def test_the_token_is_renewed_over_the_session_and_outlives_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, upstream: bool
) -> None:
    caplog.set_level(logging.DEBUG, logger="supervisor")
    gw = _MintingGateway(ttl_s=2.0, upstream=upstream)
    first = gw.mint()
    (tmp_path / "token").write_text(first + "\n")
    async with _serving(gw) as address, _running(_config(tmp_path, address)) as (session, journal):
        await _delivered(session, journal, "before")
        # Renewed at about 80 % of the 2 s, more than once, each time with the token then current.
        await _until(lambda: len(gw.refreshes) >= 2, "two renewals")
        assert gw.refreshes[0][1] == first
        assert gw.refreshes[0][0] - gw.expiry[first] < 0, "renewed before it expired"
        assert gw.refreshes[1][1] != first, "the second renewal sends the renewed token"
        await _until(lambda: time.time() > gw.expiry[first] + 0.3, "the first token's expiry")
        # The session's calls (the upstream path's PushSandboxLogs) send the renewed token, and
        # after a reconnect the stream opens with it: the first would be refused.
        await _delivered(session, journal, "after expiry")
        gw.end_stream.set()
        await _until(lambda: len(gw.connects) >= 2 and session.status.state == "connected", "a reconnect")
        await _delivered(session, journal, "after the reconnect")
        assert gw.connects[-1][1] != first
        assert session.status.auth_refusals == 0, session.status
        assert session.status.credential_renewals >= 2
        stored = tmp_path / "journal" / RENEWED_TOKEN_FILE
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        stored_times = jwt_times(stored.read_text().strip())
        assert stored_times is not None and stored_times.expires_at > gw.expiry[first]
    assert {"before", "after expiry", "after the reconnect"} <= set(gw.delivered)
    assert "gateway credential renewed" in caplog.text
    for token in gw.expiry:
        assert token not in caplog.text, "a token in the log"


async def test_a_restarted_supervisor_starts_from_the_renewed_token(tmp_path: Path) -> None:
    gw = _MintingGateway(ttl_s=2.0)
    first = gw.mint()
    (tmp_path / "token").write_text(first)
    async with _serving(gw) as address:
        config = _config(tmp_path, address)
        async with _running(config) as (session, journal):
            await _until(lambda: len(gw.expiry) >= 2, "a renewal")
        await _until(lambda: time.time() > gw.expiry[first], "the first token's expiry")
        # A new supervisor process (same journal directory, the credential file unchanged).
        async with _running(config) as (session, journal):
            await _delivered(session, journal, "restarted")
        assert gw.connects[-1][1] != first
        assert session.status.auth_refusals == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION])
async def test_a_gateway_that_cannot_renew_stops_the_renewal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: grpc.StatusCode
) -> None:
    gw = _MintingGateway(ttl_s=30.0, refresh_code=code)
    # Near the end of its life: due for renewal at once.
    (tmp_path / "token").write_text(gw.mint(issued_ago_s=27))
    async with _serving(gw) as address, _running(_config(tmp_path, address)) as (session, journal):
        await _until(lambda: gw.refreshes, "a renewal attempt")
        await _delivered(session, journal, "still delivered")
        await asyncio.sleep(1.0)
        gw.end_stream.set()  # a new session does not try that token again either
        await _until(lambda: len(gw.connects) >= 2 and session.status.state == "connected", "a reconnect")
        await asyncio.sleep(0.5)
        assert len(gw.refreshes) == 1, gw.refreshes
        assert session.status.sessions == 2 and session.status.auth_refusals == 0
    said = [r for r in caplog.records if "does not renew our credential" in r.getMessage()]
    assert len(said) == 1 and code.name in said[0].getMessage()


# -- refusals --------------------------------------------------------------------------------------


async def test_a_refused_credential_waits_the_long_backoff_until_the_file_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = _MintingGateway(ttl_s=60.0)
    token = tmp_path / "token"
    token.write_text("revoked-token-value\n")
    async with (
        _serving(gw) as address,
        _running(_config(tmp_path, address, reconnect_max_s=30.0)) as (session, journal),
    ):
        for i in range(50):
            journal.append(LogRecord(LogStream.STDOUT, f"line {i}"))
        await _until(lambda: gw.connects, "the first attempt")
        await _until(lambda: session.status.state == "backoff", "the backoff")
        # Not retried within a second (before: every reconnect_initial_s, 0.05 s here).
        await asyncio.sleep(1.5)
        assert len(gw.connects) == 1, [t for t, _ in gw.connects]
        status = session.status
        assert status.last_error == "gateway refused our credential: UNAUTHENTICATED: not a token of ours"
        assert status.credential_refused == status.last_error
        assert status.auth_refusals == 1
        # The gateway answered: not offline (the offline policy would stop a healthy sandbox).
        assert status.offline_since is None
        assert journal.acked_through == 0, "nothing trimmed meanwhile"

        # A fixed file is used within about a second, not after the 30 s backoff.
        _replace(token, gw.mint())
        await asyncio.wait_for(session.wait_acked(journal.last_sequence), 5)
        assert session.status.credential_refused == ""
    assert gw.delivered == [f"line {i}" for i in range(50)]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["gateway refused our credential: UNAUTHENTICATED: not a token of ours"]
    assert "revoked-token-value" not in caplog.text


async def test_an_upstream_call_refused_for_the_credential_is_a_refusal(tmp_path: Path) -> None:
    gw = _MintingGateway(ttl_s=60.0, upstream=True, push_code=grpc.StatusCode.PERMISSION_DENIED)
    (tmp_path / "token").write_text(gw.mint())
    async with (
        _serving(gw) as address,
        _running(_config(tmp_path, address, reconnect_max_s=30.0)) as (
            session,
            journal,
        ),
    ):
        journal.append(LogRecord(LogStream.STDOUT, "refused"))
        await _until(lambda: gw.pushes, "the refused push")
        # Not retried within a second (before: at once, as after any failed call).
        await asyncio.sleep(1.5)
        assert len(gw.connects) == 1 and gw.pushes == 1
        assert session.status.last_error == (
            "gateway refused our credential: PERMISSION_DENIED: sandbox renewal is not yours"
        )
        assert session.status.auth_refusals == 1
        assert journal.acked_through == 0


async def test_an_outage_after_a_refusal_follows_the_normal_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, then the gateway goes away (restarted while it is fixed, say): the attempts
    against the dead gateway follow the normal backoff, not a retry every second."""
    caplog.set_level(logging.INFO, logger="supervisor")
    gw = _MintingGateway(ttl_s=600.0, refuse="credential not accepted")
    token = tmp_path / "token"
    token.write_text(gw.mint())
    changed = "the gateway credential file changed"
    serving = _serving(gw)
    address = await serving.__aenter__()
    try:
        config = _config(tmp_path, address, reconnect_initial_s=20.0, reconnect_max_s=60.0)
        async with _running(config) as (session, _):
            await _until(lambda: session.status.auth_refusals == 1, "the refusal")
            await serving.__aexit__(None, None, None)  # the gateway is gone (its port closed)
            serving = None
            # A new file ends the refused wait: one attempt, against the dead gateway.
            _replace(token, gw.mint())
            await _until(lambda: session.status.attempts == 2, "the attempt with the new file", 5)
            await _until(lambda: session.status.state == "backoff", "the backoff")
            assert session.status.last_error.startswith("UNAVAILABLE"), session.status.last_error
            await asyncio.sleep(4.5)
            # Backoff from 20 s (full jitter): one more attempt at most in 4.5 s, not one a second.
            assert session.status.attempts <= 3, session.status
            said = [r.getMessage() for r in caplog.records if changed in r.getMessage()]
            assert len(said) == 1, said  # only the real change
            # Health says what the last attempt found: an outage, not a refusal.
            assert session.status.credential_refused == ""
    finally:
        if serving is not None:
            await serving.__aexit__(None, None, None)


async def test_a_refused_stored_token_gives_way_to_the_credential_file(tmp_path: Path) -> None:
    """A renewed token in the journal directory that the gateway no longer accepts (an earlier
    sandbox of the same directory), expiring later than the good file's: the file is tried next,
    not after the stored one expires, and the stored one is forgotten."""
    gw = _MintingGateway(ttl_s=600.0)
    stale = _MintingGateway(ttl_s=3000.0).mint()
    stored = tmp_path / "journal" / RENEWED_TOKEN_FILE
    stored.parent.mkdir(parents=True)
    stored.write_text(stale)
    good = gw.mint()
    (tmp_path / "token").write_text(good)
    async with _serving(gw) as address:
        config = _config(tmp_path, address, reconnect_max_s=30.0)
        async with _running(config) as (session, journal):
            await _delivered(session, journal, "with the file's token", 5)
            assert [t for _, t in gw.connects] == [stale, good]
            assert session.status.auth_refusals == 1 and session.status.credential_refused == ""
            assert not stored.exists(), "the refused stored token is forgotten"
            # The next reconnect starts from the file's token: no second refusal.
            gw.end_stream.set()
            await _until(lambda: len(gw.connects) == 3 and session.status.state == "connected", "a reconnect")
            assert gw.connects[-1][1] == good and session.status.auth_refusals == 1


async def test_a_file_rotated_while_the_refused_attempt_was_on_is_tried_at_once(tmp_path: Path) -> None:
    """The operator replaces the file after the supervisor read it but before the gateway's
    refusal arrived: the new file is not taken for the refused one."""
    token = tmp_path / "token"
    token.write_text("revoked-token-value\n")
    gw = _MintingGateway(ttl_s=600.0)

    def rotate() -> None:  # once, while the first attempt is being refused
        if token.read_text().strip() == "revoked-token-value":
            _replace(token, gw.mint())

    gw.on_refusal = rotate
    async with (
        _serving(gw) as address,
        _running(_config(tmp_path, address, reconnect_max_s=30.0)) as (session, journal),
    ):
        await _delivered(session, journal, "with the rotated file", 5)
        assert session.status.auth_refusals == 1 and len(gw.connects) == 2


async def test_a_refused_renewal_is_a_refusal_and_ends_the_renewal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = _MintingGateway(ttl_s=30.0, refresh_code=grpc.StatusCode.PERMISSION_DENIED)
    (tmp_path / "token").write_text(gw.mint(issued_ago_s=27))  # due for renewal at once
    async with _serving(gw) as address, _running(_config(tmp_path, address)) as (session, journal):
        await _until(lambda: gw.refreshes, "a renewal attempt")
        await _until(lambda: session.status.auth_refusals == 1, "the refusal counted")
        reason = (
            "gateway refused to renew our credential: PERMISSION_DENIED: "
            "this gateway does not renew sandbox tokens"
        )
        assert session.status.credential_refused == reason  # a health reason while it lasts
        await _delivered(session, journal, "still delivered")  # the session goes on
        # Not retried (before: every reconnect_initial_s, 0.05 s here, until it expired).
        await asyncio.sleep(1.0)
        assert len(gw.refreshes) == 1, gw.refreshes
        assert session.status.state == "connected"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == [reason], said  # once


# -- the real gateway ------------------------------------------------------------------------------


async def _mint_near_expiry(gateway: GatewayProcess, *, ttl_s: int, left_s: float) -> str:
    """A token of SANDBOX signed with the gateway's own keys, issued so that ``left_s`` of its
    ``ttl_s`` remain (the gateway's least ttl is 60 s: this test waits for the rest only)."""
    db = await Database.open(f"sqlite+aiosqlite:///{gateway.db_path}", migrate=False)
    try:
        tokens = SandboxTokens(
            SupervisorAuthSettings(token_ttl_s=ttl_s),
            SigningKeyStore(db),
            clock=lambda: time.time() - (ttl_s - left_s),
        )
        minted = await tokens.mint(SANDBOX, generation=1)
    finally:
        await db.close()
    return minted.token


async def test_the_real_gateway_renews_the_token_and_the_session_outlives_it(tmp_path: Path) -> None:
    gateway = GatewayProcess(
        tmp_path / "gateway",
        extra=["--set", "auth.supervisors.required=true", "--set", "auth.supervisors.token_ttl_s=60"],
    )
    try:
        gateway.start()
        first = await _mint_near_expiry(gateway, ttl_s=60, left_s=2)
        first_exp = jwt_times(first)
        assert first_exp is not None
        (tmp_path / "token").write_text(first)
        async with _running(_config(tmp_path, gateway.address)) as (session, journal):
            await _delivered(session, journal, "with the first token")
            # Past the first token's expiry (and the gateway's leeway for clock skew), the gateway
            # restarts: the supervisor reconnects with the renewed token (the first is refused).
            await _until(
                lambda: time.time() > first_exp.expires_at + LEEWAY_S + 1, "the first token's expiry", 45
            )
            gateway.kill()
            await _until(lambda: session.status.state != "connected", "the session's end")
            gateway.start()
            await _until(lambda: session.status.sessions >= 2, "the session after the restart", 20)
            await _delivered(session, journal, "with the renewed token")
            assert session.status.auth_refusals == 0, session.status
            assert session.status.credential_renewals >= 1
        assert "refused" not in gateway.log_text()
        assert {"with the first token", "with the renewed token"} <= set(gateway.log_lines(SANDBOX))
        # The first token is refused by now: the session above lived on the renewed one.
        async with aio.insecure_channel(gateway.address) as channel:
            with pytest.raises(aio.AioRpcError) as refused:
                await pb_grpc.OpenShellStub(channel).RefreshSandboxToken(
                    pb.RefreshSandboxTokenRequest(),
                    metadata=(("authorization", f"Bearer {first}"),),
                    timeout=5,
                )
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, refused.value
    finally:
        gateway.stop()


async def test_a_supervisor_refused_by_the_real_gateway_says_so_until_its_file_is_fixed(
    tmp_path: Path,
) -> None:
    """The supervisor process end to end: the refusal in /status, as a health reason and in
    /metrics, logged once, and a fixed credential file taken up without a restart."""
    gateway = GatewayProcess(tmp_path / "gateway", extra=["--set", "auth.supervisors.required=true"])
    port = free_port()
    token = tmp_path / "token"
    token.write_text("not-a-token-of-this-gateway\n")
    sv = SupervisorProcess(
        tmp_path / "sv",
        SANDBOX,
        gateway.address,
        [sys.executable, "-u", "-c", "import time; print('up', flush=True); time.sleep(60)"],
        settings=[
            "http.enabled=true",
            f"http.listen=127.0.0.1:{port}",
            "health.check_interval_s=0.2",
            f"gateway.credential_file={token}",
            "session.reconnect_max_s=30",
        ],
    )
    try:
        gateway.start()
        sv.start()
        async with aiohttp.ClientSession() as http:

            async def status() -> dict[str, object]:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/status") as resp:
                        doc: dict[str, object] = await resp.json()
                        return doc
                return {}

            def reasons(doc: dict[str, object]) -> list[str]:
                health = doc.get("health")
                return list(health.get("reasons", [])) if isinstance(health, dict) else []

            doc: dict[str, object] = {}

            async def refused() -> bool:
                nonlocal doc
                doc = await status()
                return any(r.startswith("gateway refused our credential") for r in reasons(doc))

            deadline = time.monotonic() + 20
            while not await refused():
                assert time.monotonic() < deadline, doc
                await asyncio.sleep(0.1)
            session = doc["session"]
            assert isinstance(session, dict)
            assert session["last_error"] == (
                "gateway refused our credential: UNAUTHENTICATED: malformed: not a JWT"
            ), session
            health = doc["health"]
            assert isinstance(health, dict) and health["state"] == "degraded", health
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
                assert 'openshell_supervisor_auth_refusals_total{code="UNAUTHENTICATED"} 1.0' in text
                assert 'openshell_supervisor_auth_refusals_total{code="PERMISSION_DENIED"} 0.0' in text

            # Fixed: the new file is tried within about a second, not after the 30 s backoff.
            _replace(token, await _mint_near_expiry(gateway, ttl_s=60, left_s=60))
            deadline = time.monotonic() + 10
            while (await status()).get("session", {}).get("state") != "connected":  # type: ignore[union-attr]
                assert time.monotonic() < deadline, await status()
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 10
            while await refused():
                assert time.monotonic() < deadline, doc
                await asyncio.sleep(0.1)
        await _until(lambda: "up" in gateway.log_lines(SANDBOX), "the main process's line at the gateway")
        log = sv.log_text()
        said = [
            line for line in log.splitlines() if "error" in line and "gateway refused our credential" in line
        ]
        assert len(said) == 1, log  # once, however many attempts
        assert "not-a-token-of-this-gateway" not in log
    finally:
        sv.stop()
        gateway.stop()
