"""The supervisor's resumable session with the gateway.

One ConnectSupervisor stream at a time. Each attempt:

1. opens a fresh channel on a new TCP connection (TLS material and the bearer credential are read
   from their files again, see ``credentials.py``), sends the hello with our capabilities and the
   journal's epoch and sequence range, and waits for SessionAccepted or SessionRejected within
   ``connect_timeout_s``. The channel has a subchannel pool of its own: with gRPC's default, global
   pool, a new channel to the same address takes over the previous channel's subchannel while it
   lives: its connection if that still looks READY (after a blackhole cut the kernel keeps a dead
   connection ESTABLISHED for many minutes, until its retransmissions give up), or its connection
   attempt, which follows gRPC's own reconnect backoff (up to two minutes) rather than ours. Every
   attempt would then time out, and after a heal the session came back only with the next
   retransmission or gRPC reconnect, tens of seconds later; behind a Service a dead connection also
   pins the supervisor to a partitioned replica. Once the connection is up, HTTP/2 keepalive pings
   close it when the peer's network stack stops answering (``keepalive_time_s +
   keepalive_timeout_s``); the handshake itself is bounded by ``connect_timeout_s`` only, and a
   gateway whose Python loop is stuck still answers pings from gRPC's C core, so only the
   session's stale bound (4.) notices a silent gateway;
2. in **events mode** (the gateway also speaks ``events``) it trims what the gateway already
   holds (``resume_after_sequence``), then streams journal records above that point in batches,
   with at most ``max_inflight_batches`` unacknowledged; each EventAck trims the journal;
3. in **upstream mode** (a gateway without ``events``) it sends the same records through
   PushSandboxLogs, at most ``UPSTREAM_MAX_LINES`` lines per request (what upstream's gateway
   keeps of one), and the exit through ReportMainProcessExit, trimming when each call succeeds;
4. heartbeats at the gateway's interval with jitter, and ends the attempt when the gateway has
   been silent for ``stale_after_intervals`` intervals, so a cut without a reset is noticed.

Between attempts it waits a full-jitter exponential backoff (tenacity), at least the gateway's
retry-after (``SessionRejected.retry_after_ms``, or the ``grpc-retry-pushback-ms`` trailer of an
UNAVAILABLE or RESOURCE_EXHAUSTED status; capped at ``MAX_RETRY_HINT_S``, spread upwards). An
attempt that had a healthy session, or ended on the gateway's reconnect hint, starts the backoff
again from the beginning after a short random spread, so a gateway restart does not make every
supervisor reconnect in the same instant. The gateway also hands out a reconnect window
(``SessionAccepted.reconnect_window_ms``, kept current in each heartbeat answer: the time it needs
to take all its sessions back): when an attempt gets no answer at all (the gateway is down or cut
off), the next wait is drawn over at least that window, so a whole fleet that lost its gateway at
once comes back spread over the time the gateway needs, not within the first backoff steps, where
its hellos would queue past their connect timeout (issue 22's storm). A lone supervisor that lost
its connection is not slowed: its first attempt, the short spread above, usually succeeds.

A gateway that answers, if only to refuse (a rejection, a retry pushback: its database is down) or
to send us elsewhere, is reachable: ``SessionStatus.offline_since`` (what the offline policy
counts) covers only the time in which no gateway answered at all.

A gateway that refuses our credential (UNAUTHENTICATED or PERMISSION_DENIED, on ConnectSupervisor
or an upstream call) is reachable too, but retrying soon is no use: the attempt is logged once per
distinct reason ("gateway refused our credential: ..."), counted (``status.auth_refusals``, and by
status code in ``status.auth_refusal_codes``), shown while it lasts (``status.credential_refused``,
a health reason, until the credential is accepted: an events-mode session accepted, or in upstream
mode a call that succeeds, since an upstream gateway may accept the stream and refuse the calls; or
until an attempt fails for another reason), and ``status.refused_since`` says since when attempts
are refused (the offline policy counts it only with ``offline.count_auth_refusals``); it is retried
after the backoff's cap (``reconnect_max_s``, jittered), or as soon as the credential file changes
(checked every second of that wait; compared
with the version the refused token was read from). When we hold another token the gateway has not
refused (the file's, while the refused one was the stored renewed token, or the reverse), that one
is tried after the normal backoff instead. Only the wait after a refusal is long: a later outage
follows the normal backoff. The journal keeps everything meanwhile.

A gateway-minted sandbox token is renewed over each session with RefreshSandboxToken at about
80 % of its lifetime (:func:`refresh_delay`), retried with backoff while it is valid; every call
from then on sends the renewed one (``credentials.py`` keeps it, also across restarts). A refused
renewal (UNAUTHENTICATED or PERMISSION_DENIED) is a refusal like the others (logged once, counted,
a health reason) and ends the renewal of that token: it is used until it expires. It does not start
``status.refused_since`` (the session is up and the token still valid); the attempts refused once
it has expired do.

Once the main process has exited (:meth:`Session.deliver_exit`) there is something urgent to
deliver and a deadline: the wait in progress is cut short, and from then on the backoff is capped at
``exit_reconnect_max_s``, so a heal during the exit-delivery window is used within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from openshell_wire import __version__
from openshell_wire.convert import WireError, command_from_proto, describe_command, event_to_log_line
from openshell_wire.records import (
    ALL_CAPABILITIES,
    CAP_EVENTS,
    Command,
    CommandKind,
    Event,
    LifecycleKind,
    LifecycleRecord,
    LogRecord,
    LogStream,
)
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from supervisor.commands import AppliedCommands
from supervisor.config import SupervisorConfig
from supervisor.credentials import (
    RENEWED_TOKEN_FILE,
    CredentialError,
    GatewayCredentials,
    TokenTimes,
    bearer,
    jwt_times,
    token_problem,
)
from supervisor.journal import Journal, JournalError
from supervisor.journal.codec import varint

log = logging.getLogger(__name__)


#: Trailing metadata of an UNAVAILABLE status: how long the gateway asks us to stay away, in ms
#: (gRPC's retry pushback, as a gateway whose store fails sends it).
PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: The statuses whose pushback is honoured: the gateway is there but cannot serve us now. On others
#: (an INTERNAL from a proxy, say) a stray trailer must not keep a sandbox away.
PUSHBACK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Most we wait for any retry hint of the gateway (pushback or SessionRejected.retry_after_ms): a
#: misconfigured or buggy gateway cannot keep its sandboxes away for longer than this at a time.
MAX_RETRY_HINT_S = 300.0
#: Most a reconnect hint's delay_window_ms is trusted for (also capped at session.reconnect_max_s):
#: the window is both the delay before the next hello and how long an outage after the hint goes
#: unjournaled, so a misconfigured gateway (a 10 min spread) must neither keep the sandbox away nor
#: hide a real outage for that long. The gateway's *_spread_s settings are bounded to it (le=60).
MAX_HINT_WINDOW_S = 60.0
#: Least heartbeat interval a SessionUpdate may set (the gateway's own floor): a buggy gateway
#: sending 1 ms must not make us beat a thousand times a second with a 3 ms silence bound.
MIN_UPDATE_INTERVAL_S = 0.1
#: A retry hint is spread upwards by up to this fraction, so a fleet told the same pushback does
#: not come back in the same instant.
RETRY_HINT_SPREAD = 0.2
#: Most log lines in one PushSandboxLogsRequest: upstream's gateway keeps only the first 100 of each
#: request and answers OK all the same (openshell-server src/grpc/policy.rs:4105,
#: ``batch.logs.into_iter().take(100)``), so anything past them would be trimmed from our journal as
#: delivered and lost.
UPSTREAM_MAX_LINES = 100
#: Most bytes in one PushSandboxLogsRequest: upstream's gateway decodes at most 1 MiB per message
#: (openshell-server src/multiplex.rs:200, ``MAX_GRPC_DECODE_SIZE = 1_048_576``) and fails the whole
#: call on a larger one, after publishing the requests before it; 64 KiB of headroom below that.
UPSTREAM_MAX_REQUEST_BYTES = 1024 * 1024 - 64 * 1024
#: The keepalive interval towards a gateway without our capabilities (an upstream gateway): gRPC's
#: default server policy answers pings more often than every 5 minutes without data from it with
#: GOAWAY too_many_pings, which would end every session (we reconnect, but needlessly).
UPSTREAM_KEEPALIVE_S = 300.0
#: Statuses that say the gateway refused our credential: not an outage, and no use retrying soon.
REFUSAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
#: Statuses of RefreshSandboxToken that say this gateway will not renew this token (an older
#: gateway without the method, a token it did not mint): stop renewing it.
NO_REFRESH_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION})
#: A token is renewed at this fraction of its lifetime, +/- REFRESH_JITTER (a fleet minted at
#: once must not renew at once), like upstream's supervisor (about 80 %).
REFRESH_AT = 0.8
REFRESH_JITTER = 0.05
#: How often the credential file is checked while a refused credential waits for its retry.
REFUSED_FILE_POLL_S = 1.0


def _field_bytes(size: int) -> int:
    """What a length-delimited field of ``size`` bytes (field number below 16) adds to a message."""
    return 1 + len(varint(size)) + size


def _cut_to_fit(line: pb.SandboxLogLine, room: int) -> pb.SandboxLogLine:
    """``line`` shortened to at most ``room`` bytes: its message cut (at a character boundary) and
    marked, its fields dropped but for the journal's sequence. Only a line that alone is over the
    request limit gets here; sending it whole would fail every push behind it."""
    original = line.ByteSize()
    cut = pb.SandboxLogLine()
    cut.CopyFrom(line)
    cut.ClearField("fields")
    if "sequence" in line.fields:
        cut.fields["sequence"] = line.fields["sequence"]
    marker = f" [cut by the supervisor: the line was {original} bytes, over upstream's message limit]"
    text = line.message.encode()
    keep = len(text)
    while True:
        cut.message = text[:keep].decode(errors="ignore") + marker
        over = cut.ByteSize() - room
        if over <= 0 or keep == 0:
            return cut
        keep = max(keep - over, 0)


def upstream_requests(sandbox_id: str, lines: list[pb.SandboxLogLine]) -> list[pb.PushSandboxLogsRequest]:
    """``lines`` in order as PushSandboxLogsRequests of at most ``UPSTREAM_MAX_LINES`` lines and
    ``UPSTREAM_MAX_REQUEST_BYTES`` bytes each, whichever comes first; a line over the byte limit
    alone goes alone, cut to fit (and says so)."""
    base = pb.PushSandboxLogsRequest(sandbox_id=sandbox_id).ByteSize()
    requests: list[pb.PushSandboxLogsRequest] = []
    batch: list[pb.SandboxLogLine] = []
    size = base
    for whole in lines:
        line = whole
        cost = _field_bytes(line.ByteSize())
        if cost > UPSTREAM_MAX_REQUEST_BYTES - base:
            # The room for the line's body inside its field: the field's own tag and length take
            # at most 1 + 4 bytes at this size.
            line = _cut_to_fit(whole, UPSTREAM_MAX_REQUEST_BYTES - base - 5)
            log.warning(
                "a log line over upstream's message limit was cut",
                extra={"sequence": line.fields.get("sequence", "")},
            )
            cost = _field_bytes(line.ByteSize())
        if batch and (len(batch) >= UPSTREAM_MAX_LINES or size + cost > UPSTREAM_MAX_REQUEST_BYTES):
            requests.append(pb.PushSandboxLogsRequest(sandbox_id=sandbox_id, logs=batch))
            batch, size = [], base
        batch.append(line)
        size += cost
    if batch:
        requests.append(pb.PushSandboxLogsRequest(sandbox_id=sandbox_id, logs=batch))
    return requests


def refresh_delay(times: TokenTimes, *, now: float, seen_at: float, spread: float = 0.0) -> float:
    """Seconds from ``now`` until a token is due for renewal: at REFRESH_AT (+ ``spread``, within
    +/- REFRESH_JITTER) of its lifetime, counted from its ``iat``, or from ``seen_at`` (when we
    first had it) without one. 0 when that is past (renew at once)."""
    issued = times.issued_at if times.issued_at is not None else min(seen_at, times.expires_at)
    fraction = REFRESH_AT + max(-REFRESH_JITTER, min(REFRESH_JITTER, spread))
    return max(issued + (times.expires_at - issued) * fraction - now, 0.0)


def refresh_retry_delay(failures: int, *, remaining_s: float, initial_s: float, max_s: float) -> float:
    """The wait before renewal attempt ``failures + 1`` after ``failures`` failed: exponential with
    full jitter, and at most half the time the token has left, so it is tried again before it
    expires however long the backoff."""
    base = min(initial_s * 2 ** min(failures, 30), max_s)
    return min(random.uniform(base / 2, base), max(remaining_s, 0.0) / 2)


async def finished_call_error(call: Any) -> aio.AioRpcError:
    """The status a finished call ended with, as the error a read of it raises."""
    return aio.AioRpcError(
        await call.code(),
        await call.initial_metadata(),
        await call.trailing_metadata(),
        await call.details(),
        await call.debug_error_string(),
    )


async def write_to(call: Any, message: pb.SupervisorMessage) -> None:
    """``call.write(message)``; a call the gateway already ended raises its status instead of
    gRPC's InvalidStateError (the reader sees the status a moment later): the session ends with
    it, as with a read's (a refusal recognised as one, a pushback honoured), not as an internal
    error of ours. Status OK is the stream's end, as a read's EOF is."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        if not call.done():
            raise
        ended = await finished_call_error(call)
        if ended.code() == grpc.StatusCode.OK:
            raise SessionEnded("the gateway closed the stream") from None
        raise ended from None


