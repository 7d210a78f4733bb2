#!/usr/bin/env python3
"""A peer that behaves, on the wire, like upstream's supervisor (openshell-sandbox) in its NORMAL mode.

upstream_peer.py's supervisor only connects, beats and pushes: what upstream's supervisor does in
its developer mode. This one makes the calls upstream's makes outside it, in its order and with its
exits (research: /work/notes/i21/upstream_calls.md 1.0-1.8 and 3), so a run that ends 0 means "an
upstream supervisor runs against this gateway". Like upstream_peer.py it is a separate process
whose stubs are compiled from the upstream-only protos (load_stubs); never load openshell_wire here.

    upstream_supervisor_peer.py --gateway HOST:PORT --sandbox-id ID --sandbox NAME
        [--token-file F | --k8s-sa-token-file F] [--poll-interval-s 10] [--lines N]
        [--ocsf-lines K] [--exit-code C] [--run-s S] [--retry-delay-scale 1.0]

In upstream's order: the token (the file's, or IssueSandboxToken with the ServiceAccount token as
Bearer), then ``authorization: Bearer <token>`` on every call, the token current when the call
opens; the log push (log_push.rs): the --lines + --ocsf-lines lines come one after another over
--run-s (levels INFO/WARN/ERROR with a tracing target and fields, OCSF lines as level "OCSF",
target "ocsf", shorthand text) and go on one long-lived PushSandboxLogs stream per connection, a
request at 50 lines or every 500 ms, the stream kept with the token it opened with (a refreshed
token is used only by the next stream), reopened with backoff (1 s doubling to 30 s) when it
ends, given up for good when it ends UNAUTHENTICATED; GetSandboxConfig (grpc_retry: 5 tries
sleeping 1, 2, 4, 4 s times --retry-delay-scale on EVERY error, since upstream's
is_retryable_error never finds the tonic Status in the miette chain, then exit 1); no policy:
UpdateConfig with the restrictive default and GetSandboxConfig again, on one connection and
retried together the same way, still none: exit 1; GetSandboxProviderEnvironment (an error: carry
on); GetInferenceBundle (an error: routing off, else refreshed every 5 s); the poll loop
(GetSandboxConfig every poll interval; ReportPolicyStatus LOADED for the first poll if it matches
the loaded SANDBOX policy, for a new policy, and for the same hash at a higher version);
RefreshSandboxToken at about 80 % of the JWT's exp; GetSandboxConfig once more (the main process's
start); ConnectSupervisor with hello{sandbox_id, instance_id, connection_epoch = attempt from 1},
beating every max(heartbeat_interval_secs, 5) s, reconnecting on any error or rejection with
upstream's backoff (1 s doubling to 30 s, never reset). Every channel sends HTTP/2 keepalive
pings as upstream's client does (10 s, 20 s timeout, also when idle). After --run-s,
ReportMainProcessExit until it is answered OK, the log lines still pending flushed and the stream
closed, then one line ``{"summary": ...}`` on stdout and exit 0; a fatal error prints the summary
too, its reason on stderr, and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import grpc
from grpc import aio
from upstream_peer import PeerError, load_stubs, to_dict, unknown_fields

T = TypeVar("T")

#: The codes is_retryable_error names as transient (crates/openshell-sandbox/src/lib.rs). Only the
#: policy status reporter, which looks at the tonic Status itself, goes by them: grpc_retry at
#: startup gets a miette Report whose chain hides the Status, so it retries every error (checked
#: against upstream's binary: UNIMPLEMENTED was retried 5 times, then exit 1).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
#: Upstream's log push flushes at 50 lines or every 500 ms (log_push.rs).
BATCH = 50
FLUSH_S = 0.5
#: Upstream's log push backoff between streams (log_push.rs INITIAL_BACKOFF, MAX_BACKOFF).
PUSH_BACKOFF_S = (1.0, 30.0)
#: Upstream's heartbeat floor (supervisor_session.rs: max(heartbeat_interval_secs, 5)).
HEARTBEAT_FLOOR_S = 5
#: Upstream's inference bundle refresh (OPENSHELL_ROUTE_REFRESH_INTERVAL_SECS default).
ROUTE_REFRESH_S = 5.0
CALL_TIMEOUT_S = 10.0
#: Upstream's channel (grpc_client.rs build_plain_channel): HTTP/2 pings every 10 s, also when
#: idle, a 20 s timeout. grpc's client would stop after 2 pings without data: upstream's does not.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class Connection:
    """The stubs of one channel."""

    stub: Any
    inference: Any


class Fatal(Exception):
    """What makes upstream's supervisor exit 1; the text is its reason."""


