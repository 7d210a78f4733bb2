"""The supervisor-facing gRPC service ``openshell.v1.OpenShell``.

ConnectSupervisor is a state machine per stream (docs/protocol.md draws it):

    AWAIT_HELLO --hello ok--> ACCEPTED --events/heartbeats--> ... --end/stale/replaced--> CLOSED
         \\--bad hello / timeout--> SessionRejected, CLOSED

A reader task answers the supervisor's heartbeats itself (the hot path) and moves every other
message into the session's inbox; the handler takes those one at a time, so events of one
sandbox are stored in order, and an acknowledgement is sent only after the transaction that
stored them has committed. The two take turns on the stream (gRPC takes one write at a time).
Silence longer than the stale bound ends the stream: a blackholed supervisor cannot hold a
session forever.

Supervisors that speak only the upstream subset get the upstream behaviour: SessionAccepted,
heartbeats both ways, and their logs and exit arrive through PushSandboxLogs and
ReportMainProcessExit, which carry no sequence numbers (the store numbers them).

The service is put on the server by :func:`gateway.rpc.add_service`, which decodes the frames
(a malformed one is INVALID_ARGUMENT) and answers a store failure UNAVAILABLE with a retry hint.
A session that ends on a store failure is told first: SessionRejected with the same hint. A
database that hangs is a store failure too: the store work a supervisor waits on (the hello's,
each command result's) is given up after ``grpc.store_timeout_s``, an event batch's after
``grpc.batch_store_timeout_s`` (see ``_within``).

A hello claims the sandbox in the database before the session is accepted (one UPDATE raises
the row's ``owner_epoch``; ``SessionAccepted.owner_epoch`` is that epoch), and every write of the
session is fenced on it (:mod:`gateway.store.fencing`): once a newer session has claimed the
sandbox, here or on another replica, a batch, a command result or a heartbeat flush of this one
writes nothing, nothing is acknowledged, and the stream ends with SessionRejected SUPERSEDED
saying who owns the sandbox now. The database's epoch, not this process, orders the sessions'
writes.

When a session ends, its disconnection is written by a task of its own, retried with backoff
while the store fails, until it lands or a newer session owns the sandbox (the write is
conditional on the session's claim, so it can never undo a newer session's connection). Until it
lands, the sandbox's stale heartbeat already keeps it from being shown connected
(:mod:`gateway.sandbox_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from gateway import upstream_config
from gateway.admission import Admission, Ticket
from gateway.admission import Refusal as AdmissionRefusal
from gateway.auth import CredentialRefused, Refusal, SandboxPrincipal
from gateway.auth.sandbox_tokens import MintedToken
from gateway.auth.supervisors import SupervisorAuthenticator
from gateway.batching import Batcher
from gateway.config import GatewayConfig
from gateway.drain import disconnect_delay_s
from gateway.heartbeats import HeartbeatGovernor, SessionUpdateOut
from gateway.metrics import GatewayMetrics
from gateway.replicas import ReplicaIdentity, this_replica
from gateway.routing import Handed
from gateway.rpc import STORE_UNAVAILABLE, MalformedFrame, RateLimitedLog, Unavailable, store_retry_after_ms
from gateway.sandbox_state import Liveness
from gateway.sessions import (
    Close,
    Inbound,
    InboundEnded,
    InboxItem,
    Outbound,
    Session,
    SessionRegistry,
    Wake,
    new_session_id,
)
from gateway.store import CommandRow, CommandStore, EventStore, SandboxStore, StoreError
from gateway.store.commands import Answer
from gateway.store.db import cancels_safely, is_transient
from gateway.store.fencing import Fenced
from gateway.store.sandboxes import (
    Claim,
    ClaimBusy,
    ClaimRequest,
    NoSuchSandbox,
    SandboxRow,
    StaleConnection,
    StoredPolicy,
)
from gateway.tasks import BackgroundTasks
from gateway.upstream_logs import log_record as upstream_log_record
from openshell_wire import __version__
from openshell_wire.convert import WireError, command_to_proto, result_from_proto
from openshell_wire.records import (
    ALL_CAPABILITIES,
    CAP_COMMANDS,
    CAP_EVENTS,
    Command,
    CommandKind,
    JournalEpoch,
    LifecycleKind,
    LifecycleRecord,
    Payload,
    SandboxId,
    sandbox_id_problem,
)
from openshell_wire.v1 import inference_pb2 as inf
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc
from openshell_wire.v1 import sandbox_pb2 as sb

log = logging.getLogger(__name__)

Ctx = aio.ServicerContext[Any, Any]
_T = TypeVar("_T")
_In = TypeVar("_In")
_Out = TypeVar("_Out")

#: A sandbox that asks for a token within this long (at most a tenth of token_ttl_s) of the last
#: one minted for it (the same life, the same pod) gets that one again: minting is not a thing a
#: token holder can make the gateway do in a loop.
REMINT_AFTER_S = 30.0
#: The last token minted per sandbox life kept at most (a bound on memory; emptied when full).
MINTED_MAX = 10_000
#: The largest ``SupervisorHello.connection_epoch`` taken (the wire's uint64 is stored in a signed
#: 64-bit column, ``sandboxes.connection_epoch``).
MAX_CONNECTION_EPOCH = 2**63 - 1
#: A stale check that ran this much later than its timer was due (the event loop was behind)
#: looks once more this much later before it ends the session: the supervisor's beat may be
#: received but not yet in the inbox.
STALE_RECHECK_S = 0.25


@dataclass(frozen=True, slots=True)
class _Binding:
    """A call's verified credential and the sandbox life it was bound to (None: an unknown
    sandbox let through by ``register_unknown``), with the row the binding read (a hello claims
    on it instead of reading the sandbox again)."""

    principal: SandboxPrincipal
    generation: int | None
    row: SandboxRow | None = None


#: A disconnection that cannot be written is tried again after at most this long (full-jitter
#: exponential backoff from a fifth of a second).
DISCONNECT_RETRY_MAX_S = 10.0
#: On shutdown, how long cancelled disconnection writes are given to end (see ``drain``).
DRAIN_CANCEL_WAIT_S = 0.5
#: How long a session's end waits for the heartbeat answer its reader is writing (a client that
#: reads nothing holds it until its call ends; gRPC takes one write at a time).
READER_WRITE_WAIT_S = 1.0
#: SQLite: how many store calls given up at their deadline may still run (they are not cancelled:
#: see ``_within``); past it, a new call is refused at once. SQLite's pool holds 15 connections
#: (SQLAlchemy's 5 and 10 overflow): beyond that a new call would only queue behind calls nobody
#: waits for any more.
MAX_GIVEN_UP_STORE_CALLS = 15

#: The most hellos claimed in one transaction, and whose pending commands one read fetches (group
#: commit, gateway.batching): enough for a burst's batches to amortise their round trips; the
#: work of one batch (its JSON, its rows) is done on the event loop and must stay short.
HELLO_BATCH_MAX = 64


#: The session loop's reminders to itself (see ``_serve``).
_STALE_CHECK = Wake("stale check")
_STORED = Wake("stored")


#: A call's ``context.write``.
Write = Callable[[pb.GatewayMessage], Awaitable[None]]


async def _write_in_turn(session: Session, write: Write, message: pb.GatewayMessage) -> None:
    """A write of the session's loop, after the reader's heartbeat answer if one is being written
    (gRPC takes one write at a time on a stream; the reader never waits: it queues instead)."""
    await session.write_ended()
    session.writing = True
    try:
        await write(message)
    finally:
        session.writing = False


async def _reader_write_ended(session: Session, *, timeout_s: float) -> None:
    """Wait until the reader's write in progress, if any, has ended (the session's loop is over:
    only the reader writes now), at most ``timeout_s`` (a client that stopped reading)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await session.write_ended()


class _Admitted:
    """The hello's admission ticket, if it got one, released however the call ends. Held by the
    call's frame for the session's life: an ExitStack here cost a 760-byte deque per session."""

    __slots__ = ("_ticket",)

    def __init__(self) -> None:
        self._ticket: Ticket | None = None

    def hold(self, ticket: Ticket) -> Ticket:
        self._ticket = ticket
        return ticket

    def close(self) -> None:
        if self._ticket is not None:
            self._ticket.release()  # idempotent
            self._ticket = None


#: The capability sets seen so far, each kept once: a hello's set (a subset of ALL_CAPABILITIES,
#: so at most 2**len of them) is shared by every session that has it instead of held per session.
_CAPABILITY_SETS: dict[frozenset[str], frozenset[str]] = {}
_KNOWN_CAPABILITIES = frozenset(ALL_CAPABILITIES)


def _capability_set(offered: Iterable[str]) -> frozenset[str]:
    """The capabilities of ``offered`` this gateway speaks (unknown ones ignored), interned."""
    known = frozenset(offered) & _KNOWN_CAPABILITIES
    return _CAPABILITY_SETS.setdefault(known, known)


class _NotAnswered(StoreError):
    """A store call ``_within`` gave up at its deadline, or refused because the store is behind."""


