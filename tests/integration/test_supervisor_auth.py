"""Supervisor identity end to end: a real gateway with auth required (register_unknown off, 60 s
tokens) creates sandboxes through its API with the local driver; their real supervisors connect
with the tokens it minted, and every bad credential is refused with its status and reason,
counted, and stores nothing.

Bad tokens are made the way an attacker with a copy of the database's public material, or a
leaked key, would: signed by the gateway's own key read from its database (expired, wrong
audience or issuer, another sandbox), by a key of its own under the gateway's kid (forged), or
with ``alg: none``.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import stat
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from tests.support.procs import GatewayProcess, wait_until

AGENT = "import time\nprint('agent up', flush=True)\nwhile True: time.sleep(1)\n"
Metadata = Sequence[tuple[str, str]]


def _http(method: str, url: str, body: object | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Env:
    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.channel = grpc.insecure_channel(gateway.address)
        self.stub = pb_grpc.OpenShellStub(self.channel)
        self.api = f"http://127.0.0.1:{gateway.http_port}/api/v1"

    def create(self, sandbox_id: str) -> dict[str, Any]:
        status, body = _http(
            "POST",
            f"{self.api}/sandboxes",
            {"id": sandbox_id, "command": [sys.executable, "-u", "-c", AGENT]},
        )
        assert status == 201, body
        wait_until(
            lambda: "agent up" in self.gateway.log_lines(sandbox_id),
            timeout=30,
            what=f"sandbox {sandbox_id}'s supervisor delivers its agent's output",
        )
        return body

    def delete(self, sandbox_id: str) -> None:
        status, body = _http("DELETE", f"{self.api}/sandboxes/{sandbox_id}")
        assert status == 202, body

    def token_file(self, sandbox_id: str) -> Path:
        return self.gateway.workdir / "var/openshell/sandboxes" / sandbox_id / "gateway-token"

    def token_of(self, sandbox_id: str) -> str:
        return self.token_file(sandbox_id).read_text().strip()

    def signing_key(self) -> tuple[str, str]:
        """The kid and private PEM of the gateway's newest key, from its database."""
        with sqlite3.connect(self.gateway.db_path) as db:
            kid, pem = db.execute(
                "SELECT kid, private_pem FROM signing_keys ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
        return str(kid), str(pem)

    def refusals(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.ops_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("openshell_gateway_supervisor_auth_refusals_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                counts[reason] = float(line.rsplit(" ", 1)[1])
        return counts

    # -- the three supervisor calls, each answering None (accepted) or the refusal ----------

    def exit_report(self, sandbox_id: str, metadata: Metadata | None, code: int = 77) -> grpc.RpcError | None:
        try:
            self.stub.ReportMainProcessExit(
                pb.ReportMainProcessExitRequest(sandbox_id=sandbox_id, instance_id="forger", exit_code=code),
                metadata=metadata,
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc
        return None

    def push(self, requests: Sequence[tuple[str, str]], metadata: Metadata | None) -> grpc.RpcError | None:
        messages = [
            pb.PushSandboxLogsRequest(
                sandbox_id=sandbox_id,
                logs=[pb.SandboxLogLine(message=line, level="info", target="stdout", source="sandbox")],
            )
            for sandbox_id, line in requests
        ]
        try:
            self.stub.PushSandboxLogs(iter(messages), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc
        return None

    def refresh(self, metadata: Metadata | None) -> str:
        answer = self.stub.RefreshSandboxToken(pb.RefreshSandboxTokenRequest(), metadata=metadata, timeout=10)
        assert answer.expires_at_ms > time.time() * 1000
        return str(answer.token)

    def refresh_error(self, metadata: Metadata | None) -> grpc.RpcError | None:
        try:
            self.refresh(metadata)
        except grpc.RpcError as exc:
            return exc
        return None

    def hello(self, sandbox_id: str, metadata: Metadata | None) -> grpc.RpcError | pb.GatewayMessage:
        msg = pb.SupervisorMessage()
        msg.hello.sandbox_id = sandbox_id
        msg.hello.instance_id = "forger"
        call = self.stub.ConnectSupervisor(iter([msg]), metadata=metadata, timeout=10)
        try:
            first: pb.GatewayMessage = next(call)
        except grpc.RpcError as exc:
            return exc
        call.cancel()
        return first


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def claims(sandbox_id: str, generation: int = 1, **changes: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "iss": "openshell-gateway",
        "aud": "openshell-sandbox",
        "sub": f"spiffe://openshell/sandbox/{sandbox_id}",
        "sandbox_id": sandbox_id,
        "gen": generation,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    base.update(changes)
    return base


def refused(answer: object, code: grpc.StatusCode, reason: str) -> None:
    assert isinstance(answer, grpc.RpcError), f"accepted: {answer!r}"
    assert answer.code() == code, (answer.code(), answer.details())
    details = answer.details() or ""
    assert details.startswith(f"{reason}:"), details


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("auth") / "gateway", auth=True)
    gateway.start()
    environment = Env(gateway)
    try:
        yield environment
    finally:
        environment.channel.close()
        gateway.stop()


def test_a_sandbox_created_through_the_api_connects_with_its_minted_token(env: Env) -> None:
    env.create("alpha")
    path = env.token_file("alpha")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    header = jwt.get_unverified_header(env.token_of("alpha"))
    assert header["alg"] == "EdDSA" and header["kid"] == env.signing_key()[0]
    assert jwt.decode(env.token_of("alpha"), options={"verify_signature": False})["gen"] == 1
    # Its own token lets a call through for its own sandbox.
    assert env.exit_report("alpha", bearer(env.token_of("alpha")), code=0) is None
    # Health stays open (probes and upstream peers ask it without a credential).
    assert env.stub.Health(pb.HealthRequest(), timeout=10).status == pb.SERVICE_STATUS_HEALTHY


def test_bad_credentials_are_refused_with_their_reason_and_counted(env: Env) -> None:
    env.create("bravo")
    kid, pem = env.signing_key()
    before = env.refusals()
    forger = Ed25519PrivateKey.generate()
    now = int(time.time())
    cases: list[tuple[str, Metadata | None, grpc.StatusCode]] = [
        ("missing", None, grpc.StatusCode.UNAUTHENTICATED),
        ("malformed", (("authorization", "Bearer not-a-jwt"),), grpc.StatusCode.UNAUTHENTICATED),
        ("malformed", (("authorization", "Basic dXNlcjpwYXNz"),), grpc.StatusCode.UNAUTHENTICATED),
        (
            "bad_signature",
            bearer(jwt.encode(claims("bravo"), forger, algorithm="EdDSA", headers={"kid": kid})),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "bad_signature",
            bearer(jwt.encode(claims("bravo"), None, algorithm="none", headers={"kid": kid})),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "expired",
            bearer(
                jwt.encode(
                    claims("bravo", iat=now - 600, exp=now - 300),
                    pem,
                    algorithm="EdDSA",
                    headers={"kid": kid},
                )
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "wrong_audience",
            bearer(
                jwt.encode(claims("bravo", aud="someone-else"), pem, algorithm="EdDSA", headers={"kid": kid})
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "wrong_issuer",
            bearer(
                jwt.encode(claims("bravo", iss="elsewhere"), pem, algorithm="EdDSA", headers={"kid": kid})
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "other_sandbox",
            bearer(jwt.encode(claims("alpha"), pem, algorithm="EdDSA", headers={"kid": kid})),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            "unknown_sandbox",
            bearer(jwt.encode(claims("nobody"), pem, algorithm="EdDSA", headers={"kid": kid})),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    expected: dict[str, float] = {}
    for reason, metadata, code in cases:
        target = "nobody" if reason == "unknown_sandbox" else "bravo"
        # Each of the three calls refuses it the same way.
        refused(env.exit_report(target, metadata), code, reason)
        refused(env.push([(target, "forged line")], metadata), code, reason)
        refused(env.hello(target, metadata), code, reason)
        expected[reason] = expected.get(reason, 0) + 3
    after = env.refusals()
    for reason, count in expected.items():
        assert after.get(reason, 0) - before.get(reason, 0) == count, (reason, before, after)
    # Nothing of the refused calls was stored, nor was the unknown sandbox registered.
    assert "forged line" not in [e["message"] for e in env.gateway.events("bravo", "log")]
    assert not [
        e for e in env.gateway.events("bravo", "lifecycle") if (e["data"] or {}).get("exit_code") == 77
    ]
    assert env.gateway.query("SELECT id FROM sandboxes WHERE id = 'nobody'", []) == []
    # No token, nor any part of one, in the gateway's log.
    log = env.gateway.log_text()
    assert "refused (expired)" in log
    for _, metadata, _ in cases:
        for _, value in metadata or ():
            assert value.split(" ", 1)[1] not in log


def test_an_agent_holding_its_own_token_cannot_act_for_another_sandbox(env: Env) -> None:
    env.create("charlie")
    env.create("delta")
    # An agent inside charlie holding charlie's token (its supervisor's file; with the local
    # driver it could read delta's file just as well: same uid, see docs/security.md).
    own = bearer(env.token_of("charlie"))
    refused(
        env.push([("delta", "charlie speaks for delta")], own),
        grpc.StatusCode.PERMISSION_DENIED,
        "other_sandbox",
    )
    # A stream that starts with its own sandbox cannot switch to another one.
    refused(
        env.push([("charlie", "honest line"), ("delta", "charlie speaks for delta")], own),
        grpc.StatusCode.PERMISSION_DENIED,
        "other_sandbox",
    )
    refused(env.exit_report("delta", own), grpc.StatusCode.PERMISSION_DENIED, "other_sandbox")
    refused(env.hello("delta", own), grpc.StatusCode.PERMISSION_DENIED, "other_sandbox")
    assert env.refresh(own).startswith("ey")  # its own token is valid: only the binding refuses
    delta_messages = [e["message"] for e in env.gateway.events("delta", "log")]
    assert "charlie speaks for delta" not in delta_messages
    assert not [
        e for e in env.gateway.events("delta", "lifecycle") if (e["data"] or {}).get("exit_code") == 77
    ]
    # delta's own supervisor still holds its session.
    assert _http("GET", f"{env.api}/sandboxes/delta")[1]["state"] == "connected"


def test_a_token_of_a_deleted_and_recreated_sandbox_is_stale(env: Env) -> None:
    env.create("echo")
    old = bearer(env.token_of("echo"))
    env.delete("echo")
    created = env.create("echo")
    assert created["generation"] == 2
    refused(env.exit_report("echo", old), grpc.StatusCode.PERMISSION_DENIED, "stale")
    refused(env.hello("echo", old), grpc.StatusCode.PERMISSION_DENIED, "stale")
    refused(env.refresh_error(old), grpc.StatusCode.PERMISSION_DENIED, "stale")
    # The new life's token, in its file, is of generation 2 and is accepted.
    new = env.token_of("echo")
    assert jwt.decode(new, options={"verify_signature": False})["gen"] == 2
    assert env.exit_report("echo", bearer(new), code=0) is None


def test_refresh_answers_a_new_token_for_the_same_sandbox_and_issue_needs_kubernetes(env: Env) -> None:
    env.create("foxtrot")
    old = env.token_of("foxtrot")
    new = env.refresh(bearer(old))
    assert new != old
    old_claims = jwt.decode(old, options={"verify_signature": False})
    new_claims = jwt.decode(new, options={"verify_signature": False})
    assert (new_claims["sandbox_id"], new_claims["gen"]) == (old_claims["sandbox_id"], old_claims["gen"])
    assert new_claims["jti"] != old_claims["jti"]
    assert env.exit_report("foxtrot", bearer(new), code=0) is None
    assert env.exit_report("foxtrot", bearer(old), code=0) is None  # the old one until its expiry
    refused(env.refresh_error(None), grpc.StatusCode.UNAUTHENTICATED, "missing")
    try:
        env.stub.IssueSandboxToken(pb.IssueSandboxTokenRequest(), metadata=bearer(new), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
        assert "Kubernetes" in (exc.details() or "")
    else:
        pytest.fail("IssueSandboxToken answered without the Kubernetes driver")


def test_two_gateways_on_one_database_share_their_keys_and_rotate_them_without_a_restart(
    tmp_path: Path,
) -> None:
    rotate = ["--set", "auth.supervisors.key_rotation_s=2"]
    first = GatewayProcess(tmp_path / "first", auth=True, extra=rotate)
    second = GatewayProcess(
        tmp_path / "second", auth=True, extra=rotate, database_url=f"sqlite+aiosqlite:///{first.db_path}"
    )
    try:
        first.start()
        second.start()
        a, b = Env(first), Env(second)
        a.create("golf")
        t1 = a.token_of("golf")
        kid1 = jwt.get_unverified_header(t1)["kid"]
        # The other replica verifies what this one minted: the key is in the shared database.
        assert b.exit_report("golf", bearer(t1), code=0) is None
        time.sleep(2.5)  # past the first key's signing time: the next token needs a new key
        t2 = b.refresh(bearer(t1))
        kid2 = jwt.get_unverified_header(t2)["kid"]
        assert kid2 != kid1
        # The first replica finds the key the second made (an unknown kid re-reads the ring),
        # and the old key still verifies the tokens it signed.
        assert a.exit_report("golf", bearer(t2), code=0) is None
        assert a.exit_report("golf", bearer(t1), code=0) is None
        assert b.exit_report("golf", bearer(t1), code=0) is None
        with sqlite3.connect(first.db_path) as db:
            kids = {row[0] for row in db.execute("SELECT kid FROM signing_keys")}
        assert {kid1, kid2} <= kids
        a.channel.close()
        b.channel.close()
    finally:
        second.stop()
        first.stop()


def test_a_deleted_sandbox_s_tokens_and_their_renewals_are_refused_by_every_call(env: Env) -> None:
    env.create("hotel")
    old = env.token_of("hotel")
    renewed = env.refresh(bearer(old))
    env.delete("hotel")  # its row and generation stay; its credentials must not
    for token in (old, renewed):
        metadata = bearer(token)
        refused(env.exit_report("hotel", metadata), grpc.StatusCode.PERMISSION_DENIED, "stale")
        refused(env.push([("hotel", "ghost line")], metadata), grpc.StatusCode.PERMISSION_DENIED, "stale")
        refused(env.hello("hotel", metadata), grpc.StatusCode.PERMISSION_DENIED, "stale")
        refused(env.refresh_error(metadata), grpc.StatusCode.PERMISSION_DENIED, "stale")
    assert "ghost line" not in env.gateway.log_lines("hotel")
    assert not [
        e for e in env.gateway.events("hotel", "lifecycle") if (e["data"] or {}).get("exit_code") == 77
    ]


def test_a_log_stream_cannot_outlive_its_sandbox_into_the_id_s_next_life(env: Env) -> None:
    env.create("india")
    lines: queue.Queue[str | None] = queue.Queue()

    def requests() -> Iterator[pb.PushSandboxLogsRequest]:
        while (line := lines.get()) is not None:
            yield pb.PushSandboxLogsRequest(
                sandbox_id="india",
                logs=[pb.SandboxLogLine(message=line, level="info", target="stdout", source="sandbox")],
            )

    stream = env.stub.PushSandboxLogs.future(requests(), metadata=bearer(env.token_of("india")), timeout=60)
    try:
        lines.put("before the re-creation")
        wait_until(
            lambda: "before the re-creation" in env.gateway.log_lines("india"),
            timeout=20,
            what="the stream's first line is stored",
        )
        env.delete("india")
        assert env.create("india")["generation"] == 2
        lines.put("into generation 2")
        lines.put(None)
        refused(stream.exception(timeout=20), grpc.StatusCode.PERMISSION_DENIED, "stale")
    finally:
        lines.put(None)
        stream.cancel()
    rows = env.gateway.query(
        "SELECT generation, message FROM events WHERE sandbox_id = 'india' AND message LIKE '%generation 2%'"
    )
    assert rows == []


def test_every_request_of_a_log_stream_has_its_sandbox_id_checked_first(env: Env) -> None:
    env.create("juliet")
    own = bearer(env.token_of("juliet"))
    forged = "evil\n2026-12-06 INFO forged gateway line"
    for bad in (forged, "y" * 20_000):
        answer = env.push([("juliet", "honest"), (bad, "x")], own)
        assert isinstance(answer, grpc.RpcError), "accepted"
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (answer.code(), answer.details())
    assert not any(line.startswith("2026-12-06 INFO forged") for line in env.gateway.log_text().splitlines())
    assert "y" * 1000 not in env.gateway.log_text()


def test_a_token_asked_for_again_at_once_is_the_same_one(env: Env) -> None:
    env.create("kilo")
    own = bearer(env.token_of("kilo"))
    first = env.refresh(own)
    assert env.refresh(own) == first  # not signed again: a loop of refreshes costs no signing
    assert env.refresh(bearer(first)) == first


def test_local_sandbox_directories_and_the_database_are_the_gateway_user_s_only(env: Env) -> None:
    env.create("lima")
    sandboxes = env.token_file("lima").parent.parent
    assert stat.S_IMODE(os.stat(sandboxes).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sandboxes / "lima").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(env.gateway.db_path).st_mode) == 0o600