def code_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return exc.code().name  # type: ignore[no-any-return]
    return type(exc).__name__


def jwt_exp(token: str) -> int | None:
    """The token's ``exp`` read without verifying it, as upstream does; None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def refresh_delay_s(token: str) -> float:
    """Upstream's compute_refresh_delay: 80 % of what is left, within [1 s, 12 h], plus jitter."""
    exp = jwt_exp(token)
    if not exp:
        return 6 * 3600.0
    left = exp - time.time()
    if left <= 0:
        return 1.0
    delay = min(max(left * 0.8, 1.0), 12 * 3600.0)
    return delay * (1 + (len(token) % 10) / 100)


class Supervisor:
    def __init__(self, args: argparse.Namespace, stubs: dict[str, ModuleType]) -> None:
        self.args = args
        self.pb = stubs["pb"]
        self.sb = stubs["sb"]
        self.inf = stubs["inf"]
        self.pb_grpc = stubs["pb_grpc"]
        self.inf_grpc = stubs["inf_grpc"]
        self.instance_id = str(uuid.uuid4())  # one per process, as upstream's HA branch
        self.token = ""
        self.calls: dict[str, Counter[str]] = {}
        self.summary: dict[str, Any] = {
            "instance_id": self.instance_id,
            "config": None,
            "policy_updates": [],
            "policy_status_reported": [],
            "sessions": [],
            "tokens_refreshed": 0,
            "calls_ok_with_refreshed_token": 0,
            "heartbeats_sent": 0,
            "log_lines_sent": 0,
            "log_requests_sent": 0,
            "log_streams_opened": 0,
            "log_push_disabled": False,
            "first_log_write_at": None,
            "last_log_write_at": None,
            "inference_routing": None,
            "unknown_fields": {},
        }
        self.tasks: list[asyncio.Task[None]] = []

    # -- calls ---------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def record(self, method: str, code: str) -> None:
        self.calls.setdefault(method, Counter())[code] += 1
        if code == "OK" and method != "RefreshSandboxToken" and self.summary["tokens_refreshed"]:
            self.summary["calls_ok_with_refreshed_token"] += 1

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """A new channel, as upstream's helpers open one per call (grpc_client.rs connect()): a
        restarted gateway is reached at the next call, not after a shared channel's own backoff."""
        async with aio.insecure_channel(self.args.gateway, options=CHANNEL_OPTIONS) as channel:
            yield Connection(self.pb_grpc.OpenShellStub(channel), self.inf_grpc.InferenceStub(channel))

    async def call(self, method: str, invoke: Callable[[Connection], Awaitable[T]]) -> T:
        async with self.connect() as c:
            return await self.call_on(c, method, invoke(c))

    async def call_on(self, c: Connection, method: str, pending: Awaitable[T]) -> T:
        """One call on an open connection, recorded by its code."""
        try:
            result = await pending
        except grpc.RpcError as exc:
            self.record(method, exc.code().name)
            raise
        self.record(method, "OK")
        if isinstance(result, tuple(_messages(self))):
            seen = unknown_fields(result)
            if seen:
                self.summary["unknown_fields"][method] = seen
        return result

    async def retried(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Upstream's grpc_retry as its binary behaves: 5 attempts, sleeping 1, 2, 4, 4 s (times
        --retry-delay-scale), on every error (see RETRYABLE), then exit 1."""
        for n in range(1, 6):
            try:
                return await attempt()
            except grpc.RpcError as exc:
                if n == 5:
                    raise Fatal(
                        f"{what} failed after 5 attempts: {exc.code().name}: {exc.details()}"
                    ) from None
                await asyncio.sleep(min(2 ** (n - 1), 4) * self.args.retry_delay_scale)
        raise AssertionError("unreachable")

    def get_config(self, c: Connection) -> Awaitable[Any]:
        return c.stub.GetSandboxConfig(
            self.sb.GetSandboxConfigRequest(sandbox_id=self.args.sandbox_id),
            metadata=self.metadata(),
            timeout=CALL_TIMEOUT_S,
        )

    # -- token ---------------------------------------------------------------------------

    async def acquire_token(self) -> None:
        # The files were read before the loop started (main): upstream reads them once, trimmed.
        if self.args.token:
            self.token = self.args.token
            return
        if not self.args.sa_token:
            raise Fatal("no sandbox token source available")
        sa_token = self.args.sa_token
        answer = await self.retried(
            "IssueSandboxToken",
            lambda: self.call(
                "IssueSandboxToken",
                lambda c: c.stub.IssueSandboxToken(
                    self.pb.IssueSandboxTokenRequest(),
                    metadata=(("authorization", f"Bearer {sa_token}"),),
                    timeout=CALL_TIMEOUT_S,
                ),
            ),
        )
        self.token = answer.token

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(refresh_delay_s(self.token))
            try:
                answer = await self.call(
                    "RefreshSandboxToken",
                    lambda c: c.stub.RefreshSandboxToken(
                        self.pb.RefreshSandboxTokenRequest(), metadata=self.metadata(), timeout=CALL_TIMEOUT_S
                    ),
                )
            except grpc.RpcError:
                await asyncio.sleep(10)  # upstream warns and tries again 10 s later
                continue
            if answer.token:
                self.token = answer.token
                self.summary["tokens_refreshed"] += 1

    # -- logs ----------------------------------------------------------------------------

    def log_line(self, i: int) -> Any:
        """The i-th line the peer logs: --lines plain ones, then --ocsf-lines OCSF ones."""
        now_ms = int(time.time() * 1000)
        if i < self.args.lines:
            return self.pb.SandboxLogLine(
                sandbox_id=self.args.sandbox_id,
                timestamp_ms=now_ms,
                level=("INFO", "WARN", "ERROR")[i % 3],
                target="openshell_sandbox::peer",
                message=f"upstream normal-mode line {i}",
                source="sandbox",
                fields={"line": str(i), "peer": '"upstream"'},  # tracing's Debug formatting
            )
        return self.pb.SandboxLogLine(
            sandbox_id=self.args.sandbox_id,
            timestamp_ms=now_ms,
            level="OCSF",
            target="ocsf",
            message=f"NET:OPEN [INFO] ALLOWED python3({42 + i - self.args.lines}) -> api.example.com:443 "
            "[policy:default]",
            source="sandbox",
        )

    async def produce_logs(self, lines: asyncio.Queue[Any]) -> None:
        """The tracing layer: the lines come one after another over --run-s (the last a little
        before its end), as a sandbox's supervisor logs over its life, not all at its start."""
        total = self.args.lines + self.args.ocsf_lines
        started = time.monotonic()
        for i in range(total):
            await asyncio.sleep(max(0.0, started + self.args.run_s * i / total - time.monotonic()))
            lines.put_nowait(self.log_line(i))

    async def push_logs(self, lines: asyncio.Queue[Any]) -> None:
        """log_push.rs run_push_loop: one client stream per connection, kept open for the run; a
        request when 50 lines are pending or every 500 ms; the stream's ``authorization`` is the
        token current when it opened (upstream's interceptor runs once per call). When the
        connection fails or the call ends, the lines not yet written wait out a backoff (1 s
        doubling to 30 s, reset on connect) and go on a new stream; an UNAUTHENTICATED end
        disables log push for good. A None on ``lines`` is the process's end: flush, close the
        stream, await its answer."""
        batch: list[Any] = []
        backoff = PUSH_BACKOFF_S[0]
        next_line = _NextLine(lines)
        try:
            while True:
                async with aio.insecure_channel(self.args.gateway, options=CHANNEL_OPTIONS) as channel:
                    try:
                        # CachedOpenShellClient::connect: a failed connect backs off, not reset.
                        await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
                    except TimeoutError:
                        code, exiting = None, False
                        self.record("PushSandboxLogs", "CONNECT_FAILED")
                    else:
                        backoff = PUSH_BACKOFF_S[0]
                        code, exiting = await self._log_stream(channel, batch, next_line)
                        self.record("PushSandboxLogs", code.name if code is not None else "NO_STATUS")
                if exiting:
                    return
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.summary["log_push_disabled"] = True
                    print("log push disabled after authentication failure", file=sys.stderr, flush=True)
                    return
                if not await next_line.drain(batch, backoff):
                    return  # the process ended while disconnected: upstream drops the batch
                backoff = min(backoff * 2, PUSH_BACKOFF_S[1])
        finally:
            next_line.close()

    async def _log_stream(
        self, channel: aio.Channel, batch: list[Any], next_line: _NextLine
    ) -> tuple[grpc.StatusCode | None, bool]:
        """One PushSandboxLogs call: its status, and whether it ended with the process's end."""
        loop = asyncio.get_running_loop()
        call = self.pb_grpc.OpenShellStub(channel).PushSandboxLogs(metadata=self.metadata())
        self.summary["log_streams_opened"] += 1
        ended = asyncio.ensure_future(call.code())
        exiting = False
        try:
            try:
                if batch:
                    await self._write_logs(call, batch)
                next_flush = loop.time() + FLUSH_S
                while True:
                    line = await next_line.get(until=next_flush, unless=ended)
                    if line is _END:
                        if batch:
                            await self._write_logs(call, batch)
                        await call.done_writing()
                        exiting = True
                        break
                    if line is not None:
                        batch.append(line)
                        if len(batch) >= BATCH:
                            await self._write_logs(call, batch)
                        continue
                    if ended.done():
                        break  # the call ended (the gateway answered or the stream broke)
                    if batch:
                        await self._write_logs(call, batch)
                    while next_flush <= loop.time():  # tokio's interval, MissedTickBehavior::Skip
                        next_flush += FLUSH_S
            except Exception:  # a write on a call that has ended: its status tells why
                exiting = False
            try:
                code: grpc.StatusCode | None = await asyncio.wait_for(asyncio.shield(ended), CALL_TIMEOUT_S)
            except (TimeoutError, grpc.RpcError):
                code = None
            return code, exiting
        finally:
            ended.cancel()
            call.cancel()

    async def _write_logs(self, call: Any, batch: list[Any]) -> None:
        await call.write(self.pb.PushSandboxLogsRequest(sandbox_id=self.args.sandbox_id, logs=batch))
        # Written is gone, as upstream's (the lines are moved into the request).
        self.summary["log_lines_sent"] += len(batch)
        self.summary["log_requests_sent"] += 1
        now = time.time()
        self.summary["first_log_write_at"] = self.summary["first_log_write_at"] or now
        self.summary["last_log_write_at"] = now
        batch.clear()

    # -- policy --------------------------------------------------------------------------

    def restrictive_default(self) -> Any:
        """The shape of upstream's restrictive_default_policy (openshell-policy lib.rs): no network
        policies (deny egress), and no process identity (left to the compute runtime). Upstream's
        enrich_proto_baseline_paths adds paths it finds on its host before the sync: not done here."""
        return self.sb.SandboxPolicy(
            version=1,
            filesystem=self.sb.FilesystemPolicy(
                include_workdir=True,
                read_only=["/usr", "/lib", "/proc", "/dev/urandom", "/app", "/etc", "/var/log"],
                read_write=["/tmp", "/dev/null"],
            ),
            landlock=self.sb.LandlockPolicy(compatibility="best_effort"),
        )

    def remember_config(self, answer: Any) -> None:
        self.summary["config"] = {
            "has_policy": answer.HasField("policy"),
            "policy": to_dict(answer.policy) if answer.HasField("policy") else None,
            "version": answer.version,
            "policy_hash": answer.policy_hash,
            "policy_source": self.sb.PolicySource.Name(answer.policy_source),
            "config_revision": answer.config_revision,
            "provider_env_revision": answer.provider_env_revision,
            "workspace": answer.workspace,
            "settings": sorted(answer.settings),
        }

    async def load_policy(self) -> Any:
        answer = await self.retried("Policy fetch", lambda: self.call("GetSandboxConfig", self.get_config))
        if not answer.HasField("policy"):
            # Upstream discovers a local policy (none here) and falls back to the restrictive default.
            if not self.args.sandbox:
                raise Fatal("policy sync requires the sandbox name (--sandbox)")
            policy = self.restrictive_default()

            async def sync_and_fetch() -> Any:
                # sync_policy_and_fetch_snapshot: both calls on one connection, retried together.
                async with self.connect() as c:
                    await self.call_on(
                        c,
                        "UpdateConfig",
                        c.stub.UpdateConfig(
                            self.pb.UpdateConfigRequest(name=self.args.sandbox, policy=policy, workspace=""),
                            metadata=self.metadata(),
                            timeout=CALL_TIMEOUT_S,
                        ),
                    )
                    if not self.summary["policy_updates"]:
                        self.summary["policy_updates"].append(to_dict(policy))
                    return await self.call_on(c, "GetSandboxConfig", self.get_config(c))

            answer = await self.retried("Policy discovery sync", sync_and_fetch)
            if not answer.HasField("policy"):
                raise Fatal("Server still returned no policy after sync — this is a bug")
        self.remember_config(answer)
        return answer

    async def report_status(self, version: int) -> None:
        """LOADED for ``version``; retryable codes retried (1 s doubling to 32 s), others dropped."""
        backoff = 1.0
        while True:
            try:
                await self.call(
                    "ReportPolicyStatus",
                    lambda c: c.stub.ReportPolicyStatus(
                        self.pb.ReportPolicyStatusRequest(
                            sandbox_id=self.args.sandbox_id,
                            version=version,
                            status=self.pb.POLICY_STATUS_LOADED,
                        ),
                        metadata=self.metadata(),
                        timeout=CALL_TIMEOUT_S,
                    ),
                )
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    return  # "Discarding terminal policy status update"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 32.0)
                continue
            self.summary["policy_status_reported"].append(version)
            return

    async def poll_loop(self, loaded: Any) -> None:
        """run_policy_poll_loop: the first poll acknowledges the loaded policy if it is still the
        sandbox's (initial_poll_disposition; a failed first poll acknowledges nothing); later, a
        new policy is loaded and reported, and the same hash at a higher version reported too
        (unchanged_policy_revision_candidate)."""
        version, policy_hash = loaded.version, loaded.policy_hash
        first = True
        while True:
            try:
                answer = await self.call("GetSandboxConfig", self.get_config)
            except grpc.RpcError:
                answer = None  # poll errors are ignored
            initial, first = first, False
            if answer is not None:
                sandbox_policy = answer.policy_source == self.sb.POLICY_SOURCE_SANDBOX
                if initial and answer.policy_hash == policy_hash:
                    if sandbox_policy and answer.version > 0:
                        version = answer.version
                        await self.report_status(version)
                elif answer.policy_hash != policy_hash:
                    if answer.HasField("policy"):
                        version, policy_hash = answer.version, answer.policy_hash
                        self.remember_config(answer)
                        if sandbox_policy and version > 0:
                            await self.report_status(version)
                    else:
                        # "runtime reload requires a policy payload": upstream fails closed.
                        self.summary["quarantined"] = True
                elif sandbox_policy and policy_hash and answer.version > version:
                    version = answer.version
                    self.remember_config(answer)
                    await self.report_status(version)
            await asyncio.sleep(self.args.poll_interval_s)

    # -- provider environment and inference ------------------------------------------------

    async def provider_env(self) -> None:
        try:
            answer = await self.call(
                "GetSandboxProviderEnvironment",
                lambda c: c.stub.GetSandboxProviderEnvironment(
                    self.pb.GetSandboxProviderEnvironmentRequest(
                        sandbox_id=self.args.sandbox_id, supports_static_credential_bindings=True
                    ),
                    metadata=self.metadata(),
                    timeout=CALL_TIMEOUT_S,
                ),
            )
        except grpc.RpcError:
            return  # upstream logs "fail_closed" and runs with no provider environment
        self.summary["provider_env"] = {
            "keys": sorted(answer.environment),
            "revision": answer.provider_env_revision,
        }

    async def inference_bundle(self) -> Any | None:
        try:
            return await self.call(
                "GetInferenceBundle",
                lambda c: c.inference.GetInferenceBundle(
                    self.inf.GetInferenceBundleRequest(), metadata=self.metadata(), timeout=CALL_TIMEOUT_S
                ),
            )
        except grpc.RpcError:
            return None

    async def inference_refresh(self) -> None:
        while True:
            await asyncio.sleep(ROUTE_REFRESH_S)
            await self.inference_bundle()  # errors keep the stale routes

    # -- supervisor session ----------------------------------------------------------------

    async def session_loop(self) -> None:
        attempt = 0
        backoff = 1.0
        while True:
            attempt += 1
            session: dict[str, Any] = {"epoch": attempt}
            self.summary["sessions"].append(session)
            try:
                await self.session(attempt, session)
                session["end"] = "gateway closed stream"
            except grpc.RpcError as exc:
                session["end"] = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a rejection, or a write on a call that had ended
                session["end"] = f"{code_name(exc)}: {exc}"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)  # never reset after a successful session

    async def session(self, attempt: int, session: dict[str, Any]) -> None:
        pb = self.pb
        channel = aio.insecure_channel(self.args.gateway, options=CHANNEL_OPTIONS)
        call = self.pb_grpc.OpenShellStub(channel).ConnectSupervisor(metadata=self.metadata())
        try:
            hello = pb.SupervisorHello(
                sandbox_id=self.args.sandbox_id, instance_id=self.instance_id, connection_epoch=attempt
            )
            await call.write(pb.SupervisorMessage(hello=hello))
            first = await call.read()
            if first is aio.EOF:
                raise PeerError("stream closed before session accepted")
            kind = first.WhichOneof("payload")
            if kind == "session_rejected":
                session["rejected"] = first.session_rejected.reason
                raise PeerError(f"session rejected: {first.session_rejected.reason}")
            if kind != "session_accepted":
                raise PeerError(f"expected SessionAccepted, got {kind or 'an unknown message'}")
            accepted = first.session_accepted
            session.update(
                accepted=True,
                session_id=accepted.session_id,
                heartbeat_interval_secs=accepted.heartbeat_interval_secs,
                accepted_at=time.time(),
            )
            period = max(accepted.heartbeat_interval_secs, HEARTBEAT_FLOOR_S)
            write_lock = asyncio.Lock()

            async def beat() -> None:
                while True:
                    await asyncio.sleep(period)  # tokio's interval: the first tick is skipped
                    async with write_lock:
                        await call.write(pb.SupervisorMessage(heartbeat=pb.SupervisorHeartbeat()))
                    self.summary["heartbeats_sent"] += 1
                    session["heartbeats"] = session.get("heartbeats", 0) + 1

            beater = asyncio.create_task(beat())
            try:
                while True:
                    message = await call.read()
                    if message is aio.EOF:
                        return
                    if beater.done():
                        beater.result()
                    if message.WhichOneof("payload") == "relay_open":
                        # No SSH server in this peer: the relay is refused, the session goes on.
                        reply = pb.RelayOpenResult(
                            channel_id=message.relay_open.channel_id, success=False, error="no ssh server"
                        )
                        async with write_lock:
                            await call.write(pb.SupervisorMessage(relay_open_result=reply))
                    # Gateway heartbeats and anything else are ignored, as upstream does.
            finally:
                beater.cancel()
                with contextlib.suppress(BaseException):
                    await beater
                session["ended_at"] = time.time()
        finally:
            call.cancel()
            await channel.close()

    # -- exit ----------------------------------------------------------------------------

    async def report_exit(self) -> None:
        """ReportMainProcessExit until it is answered OK (250 ms doubling to 2 s)."""
        backoff = 0.25
        while True:
            try:
                await self.call(
                    "ReportMainProcessExit",
                    lambda c: c.stub.ReportMainProcessExit(
                        self.pb.ReportMainProcessExitRequest(
                            sandbox_id=self.args.sandbox_id,
                            instance_id=self.instance_id,
                            exit_code=self.args.exit_code,
                        ),
                        metadata=self.metadata(),
                        timeout=CALL_TIMEOUT_S,
                    ),
                )
                return
            except grpc.RpcError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # -- the run ---------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))
        self.tasks[-1].set_name(name)

    async def run(self) -> None:
        lines: asyncio.Queue[Any] = asyncio.Queue()
        await self.acquire_token()
        self.spawn(self.produce_logs(lines), "log-lines")
        self.spawn(self.push_logs(lines), "log-push")
        self.spawn(self.refresh_loop(), "token-refresh")
        loaded = await self.load_policy()
        await self.provider_env()
        bundle = await self.inference_bundle()
        self.summary["inference_routing"] = bundle is not None
        if bundle is not None:
            self.summary["inference_routes"] = [route.name for route in bundle.routes]
            self.spawn(self.inference_refresh(), "inference-refresh")
        self.spawn(self.poll_loop(loaded), "policy-poll")
        # run_process asks once more (for the agent-skill setting); its error is not fatal there.
        with contextlib.suppress(grpc.RpcError):
            await self.call("GetSandboxConfig", self.get_config)
        self.spawn(self.session_loop(), "supervisor-session")
        await asyncio.sleep(self.args.run_s)
        # The main process has exited: the session task is aborted, the exit reported until acked.
        for task in self.tasks:
            if task.get_name() not in ("log-push", "log-lines"):
                task.cancel()
        await self.report_exit()
        # The tracing layer is dropped: its last lines (all logged by now) are flushed.
        producer = next(t for t in self.tasks if t.get_name() == "log-lines")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(producer), CALL_TIMEOUT_S)
        lines.put_nowait(None)
        log_push = next(t for t in self.tasks if t.get_name() == "log-push")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(log_push), CALL_TIMEOUT_S)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def report(self, *, exit_code: int, reason: str | None) -> dict[str, Any]:
        return {
            **self.summary,
            "calls": {method: dict(codes) for method, codes in sorted(self.calls.items())},
            "exit": exit_code,
            "reason": reason,
        }