#: An event batch whose transaction the database lost is tried again after this pause, doubled up
#: to the largest, until its deadline (see ``_retrying``).
STORE_RETRY_INITIAL_S, STORE_RETRY_MAX_S = 0.1, 1.0


class ProtocolError(Exception):
    """The supervisor sent something not valid at this point; the stream ends with the reason."""


def validate_sandbox_id(sandbox_id: str) -> str | None:
    """None when valid, else the reason."""
    if not sandbox_id:
        return "hello without sandbox_id"
    return sandbox_id_problem(sandbox_id)


def _command_message(command: Command) -> pb.GatewayMessage:
    msg = pb.GatewayMessage()
    msg.command.CopyFrom(command_to_proto(command))
    return msg


@dataclass(frozen=True, slots=True)
class _CommandOut(Outbound):
    """A command the API hands a live session: ``taken`` turns True once the session has written
    it to its stream, False if the session ends first or the command expires in the inbox."""

    command: Command
    expires_at: datetime
    taken: asyncio.Future[bool]


def _settle(taken: asyncio.Future[bool], value: bool) -> None:
    if not taken.done():
        taken.set_result(value)


def _reject(code: pb.RejectCode.ValueType, reason: str, retry_after_ms: int = 0) -> pb.GatewayMessage:
    msg = pb.GatewayMessage()
    msg.session_rejected.reason = reason
    msg.session_rejected.code = code
    msg.session_rejected.retry_after_ms = retry_after_ms
    return msg


