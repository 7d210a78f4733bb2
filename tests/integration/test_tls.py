"""TLS, mTLS and the bearer credential between the supervisor and the gateway, with real TLS.

A throwaway CA (tests/support/certs.py) signs a server certificate for 127.0.0.1 and a client
certificate. The end-to-end cases run our gateway and supervisor as processes and read what the
gateway stored from its database; the credential cases use a test-only gRPC server that records
the metadata of every ConnectSupervisor call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import Gateway, GatewayStartError
from gateway.config import GatewayConfig
from openshell_wire.configfile import ConfigError, load_settings
from openshell_wire.records import LogRecord, LogStream
from openshell_wire.v1 import openshell_pb2 as pb
from supervisor.agent import journal_options
from supervisor.config import SupervisorConfig
from supervisor.credentials import CredentialError, TokenFile
from supervisor.journal import Journal
from supervisor.session import Session
from tests.support.certs import Pki, make_pki
from tests.support.gateway import gateway_config
from tests.support.procs import GatewayProcess, SupervisorProcess, wait_until, writer_command


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _tls_gateway(tmp_path: Path, pki: Pki, *, mtls: bool = False) -> GatewayProcess:
    extra = [
        "--set", f"grpc.tls.cert_file={pki.server.cert}",
        "--set", f"grpc.tls.key_file={pki.server.key}",
    ]  # fmt: skip
    if mtls:
        extra += ["--set", f"grpc.tls.client_ca_file={pki.ca}"]
    return GatewayProcess(tmp_path / "gateway", extra=extra)


def _supervisor(
    tmp_path: Path, gw: GatewayProcess, sandbox_id: str, command: list[str], settings: list[str]
) -> SupervisorProcess:
    return SupervisorProcess(tmp_path / sandbox_id, sandbox_id, gw.address, command, settings=settings)


def _attempts_failed(sv: SupervisorProcess) -> int:
    return sv.log_text().count("gateway unreachable")


# -- real processes ------------------------------------------------------------------------


def test_supervisor_delivers_over_tls_with_a_ca_file_and_a_credential(
    tmp_path: Path, pki: Pki, supervisors: list[SupervisorProcess]
) -> None:
    gw = _tls_gateway(tmp_path, pki)
    token = tmp_path / "token"
    token.write_text("token-over-tls\n")
    try:
        gw.start()
        assert "gRPC over TLS" in gw.log_text()
        n = 200
        sv = _supervisor(
            tmp_path,
            gw,
            "tls-plain",
            writer_command(n, exit_code=4),
            ["gateway.tls=true", f"gateway.ca_file={pki.ca}", f"gateway.credential_file={token}"],
        )
        supervisors.append(sv)
        sv.start()
        assert sv.wait(timeout=60) == 4, sv.log_text()[-3000:]
        assert gw.log_lines("tls-plain") == [f"line {i}" for i in range(n)]
        assert "gateway credential loaded" in sv.log_text()
        # The gateway saw the credential on the call (its debug note), and never logs the token.
        assert "gRPC call with a credential" in gw.log_text()
        assert "token-over-tls" not in gw.log_text() + sv.log_text()
    finally:
        gw.stop()


def test_mtls_refuses_a_supervisor_without_a_client_certificate(
    tmp_path: Path, pki: Pki, supervisors: list[SupervisorProcess]
) -> None:
    gw = _tls_gateway(tmp_path, pki, mtls=True)
    try:
        gw.start()
        assert "client certificates required" in gw.log_text()
        anonymous = _supervisor(
            tmp_path, gw, "no-cert", writer_command(5), ["gateway.tls=true", f"gateway.ca_file={pki.ca}"]
        )
        supervisors.append(anonymous)
        anonymous.start()
        wait_until(lambda: _attempts_failed(anonymous) >= 3, timeout=30, what="refused attempts")
        assert anonymous.proc is not None and anonymous.proc.poll() is None, "it keeps retrying"
        assert gw.query("SELECT id FROM sandboxes") == [], "the gateway never saw a session"
        assert "session accepted" not in anonymous.log_text()
        anonymous.stop()

        n = 50
        sv = _supervisor(
            tmp_path,
            gw,
            "with-cert",
            writer_command(n),
            [
                "gateway.tls=true",
                f"gateway.ca_file={pki.ca}",
                f"gateway.cert_file={pki.client.cert}",
                f"gateway.key_file={pki.client.key}",
            ],
        )
        supervisors.append(sv)
        sv.start()
        assert sv.wait(timeout=60) == 0, sv.log_text()[-3000:]
        assert gw.log_lines("with-cert") == [f"line {i}" for i in range(n)]
        assert gw.query("SELECT id FROM sandboxes") == [("with-cert",)]
    finally:
        gw.stop()


def test_a_gateway_signed_by_another_ca_is_refused_and_retried(
    tmp_path: Path, pki: Pki, supervisors: list[SupervisorProcess]
) -> None:
    other = make_pki(tmp_path / "other-pki", ca_name="someone else's CA")
    gw = _tls_gateway(tmp_path, pki)
    try:
        gw.start()
        sv = _supervisor(
            tmp_path, gw, "wrong-ca", writer_command(5), ["gateway.tls=true", f"gateway.ca_file={other.ca}"]
        )
        supervisors.append(sv)
        sv.start()
        wait_until(lambda: _attempts_failed(sv) >= 3, timeout=30, what="failed attempts")
        text = sv.log_text()
        assert "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]
        assert "Traceback" not in text
        assert sv.proc is not None and sv.proc.poll() is None, "a verification failure is retried"
        assert gw.query("SELECT id FROM sandboxes") == []
    finally:
        gw.stop()


# -- the credential file, against a test-only server -----------------------------------------


class _RecordingGateway:
    """A TLS gRPC server whose ConnectSupervisor accepts, acknowledges, and records the
    ``authorization`` metadata of each call; ``end_stream`` ends the current stream."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.authorizations: list[str | None] = []
        self.end_stream = asyncio.Event()
        self.server: aio.Server | None = None
        self.port = 0

    async def _handler(
        self, requests: AsyncIterator[pb.SupervisorMessage], context: Any
    ) -> AsyncIterator[bytes]:
        metadata = dict(context.invocation_metadata() or ())
        self.authorizations.append(metadata.get("authorization"))
        hello = await anext(requests)
        accepted = pb.GatewayMessage()
        accepted.session_accepted.session_id = f"s{len(self.authorizations)}"
        accepted.session_accepted.heartbeat_interval_ms = 200
        accepted.session_accepted.capabilities.extend(["events", "resume"])
        yield accepted.SerializeToString()
        reader = asyncio.ensure_future(anext(requests))
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
                    ack = pb.GatewayMessage()
                    ack.event_ack.journal_epoch = hello.hello.journal_epoch
                    ack.event_ack.acked_through_sequence = msg.events.events[-1].sequence
                    yield ack.SerializeToString()
                reader = asyncio.ensure_future(anext(requests))
        finally:
            for task in (reader, ender):
                task.cancel()

    async def start(self) -> None:
        server = aio.server()
        rpc = grpc.stream_stream_rpc_method_handler(
            self._handler,
            request_deserializer=pb.SupervisorMessage.FromString,
            response_serializer=lambda b: b,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("openshell.v1.OpenShell", {"ConnectSupervisor": rpc})]
        )
        creds = grpc.ssl_server_credentials(
            [(self.pki.server.key.read_bytes(), self.pki.server.cert.read_bytes())]
        )
        self.port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