#: What _NextLine.get answers for the process's end (a None put on the queue).
_END = object()


class _NextLine:
    """The log push's receiving end of the tracing layer's channel: one pending get, kept across
    waits, so a line is never lost to a timeout."""

    def __init__(self, lines: asyncio.Queue[Any]) -> None:
        self.lines = lines
        self.getter: asyncio.Future[Any] | None = None

    async def get(self, *, until: float, unless: asyncio.Future[Any]) -> Any:
        """The next line, _END, or None once ``until`` (loop time) has come or ``unless`` is done."""
        if self.getter is None:
            self.getter = asyncio.ensure_future(self.lines.get())
        left = max(0.0, until - asyncio.get_running_loop().time())
        await asyncio.wait({self.getter, unless}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not self.getter.done():
            return None
        line, self.getter = self.getter.result(), None
        return _END if line is None else line

    async def drain(self, batch: list[Any], seconds: float) -> bool:
        """drain_during_backoff: wait ``seconds``, the lines meanwhile added to ``batch``; False
        if the process ended meanwhile."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        never: asyncio.Future[Any] = loop.create_future()
        while loop.time() < until:
            line = await self.get(until=until, unless=never)
            if line is _END:
                return False
            if line is not None:
                batch.append(line)
        return True

    def close(self) -> None:
        if self.getter is not None:
            self.getter.cancel()


def _messages(supervisor: Supervisor) -> list[type]:
    """The answer types whose unknown fields are worth telling (the configuration answers)."""
    return [
        supervisor.sb.GetSandboxConfigResponse,
        supervisor.pb.GetSandboxProviderEnvironmentResponse,
        supervisor.inf.GetInferenceBundleResponse,
    ]


async def run(args: argparse.Namespace, stubs: dict[str, ModuleType]) -> int:
    supervisor = Supervisor(args, stubs)
    code, reason = 0, None
    try:
        await supervisor.run()
    except Fatal as exc:
        code, reason = 1, str(exc)
    finally:
        await supervisor.close()
    print(
        json.dumps({"summary": supervisor.report(exit_code=code, reason=reason)}, sort_keys=True), flush=True
    )
    if reason is not None:
        print(f"upstream supervisor failed: {reason}", file=sys.stderr, flush=True)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An upstream supervisor in its normal mode, on the wire.")
    parser.add_argument(
        "--stubs-dir", type=Path, help="compile the stubs here (default: a temporary directory)"
    )
    parser.add_argument("--gateway", required=True, metavar="HOST:PORT")
    parser.add_argument("--sandbox-id", required=True)
    parser.add_argument("--sandbox", default="", help="the sandbox's name (needed only for policy sync)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--token-file", type=Path)
    source.add_argument("--k8s-sa-token-file", type=Path)
    parser.add_argument("--poll-interval-s", type=float, default=10.0)
    parser.add_argument("--lines", type=int, default=0)
    parser.add_argument("--ocsf-lines", type=int, default=0)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--run-s", type=float, default=10.0, help="how long the main process runs")
    parser.add_argument(
        "--retry-delay-scale",
        type=float,
        default=1.0,
        help="multiplies the startup retries' 1, 2, 4, 4 s sleeps (tests need not wait 11 s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.stubs_dir is None
    stubs_dir = Path(tempfile.mkdtemp(prefix="upstream-stubs-")) if temporary else args.stubs_dir
    try:
        args.token = args.token_file.read_text().strip() if args.token_file else ""
        args.sa_token = args.k8s_sa_token_file.read_text().strip() if args.k8s_sa_token_file else ""
        pb, pb_grpc = load_stubs(stubs_dir)
        stubs = {
            "pb": pb,
            "pb_grpc": pb_grpc,
            "sb": importlib.import_module("openshell.v1.sandbox_pb2"),
            "inf": importlib.import_module("openshell.v1.inference_pb2"),
            "inf_grpc": importlib.import_module("openshell.v1.inference_pb2_grpc"),
        }
        return asyncio.run(run(args, stubs))
    except Exception as exc:
        print(f"upstream supervisor failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if temporary:
            shutil.rmtree(stubs_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