class OpenShellService(pb_grpc.OpenShellServicer):
    def __init__(
        self,
        *,
        config: GatewayConfig,
        registry: SessionRegistry,
        sandboxes: SandboxStore,
        events: EventStore,
        commands: CommandStore,
        metrics: GatewayMetrics | None = None,
        authenticator: SupervisorAuthenticator | None = None,
        identity: ReplicaIdentity | None = None,
        lease_written: Callable[[], bool] | None = None,
        admission: Admission | None = None,
        heartbeats: HeartbeatGovernor | None = None,
    ) -> None:
        self._metrics = metrics
        if metrics is not None:
            events.on_records = metrics.observe_records  # gaps, lifecycle, health: as stored
        #: The interval handed out (adaptive; a governor that never runs keeps the fixed one).
        self._heartbeats = (
            heartbeats if heartbeats is not None else HeartbeatGovernor(config.sessions, registry=registry)
        )
        #: Bounds the hellos worked on (None: no bound, as in tests of other concerns).
        self._admission = admission
        #: Whether this run's lease row exists yet (None: always, as in tests of other concerns).
        self._lease_written = lease_written
        #: Every supervisor call's credential goes through it (None: unit tests of other concerns).
        self._auth = authenticator
        # A limiter per concern: a store outage fails the disconnection writes of every session
        # at once, and their successes come in a burst when it ends.
        self._retry_log = RateLimitedLog(log, concern="disconnection-retry")
        self._recorded_log = RateLimitedLog(log, concern="disconnection-recorded")
        # An outage ends every session at once: a line or two for all of them, not one each.
        self._outage_closed_log = RateLimitedLog(log, concern="sessions-closed-store", burst=2)
        self._config = config
        self._registry = registry
        self._sandboxes = sandboxes
        self._events = events
        self._commands = commands
        # This replica's id and run (the lease row's): another replica tells from them whether the
        # owner of a session lives. The app passes its own; a service alone (tests) makes one.
        self._identity = identity if identity is not None else this_replica(config.ha)
        self._owner = self._identity.id
        self._tasks: set[asyncio.Task[Any]] = set()
        # Store calls given up at their deadline (see _within): left to end by themselves.
        self._abandoned: set[asyncio.Task[Any]] = set()
        # Whether those are cancelled too: not on SQLite, where that can leave the file locked.
        self._cancel_given_up = cancels_safely(config.database.url)
        #: (sandbox, generation, pod uid) -> (when, the token last minted for it): see REMINT_AFTER_S.
        self._minted: dict[tuple[str, int, str | None], tuple[float, MintedToken]] = {}
        # Group commit of the hellos' store work: one transaction claims every hello that arrived
        # while the previous one ran, one read fetches their pending commands (issue 22: a burst
        # of hellos was bound by the round trips of one transaction each, not by CPU).
        self._batches = BackgroundTasks("hello-batches")
        self._claims: Batcher[ClaimRequest, Claim | None] = Batcher(
            self._bounded_batch(
                functools.partial(sandboxes.claim_many, skip_locked=True), what="claim the hellos' sandboxes"
            ),
            name="hello-claims",
            tasks=self._batches,
            max_size=HELLO_BATCH_MAX,
        )
        self._pending_reads: Batcher[str, list[tuple[CommandRow, timedelta]]] = Batcher(
            self._bounded_batch(commands.pending_left_many, what="read the hellos' pending commands"),
            name="hello-pending-commands",
            tasks=self._batches,
            max_size=HELLO_BATCH_MAX,
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background write failed: %s", task.exception(), extra={"task": task.get_name()})

    async def _within(
        self,
        coro: Coroutine[Any, Any, _T],
        *,
        deadline: float,
        what: str,
        limit_s: float | None = None,
        undo: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    ) -> _T:
        """Run a store call a supervisor is waiting on, giving up at ``deadline`` (monotonic) with
        a StoreError, which the session answers with SessionRejected OVERLOADED and a retry hint.

        Without it a database that hangs (a stopped server, a blackholed connection, a SQLite lock
        held long) rather than fails would make the supervisor's hello time out, which it counts
        as offline (offline.policy stop could then stop healthy sandboxes), and a hung event batch
        would hold the session's heartbeat answers until it went stale. The call runs in a task of
        its own and is not awaited past the deadline: SQLAlchemy finishes a connection's cleanup
        (a rollback that waits for the hung server too) before it lets a cancellation through.
        A call given up may still commit later; nothing of it was acknowledged, and what it wrote
        is idempotent (events by sequence, the connection conditional on the session).

        On PostgreSQL the call given up is cancelled (a hung server would hold it otherwise). On
        SQLite it is left to run to its end, which the busy timeout bounds: cancelled inside a
        write transaction, it could leave its connection holding the file's write lock with no one
        to release it (see :func:`gateway.store.db.cancels_safely`). At most
        ``MAX_GIVEN_UP_STORE_CALLS`` such calls run; past that the store is behind, and a new call
        is refused at once without touching it (a hello answered OVERLOADED with a retry hint).

        ``undo``: what reverts the call if it is given up (at the deadline, or its caller
        cancelled), spawned once the call has ended: it may commit after it was given up, and an
        undo that ran first would find nothing to revert."""
        limit_s = self._config.grpc.store_timeout_s if limit_s is None else limit_s
        if not self._cancel_given_up and len(self._abandoned) >= MAX_GIVEN_UP_STORE_CALLS:
            coro.close()
            raise _NotAnswered(
                f"{what}: the database is behind ({len(self._abandoned)} store calls given up "
                f"after {limit_s:g}s still running)"
            )
        task = asyncio.create_task(coro, name=what)
        try:
            await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.CancelledError:
            self._abandon(task, undo=undo)
            raise
        if not task.done():
            self._abandon(task, undo=undo)
            raise _NotAnswered(f"{what}: the database did not answer within {limit_s:g}s")
        return task.result()

    def _abandon(
        self, task: asyncio.Task[Any], *, undo: Callable[[], Coroutine[Any, Any, Any]] | None = None
    ) -> None:
        if self._cancel_given_up:
            task.cancel()
        self._abandoned.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._abandoned.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.debug("a store call given up at its deadline failed: %s", task.exception())
            if undo is not None:
                self._spawn(undo(), name=f"undo-{task.get_name()}")

        task.add_done_callback(done)

    def _store_deadline(self, limit_s: float | None = None) -> float:
        return time.monotonic() + (self._config.grpc.store_timeout_s if limit_s is None else limit_s)

    @staticmethod
    async def _retrying(call: Callable[[], Awaitable[_T]], *, deadline: float) -> _T:
        """``call()`` tried again with backoff while it fails because the database is unreachable
        for now (a restart, a failover: its transaction was lost, not refused) and ``deadline`` is
        not reached; for idempotent writes only (an event batch: by sequence; a command result:
        only while pending). ``_within`` still
        bounds the whole, so a long outage ends the session as before; a short one is not seen by
        the supervisor, since nothing is acknowledged before a commit."""
        pause = STORE_RETRY_INITIAL_S
        while True:
            try:
                return await call()
            except StoreError as exc:
                if not is_transient(exc) or time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, STORE_RETRY_MAX_S)

    async def deliver(self, created: CommandRow) -> bool:
        """Send a command just stored to its sandbox's live session on this gateway, if there is
        one that speaks ``commands`` and is of the generation the command was created for, and
        wait up to ``commands.delivery_wait_s`` for the session to write it to its stream: True
        means it did (a session merely existing is not enough: it may be dead and not yet
        noticed). Otherwise it goes out with the sandbox's next session (pending commands are sent
        at every hello) unless it expires first; a session slower than the wait may still send it."""
        handed = self.hand_off(created)
        if handed is None:
            return False
        try:
            # shield: a POST that gives up must not cancel the outcome the session settles.
            return await asyncio.wait_for(asyncio.shield(handed.taken), self._config.commands.delivery_wait_s)
        except TimeoutError:
            return False

    def hand_off(self, created: CommandRow) -> Handed | None:
        """Queue a command for its sandbox's live session on this replica (see ``deliver``; the
        command router of :mod:`gateway.routing` uses this for any replica's commands): None when
        no session here may take it, else the session's claim and a future the session settles,
        True once it wrote the command to its stream, False if it ended first or the command
        expired in its inbox (``created.expires_at`` on this replica's clock)."""
        session = self._registry.get(created.sandbox_id)
        if session is None or CAP_COMMANDS not in session.capabilities:
            return None
        if created.generation is not None and session.generation != created.generation:
            # The id was created again around the command: a supervisor of the old sandbox still
            # connected must not get the new one's command (nor the new one a command the
            # re-creation failed).
            return None
        if created.expires_at <= datetime.now(UTC):
            return None
        taken: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        message = _command_message(created.command)
        session.inbox.put_nowait(
            _CommandOut(message, command=created.command, expires_at=created.expires_at, taken=taken)
        )
        return Handed(taken, session.owner_epoch)

    def _expect_heartbeats(self, session: Session, command: Command) -> None:
        """A slower heartbeat asked of the supervisor widens the silence this session may keep,
        or the gateway would drop the session it just reconfigured (the supervisor jitters its
        beats by up to half the interval)."""
        if command.kind is CommandKind.HEARTBEAT:
            wanted = Liveness.stale_after_for(
                command.interval_ms / 1000, grace_s=self._config.sessions.grace_s, jitter=0.5
            )
            session.stale_after_s = max(session.stale_after_s, wanted)

    def _bounded_batch(
        self, run: Callable[[Sequence[_In]], Awaitable[_Out]], *, what: str
    ) -> Callable[[Sequence[_In]], Awaitable[_Out]]:
        """A hellos' batch that gives up at ``grpc.store_timeout_s`` where a store call can be
        cancelled safely (PostgreSQL: the transaction is rolled back with its connection). Every
        hello of a batch was submitted before it started, so each one's own deadline has passed
        by then; without this bound a batch on a connection that hangs (a primary frozen or cut
        off) held every later hello of the replica behind it until statement_timeout_s dropped
        the connection, where hellos each on their own connection reached the new primary at
        once. On SQLite the batch runs to its end, as every SQLite store call does (see
        ``cancels_safely``)."""
        if not self._cancel_given_up:
            return run
        limit_s = self._config.grpc.store_timeout_s

        async def bounded(items: Sequence[_In]) -> _Out:
            try:
                async with asyncio.timeout(limit_s):
                    return await run(items)
            except TimeoutError:
                raise StoreError(f"cannot {what}: the database did not answer within {limit_s:g}s") from None

        return bounded

    async def _claim(self, request: ClaimRequest) -> Claim | None:
        """The hello's claim, in the next batch (gateway.batching); a row the batch found held by
        another transaction (ClaimBusy) is claimed alone, waiting for the lock as it must, so one
        sandbox's row held long delays that sandbox's hello only, not the batches."""
        try:
            return await self._claims.submit(request)
        except ClaimBusy:
            return await self._sandboxes.claim_one(request)

    async def drain(self, *, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the writes that ended sessions left behind, then cancel
        what is still retrying (called on shutdown, before the database closes). A disconnection
        given up this way is still not shown as connected: its heartbeat goes stale."""
        deadline = time.monotonic() + timeout_s
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=left)
        pending = set(self._tasks)
        if pending:
            log.warning(
                "shutting down with %d disconnection(s) not written: the store is failing", len(pending)
            )
            for task in pending:
                task.cancel()
        if pending or self._abandoned:
            # Briefly: a write stuck on a hung database may take its time to notice (the rest of
            # the cancellation ends with the event loop; the shutdown has a deadline).
            await asyncio.wait(pending | self._abandoned, timeout=DRAIN_CANCEL_WAIT_S)
        self._claims.close()
        self._pending_reads.close()
        await self._batches.close(timeout_s=DRAIN_CANCEL_WAIT_S)
        self._retry_log.close()
        self._recorded_log.close()
        self._outage_closed_log.close()

    # -- ConnectSupervisor ---------------------------------------------------------------

    async def ConnectSupervisor(  # type: ignore[override]  # the stubs know only generators
        self, request_iterator: AsyncIterator[pb.SupervisorMessage], context: Ctx
    ) -> None:
        # A coroutine writing with context.write, not an async generator yielding: per held
        # session that is no generator object (ours and gRPC's wrapper's), no aclosing and no entry
        # in the loop's weak set of async generators (python -m chaos.memprobe), and one await
        # per message instead of a value raised through every generator layer. A call cancelled
        # (the peer left) cancels this coroutine: _connect's cleanup (the registry, the
        # disconnection write) runs at once.
        # The hello's admission ticket (if any) is held here, so that however the hello ends
        # (answered, refused, failed, cancelled) its concurrency slot is freed.
        admitted = _Admitted()
        try:
            await self._connect(request_iterator, context, admitted)
        except StoreError as exc:
            admitted.close()
            # Tell our supervisor on the stream (it backs off at least this long), then end the
            # call UNAVAILABLE with the same hint for any other client (gateway.rpc).
            retry_after_ms = store_retry_after_ms()
            try:
                await context.write(_reject(pb.REJECT_CODE_OVERLOADED, STORE_UNAVAILABLE, retry_after_ms))
            except Exception as write_failed:
                # The client left, or a heartbeat answer still holds the stream past the wait
                # for it: the status below carries the same hint.
                log.debug("store-failure rejection not written: %r", write_failed)
            else:
                if self._metrics is not None:
                    self._metrics.sessions_rejected.labels(
                        pb.RejectCode.Name(pb.REJECT_CODE_OVERLOADED)
                    ).inc()
            raise Unavailable(STORE_UNAVAILABLE, retry_after_ms=retry_after_ms, detail=str(exc)) from None
        finally:
            admitted.close()

    async def _connect(
        self,
        request_iterator: AsyncIterator[pb.SupervisorMessage],
        context: Ctx,
        admitted: _Admitted,
    ) -> None:
        peer = context.peer()
        send = context.write
        try:
            # asyncio.timeout, not wait_for: no task wrapped around the read (one per hello).
            async with asyncio.timeout(self._config.grpc.hello_timeout_s):
                first = await anext(request_iterator)
        except (TimeoutError, StopAsyncIteration):
            log.info("stream closed before hello", extra={"peer": peer})
            await send(self._rejection(pb.REJECT_CODE_PROTOCOL_ERROR, "no hello received"))
            return
        if first.WhichOneof("payload") != "hello":
            kind = first.WhichOneof("payload") or "an unknown message kind"
            await send(
                self._rejection(pb.REJECT_CODE_PROTOCOL_ERROR, f"the first message must be hello, got {kind}")
            )
            return
        hello = first.hello
        problem = validate_sandbox_id(hello.sandbox_id)
        if problem is not None:
            log.info("hello rejected: %s", problem, extra={"peer": peer})
            await send(self._rejection(pb.REJECT_CODE_INVALID_HELLO, problem))
            return
        if "\x00" in hello.instance_id or "\x00" in hello.journal_epoch:
            # PostgreSQL's text (and jsonb, which the batched claim sends its requests in) cannot
            # hold NUL: refused here, or its claim would fail the whole batch of hellos it rode in.
            problem = "instance_id and journal_epoch must not contain NUL characters"
            log.info("hello rejected: %s", problem, extra={"peer": peer})
            await send(self._rejection(pb.REJECT_CODE_INVALID_HELLO, problem))
            return
        if hello.connection_epoch > MAX_CONNECTION_EPOCH:
            # uint64 on the wire, a signed 64-bit column in the store: refused here, before any
            # store work, rather than failing the claim (a traceback on SQLite, a false store
            # outage on PostgreSQL). No honest supervisor counts its connections that far.
            problem = (
                f"connection_epoch {hello.connection_epoch} out of range (at most {MAX_CONNECTION_EPOCH})"
            )
            log.info("hello rejected: %s", problem, extra={"peer": peer})
            await send(self._rejection(pb.REJECT_CODE_INVALID_HELLO, problem))
            return
        ticket: Ticket | None = None
        if self._admission is not None:
            # Before any signature check or store work, and no queue: a hello over a bound is
            # answered now, with when to come back (see gateway.admission).
            entered = self._admission.try_enter()
            if isinstance(entered, AdmissionRefusal):
                retry_after_ms = self._admission.retry_after_ms(entered)
                log.debug(
                    "hello refused: overloaded (%s)",
                    entered.value,
                    extra={"peer": peer, "sandbox_id": hello.sandbox_id, "retry_after_ms": retry_after_ms},
                )
                await send(
                    self._rejection(
                        pb.REJECT_CODE_OVERLOADED, f"overloaded: {entered.value}, retry later", retry_after_ms
                    )
                )
                return
            ticket = admitted.hold(entered)
            del entered
        sandbox_id = SandboxId(hello.sandbox_id)
        if self._lease_written is not None and not self._lease_written():
            # A replica started before its schema was migrated renews in the background: a claim
            # before its first renewal would name an owner without a lease row, shown disconnected
            # on every replica. Refused like a store outage (OVERLOADED with a retry hint).
            raise StoreError("this replica's lease is not written yet (its schema was being migrated)")
        # One deadline for all the store work the hello waits on (see _within).
        deadline = self._store_deadline()
        # Before anything of the sandbox is read or written: a refused peer learns only the reason.
        binding = await self._authenticate(context, sandbox_id, "ConnectSupervisor", deadline=deadline)
        capabilities = _capability_set(hello.capabilities)
        events_mode = CAP_EVENTS in capabilities
        if events_mode and not hello.journal_epoch:
            await send(
                self._rejection(
                    pb.REJECT_CODE_INVALID_HELLO, "capability 'events' needs a journal_epoch in the hello"
                )
            )
            return
        epoch = JournalEpoch(hello.journal_epoch if events_mode else "")
        register_unknown = self._config.sessions.register_unknown
        # The row the binding read is the one claimed (its generation pins the claim: a sandbox
        # created again since is caught by the claim itself, which then writes nothing). Without
        # a binding (auth off) nothing is read first: the claim, unpinned, reports the generation
        # it claimed, and registers a missing row itself when register_unknown allows (or refuses
        # it, NoSuchSandbox, writing nothing): the hello's store work is one batched transaction.
        registered = binding.row if binding is not None else None
        if binding is not None and registered is None:
            # An unknown sandbox let through by the credential check (rare): registered first, so
            # the binding's generation is checked against the row before anything is claimed.
            if not register_unknown:
                await send(
                    self._rejection(
                        pb.REJECT_CODE_UNKNOWN_SANDBOX, f"sandbox {sandbox_id} is not known to this gateway"
                    )
                )
                return
            registered = await self._within(
                self._sandboxes.ensure(sandbox_id), deadline=deadline, what="hello: register the sandbox"
            )
        if (
            binding is not None
            and registered is not None
            and binding.generation not in (None, registered.generation)
        ):
            # Deleted and created again between the binding and this read: the credential is the
            # earlier life's, and must not get a session of (and commands for) the new one.
            await self._refuse(
                context,
                CredentialRefused(
                    Refusal.STALE,
                    f"sandbox {sandbox_id} was created again (generation {registered.generation}) "
                    f"while this credential of generation {binding.generation} was checked",
                ),
                method="ConnectSupervisor",
                sandbox_id=sandbox_id,
            )
        session_id = new_session_id()
        opened_at = datetime.now(UTC)
        pinned = registered.generation if registered is not None else None
        try:
            claimed = await self._within(
                self._claim(
                    ClaimRequest(
                        sandbox_id,
                        instance_id=hello.instance_id,
                        session_id=session_id,
                        journal_epoch=epoch,
                        owner=self._identity.id,
                        owner_run=self._identity.run,
                        at=opened_at,
                        generation=pinned,
                        connection_epoch=hello.connection_epoch,
                        # Live as the API's rule says: a session heard from within fresh_for_s.
                        live_for_s=Liveness.from_settings(self._config.sessions).fresh_for_s,
                        # Read in the claim's transaction, after its UPDATE: an older owner can no
                        # longer raise the mark after this read without it being stored (its
                        # batches are fenced from then on; see SandboxStore.claim).
                        read_high_water_mark=events_mode,
                        register=registered is None and register_unknown,
                    )
                ),
                deadline=deadline,
                what="hello: claim the sandbox",
                # Given up at its deadline or cancelled (the peer left), the claim may still
                # commit: undone after it ended (the batcher delivers a cancellation only once
                # the batch holding the claim has ended), conditional on this session's id, which
                # nobody else writes.
                undo=lambda: self._record_disconnected(sandbox_id, session_id, generation=pinned),
            )
        except NoSuchSandbox:
            # Not registered (register_unknown off) and nothing written.
            await send(
                self._rejection(
                    pb.REJECT_CODE_UNKNOWN_SANDBOX, f"sandbox {sandbox_id} is not known to this gateway"
                )
            )
            return
        except StaleConnection as exc:
            # A delayed hello of the supervisor that holds the sandbox on a newer connection:
            # refused without a claim (nothing was written), so it cannot take the sandbox back.
            log.warning(
                "hello refused: %s",
                exc,
                extra={"sandbox_id": sandbox_id, "peer": peer, "instance_id": exc.instance_id},
            )
            await send(self._rejection(pb.REJECT_CODE_SUPERSEDED, str(exc)))
            return
        except (_NotAnswered, asyncio.CancelledError):
            raise  # given up (undone by _within once the claim ended), or never run
        except BaseException:
            # The claim failed, perhaps in its commit, which may have landed: undone too.
            self._spawn(
                self._record_disconnected(sandbox_id, session_id, generation=pinned),
                name=f"disconnected-{sandbox_id}",
            )
            raise
        if claimed is None:
            await send(
                self._rejection(
                    pb.REJECT_CODE_SUPERSEDED,
                    f"sandbox {sandbox_id} was created again while this hello was handled; reconnect",
                )
            )
            return
        session = self._registry.open(
            sandbox_id=sandbox_id,
            instance_id=hello.instance_id,
            journal_epoch=epoch,
            capabilities=capabilities,
            owner_epoch=claimed.owner_epoch,
            session_id=session_id,
            opened_at=opened_at,
        )
        if session is None:
            # Another hello of this sandbox on this replica claimed it after us but entered the
            # registry first: it owns the sandbox (this claim is fenced already).
            await send(
                self._rejection(
                    pb.REJECT_CODE_SUPERSEDED,
                    f"sandbox {sandbox_id} is owned by a newer session on this replica "
                    f"({self._identity.id}); this hello's claim (epoch {claimed.owner_epoch}) was taken",
                )
            )
            return
        session.generation = claimed.generation
        # From here on the session is in the registry: whatever happens (the peer gives up while
        # we wait for the database, a protocol error, cancellation), the finally below undoes it.
        reader: asyncio.Task[None] | None = None
        reason = "ended"
        try:
            session.acked_through = claimed.high_water_mark
            await send(self._accept(session, hello, peer))
            if ticket is not None:
                ticket.accepted()  # written: the handshake is over, its slot freed
            # This frame lives as long as the session: what only the hello needed goes now (the
            # hello's message, the claim's answer and the ticket would otherwise be held per session).
            del first, hello, claimed, binding, registered
            ticket = None
            admitted.close()
            if CAP_COMMANDS in session.capabilities:
                # Whatever is still unanswered goes out again; the supervisor drops repeats.
                # The time left is the database's, from this replica's clock before the read: the
                # deadline errs early by the read's latency, never late, whatever the clocks say.
                before = datetime.now(UTC)
                pending = await self._within(
                    self._pending_reads.submit(sandbox_id),
                    deadline=self._store_deadline(),
                    what="read the pending commands",
                )
                sent: list[str] = []
                for row, left in pending:
                    if before + left <= datetime.now(UTC):
                        continue  # expired since the read (a slow stream): the next read marks it
                    self._expect_heartbeats(session, row.command)
                    await send(_command_message(row.command))
                    sent.append(row.command.command_id)
                if sent:
                    # Written to this stream: recorded (and a POST waiting on it told), so the
                    # router's redelivery does not send them again.
                    self._spawn(
                        self._commands.mark_delivered(
                            sandbox_id, sent, by=self._owner, owner_epoch=session.owner_epoch
                        ),
                        name=f"delivered-{sandbox_id}",
                    )
            reader = asyncio.create_task(
                self._read_into(session, request_iterator, send), name=f"read-{sandbox_id}"
            )
            await self._serve(session, send)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("session ended by a protocol error: %s", exc, extra={"sandbox_id": sandbox_id})
            await _write_in_turn(session, send, self._rejection(pb.REJECT_CODE_PROTOCOL_ERROR, str(exc)))
        except Fenced as exc:
            # Nothing of the fenced write was committed, and nothing of it acknowledged.
            reason = f"fenced: {exc}"
            session.fenced = True
            self._count_fenced(exc.kind)
            log.warning(
                "session fenced: %s",
                exc,
                extra={"sandbox_id": sandbox_id, "session_id": session.session_id, "epoch": exc.epoch},
            )
            await _write_in_turn(session, send, self._rejection(pb.REJECT_CODE_SUPERSEDED, str(exc)))
        except MalformedFrame as exc:
            reason = str(exc)
            raise
        except StoreError as exc:
            reason = f"store unavailable: {exc}"
            raise
        finally:
            if reader is not None:
                # A heartbeat answer the reader is writing is let finish first (bounded): a write
                # cancelled in Python goes on in gRPC's core, and a rejection written after it
                # (ConnectSupervisor's, on a store failure) would be refused as a second write.
                await _reader_write_ended(session, timeout_s=READER_WRITE_WAIT_S)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            if self._registry.close(session) and not session.fenced:
                # The handler may be cancelled (the peer went away): the write that records the
                # disconnection runs as its own task, which the gateway awaits before it closes
                # the database. A fenced session's would be fenced too: a newer one owns the row.
                # A session asked to move waits for its supervisor's claim elsewhere (drain).
                self._spawn(
                    self._record_disconnected(
                        sandbox_id,
                        session.session_id,
                        generation=session.generation,
                        owner_epoch=session.owner_epoch,
                        delay_s=disconnect_delay_s(session.hinted, self._config),
                    ),
                    name=f"disconnected-{sandbox_id}",
                )
            # Out of the registry now, so nothing more is queued: commands still waiting in the
            # inbox were not taken (they stay pending for the next session).
            while not session.inbox.empty():
                item = session.inbox.get_nowait()
                if isinstance(item, _CommandOut):
                    _settle(item.taken, False)
            closed = {"sandbox_id": sandbox_id, "session_id": session.session_id}
            if reason.startswith("store unavailable"):
                self._outage_closed_log.log(
                    logging.INFO, ("store",), f"session closed ({reason}); others may follow", extra=closed
                )
            else:
                log.info("session closed (%s)", reason, extra=closed)

    def _rejection(
        self, code: pb.RejectCode.ValueType, reason: str, retry_after_ms: int = 0
    ) -> pb.GatewayMessage:
        if self._metrics is not None:
            self._metrics.sessions_rejected.labels(pb.RejectCode.Name(code)).inc()
        return _reject(code, reason, retry_after_ms)

    def _count_fenced(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.fenced_writes.labels(kind).inc()

    async def _record_disconnected(
        self,
        sandbox_id: str,
        session_id: str,
        *,
        generation: int | None,
        owner_epoch: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Mark the sandbox disconnected, retrying while the store fails. The write is conditional
        on the session (its id, and with ``owner_epoch`` its claim), so once it runs, whether it
        changed the row or found a newer session there (fenced: counted, not retried), it is done,
        and it can land in any order with a newer session's claim. ``delay_s``: a session asked to
        reconnect elsewhere waits for its supervisor's new claim, which usually wins, so the API
        does not show a moved sandbox disconnected meanwhile (the shutdown's deadline bounds it)."""
        at = datetime.now(UTC)
        if delay_s > 0:
            await asyncio.sleep(delay_s)

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if self._metrics is not None:
                self._metrics.background_write_failures.labels("disconnect").inc()
            self._retry_log.log(
                logging.WARNING,
                # One key for all sandboxes: an outage fails every session's write at once, and is
                # one line (a minute) rather than one per session; the summary counts the others.
                ("disconnect-write",),
                f"cannot record that sandbox {sandbox_id} disconnected (attempt {state.attempt_number}), "
                f"retrying: {exc}",
                extra={"sandbox_id": sandbox_id, "session_id": session_id},
            )

        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(StoreError),
                wait=wait_random_exponential(multiplier=0.2, max=DISCONNECT_RETRY_MAX_S),
                before_sleep=failed,
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    await self._sandboxes.mark_disconnected(
                        sandbox_id,
                        session_id=session_id,
                        at=at,
                        generation=generation,
                        owner_epoch=owner_epoch,
                    )
        except Fenced as exc:
            # The usual end of a session whose supervisor reconnected elsewhere first (a drain
            # moves thousands: debug, counted in fenced_writes).
            self._count_fenced(exc.kind)
            log.debug(
                "disconnection not recorded: %s",
                exc,
                extra={"sandbox_id": sandbox_id, "session_id": session_id},
            )
            return
        if attempts > 1:
            self._recorded_log.log(
                logging.INFO,
                ("disconnect-recorded", sandbox_id),
                f"disconnection of sandbox {sandbox_id} recorded after {attempts} attempts",
                extra={"sandbox_id": sandbox_id, "session_id": session_id},
            )

    def _accept(self, session: Session, hello: pb.SupervisorHello, peer: str) -> pb.GatewayMessage:
        """The SessionAccepted answer of a session whose claim is recorded."""
        sandbox_id = session.sandbox_id
        capabilities = session.capabilities
        resume_after = session.acked_through
        if self._metrics is not None:
            self._metrics.session_accepted(
                owner_epoch=session.owner_epoch,
                journal_last=hello.journal_last_sequence,
                resume_after=resume_after,
            )
        log.info(
            "session accepted",
            extra={
                "sandbox_id": sandbox_id,
                "session_id": session.session_id,
                "peer": peer,
                "capabilities": sorted(capabilities),
                "resume_after": resume_after,
                "journal_last": hello.journal_last_sequence,
                "owner_epoch": session.owner_epoch,
            },
        )
        accepted = pb.GatewayMessage()
        sa = accepted.session_accepted
        sa.session_id = session.session_id
        # The adaptive interval (gateway.heartbeats): this replica's sessions / max_heartbeats_per_s,
        # clamped; the fixed heartbeat_interval_s while few sessions are held.
        interval = self._heartbeats.interval_s
        session.heartbeat_interval_s = interval
        sa.heartbeat_interval_secs = max(1, round(interval))
        sa.heartbeat_interval_ms = round(interval * 1000)
        # An upstream supervisor knows only the whole seconds, which may round above the interval,
        # and beats no faster than every 5 s: a session without our capabilities gets a stale
        # bound with room for both. A bound above the fixed interval's is kept fresh for the API
        # by the heartbeat flush's renewal (SessionRegistry.take_heartbeats).
        session.stale_after_s = self._heartbeats.stale_after_s(interval, upstream=not capabilities)
        sa.stale_after_ms = round(session.stale_after_s * 1000)
        sa.capabilities.extend(sorted(capabilities))
        sa.resume_after_sequence = resume_after
        sa.owner_epoch = session.owner_epoch
        if self._admission is not None:
            sa.reconnect_window_ms = self._admission.reconnect_window_ms()
        return accepted

    async def _read_into(
        self, session: Session, request_iterator: AsyncIterator[pb.SupervisorMessage], write: Write
    ) -> None:
        """The session's reader: a heartbeat is answered here, the hot path (one per session per
        interval) without a hop through the inbox to the session's loop; everything else is
        queued for the loop, in order. A heartbeat that comes while the loop writes is queued
        too (one write at a time on a stream; the loop answers it)."""
        error: str | None = None
        malformed: MalformedFrame | None = None
        inbox = session.inbox
        try:
            async for message in request_iterator:
                if session.writing or not message.HasField("heartbeat"):
                    inbox.put_nowait(Inbound(message))
                    continue
                # What the flush writes is derived from this (SessionRegistry.take_heartbeats);
                # the stale check reads it.
                session.touch()
                session.writing = True
                try:
                    await write(self._heartbeat_answer(message))
                finally:
                    session.writing = False
                    session.wake_writer()
                # Not bound to this frame while the next message is awaited.
                del message
        except asyncio.CancelledError:
            raise
        except MalformedFrame as exc:  # the handler ends the call INVALID_ARGUMENT
            error, malformed = str(exc), exc
        except Exception as exc:  # the stream broke; the handler ends the session with this reason
            error = f"{type(exc).__name__}: {exc}"
        inbox.put_nowait(InboundEnded(error, malformed=malformed))

    async def _serve(self, session: Session, write: Write) -> None:
        """The session's loop: what the supervisor sends, and what is queued for it, in order.

        An event batch is stored in a task of the session's own (``storing``), at most one at a
        time, while the loop goes on answering heartbeats (and sending commands): a database that
        hangs longer than the supervisor's stale bound, but not past the batch's deadline, does
        not end the session from the supervisor's side. Batches that arrive meanwhile wait their
        turn (the supervisor bounds how many it has in flight), so they are stored, and acked, in
        the order they came, each knowing the high-water mark of the one before. A command result
        is still stored before the next message is read: an ack of a later batch (carrying the
        command's audit line) means the answer is stored."""
        loop = asyncio.get_running_loop()
        session.touch()
        inbox = session.inbox
        # Shared reminders, and the timer puts one straight into this inbox: no closure, cell or
        # Wake of its own per session (each timer reaches only its own session's inbox).
        check_stale = functools.partial(inbox.put_nowait, _STALE_CHECK)

        # One timer per stale bound, not one per message: when it fires, the loop looks at the
        # last time the supervisor spoke and sets it again for what is left (a wait_for or a
        # getter task per message cost more than answering the heartbeat). Its reminder queues
        # behind the messages already in the inbox; a beat the reader has not queued yet (the
        # loop was behind: the check came late) gets one more look (STALE_RECHECK_S) first.
        due_at = time.monotonic() + session.stale_after_s
        timer = loop.call_later(session.stale_after_s, check_stale)
        rechecked = False
        storing: asyncio.Task[pb.GatewayMessage] | None = None
        # A list, not a deque: a deque costs 760 bytes per session even while empty, and
        # batches wait here one or two at a time (the supervisor bounds those in flight).
        waiting: list[pb.EventBatch] = []
        try:
            while True:
                if storing is not None and storing.done():
                    ack = storing.result()  # what the store raised ends the session, as before
                    storing = None
                    await _write_in_turn(session, write, ack)
                    continue
                if storing is None and waiting:
                    storing = asyncio.create_task(
                        self._store_batch(session, waiting.pop(0)), name=f"store-{session.sandbox_id}"
                    )
                    storing.add_done_callback(lambda _: inbox.put_nowait(_STORED))
                # Queue.get: cancelled while waiting, it takes nothing (an item stays queued for
                # the cleanup in _connect, which settles commands not taken).
                item: InboxItem = inbox.get_nowait() if not inbox.empty() else await inbox.get()
                if isinstance(item, Wake):
                    if item is _STALE_CHECK:
                        # Only what the supervisor sends counts as a sign of life: our own outbound
                        # messages (commands) must not keep a dead session open.
                        now = time.monotonic()
                        due = session.last_seen_monotonic + session.stale_after_s
                        if due > now:
                            due_at, rechecked = due, False
                            timer = loop.call_later(due - now, check_stale)
                        elif now - due_at > STALE_RECHECK_S and not rechecked:
                            due_at, rechecked = now + STALE_RECHECK_S, True
                            timer = loop.call_later(STALE_RECHECK_S, check_stale)
                        else:
                            log.warning(
                                "session stale: nothing received for %.1fs",
                                session.stale_after_s,
                                extra={"sandbox_id": session.sandbox_id},
                            )
                            return
                    continue  # a stored batch: its ack at the top
                if isinstance(item, InboundEnded | Close):
                    # What was received before the end is stored (and acked, if the stream can
                    # still carry it) first, as when batches were stored one by one in the loop.
                    if storing is not None:
                        await _write_in_turn(session, write, await storing)
                        storing = None
                    while waiting:
                        await _write_in_turn(session, write, await self._store_batch(session, waiting.pop(0)))
                if isinstance(item, InboundEnded):
                    if item.malformed is not None:
                        raise item.malformed
                    if item.error:
                        log.info("stream broke: %s", item.error, extra={"sandbox_id": session.sandbox_id})
                    return
                if isinstance(item, Close):
                    log.info("closing session: %s", item.reason, extra={"sandbox_id": session.sandbox_id})
                    if item.fenced:
                        self._count_fenced("heartbeats")
                        await _write_in_turn(
                            session, write, self._rejection(pb.REJECT_CODE_SUPERSEDED, item.reason)
                        )
                    return
                if isinstance(item, _CommandOut):
                    if item.expires_at <= datetime.now(UTC):
                        _settle(item.taken, False)  # expired while queued: never sent
                        continue
                    # Widened only now that it is written: a heartbeat command that expired in the
                    # inbox or was never taken must not let a dead session stay silent longer.
                    self._expect_heartbeats(session, item.command)
                    try:
                        await _write_in_turn(session, write, item.message)
                    except BaseException:
                        # The write failed or the call was cancelled.
                        _settle(item.taken, False)
                        raise
                    # Returned: gRPC has written the message to this open stream.
                    _settle(item.taken, True)
                    continue
                if isinstance(item, SessionUpdateOut):
                    # Widened as it is written, never narrowed: a supervisor that never got a
                    # longer interval keeps the old pace, and one told a shorter one may still be
                    # in a sleep of the old length.
                    session.stale_after_s = max(session.stale_after_s, item.stale_after_s)
                    await _write_in_turn(session, write, item.message)
                    if self._metrics is not None:
                        self._metrics.session_updates.inc()
                    continue
                if isinstance(item, Outbound):
                    await _write_in_turn(session, write, item.message)
                    continue
                # What the flush writes is derived from this (SessionRegistry.take_heartbeats).
                session.touch()
                message = item.message
                # Neither the message nor its answer stays bound to this frame while the session
                # waits for the next one (a few hundred bytes of every held session).
                del item
                if message.HasField("heartbeat"):
                    # The hot path, answered here: one message per session per interval.
                    await _write_in_turn(session, write, self._heartbeat_answer(message))
                    del message
                    continue
                if message.HasField("events"):
                    waiting.append(message.events)
                    continue
                reply = await self._handle(session, message)
                if reply is not None:
                    await _write_in_turn(session, write, reply)
        finally:
            timer.cancel()
            # Owned here: a store in flight ends with the session (nothing of it was acked; what
            # it commits later is idempotent by sequence).
            if storing is not None:
                storing.cancel()
                # asyncio.wait: never raises what the task did, yet lets our own cancellation through.
                await asyncio.wait([storing])

    def _heartbeat_answer(self, message: pb.SupervisorMessage) -> pb.GatewayMessage:
        out = pb.GatewayMessage()
        out.heartbeat.echo_unix_ms = message.heartbeat.sent_unix_ms
        if self._metrics is not None:
            self._metrics.heartbeats.inc()
        if self._admission is not None:
            # Kept current on live sessions: the fleet grows after most hellos.
            out.heartbeat.reconnect_window_ms = self._admission.reconnect_window_ms()
        return out

    async def _handle(self, session: Session, message: pb.SupervisorMessage) -> pb.GatewayMessage | None:
        """A message other than a heartbeat (heartbeats are answered by the reader, or by
        ``_serve``'s loop when one came while the loop was writing)."""
        kind = message.WhichOneof("payload")
        if kind == "events":
            return await self._store_batch(session, message.events)
        if kind == "command_result":
            try:
                result = result_from_proto(message.command_result)
            except WireError as exc:
                raise ProtocolError(str(exc)) from None
            deadline = self._store_deadline()
            answered = await self._within(
                # Retried like a batch: an answer is conditional on the command still pending, so
                # one replayed after a commit whose reply was lost changes nothing (IGNORED).
                self._retrying(
                    lambda: self._commands.answer(
                        session.sandbox_id, result, owner_epoch=session.owner_epoch, by=self._owner
                    ),
                    deadline=deadline,
                ),
                deadline=deadline,
                what="store a command result",
            )
            if answered is Answer.IGNORED:
                log.info("result for an unknown or answered command %s ignored", result.command_id)
            elif answered is Answer.LATE:
                log.info(
                    "result for command %s came after it expired: kept as its late result, "
                    "the command stays expired",
                    result.command_id,
                    extra={"sandbox_id": session.sandbox_id, "applied": result.applied},
                )
            else:
                log.info(
                    "command answered",
                    extra={
                        "sandbox_id": session.sandbox_id,
                        "command_id": result.command_id,
                        "applied": result.applied,
                        "duplicate": result.duplicate,
                        "error": result.error,
                    },
                )
            return None
        if kind == "hello":
            raise ProtocolError("a second hello on an accepted session")
        if kind in ("relay_open_result", "relay_close"):
            log.debug(
                "relay message ignored: relays are not implemented", extra={"sandbox_id": session.sandbox_id}
            )
            return None
        # A newer supervisor may send kinds we do not know: ignoring them keeps the session usable.
        log.debug("unknown message kind ignored", extra={"sandbox_id": session.sandbox_id})
        return None

    async def _store_batch(self, session: Session, batch: pb.EventBatch) -> pb.GatewayMessage:
        if CAP_EVENTS not in session.capabilities:
            raise ProtocolError("events sent without negotiating the 'events' capability")
        if batch.journal_epoch != session.journal_epoch:
            raise ProtocolError(
                f"event batch for journal epoch {batch.journal_epoch!r}, "
                f"the session's is {session.journal_epoch!r}"
            )
        started = time.monotonic()
        deadline = self._store_deadline(self._config.grpc.batch_store_timeout_s)
        try:
            hwm = await self._within(
                self._retrying(
                    lambda: self._events.store_wire_batch(
                        session.sandbox_id,
                        session.journal_epoch,
                        batch.events,
                        known_high_water_mark=session.acked_through,
                        generation=session.generation,
                        owner_epoch=session.owner_epoch,
                    ),
                    deadline=deadline,
                ),
                deadline=deadline,
                what="store an event batch",
                limit_s=self._config.grpc.batch_store_timeout_s,
            )
        except WireError as exc:
            raise ProtocolError(str(exc)) from None
        if self._metrics is not None:
            self._metrics.batch_store_seconds.observe(time.monotonic() - started)
            self._metrics.event_batches.inc()
            self._metrics.events_received.inc(len(batch.events))
            self._metrics.event_bytes.inc(batch.ByteSize())
        session.acked_through = hwm
        ack = pb.GatewayMessage()
        ack.event_ack.journal_epoch = session.journal_epoch
        ack.event_ack.acked_through_sequence = hwm
        return ack

    # -- upstream unary/streaming paths ---------------------------------------------------

    async def PushSandboxLogs(
        self,
        request_iterator: AsyncIterator[pb.PushSandboxLogsRequest],
        context: Ctx,
    ) -> pb.PushSandboxLogsResponse:
        count = 0
        # The stream's credential is checked with its first request, and the sandbox life it was
        # bound to is pinned: every later request must be for the same sandbox, still of that life
        # (not deleted, not created again), and its write is conditional on that generation, so a
        # stream of an earlier life never writes into a later. The credential's expiry is checked
        # at the call's start only, as upstream's gateway does (its router authenticates each RPC
        # once): upstream's supervisor keeps one stream open for the sandbox's life with the token
        # it opened it with, and turns its log push off for good on an UNAUTHENTICATED end.
        bound: str | None = None
        binding: _Binding | None = None
        async for request in request_iterator:
            # Every request's id is checked before anything uses it (a log line, a status).
            problem = validate_sandbox_id(request.sandbox_id)
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            if bound is None:
                binding = await self._authenticate(
                    context, request.sandbox_id, "PushSandboxLogs", deadline=self._store_deadline()
                )
                bound = request.sandbox_id
            elif request.sandbox_id != bound and self._auth is not None and self._auth.required:
                await self._refuse(
                    context,
                    CredentialRefused(
                        Refusal.OTHER_SANDBOX,
                        f"this stream's credential is for sandbox {bound}, a request names "
                        f"{request.sandbox_id}",
                    ),
                    method="PushSandboxLogs",
                    sandbox_id=request.sandbox_id,
                )
            elif binding is not None:
                await self._still_bound(context, binding, "PushSandboxLogs")
            items: list[tuple[int, Payload]] = []
            for line in request.logs:
                sandbox_id = line.sandbox_id or request.sandbox_id
                if sandbox_id != request.sandbox_id:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"log line for sandbox {sandbox_id!r} in a request for {request.sandbox_id!r}",
                    )
                items.append((line.timestamp_ms, upstream_log_record(line)))
            await self._check_sandbox(request.sandbox_id, context)
            if items:
                await self._events.append_unsequenced(
                    request.sandbox_id, items, generation=binding.generation if binding else None
                )
                count += len(items)
        log.debug("stored %d upstream log lines", count)
        return pb.PushSandboxLogsResponse()

    async def ReportMainProcessExit(
        self, request: pb.ReportMainProcessExitRequest, context: Ctx
    ) -> pb.ReportMainProcessExitResponse:
        problem = validate_sandbox_id(request.sandbox_id)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        binding = await self._authenticate(
            context, request.sandbox_id, "ReportMainProcessExit", deadline=self._store_deadline()
        )
        await self._check_sandbox(request.sandbox_id, context)
        code = request.exit_code
        record = LifecycleRecord(
            kind=LifecycleKind.EXITED,
            exit_code=code,
            signal=code - 128 if code > 128 else 0,
            instance_id=request.instance_id,
        )
        await self._events.append_unsequenced(
            request.sandbox_id, [(_now_ms(), record)], generation=binding.generation if binding else None
        )
        log.info("main process exit reported", extra={"sandbox_id": request.sandbox_id, "exit_code": code})
        return pb.ReportMainProcessExitResponse()

    async def IssueSandboxToken(
        self, request: pb.IssueSandboxTokenRequest, context: Ctx
    ) -> pb.IssueSandboxTokenResponse:
        """Trade a sandbox pod's projected ServiceAccount token for a minted one of its sandbox."""
        auth = self._require_auth()
        if auth.kubernetes is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this gateway does not run the Kubernetes driver: it has no pod tokens to trade; a "
                "sandbox token is given to local sandboxes in a file and renewed with RefreshSandboxToken",
            )
        principal = await self._credential(context, "IssueSandboxToken", deadline=self._store_deadline())
        if principal.kind != "kubernetes":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "IssueSandboxToken takes a pod's ServiceAccount token; renew a sandbox token with "
                "RefreshSandboxToken",
            )
        # Bound to this pod (refused once the sandbox's pod is another, or none), and living no
        # longer than the pod's own token: a trade cannot outlast what was traded.
        token = await self._mint_for(principal, context, "IssueSandboxToken", not_after=principal.expires_at)
        return pb.IssueSandboxTokenResponse(token=token.token, expires_at_ms=int(token.expires_at * 1000))

    async def RefreshSandboxToken(
        self, request: pb.RefreshSandboxTokenRequest, context: Ctx
    ) -> pb.RefreshSandboxTokenResponse:
        """A new token for the caller's sandbox and generation, for a still valid minted one."""
        principal = await self._credential(context, "RefreshSandboxToken", deadline=self._store_deadline())
        if principal.kind != "sandbox-token":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "a Kubernetes ServiceAccount token is renewed by the kubelet, not by the gateway",
            )
        token = await self._mint_for(principal, context, "RefreshSandboxToken")
        return pb.RefreshSandboxTokenResponse(token=token.token, expires_at_ms=int(token.expires_at * 1000))

    def _require_auth(self) -> SupervisorAuthenticator:
        if self._auth is None:  # only a service built without one (tests of other concerns)
            raise RuntimeError("this service has no authenticator")
        return self._auth

    async def _credential(self, context: Ctx, method: str, *, deadline: float) -> SandboxPrincipal:
        """The verified credential of a call that names no sandbox but its own (whatever
        ``required`` says: a token is only ever minted for a valid credential), bound to the
        sandbox it names."""
        auth = self._require_auth()
        try:
            principal = await self._within(
                auth.verify(context.invocation_metadata()), deadline=deadline, what=f"{method}: verify"
            )
        except CredentialRefused as exc:
            await self._refuse(context, exc, method=method, sandbox_id="-")
        try:
            await self._within(
                auth.bind(principal, principal.sandbox_id), deadline=deadline, what=f"{method}: bind"
            )
        except CredentialRefused as exc:
            await self._refuse(context, exc, method=method, sandbox_id=principal.sandbox_id)
        return principal

    async def _mint_for(
        self, principal: SandboxPrincipal, context: Ctx, method: str, *, not_after: float | None = None
    ) -> MintedToken:
        """A token of the principal's sandbox life, bound to its pod if it has one (a pod token,
        or a minted one traded for it: renewals keep the pod)."""
        auth = self._require_auth()
        generation = principal.generation
        if generation is None:  # a pod's token: the sandbox's current life (bind checked the pod)
            row = await self._sandboxes.get(principal.sandbox_id)
            if row is None:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{Refusal.UNKNOWN_SANDBOX.value}: sandbox {principal.sandbox_id} is not known",
                )
            generation = row.generation
        key = (principal.sandbox_id, generation, principal.pod_uid)
        now = time.time()
        recent = self._minted.get(key)
        reuse_s = min(REMINT_AFTER_S, auth.tokens.token_ttl_s / 10)
        if (
            recent is not None
            and now - recent[0] < reuse_s
            and (not_after is None or recent[1].expires_at <= not_after)
        ):
            log.debug(
                "sandbox token asked for again within %.0f s: the last one given",
                reuse_s,
                extra={"sandbox_id": principal.sandbox_id, "method": method},
            )
            return recent[1]
        minted = await self._within(
            auth.tokens.mint(
                principal.sandbox_id, generation=generation, pod_uid=principal.pod_uid, not_after=not_after
            ),
            deadline=self._store_deadline(),
            what=f"{method}: mint",
        )
        if len(self._minted) >= MINTED_MAX:
            self._minted.clear()
        self._minted[key] = (now, minted)
        if self._metrics is not None:
            self._metrics.sandbox_tokens_minted.inc()
        # Debug only: any token holder can ask (at most once per reuse_s for what it gets signed).
        log.debug(
            "sandbox token issued",
            extra={"sandbox_id": principal.sandbox_id, "method": method, "kid": minted.kid},
        )
        return minted

    async def _authenticate(
        self, context: Ctx, sandbox_id: str, method: str, *, deadline: float
    ) -> _Binding | None:
        """Let the call through only with a credential bound to ``sandbox_id`` (see
        :mod:`gateway.auth.supervisors`); else end it with the refusal's status and reason.
        Returns the credential and the sandbox life it is bound to (None: auth not required)."""
        if self._auth is None or not self._auth.required:
            return None
        try:
            bound = await self._within(
                self._auth.authenticate_bound(
                    context.invocation_metadata(), sandbox_id=sandbox_id, method=method, peer=context.peer()
                ),
                deadline=deadline,
                what=f"{method}: authenticate",
            )
        except CredentialRefused as exc:  # counted and logged by the authenticator
            await context.abort(exc.status, f"{exc.reason.value}: {exc.detail}")
        assert bound is not None  # required
        principal, row = bound
        return _Binding(principal, row.generation if row is not None else None, row)

    async def _still_bound(self, context: Ctx, binding: _Binding, method: str) -> None:
        """A later request of a stream: its credential still binds to the sandbox life the stream
        was opened for (else the stream ends with the refusal). Its expiry is not checked again:
        it was valid when the call opened (see PushSandboxLogs), and the generation fences an
        earlier life."""
        auth = self._require_auth()
        principal = binding.principal
        try:
            row = await self._within(
                auth.bind(principal, principal.sandbox_id),
                deadline=self._store_deadline(),
                what=f"{method}: bind",
            )
            if binding.generation is not None and (row is None or row.generation != binding.generation):
                now_at = row.generation if row is not None else "none"
                raise CredentialRefused(
                    Refusal.STALE,
                    f"sandbox {principal.sandbox_id} was created again (generation {now_at}) since this "
                    f"stream's credential was bound to generation {binding.generation}",
                )
        except CredentialRefused as exc:
            await self._refuse(context, exc, method=method, sandbox_id=principal.sandbox_id)

    async def _refuse(
        self, context: Ctx, exc: CredentialRefused, *, method: str, sandbox_id: str
    ) -> NoReturn:
        auth = self._require_auth()
        auth.refused(exc, method=method, peer=context.peer(), sandbox_id=sandbox_id)
        await context.abort(exc.status, f"{exc.reason.value}: {exc.detail}")

    # -- upstream's configuration calls (the answers' rules: gateway/upstream_config.py) --------

    async def _own_sandbox(
        self, sandbox_id: str, context: Ctx, method: str, *, check: bool = True
    ) -> _Binding | None:
        """A call of a sandbox principal for its own sandbox: the id is valid, the credential is
        bound to it (else the call ends with the refusal), and the sandbox is known (unless
        ``check`` is False: the caller's own read of the row tells)."""
        problem = validate_sandbox_id(sandbox_id)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {problem}")
        binding = await self._authenticate(context, sandbox_id, method, deadline=self._store_deadline())
        # A bound generation means the bind read the row and found the sandbox there, not
        # deleted: a second read would say nothing more (upstream polls every 10 s per sandbox).
        if check and (binding is None or binding.generation is None):
            await self._check_sandbox(sandbox_id, context)
        return binding

    async def _policy_of(
        self, sandbox_id: str, context: Ctx, binding: _Binding | None
    ) -> tuple[int | None, StoredPolicy]:
        """The sandbox's stored policy, in one read where the sandbox is known: only a read that
        finds no row (an unknown sandbox, without bound credentials) goes through
        :meth:`_check_sandbox` (registered, or NOT_FOUND) and reads again."""
        generation = binding.generation if binding is not None else None
        stored = await self._sandboxes.policy(sandbox_id, generation=generation)
        if stored is None and generation is None:
            await self._check_sandbox(sandbox_id, context)
            stored = await self._sandboxes.policy(sandbox_id)
        if stored is None:
            await self._created_again(context, sandbox_id, generation)
        return generation, stored

    async def GetSandboxConfig(
        self, request: sb.GetSandboxConfigRequest, context: Ctx
    ) -> sb.GetSandboxConfigResponse:
        """The policy the sandbox's supervisor synced (none before its first sync), no settings."""
        binding = await self._own_sandbox(request.sandbox_id, context, "GetSandboxConfig", check=False)
        _, stored = await self._policy_of(request.sandbox_id, context, binding)
        self._answered("GetSandboxConfig")
        return upstream_config.config_response(stored)

    async def UpdateConfig(self, request: pb.UpdateConfigRequest, context: Ctx) -> pb.UpdateConfigResponse:
        """Only a sandbox supervisor's sync of its own policy (``name`` is the sandbox's id)."""
        if not request.name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "UpdateConfig: name the sandbox (its id) in `name`"
            )
        binding = await self._own_sandbox(request.name, context, "UpdateConfig", check=False)
        generation, stored = await self._policy_of(request.name, context, binding)
        # What a sync may change is judged against the stored policy. Two syncs at once are both
        # judged against the same one; each is then still safe and only adds to it.
        refused = upstream_config.update_problem(
            request, stored=None if stored.policy is None else sb.SandboxPolicy.FromString(stored.policy)
        )
        if refused is not None:
            await context.abort(refused.code, refused.message)
        blob = upstream_config.policy_bytes(request.policy)
        digest = upstream_config.policy_hash(blob)
        # Conditional on the life the credential was bound to: a token of an earlier sandbox of
        # this id writes nothing into the current one.
        version = await self._sandboxes.set_policy(
            request.name, blob, policy_hash=digest, generation=generation
        )
        if version is None:
            await self._created_again(context, request.name, generation)
        await self._events.append_unsequenced(
            request.name, [(_now_ms(), upstream_config.sync_record(version, digest))], generation=generation
        )
        log.info(
            "policy synced by the sandbox's supervisor",
            extra={"sandbox_id": request.name, "policy_version": version},
        )
        self._answered("UpdateConfig")
        return pb.UpdateConfigResponse(version=version, policy_hash=digest)

    async def ReportPolicyStatus(
        self, request: pb.ReportPolicyStatusRequest, context: Ctx
    ) -> pb.ReportPolicyStatusResponse:
        """The supervisor's report on a policy version, recorded as the sandbox's event."""
        binding = await self._own_sandbox(request.sandbox_id, context, "ReportPolicyStatus")
        record = upstream_config.status_record(request)
        if isinstance(record, upstream_config.Refused):
            await context.abort(record.code, record.message)
        await self._events.append_unsequenced(
            request.sandbox_id,
            [(_now_ms(), record)],
            generation=binding.generation if binding is not None else None,
        )
        self._answered("ReportPolicyStatus")
        return pb.ReportPolicyStatusResponse()

    async def GetSandboxProviderEnvironment(
        self, request: pb.GetSandboxProviderEnvironmentRequest, context: Ctx
    ) -> pb.GetSandboxProviderEnvironmentResponse:
        await self._own_sandbox(request.sandbox_id, context, "GetSandboxProviderEnvironment")
        self._answered("GetSandboxProviderEnvironment")
        return upstream_config.provider_environment()

    async def GetInferenceBundle(
        self, request: inf.GetInferenceBundleRequest, context: Ctx
    ) -> inf.GetInferenceBundleResponse:
        """``openshell.inference.v1.Inference``'s one call (gateway/app.py puts this service on
        the server for it too). It names no sandbox: the credential's own is the caller's. Without
        required credentials anyone gets the (empty) bundle: it holds nothing to keep."""
        if self._auth is not None and self._auth.required:
            # The credential's signature and expiry only (cached after the first call), no bind
            # read of the store: the bundle is the same empty one for every sandbox, and a token of
            # a deleted sandbox learns nothing from it (upstream refreshes it every 5 s).
            try:
                await self._within(
                    self._auth.verify(context.invocation_metadata()),
                    deadline=self._store_deadline(),
                    what="GetInferenceBundle: verify",
                )
            except CredentialRefused as exc:
                await self._refuse(context, exc, method="GetInferenceBundle", sandbox_id="-")
        self._answered("GetInferenceBundle")
        return upstream_config.inference_bundle()

    def _answered(self, method: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_config_calls.labels(method).inc()

    async def _created_again(self, context: Ctx, sandbox_id: str, generation: int | None) -> NoReturn:
        """End a call whose sandbox life is gone (the id deleted, or created again, after its
        credential was bound): nothing was written. Without a bound life (auth not required) the
        sandbox was deleted between the check and the read: it is not known now."""
        if generation is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"sandbox {sandbox_id} is not known to this gateway (deleted): nothing written",
            )
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"sandbox {sandbox_id} was deleted or created again since this call's credential was "
            f"bound to generation {generation}: nothing written",
        )

    async def Health(self, request: pb.HealthRequest, context: Ctx) -> pb.HealthResponse:
        return pb.HealthResponse(status=pb.SERVICE_STATUS_HEALTHY, version=__version__)

    async def _check_sandbox(self, sandbox_id: str, context: Ctx) -> None:
        problem = validate_sandbox_id(sandbox_id)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self._config.sessions.register_unknown:
            await self._sandboxes.ensure(sandbox_id)
        elif await self._sandboxes.get(sandbox_id) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"sandbox {sandbox_id} is not known to this gateway"
            )


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def server_options(config: GatewayConfig) -> Iterable[tuple[str, int]]:
    g = config.grpc
    return [
        ("grpc.max_receive_message_length", g.max_receive_message_bytes),
        ("grpc.server.max_pending_requests", g.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", g.max_pending_requests_hard_limit),
        ("grpc.server_max_unrequested_time_in_server", int(g.max_unrequested_time_s)),
        # Our own heartbeats detect dead peers; these keep idle NATs from dropping the stream.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Supervisors send keepalive pings every session.keepalive_time_s (at least 10 s). This is
        # the least interval gRPC accepts between received pings (the C core's
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; default 5 minutes): after more than
        # grpc.http2.max_ping_strikes (2) pings sooner than that without data from us in between, a
        # server ends the connection with GOAWAY too_many_pings. Half the supervisor's least
        # interval leaves room for timer slack; permit_without_calls keeps the bound from rising to
        # 2 hours while a connection has no call.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Per connection, and a replica holds tens of thousands (issue 22's memory figure, measured
        # with ``python -m chaos.memprobe --server echo --rss-only``): channelz's bookkeeping of each
        # socket, which nothing here reads (no channelz service is served), ~0.55 KB; and the HPACK
        # header tables, ~0.5 KB together. A supervisor's connection carries one long stream and a
        # few unary calls (a token renewal, upstream's config polls): the tables would save a few
        # hundred bytes of repeated headers now and then, against half a kilobyte held all along.
        ("grpc.enable_channelz", 0),
        ("grpc.http2.hpack_table_size.decoder", 0),
        ("grpc.http2.hpack_table_size.encoder", 0),
    ]