class StreamWriter:
    """The one way a session's tasks (heartbeats, sender, command answers) write to its stream:
    one message at a time, nothing after the half-close, and a call the gateway ended seen as its
    status."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._lock = asyncio.Lock()
        self._half_closed = False

    async def write(self, message: pb.SupervisorMessage) -> None:
        async with self._lock:
            if self._half_closed:
                return  # the session is ending on a reconnect hint: what is unsent is resent
            await write_to(self._call, message)

    async def half_close(self) -> None:
        # The gateway then sees a clean end of the stream, not a cancelled call (cosmetic: it
        # does not depend on it). Bounded as a whole: a write blocked on flow control holds the
        # lock, and the receive task must not wait on it (the gateway's Close right after the
        # hint ends the call).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0), self._lock:
                self._half_closed = True
                await self._call.done_writing()


def pushback_s(exc: aio.AioRpcError) -> float:
    """The retry pushback of a failed call in seconds, 0.0 without one (or a malformed one, or on
    a status other than UNAVAILABLE and RESOURCE_EXHAUSTED)."""
    if exc.code() not in PUSHBACK_CODES:
        return 0.0
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            raw = value.decode(errors="replace") if isinstance(value, bytes) else value
            try:
                ms = int(raw)
            except ValueError:
                return 0.0
            # A negative pushback means "do not retry" in gRPC's retry policy; we always retry.
            return min(max(ms, 0) / 1000, MAX_RETRY_HINT_S)
    return 0.0


class SessionEnded(Exception):
    """One attempt is over. ``restart`` means: no backoff, reconnect after ``delay_s``.
    ``answered``: the gateway itself ended it (a rejection, a pushback, a reconnect hint), so it is
    reachable, whatever it refused."""

    def __init__(
        self,
        reason: str,
        *,
        retry_after_s: float = 0.0,
        restart: bool = False,
        delay_s: float = 0.0,
        answered: bool = False,
        refused: bool = False,
        other_credential: bool = False,
        busy: bool = False,
    ):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.restart = restart
        self.delay_s = delay_s
        self.answered = answered
        #: The gateway refused our credential: retry after the long backoff, not soon.
        self.refused = refused
        #: Refused, but we hold another token it has not refused: try that one after the normal
        #: backoff.
        self.other_credential = other_credential
        #: Refused OVERLOADED (admission, a store outage): the gateway is up but busy, and said
        #: when to come back (``retry_after_s``); logged as such, not as a network fault.
        self.busy = busy


@dataclass
class SessionStatus:
    state: str = "connecting"  # connecting | connected | backoff | stopped
    mode: str = ""  # events | upstream
    session_id: str = ""
    attempts: int = 0
    sessions: int = 0
    last_error: str = ""
    last_rtt_ms: float | None = None
    connected_since: float | None = None
    #: time.monotonic() since when no gateway has answered: no session up, and no rejection,
    #: pushback or reconnect hint since (None while connected or answered). The offline policy
    #: counts this: a gateway that refuses us (its database is down) is not offline.
    offline_since: float | None = field(default_factory=time.monotonic)
    #: time.monotonic() since when no session has been up (None while connected): the length of
    #: the outage journaled when one is up again.
    disconnected_since: float | None = field(default_factory=time.monotonic)
    history: list[str] = field(default_factory=list)
    #: Calls the gateway ended with UNAUTHENTICATED or PERMISSION_DENIED.
    auth_refusals: int = 0
    #: The same, by status code name (the metric's ``code`` label).
    auth_refusal_codes: dict[str, int] = field(default_factory=dict)
    #: time.monotonic() of the first refusal since the gateway last accepted our credential (None
    #: while it does). Apart from offline_since: the offline policy counts it only when told to.
    refused_since: float | None = None
    #: Why the gateway refuses our credential, while it does ("" once a session is accepted).
    credential_refused: str = ""
    #: Sandbox tokens renewed with RefreshSandboxToken.
    credential_renewals: int = 0


def _now_ms() -> int:
    return int(time.time() * 1000)


_LENGTH = [bytes((i,)) for i in range(128)]
#: Tags (field number << 3 | 2, length-delimited) of SupervisorMessage.events (100),
#: EventBatch.journal_epoch (1) and EventBatch.events (2).
_EVENTS_TAG = varint(pb.SupervisorMessage.EVENTS_FIELD_NUMBER << 3 | 2)
_EPOCH_TAG = varint(pb.EventBatch.JOURNAL_EPOCH_FIELD_NUMBER << 3 | 2)
_EVENT_TAG = varint(pb.EventBatch.EVENTS_FIELD_NUMBER << 3 | 2)


def event_batch_message(epoch: str, records: list[tuple[int, bytes]]) -> pb.SupervisorMessage:
    """The SupervisorMessage carrying an EventBatch of journal payloads, without decoding them.

    The journal stores each record as the protobuf ``Event`` bytes, so the batch is assembled in
    the wire format (a length-delimited ``events`` field per record) and parsed once by the C
    protobuf runtime, instead of decoding every record into Python objects and encoding it again.
    """
    tag = _EVENT_TAG
    parts = []
    if epoch:
        raw_epoch = epoch.encode()
        parts.append(_EPOCH_TAG + varint(len(raw_epoch)) + raw_epoch)
    for _sequence, payload in records:
        size = len(payload)
        parts.append(tag + (_LENGTH[size] if size < 128 else varint(size)))
        parts.append(payload)
    body = b"".join(parts)
    return pb.SupervisorMessage.FromString(_EVENTS_TAG + varint(len(body)) + body)


#: Applies a command (stop or signal) to the sandbox; returns why it could not, or None. It must
#: return promptly: a stop with a grace period runs on after it has returned.
CommandHandler = Callable[[Command], Awaitable[str | None]]


class Session:
    def __init__(
        self,
        *,
        config: SupervisorConfig,
        journal: Journal,
        instance_id: str,
        on_command: CommandHandler | None = None,
        on_rtt: Callable[[float], None] | None = None,
    ) -> None:
        self._config = config
        self._s = config.session
        self._journal = journal
        self._instance_id = instance_id
        self._acked = asyncio.Condition()
        self._on_command = on_command
        self._on_rtt = on_rtt
        self._applied = AppliedCommands(config.journal.directory / "commands.json")
        #: Held from a command's apply until its answer is written, and by the event sender from
        #: its read of the journal until its batch is written: the answer goes out on the stream
        #: before the batch carrying the command's audit line (see ``_receive``).
        self._answering = asyncio.Lock()
        #: Set by a HEARTBEAT command; the heartbeat loop reads it before every beat.
        self._interval_override: float | None = None
        #: Set by the gateway's SessionUpdate (adaptive heartbeats) for the current session; the
        #: command's override wins over it.
        self._session_interval: float | None = None
        #: Set when either changes: a heartbeat sleep in progress is cut short to the new interval.
        self._interval_changed = asyncio.Event()
        #: (time.monotonic(), delay window) of the reconnect hint that ended the last session: a new
        #: session within the window (+ connect_timeout_s) is a move, not an outage.
        self._hinted: tuple[float, float] | None = None
        self._credentials = GatewayCredentials(
            config.gateway, renewed_path=config.journal.directory / RENEWED_TOKEN_FILE
        )
        #: The last refusal logged (each distinct reason once, not once per retry).
        self._refusal_logged = ""
        #: The credential file's version the refused token was read with: a new one ends the wait.
        self._refused_stamp: object = None
        #: The credential file's version when this attempt read its token.
        self._attempt_stamp: object = None
        #: The wait in progress follows a refusal (the attempt that just failed was refused).
        self._waiting_refused = False
        #: A token without iat and when we first had it: its lifetime is counted from then.
        self._token_seen: tuple[str, float] = ("", 0.0)
        #: The bearer token of the current attempt, sent with every call (None: no credential file).
        self._token: str | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        #: Set when there is something urgent to deliver: the wait between attempts ends at once.
        self._urgent = asyncio.Event()
        #: The main process has exited: reconnect with the short exit backoff from now on.
        self._delivering_exit = False
        #: time.monotonic() before which the gateway asked us not to come back (its retry hint).
        self._not_before = 0.0
        #: The last gateway that accepted us lacked our capabilities: ping it no more often than
        #: gRPC's default server policy allows.
        self._upstream_gateway = False
        #: The gateway's reconnect window (seconds; 0: none given), from the last session's accept
        #: and heartbeat answers: the least range of the wait after an attempt nobody answered.
        self._reconnect_window_s = 0.0
        self.status = SessionStatus()

    # -- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a session up until cancelled."""
        try:
            while True:
                retrying = AsyncRetrying(
                    sleep=self._sleep,
                    wait=self._backoff,
                    retry=retry_if_exception(lambda e: isinstance(e, SessionEnded) and not e.restart),
                    before_sleep=self._before_sleep,
                    reraise=True,
                )
                try:
                    async for attempt in retrying:
                        with attempt:
                            await self._attempt()
                except SessionEnded as ended:
                    # A healthy session ended (or the gateway asked us to move): start over, spread out.
                    self.status.state = "backoff"
                    delay = ended.delay_s
                    if self._delivering_exit:
                        # A drain's spread does not apply to the last records of an exited sandbox.
                        delay = min(delay, random.uniform(0, self._s.exit_reconnect_max_s))
                    log.info("session ended (%s); reconnecting in %.2fs", ended.reason, delay)
                    await self._sleep(delay)
        finally:
            self.status.state = "stopped"

    def deliver_exit(self) -> None:
        """The main process has exited: try at once and keep the reconnect backoff short.

        Called by the exit-delivery window (``Agent._flush``). A wait between attempts in progress
        ends at once (the gateway's retry hint still holds); a connected session goes on, but the
        first wait after it ends is skipped, and from now on every backoff, and the spread after a
        healthy session or a reconnect hint, is capped at ``exit_reconnect_max_s``.
        """
        if not self._delivering_exit:
            self._delivering_exit = True
            log.info("main process exited: delivering what is left with a short reconnect backoff")
        self._urgent.set()

    async def wait_acked(self, sequence: int) -> None:
        """Return once the gateway has acknowledged every record up to ``sequence``."""
        async with self._acked:
            await self._acked.wait_for(lambda: self._journal.acked_through >= sequence)

    # -- one attempt -------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Wait between attempts; an urgent delivery (the main process exited) ends the wait."""
        if seconds > 0 and not self._urgent.is_set():
            if self._waiting_refused:
                await self._wait_refused(seconds)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), seconds)
        # Consumed: only the wait in progress is cut short, later ones follow the (short) backoff.
        self._urgent.clear()
        self._waiting_refused = False
        # Not the gateway's retry hint, though: its store is failing, coming back sooner is no use.
        rest = self._not_before - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)

    async def _wait_refused(self, seconds: float) -> None:
        """The wait after a refused credential: ends early when the main process exited, or when
        the credential file changed (checked every REFUSED_FILE_POLL_S), so a fix is used at once."""
        deadline = time.monotonic() + seconds
        while (rest := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), min(rest, REFUSED_FILE_POLL_S))
                return
            if self._credentials.file_stamp() != self._refused_stamp:
                log.info("the gateway credential file changed: trying it now")
                return

    def _backoff(self, state: RetryCallState) -> float:
        cap = self._s.exit_reconnect_max_s if self._delivering_exit else self._s.reconnect_max_s
        base = wait_random_exponential(multiplier=self._s.reconnect_initial_s, max=cap)(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        # Only the wait after a refusal is the refused wait: a later failure (the gateway down
        # while it is fixed) follows the normal backoff.
        self._waiting_refused = isinstance(exc, SessionEnded) and exc.refused and not exc.other_credential
        if self._waiting_refused:
            # Refused: coming back soon only hammers the gateway's auth (the credential file
            # changing ends the wait, see _wait_refused). The long wait holds while the exit is
            # being delivered too: the refusal does not go away because it is urgent.
            self._not_before = 0.0
            return self._s.reconnect_max_s * random.uniform(1 - RETRY_HINT_SPREAD, 1.0)
        retry_after = exc.retry_after_s if isinstance(exc, SessionEnded) else 0.0
        if retry_after > 0:
            # At least what the gateway asked for (within our cap), spread upwards: a fleet told
            # the same pushback must not come back in the same instant.
            retry_after = min(retry_after, MAX_RETRY_HINT_S) * (1 + random.uniform(0, RETRY_HINT_SPREAD))
        self._not_before = time.monotonic() + retry_after
        window = min(self._reconnect_window_s, cap)
        if window > 0 and isinstance(exc, SessionEnded) and not exc.answered:
            # Nobody answered: the gateway is likely down for its whole fleet, which redials
            # now. Full jitter over its window, unless our own backoff has grown past it.
            ceiling = min(cap, self._s.reconnect_initial_s * 2 ** (state.attempt_number - 1))
            if window > ceiling:
                base = random.uniform(0, window)
        return max(base, retry_after)

    def _channel_options(self) -> list[tuple[str, int | str]]:
        s = self._s
        keepalive_s = (
            max(s.keepalive_time_s, UPSTREAM_KEEPALIVE_S) if self._upstream_gateway else s.keepalive_time_s
        )
        return [
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.enable_retries", 0),
            # A subchannel pool of this channel's own, so every attempt opens a new TCP connection
            # instead of taking over a (possibly dead) one of an earlier channel (module docstring).
            ("grpc.use_local_subchannel_pool", 1),
            # We reconnect on our own schedule with a fresh channel.
            ("grpc.initial_reconnect_backoff_ms", 1000),
            # A connection the gateway no longer answers is closed after keepalive time + timeout.
            # Our gateway permits a ping every 5 s (gateway/server.py server_options), half of
            # keepalive_time_s's least value; pings go on without data written by us (a blackholed
            # write sits in the socket buffer), as gRPC otherwise stops after two. An upstream
            # gateway (learnt from the last session) gets gRPC's default server policy's interval:
            # a GOAWAY too_many_pings would end each session (an UNAVAILABLE we reconnect from).
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def _before_sleep(self, state: RetryCallState) -> None:
        self.status.state = "backoff"
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        if isinstance(exc, SessionEnded) and exc.refused:
            # Logged at error level once per reason when it happened (_refused).
            log.debug("credential refused; attempt %d, retrying in %.2fs", state.attempt_number, wait)
            return
        if isinstance(exc, SessionEnded) and exc.busy:
            # An answer, not a fault of the network: the gateway sheds load (or its store is out)
            # and said when to come back. Info: it is counted and alerted on at the gateway.
            log.info(
                "gateway busy (%s); attempt %d, retrying in %.2fs as it asked (at least %.2fs)",
                exc.reason,
                state.attempt_number,
                wait,
                exc.retry_after_s,
                extra={"retry_after_ms": round(exc.retry_after_s * 1000)},
            )
            return
        log.warning(
            "gateway unreachable (%s); attempt %d, retrying in %.2fs", exc, state.attempt_number, wait
        )

    async def _attempt(self) -> None:
        self.status.attempts += 1
        self.status.state = "connecting"
        options = self._channel_options()
        # Credentials and TLS material are read for every attempt, so rotated files are picked up.
        try:
            tls = self._credentials.channel_credentials()
            self._token = self._credentials.token()
            # The file's version this token was read with: one rotated after it is a fix to try.
            self._attempt_stamp = self._credentials.loaded_stamp()
            self._metadata = bearer(self._token) if self._token is not None else None
        except CredentialError as exc:
            raise self._after(SessionEnded(str(exc)), None) from None
        address = self._config.gateway.address
        if tls is None:
            channel = aio.insecure_channel(address, options=options)
        else:
            options.extend(self._credentials.channel_options())
            channel = aio.secure_channel(address, tls, options=options)
        call: Any = None
        accepted_at: float | None = None
        try:
            stub = pb_grpc.OpenShellStub(channel)
            call = stub.ConnectSupervisor(metadata=self._metadata)
            accepted = await self._handshake(call)
            accepted_at = time.monotonic()
            await self._run_session(stub, call, accepted)
        except SessionEnded as ended:
            raise self._after(ended, accepted_at) from None
        except aio.AioRpcError as exc:
            if exc.code() in REFUSAL_CODES:
                raise self._after(self._refused(exc), accepted_at) from None
            pushback = pushback_s(exc)
            failed = SessionEnded(
                f"{exc.code().name}: {exc.details()}", retry_after_s=pushback, answered=pushback > 0
            )
            raise self._after(failed, accepted_at) from None
        except (TimeoutError, OSError) as exc:
            raise self._after(SessionEnded(f"{type(exc).__name__}: {exc}"), accepted_at) from None
        except Exception as exc:
            # A bug of ours must not end the session task for good: the sandbox would be cut off
            # from its gateway in silence. Log it loudly and go on with the backoff.
            log.exception("session attempt failed unexpectedly")
            raise self._after(
                SessionEnded(f"internal error: {type(exc).__name__}: {exc}"), accepted_at
            ) from exc
        finally:
            if self.status.connected_since is not None:
                self.status.disconnected_since = time.monotonic()
            self.status.connected_since = None
            if call is not None:
                call.cancel()
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    def _redacted(self, exc: aio.AioRpcError, *tokens: str | None) -> str:
        """The details of a refusal without our tokens: a gateway echoing what it got must not
        put one into our log."""
        details = exc.details() or ""
        current: str | None = None
        with contextlib.suppress(CredentialError):
            current = self._credentials.token()
        for token in (*tokens, current):
            if token:
                details = details.replace(token, "<token>")
        return details

    def _note_refusal(self, reason: str, code: grpc.StatusCode, *, ends_attempt: bool = True) -> None:
        """Count a refusal and mark it, for status and health, until the credential is accepted;
        log it once per reason. Only a refusal that ends an attempt starts ``refused_since`` (the
        offline policy's clock with ``offline.count_auth_refusals``): a refused renewal leaves the
        session up and its token valid until its exp, and the refusals once it has expired end
        attempts. So in both modes the clock runs from the first refused attempt, whatever clears it."""
        self.status.auth_refusals += 1
        codes = self.status.auth_refusal_codes
        codes[code.name] = codes.get(code.name, 0) + 1
        self.status.credential_refused = reason
        if ends_attempt and self.status.refused_since is None:
            self.status.refused_since = time.monotonic()
        if reason != self._refusal_logged:
            self._refusal_logged = reason
            log.error("%s", reason)

    def _refused(self, exc: aio.AioRpcError) -> SessionEnded:
        """A call ended UNAUTHENTICATED or PERMISSION_DENIED: log it (once per reason), count it
        and mark it, for status and health, until a session is accepted."""
        sent = self._token
        reason = f"gateway refused our credential: {exc.code().name}: {self._redacted(exc, sent)}"
        self._note_refusal(reason, exc.code())
        # The file's version the refused token was read with, not the one now: a file rotated
        # while the attempt was on is a fix to try.
        self._refused_stamp = self._attempt_stamp
        other = False
        if sent is not None:
            self._credentials.refused(sent)
            with contextlib.suppress(CredentialError):
                other = self._credentials.token() not in (None, sent)
        # Answered: the gateway is there (the offline policy is about reaching it, and stopping
        # the sandbox would not fix a credential); nothing is acknowledged, so nothing is trimmed.
        return SessionEnded(reason, answered=True, refused=True, other_credential=other)

    def _after(self, ended: SessionEnded, accepted_at: float | None) -> SessionEnded:
        """Turn the end of a long healthy session into a restart without backoff, and count the
        time offline from the first attempt no gateway answered."""
        self.status.last_error = ended.reason
        if not ended.refused:
            # Whether the gateway still refuses our credential is not known now (it may be down):
            # health says what this attempt found.
            self.status.credential_refused = ""
        if ended.answered:
            self.status.offline_since = None
        elif self.status.offline_since is None:
            self.status.offline_since = time.monotonic()
        healthy = accepted_at is not None and time.monotonic() - accepted_at >= self._s.healthy_session_s
        # A pushback (the gateway's store is failing) keeps its wait, healthy session or not; so
        # does a refusal (an upstream gateway refusing the calls of a long session): retrying it
        # at once would only be refused again.
        if healthy and not ended.restart and not ended.refused and ended.retry_after_s == 0:
            ended.restart = True
            ended.delay_s = random.uniform(0, self._s.reconnect_initial_s)
        return ended

    async def _handshake(self, call: Any) -> pb.SessionAccepted:
        hello = pb.SupervisorMessage()
        h = hello.hello
        h.sandbox_id = self._config.sandbox_id
        h.instance_id = self._instance_id
        # Upstream's rule (its HA work): this process's connection attempt, counted from 1, with a
        # fresh instance_id per process and nothing persisted, so a reconnect of ours supersedes
        # the owner record our previous session left on an upstream gateway. A configured
        # instance_id kept across restarts breaks that: the restarted process counts from 1 again
        # and our gateway refuses its hellos SUPERSEDED until the old claim goes stale.
        h.connection_epoch = self.status.attempts
        h.capabilities.extend(ALL_CAPABILITIES)
        h.journal_epoch = self._journal.epoch
        h.journal_first_sequence = self._journal.first_sequence
        h.journal_last_sequence = self._journal.last_sequence
        h.supervisor_version = __version__
        async with asyncio.timeout(self._config.gateway.connect_timeout_s):
            # A gateway may refuse the call before it reads the hello (a credential it rejects).
            await write_to(call, hello)
            first = await call.read()
        if first is aio.EOF:
            raise SessionEnded("the gateway closed the stream before answering the hello")
        kind = first.WhichOneof("payload")
        if kind == "session_rejected":
            r = first.session_rejected
            raise SessionEnded(
                f"rejected: {r.reason}",
                retry_after_s=r.retry_after_ms / 1000,
                answered=True,
                busy=r.code == pb.REJECT_CODE_OVERLOADED,
            )
        if kind != "session_accepted":
            raise SessionEnded(f"the gateway answered the hello with {kind or 'an unknown message'}")
        accepted: pb.SessionAccepted = first.session_accepted
        self._reconnect_window_s = accepted.reconnect_window_ms / 1000
        return accepted

    async def _run_session(
        self, stub: pb_grpc.OpenShellStub, call: Any, accepted: pb.SessionAccepted
    ) -> None:
        interval = (accepted.heartbeat_interval_ms / 1000) or float(accepted.heartbeat_interval_secs) or 10.0
        events_mode = CAP_EVENTS in accepted.capabilities
        self._upstream_gateway = not events_mode
        if events_mode:
            # The stream is what needs the credential: accepting it accepts the credential. An
            # upstream gateway may accept the stream and refuse every call (a method-scoped auth):
            # there the first call that succeeds says so (_credential_accepted).
            self._credential_accepted()
        self._note_reconnected()
        self._session_interval = None
        self.status.sessions += 1
        self.status.state = "connected"
        self.status.mode = "events" if events_mode else "upstream"
        self.status.session_id = accepted.session_id
        self.status.connected_since = time.monotonic()
        writer = StreamWriter(call)
        write = writer.write

        if events_mode:
            resume = accepted.resume_after_sequence
            if resume > self._journal.last_sequence:
                # The gateway holds records our disk lost (an fsync-pending tail): never reuse them.
                log.warning(
                    "gateway holds sequence %d beyond our journal's %d", resume, self._journal.last_sequence
                )
                self._journal.advance_to(resume)
            if resume < self._journal.acked_through:
                log.warning(
                    "gateway resumes at %d below our acknowledged %d: records in between were trimmed",
                    resume,
                    self._journal.acked_through,
                )
            await self._ack(resume)
            sender: Coroutine[Any, Any, None] = self._send_events(write, resume)
        else:
            sender = self._send_upstream(stub)
        log.info(
            "session accepted",
            extra={"session_id": accepted.session_id, "mode": self.status.mode, "interval_s": interval},
        )
        tasks = [
            asyncio.create_task(self._heartbeats(write, interval), name="heartbeat"),
            asyncio.create_task(
                self._receive(call, write, interval, half_close=writer.half_close), name="receive"
            ),
            asyncio.create_task(sender, name="send"),
        ]
        # Not among the tasks whose end ends the session: a renewal that stops (or fails) leaves
        # the session up; the token stays valid until its exp.
        refresher = asyncio.create_task(self._refresh_credential(stub), name="credential refresh")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, refresher):
                task.cancel()
            await asyncio.gather(*tasks, refresher, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        raise SessionEnded("session tasks ended")

    async def _refresh_credential(self, stub: pb_grpc.OpenShellStub) -> None:
        """Renew the gateway-minted sandbox token of this session while it lasts; never returns
        (cancelled with the session)."""
        try:
            await self._refresh_loop(stub)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must be seen but must not end the session: the token stays valid a while.
            log.exception("renewing the gateway credential failed unexpectedly")
        await asyncio.Event().wait()

    async def _refresh_loop(self, stub: pb_grpc.OpenShellStub) -> None:
        failures = 0
        timeout = self._config.gateway.connect_timeout_s
        while True:
            try:
                token = self._credentials.token()
            except CredentialError:
                return  # nothing valid to renew with; the next attempt reports why
            times = self._credentials.renewable(token) if token else None
            if token is None or times is None:
                return  # not renewable: opaque, renewal off, or the gateway said it cannot
            now = time.time()
            if self._token_seen[0] != token:
                self._token_seen = (token, now)
            remaining = times.expires_at - now
            if failures == 0:
                delay = refresh_delay(
                    times, now=now, seen_at=self._token_seen[1], spread=random.uniform(-1, 1) * REFRESH_JITTER
                )
            elif remaining < 1.0:
                log.error("the gateway credential expires before it could be renewed")
                return
            else:
                delay = refresh_retry_delay(
                    failures,
                    remaining_s=remaining,
                    initial_s=self._s.reconnect_initial_s,
                    max_s=self._s.reconnect_max_s,
                )
            await asyncio.sleep(delay)
            try:
                response = await stub.RefreshSandboxToken(
                    pb.RefreshSandboxTokenRequest(), metadata=bearer(token), timeout=timeout
                )  # type: ignore[misc]
            except aio.AioRpcError as exc:
                if exc.code() in REFUSAL_CODES:
                    # The gateway will not renew this token (a sandbox re-created while this
                    # session is open, say), and would refuse the next connect with it too: say so
                    # now, not when it expires; retrying would only be refused again.
                    self._credentials.not_renewable(token)
                    self._note_refusal(
                        f"gateway refused to renew our credential: {exc.code().name}: "
                        f"{self._redacted(exc, token)}",
                        exc.code(),
                        ends_attempt=False,
                    )
                    return
                if exc.code() in NO_REFRESH_CODES:
                    self._credentials.not_renewable(token)
                    log.warning(
                        "the gateway does not renew our credential (%s: %s); it is used until it expires",
                        exc.code().name,
                        exc.details(),
                    )
                    return
                failures += 1
                log.warning("renewing the gateway credential failed (%s: %s)", exc.code().name, exc.details())
                continue
            renewed: str = response.token
            new_times = jwt_times(renewed) if token_problem(renewed) is None else None
            if new_times is None or new_times.expires_at <= times.expires_at:
                failures += 1
                log.warning("the gateway answered RefreshSandboxToken with no newer token")
                continue
            failures = 0
            self._credentials.store_renewed(renewed)
            # Every call from now on (the upstream calls of this session, the next attempts)
            # sends the renewed token; the open stream keeps the one it was opened with.
            self._token, self._metadata = renewed, bearer(renewed)
            self.status.credential_renewals += 1
            log.info(
                "gateway credential renewed",
                extra={"expires_in_s": round(new_times.expires_at - time.time(), 1)},
            )

    async def _ack(self, sequence: int) -> None:
        self._journal.ack(sequence)
        async with self._acked:
            self._acked.notify_all()

    async def _heartbeats(
        self, write: Callable[[pb.SupervisorMessage], Awaitable[None]], interval: float
    ) -> None:
        jitter = self._s.heartbeat_jitter
        self._interval_override = None
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._interval(interval) * (1 + jitter * random.uniform(-1, 1))
            while (left := due - loop.time()) > 0:
                self._interval_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interval_changed.wait(), left)
                    # A shorter interval applies to the sleep in progress (the gateway's stale
                    # bound may follow it); a longer one from the next beat (the gateway widens
                    # its bound as it writes the update, not before).
                    due = min(
                        due, loop.time() + self._interval(interval) * (1 + jitter * random.uniform(-1, 1))
                    )
            msg = pb.SupervisorMessage()
            msg.heartbeat.sent_unix_ms = _now_ms()
            await write(msg)

    async def _receive(
        self,
        call: Any,
        write: Callable[[pb.SupervisorMessage], Awaitable[None]],
        interval: float,
        *,
        half_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        while True:
            # A heartbeat command or a SessionUpdate may have changed the interval: the silence we
            # accept follows it.
            stale = self._interval(interval) * self._s.stale_after_intervals
            try:
                msg = await asyncio.wait_for(call.read(), stale)
            except TimeoutError:
                raise SessionEnded(f"no message from the gateway for {stale:.1f}s") from None
            if msg is aio.EOF:
                raise SessionEnded("the gateway closed the stream")
            kind = msg.WhichOneof("payload")
            if kind == "event_ack":
                if msg.event_ack.journal_epoch == self._journal.epoch:
                    await self._ack(msg.event_ack.acked_through_sequence)
            elif kind == "heartbeat":
                if msg.heartbeat.reconnect_window_ms:
                    self._reconnect_window_s = msg.heartbeat.reconnect_window_ms / 1000
                if msg.heartbeat.echo_unix_ms:
                    self.status.last_rtt_ms = max(0, _now_ms() - msg.heartbeat.echo_unix_ms)
                    if self._on_rtt is not None:
                        self._on_rtt(self.status.last_rtt_ms / 1000)
            elif kind == "reconnect":
                window = min(msg.reconnect.delay_window_ms / 1000, MAX_HINT_WINDOW_S, self._s.reconnect_max_s)
                self._hinted = (time.monotonic(), window)
                if half_close is not None:
                    await half_close()
                raise SessionEnded(
                    f"gateway asked to reconnect: {msg.reconnect.reason}",
                    restart=True,
                    delay_s=random.uniform(0, window) if window > 0 else 0.0,
                    answered=True,
                )
            elif kind == "session_rejected":
                r = msg.session_rejected
                raise SessionEnded(
                    f"session ended by the gateway: {r.reason}",
                    retry_after_s=r.retry_after_ms / 1000,
                    answered=True,
                    busy=r.code == pb.REJECT_CODE_OVERLOADED,
                )
            elif kind == "command":
                async with self._answering:
                    reply, notes = await self._command(msg.command)
                    # Journaled once applied, before the answer: a stream cut at the answer's
                    # write must not lose the line while the command stays applied. The lock
                    # keeps the batch carrying the line behind the answer on the stream, so the
                    # gateway (which handles a stream's messages in order) has stored the answer
                    # when it acknowledges the line; the exit flush waits for that.
                    for note in notes:
                        self._note(note)
                    await write(reply)
            elif kind == "session_update":
                # Adaptive heartbeats: the gateway's interval for this session from now on; nothing
                # journaled (it is not about the sandbox). A HEARTBEAT command's interval wins.
                update = msg.session_update
                if update.heartbeat_interval_ms:
                    self._session_interval = update.heartbeat_interval_ms / 1000
                    if self._session_interval < MIN_UPDATE_INTERVAL_S:
                        log.warning(
                            "the gateway's heartbeat interval %.3fs raised to %.1fs",
                            self._session_interval,
                            MIN_UPDATE_INTERVAL_S,
                            extra={"interval_s": self._session_interval},
                        )
                        self._session_interval = MIN_UPDATE_INTERVAL_S
                    self._interval_changed.set()
                    log.info(
                        "heartbeat interval set by the gateway to %.2fs",
                        self._session_interval,
                        extra={
                            "interval_s": self._session_interval,
                            "overridden": bool(self._interval_override),
                        },
                    )
            elif kind == "relay_open":
                reply = pb.SupervisorMessage()
                reply.relay_open_result.channel_id = msg.relay_open.channel_id
                reply.relay_open_result.success = False
                reply.relay_open_result.error = "unsupported"
                await write(reply)
            else:
                log.debug("ignoring a gateway message of unknown kind")

    async def _command(self, raw: pb.Command) -> tuple[pb.SupervisorMessage, list[str]]:
        """Apply one command (at most once per id); the answer to send back and the audit lines.

        The caller journals the audit lines before it writes the answer, and holds back the
        event batches meanwhile (``_answering``), so the gateway, which handles a stream's
        messages in order, has stored the answer by the time it acknowledges them; the exit
        flush waits for that acknowledgement."""
        notes: list[str] = []
        reply = pb.SupervisorMessage()
        reply.command_result.command_id = raw.command_id
        try:
            command = command_from_proto(raw)
        except WireError as exc:
            reply.command_result.error = str(exc)
            notes.append(f"command {raw.command_id or '(no id)'} refused: {exc}")
            return reply, notes
        earlier = self._applied.outcome(command.command_id)
        if earlier is not None:
            reply.command_result.applied = bool(earlier.applied)
            reply.command_result.error = earlier.error
            reply.command_result.duplicate = True
            notes.append(
                f"command {command.command_id} ({describe_command(command)}): repeated, not applied again"
            )
            return reply, notes
        try:
            self._applied.begin(command.command_id)
        except OSError as exc:
            # Without the durable note a redelivery could apply it twice: refuse instead.
            reply.command_result.error = f"cannot record the command id: {exc}"
            notes.append(f"command {command.command_id} refused: {reply.command_result.error}")
            return reply, notes
        if command.kind is CommandKind.HEARTBEAT:
            self._interval_override = command.interval_ms / 1000
            self._interval_changed.set()
            error = None
        elif self._on_command is None:
            error = f"{command.kind.value} commands are not supported by this supervisor"
        else:
            error = await self._on_command(command)
        reply.command_result.applied = error is None
        reply.command_result.error = error or ""
        self._applied.finish(command.command_id, applied=error is None, error=error or "")
        notes.append(
            f"command {command.command_id} ({describe_command(command)}): "
            + ("applied" if error is None else f"failed: {error}")
        )
        return reply, notes

    def _credential_accepted(self) -> None:
        """The gateway accepted our credential: the refusal (if any) is over."""
        if self.status.credential_refused or self.status.refused_since is not None or self._refusal_logged:
            self.status.credential_refused = self._refusal_logged = ""
            self.status.refused_since = None
        self._credentials.accepted(self._token)

    def _interval(self, accepted_s: float) -> float:
        """The heartbeat interval now: a HEARTBEAT command's, else the gateway's last SessionUpdate,
        else the session's accepted one."""
        return self._interval_override or self._session_interval or accepted_s

    def _note_reconnected(self) -> None:
        """Journal the end of an outage (not the first connection), with its length; a session
        the gateway moved (a reconnect hint, then a new session within its window plus
        connect_timeout_s) is no outage: a drain or rebalance adds nothing to the sandbox's history."""
        since = self.status.disconnected_since
        self.status.offline_since = self.status.disconnected_since = None
        hinted, self._hinted = self._hinted, None
        if since is None or self.status.sessions == 0:
            return
        if hinted is not None:
            at, window = hinted
            moved_in = time.monotonic() - at
            if moved_in <= window + self._config.gateway.connect_timeout_s:
                log.debug("moved to another gateway session in %.1fs after a reconnect hint", moved_in)
                return
        outage_ms = int((time.monotonic() - since) * 1000)
        with contextlib.suppress(JournalError):
            self._journal.append(LifecycleRecord(kind=LifecycleKind.RECONNECTED, duration_ms=outage_ms))
        log.info("gateway reachable again after %.1fs", outage_ms / 1000)

    def _note(self, text: str) -> None:
        """Journal a line of the supervisor's own about the sandbox (an audit trail of commands)."""
        log.info(text)
        with contextlib.suppress(JournalError):
            self._journal.append(LogRecord(stream=LogStream.SUPERVISOR, message=text))

    async def _send_events(
        self, write: Callable[[pb.SupervisorMessage], Awaitable[None]], resume: int
    ) -> None:
        cursor = resume
        inflight: list[int] = []  # last sequence of each unacknowledged batch
        while True:
            acked = self._journal.acked_through
            inflight = [s for s in inflight if s > acked]
            if len(inflight) >= self._s.max_inflight_batches:
                await self.wait_acked(inflight[0])
                continue
            # Not while a command is being answered: its audit line, journaled before its answer
            # is written, must reach the gateway after the answer (see ``_receive``).
            async with self._answering:
                records = self._journal.read_raw_after(
                    cursor, max_records=self._s.batch_max_records, max_bytes=self._s.batch_max_bytes
                )
                if records:
                    msg = event_batch_message(self._journal.epoch, records)
                    cursor = records[-1][0]
                    # Mark before the write: while it awaits, appends may evict, and what is on
                    # its way to the gateway must not also be counted in a gap.
                    self._journal.mark_sent(cursor)
                    await write(msg)
            if not records:
                await self._journal.wait_for_append(max(cursor, self._journal.last_sequence))
                continue
            inflight.append(cursor)

    async def _send_upstream(self, stub: pb_grpc.OpenShellStub) -> None:
        """The upstream log and exit paths; a call's success is its acknowledgement."""
        sandbox_id = self._config.sandbox_id
        timeout = max(self._config.gateway.connect_timeout_s, 10.0)
        while True:
            cursor = self._journal.acked_through
            events = self._journal.read_after(
                cursor, max_records=self._s.batch_max_records, max_bytes=self._s.batch_max_bytes
            )
            if not events:
                await self._journal.wait_for_append(max(cursor, self._journal.last_sequence))
                continue
            pending: list[Event] = []
            for event in events:
                p = event.payload
                if isinstance(p, LifecycleRecord) and p.kind is LifecycleKind.EXITED:
                    await self._push(stub, sandbox_id, pending, timeout)
                    pending = []
                    await stub.ReportMainProcessExit(
                        pb.ReportMainProcessExitRequest(
                            sandbox_id=sandbox_id, instance_id=self._instance_id, exit_code=p.exit_code
                        ),
                        timeout=timeout,
                        metadata=self._metadata,
                    )  # type: ignore[misc]
                    self._journal.mark_sent(event.sequence)
                    self._credential_accepted()
                    await self._ack(event.sequence)
                else:
                    pending.append(event)
            await self._push(stub, sandbox_id, pending, timeout)

    async def _push(
        self, stub: pb_grpc.OpenShellStub, sandbox_id: str, events: list[Event], deadline_s: float
    ) -> None:
        if not events:
            return
        # One call carries the whole batch as several requests of at most UPSTREAM_MAX_LINES
        # lines and UPSTREAM_MAX_REQUEST_BYTES bytes: the call's OK is the only acknowledgement
        # upstream gives, and it covers every request of the call, so trimming after it is safe;
        # one call per batch (not one per request) keeps a batch to one round trip. A call that
        # fails is sent again whole (what upstream stored of it arrives twice: at-least-once).
        requests = upstream_requests(sandbox_id, [event_to_log_line(sandbox_id, e) for e in events])
        self._journal.mark_sent(events[-1].sequence)
        await stub.PushSandboxLogs(iter(requests), timeout=deadline_s, metadata=self._metadata)  # type: ignore[misc]
        self._credential_accepted()
        await self._ack(events[-1].sequence)