def _session(tmp_path: Path, port: int, pki: Pki, token: Path) -> tuple[Session, Journal]:
    config = load_settings(
        SupervisorConfig,
        overrides={
            "sandbox_id": "token-sandbox",
            "gateway": {
                "address": f"127.0.0.1:{port}",
                "connect_timeout_s": 2,
                "tls": True,
                "ca_file": str(pki.ca),
                # The certificate also names gateway.test: verify against that name, not the IP.
                "server_name": "gateway.test",
                "credential_file": str(token),
            },
            "journal": {"directory": str(tmp_path / "journal")},
            "session": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.3},
        },
        use_env=False,
    )
    journal = Journal.open(journal_options(config))
    return Session(config=config, journal=journal, instance_id="i1"), journal


def _replace(path: Path, text: str) -> None:
    """Write like a secret rotation: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def _running(session: Session, journal: Journal) -> AsyncIterator[asyncio.Task[None]]:
    runner = asyncio.create_task(session.run())
    try:
        yield runner
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        journal.close()


async def _until(predicate: Any, what: str, limit_s: float = 15) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - polls another task's status, nothing to wait on
            await asyncio.sleep(0.02)


async def test_a_rotated_credential_file_is_sent_on_the_next_connection(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    gw = _RecordingGateway(pki)
    await gw.start()
    token = tmp_path / "token"
    token.write_text("token-A\n")
    try:
        session, journal = _session(tmp_path, gw.port, pki, token)
        async with _running(session, journal):
            journal.append(LogRecord(LogStream.STDOUT, "first"))
            await asyncio.wait_for(session.wait_acked(journal.last_sequence), 15)
            assert gw.authorizations == ["Bearer token-A"]

            _replace(token, "token-B\n")
            gw.end_stream.set()
            await _until(lambda: len(gw.authorizations) >= 2, "the second connection")
            journal.append(LogRecord(LogStream.STDOUT, "second"))
            await asyncio.wait_for(session.wait_acked(journal.last_sequence), 15)
        assert gw.authorizations == ["Bearer token-A", "Bearer token-B"]
        assert "gateway credential reloaded" in caplog.text
        assert "token-B" not in caplog.text
    finally:
        await gw.stop()


async def test_a_missing_credential_file_fails_the_attempt_until_it_appears(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    gw = _RecordingGateway(pki)
    await gw.start()
    token = tmp_path / "token"
    try:
        session, journal = _session(tmp_path, gw.port, pki, token)
        async with _running(session, journal):
            await _until(lambda: session.status.attempts >= 3, "failed attempts")
            assert str(token) in session.status.last_error
            assert "No such file" in session.status.last_error
            assert gw.authorizations == [], "no connection without the credential"
            # Logged as an error once, not once per retry (each retry's warning carries the reason).
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "No such file" in errors[0].getMessage()

            token.write_text("")
            await _until(lambda: "empty" in session.status.last_error, "the empty file noticed")
            _replace(token, "late-token")
            journal.append(LogRecord(LogStream.STDOUT, "eventually"))
            await asyncio.wait_for(session.wait_acked(journal.last_sequence), 15)
        assert gw.authorizations == ["Bearer late-token"]
    finally:
        await gw.stop()


async def test_bad_tls_files_fail_the_attempt_with_the_path(tmp_path: Path, pki: Pki) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    for ca, reason in ((tmp_path / "missing.pem", "No such file"), (not_pem, "not a PEM file")):
        config = load_settings(
            SupervisorConfig,
            overrides={
                "sandbox_id": "bad-tls",
                "gateway": {"address": "127.0.0.1:1", "tls": True, "ca_file": str(ca)},
                "journal": {"directory": str(tmp_path / "journal")},
                "session": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.1},
            },
            use_env=False,
        )
        journal = Journal.open(journal_options(config))
        session = Session(config=config, journal=journal, instance_id="i1")
        async with _running(session, journal):
            await _until(lambda s=session: s.status.attempts >= 2, "failed attempts")
        assert session.status.last_error.startswith(f"gateway TLS CA bundle {ca}: ")
        assert reason in session.status.last_error


def test_token_file_follows_a_kubernetes_style_symlink_swap(tmp_path: Path) -> None:
    """A projected token: token -> ..data/token, ..data -> ..<timestamp>; rotation swaps ..data."""
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str, token: str) -> None:
        real = mount / f"..{version}"
        real.mkdir()
        (real / "token").write_text(token)
        # Same size and, within a coarse clock, possibly the same mtime: only the target differs.
        link = mount / "..data_tmp"
        link.symlink_to(real.name)
        os.replace(link, mount / "..data")

    publish("2024_01", "aaaa")
    (mount / "token").symlink_to("..data/token")
    tokens = TokenFile(mount / "token")
    assert tokens.token() == "aaaa"
    assert tokens.token() == "aaaa" and tokens.loads == 1, "an unchanged file is not read again"
    publish("2024_02", "bbbb")
    assert tokens.token() == "bbbb"
    assert tokens.loads == 2

    (mount / "..data").unlink()
    with pytest.raises(CredentialError, match=r"gateway credential .*token: No such file"):
        tokens.token()


# -- configuration ----------------------------------------------------------------------------


def test_client_certificate_without_key_is_a_clear_config_error(tmp_path: Path) -> None:
    base = {"sandbox_id": "cfg", "journal": {"directory": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"cert_file and key_file go together"):
        load_settings(
            SupervisorConfig,
            overrides={**base, "gateway": {"tls": True, "cert_file": "/c.pem"}},
            use_env=False,
        )
    with pytest.raises(ConfigError, match=r"ca_file need tls: true"):
        load_settings(SupervisorConfig, overrides={**base, "gateway": {"ca_file": "/ca.pem"}}, use_env=False)
    with pytest.raises(ConfigError, match=r"cert_file and key_file go together"):
        load_settings(GatewayConfig, overrides={"grpc": {"tls": {"key_file": "/k.pem"}}}, use_env=False)
    with pytest.raises(ConfigError, match=r"client_ca_file \(mTLS\) needs cert_file"):
        load_settings(
            GatewayConfig, overrides={"grpc": {"tls": {"client_ca_file": "/ca.pem"}}}, use_env=False
        )


async def test_gateway_with_an_unreadable_tls_file_does_not_start(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    config = load_settings(
        GatewayConfig,
        overrides={
            "grpc": {
                "listen": "127.0.0.1:0",
                "tls": {"cert_file": str(pki.server.cert), "key_file": str(missing)},
            },
            "http": {"listen": "127.0.0.1:0"},
            "ops": {"listen": "127.0.0.1:0"},
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        },
        use_env=False,
    )
    gateway = Gateway(config)
    with pytest.raises(GatewayStartError, match=rf"TLS key {missing}: No such file"):
        await gateway.start()


# -- the gateway's listeners: HTTPS, mTLS on both, rotation from disk ------------------------


def _tls(pair: Any, ca: Path | None = None) -> dict[str, str]:
    settings = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    if ca is not None:
        settings["client_ca_file"] = str(ca)
    return settings


@contextlib.asynccontextmanager
async def _tls_listeners(
    tmp_path: Path, grpc_tls: dict[str, str], http_tls: dict[str, str]
) -> AsyncIterator[Gateway]:
    config = gateway_config(tmp_path, {"grpc": {"tls": grpc_tls}, "http": {"tls": http_tls}})
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def _client_context(ca: Path | None, client: Any = None) -> ssl.SSLContext:
    if ca is None:  # only to read which certificate the server presents
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # gRPC servers want h2
    return ctx


async def _served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection to ``port`` is given."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_context(None))
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


async def _https_status(url: str, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as http, http.get(url, ssl=ctx) as resp:
        return resp.status


def _channel_credentials(ca: Path, client: Any = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client is not None else None,
        certificate_chain=client.cert.read_bytes() if client is not None else None,
    )


async def _grpc_health(port: int, ca: Path, client: Any = None) -> Any:
    async with aio.secure_channel(f"127.0.0.1:{port}", _channel_credentials(ca, client)) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_https_api_and_mtls_on_both_listeners(tmp_path: Path, pki: Pki) -> None:
    other = make_pki(tmp_path / "other-pki", ca_name="someone else's CA")
    mtls = _tls(pki.server, pki.ca)
    async with _tls_listeners(tmp_path, mtls, mtls) as gateway:
        url = f"{gateway.http_url}/api/v1/sandboxes"
        assert url.startswith("https://")
        assert await _https_status(url, _client_context(pki.ca, pki.client)) == 200
        for name, ctx in (
            ("no client certificate", _client_context(pki.ca)),
            ("a client certificate of another CA", _client_context(pki.ca, other.client)),
        ):
            with pytest.raises(aiohttp.ClientError):
                await _https_status(url, ctx)
                pytest.fail(f"HTTPS accepted {name}")
        with pytest.raises(aiohttp.ClientError):  # plaintext HTTP is not served there
            async with aiohttp.ClientSession() as http, http.get(url.replace("https", "http", 1)) as resp:
                await resp.read()

        assert (
            await _grpc_health(gateway.grpc_port, pki.ca, pki.client)
            == health_pb2.HealthCheckResponse.SERVING
        )
        for client in (None, other.client):
            with pytest.raises(aio.AioRpcError) as refused:
                await _grpc_health(gateway.grpc_port, pki.ca, client)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _secret_volume(root: Path) -> Path:
    """A directory laid out like a Kubernetes Secret volume: tls.crt and tls.key are symlinks
    through ``..data``, which is swapped atomically to a new timestamped directory."""
    root.mkdir()
    for name in ("tls.crt", "tls.key"):
        (root / name).symlink_to(f"..data/{name}")
    return root


def _publish(volume: Path, generation: int, cert: Path, key: Path) -> None:
    stamped = volume / f"..2026_{generation:02d}"
    stamped.mkdir()
    (stamped / "tls.crt").write_bytes(cert.read_bytes())
    (stamped / "tls.key").write_bytes(key.read_bytes())
    (volume / "..data_tmp").symlink_to(stamped.name)
    os.replace(volume / "..data_tmp", volume / "..data")


async def test_rotated_certificates_are_served_to_new_connections_and_a_broken_rotation_keeps_the_last(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.tls")
    second = make_pki(tmp_path / "second")
    third = make_pki(tmp_path / "third")
    volume = _secret_volume(tmp_path / "secret")
    _publish(volume, 1, pki.server.cert, pki.server.key)
    files = {"cert_file": str(volume / "tls.crt"), "key_file": str(volume / "tls.key")}
    async with _tls_listeners(tmp_path, files, files) as gateway:
        ports = {"gRPC": gateway.grpc_port, "HTTP": gateway.http_port}
        for port in ports.values():
            assert await _served_certificate(port) == _der(pki.server.cert)
        # An HTTP keep-alive connection made before the rotation.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        api = f"{gateway.http_url}/api/v1/sandboxes"
        old_ctx = _client_context(pki.ca)
        try:
            async with session.get(api, ssl=old_ctx) as resp:
                assert resp.status == 200

            _publish(volume, 2, second.server.cert, second.server.key)
            for listener, port in ports.items():
                assert await _served_certificate(port) == _der(second.server.cert), listener
            # The connection made before is untouched (the pool reuses it: a new handshake with
            # the old CA alone would fail now).
            async with session.get(api, ssl=old_ctx) as resp:
                assert resp.status == 200
        finally:
            await session.close()
        # The supervisors' side: a gRPC call verified against the new certificate's CA.
        assert await _grpc_health(gateway.grpc_port, second.ca) == health_pb2.HealthCheckResponse.SERVING

        # A rotation to a key that is not the certificate's: the last good pair stays in use.
        _publish(volume, 3, third.server.cert, second.server.key)
        for _ in range(3):
            for listener, port in ports.items():
                assert await _served_certificate(port) == _der(second.server.cert), listener
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2, errors  # once per listener, not once per handshake
        assert all("it is not the key of the certificate" in e for e in errors), errors
        assert {e.split(" TLS ")[0] for e in errors} == {"cannot use the gRPC", "cannot use the HTTP API"}

        # Half-written files are refused the same way.
        stamped = volume / "..2026_04"
        stamped.mkdir()
        (stamped / "tls.crt").write_bytes(third.server.cert.read_bytes()[:100])
        (stamped / "tls.key").write_bytes(third.server.key.read_bytes())
        (volume / "..data_tmp").symlink_to(stamped.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        for listener, port in ports.items():
            assert await _served_certificate(port) == _der(second.server.cert), listener

        # The next good rotation is picked up: nothing was given up for good.
        _publish(volume, 5, third.server.cert, third.server.key)
        for listener, port in ports.items():
            assert await _served_certificate(port) == _der(third.server.cert), listener
        assert await _grpc_health(gateway.grpc_port, third.ca) == health_pb2.HealthCheckResponse.SERVING


async def test_a_gateway_with_a_mismatched_http_key_does_not_start(tmp_path: Path, pki: Pki) -> None:
    config = gateway_config(
        tmp_path, {"http": {"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.client.key)}}}
    )
    with pytest.raises(GatewayStartError, match=rf"HTTP API TLS key {pki.client.key}: it is not the key"):
        await Gateway(config).start()


def _https_get(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, bool, Any]:
    """One blocking HTTPS request to the gateway's API, offering ``session`` for resumption: its
    status line ("" when the handshake or the request was refused), whether the session was
    resumed, and the session to offer next time."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="gateway.test", session=session) as conn,
        ):
            conn.sendall(b"GET /api/v1/sandboxes HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            return data.split(b"\r\n")[0], conn.session_reused, conn.session
    except (ssl.SSLError, OSError):
        return b"", False, None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
async def test_a_client_ca_removed_from_the_http_bundle_cannot_resume_its_sessions(
    tmp_path: Path, pki: Pki, version: ssl.TLSVersion
) -> None:
    """Rotating ``client_ca_file`` shuts out the removed CA's clients on the HTTP API, also those
    that offer a session of before the rotation (a resumed handshake is not verified again)."""
    other = make_pki(tmp_path / "other-pki", ca_name="the next client CA")
    bundle = tmp_path / "client-ca.pem"
    bundle.write_bytes(pki.ca.read_bytes())
    first = _client_context(pki.ca, pki.client)
    first.set_alpn_protocols(["http/1.1"])
    first.maximum_version = version
    async with _tls_listeners(tmp_path, _tls(pki.server), _tls(pki.server, bundle)) as gateway:
        port = gateway.http_port
        line, _, session = await asyncio.to_thread(_https_get, port, first)
        if version is ssl.TLSVersion.TLSv1_2:
            # mTLS on the HTTP API is TLS 1.3 only: TLS 1.2 resumes by session ID from a cache
            # Python cannot turn off.
            assert line == b"", line
            return
        assert line == b"HTTP/1.1 200 OK", line
        # No resumption even before a rotation: nothing to resume after one.
        line, resumed, session = await asyncio.to_thread(_https_get, port, first, session)
        assert (line, resumed) == (b"HTTP/1.1 200 OK", False)

        bundle.write_bytes(other.ca.read_bytes())
        line, resumed, _ = await asyncio.to_thread(_https_get, port, first, session)
        assert (line, resumed) == (b"", False), "the removed CA's client got in"
        line, _, _ = await asyncio.to_thread(_https_get, port, first)
        assert line == b"", line
        nxt = _client_context(pki.ca, other.client)
        nxt.set_alpn_protocols(["http/1.1"])
        line, _, _ = await asyncio.to_thread(_https_get, port, nxt)
        assert line == b"HTTP/1.1 200 OK", line
