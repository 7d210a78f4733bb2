"""Simulated supervisors for tests of many sessions (drain, rebalancing, admission).

Each :class:`SimSupervisor` speaks the real protocol over its own gRPC channel (one TCP connection,
as a pod has), with an in-memory journal: it writes log records with sequence numbers, sends them in
batches, trims on acknowledgement, and checks every answer of the gateway against what it wrote (a
resume point below what was acknowledged means the gateway forgot events; above what was written,
it holds events never written). It honours SessionRejected.retry_after_ms and ReconnectHint (a
delay within the hint's window, no backoff), applies SessionUpdate intervals, and records what
happened (sessions, hints, rejections, updates) for the test to assert on. :func:`stored_problems`
then checks the gateway's database: per sandbox exactly 1..acknowledged, nothing above written.

``addresses`` is a callable standing in for a Service: each attempt dials one of the addresses it
returns, at random (a test returns the ready replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from openshell_wire.records import CAP_EVENTS, CAP_RECONNECT, CAP_RESUME
from openshell_wire.v1 import openshell_pb2 as pb
from openshell_wire.v1 import openshell_pb2_grpc as pb_grpc

DEFAULT_CAPABILITIES = (CAP_RESUME, CAP_EVENTS, CAP_RECONNECT)
#: Largest batch sent at once, and how many records a batch carries at most.
BATCH_MAX = 200


@dataclass
class SessionRecord:
    address: str
    accepted_at: float
    ended_at: float | None = None
    end: str = ""
    interval_ms: int = 0
    reconnect_window_ms: int = 0


@dataclass
class SimSupervisor:
    sandbox_id: str
    addresses: Callable[[], Sequence[str]]
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES
    token: str | None = None
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    #: Append one record this often while connected or not (None: only what ``write`` adds).
    write_every_s: float | None = None
    journal_epoch: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    written: int = 0
    acked: int = 0
    sessions: list[SessionRecord] = field(default_factory=list)
    #: (monotonic time, reason, delay_window_ms, address)
    hints: list[tuple[float, str, int, str]] = field(default_factory=list)
    #: (monotonic time, reject code name, retry_after_ms, reason, address)
    rejections: list[tuple[float, str, int, str, str]] = field(default_factory=list)
    #: (monotonic time, heartbeat_interval_ms, stale_after_ms)
    updates: list[tuple[float, int, int]] = field(default_factory=list)
    #: Monotonic times of every connection attempt.
    attempts: list[float] = field(default_factory=list)
    #: Answers of the gateway that break a guarantee (lost or invented events, acks going back).
    violations: list[str] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    _new: asyncio.Event = field(default_factory=asyncio.Event)
    _connection: int = 0

    @property
    def connected(self) -> bool:
        return bool(self.sessions) and self.sessions[-1].ended_at is None

    @property
    def current_address(self) -> str | None:
        return self.sessions[-1].address if self.connected else None

    def write(self, n: int = 1) -> None:
        self.written += n
        self._new.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, reconnect until ``stop``; then leave (cancelled from outside is fine too)."""
        writer = asyncio.create_task(self._write_loop(stop)) if self.write_every_s else None
        failures = 0
        try:
            while not stop.is_set():
                wait_s, failures = await self._one_session(stop, failures)
                if wait_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait_s)
        finally:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    async def _write_loop(self, stop: asyncio.Event) -> None:
        assert self.write_every_s is not None
        while not stop.is_set():
            await asyncio.sleep(self.write_every_s * random.uniform(0.8, 1.2))
            self.write()

    def _backoff(self, failures: int, retry_after_ms: int = 0) -> float:
        jittered = random.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2**failures))
        return max(jittered, retry_after_ms / 1000 * random.uniform(1.0, 1.2))

    async def _one_session(self, stop: asyncio.Event, failures: int) -> tuple[float, int]:
        """One connection attempt and, if accepted, its session: (wait before the next, failures)."""
        choices = list(self.addresses())
        if not choices:
            return self._backoff(failures), failures + 1
        address = random.choice(choices)
        self._connection += 1
        self.attempts.append(time.monotonic())
        channel = aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        call: Any = pb_grpc.OpenShellStub(channel).ConnectSupervisor(metadata=metadata)
        try:
            hello = pb.SupervisorMessage()
            h = hello.hello
            h.sandbox_id = self.sandbox_id
            h.instance_id = self.instance_id
            h.connection_epoch = self._connection
            h.capabilities.extend(self.capabilities)
            h.journal_epoch = self.journal_epoch
            h.journal_first_sequence = self.acked + 1 if self.written > self.acked else 0
            h.journal_last_sequence = self.written
            await call.write(hello)
            try:
                first = await asyncio.wait_for(call.read(), self.connect_timeout_s)
            except TimeoutError:
                return self._backoff(failures), failures + 1
            if first is aio.EOF or first.WhichOneof("payload") != "session_accepted":
                if first is not aio.EOF and first.WhichOneof("payload") == "session_rejected":
                    rejected = first.session_rejected
                    self.rejections.append(
                        (
                            time.monotonic(),
                            pb.RejectCode.Name(rejected.code),
                            rejected.retry_after_ms,
                            rejected.reason,
                            address,
                        )
                    )
                    return self._backoff(failures, rejected.retry_after_ms), failures + 1
                return self._backoff(failures), failures + 1
            return await self._serve(stop, call, first.session_accepted, address, failures)
        except aio.AioRpcError:
            return self._backoff(failures), failures + 1
        finally:
            call.cancel()
            await channel.close()

    async def _serve(
        self, stop: asyncio.Event, call: Any, accepted: pb.SessionAccepted, address: str, failures: int
    ) -> tuple[float, int]:
        resume = accepted.resume_after_sequence
        if resume < self.acked:
            self.violations.append(f"resume point {resume} below acknowledged {self.acked} at {address}")
        if resume > self.written:
            self.violations.append(f"resume point {resume} above written {self.written} at {address}")
        self.acked = max(self.acked, min(resume, self.written))
        interval_ms = accepted.heartbeat_interval_ms or accepted.heartbeat_interval_secs * 1000
        record = SessionRecord(
            address=address,
            accepted_at=time.monotonic(),
            interval_ms=interval_ms,
            reconnect_window_ms=accepted.reconnect_window_ms,
        )
        self.sessions.append(record)
        state: dict[str, Any] = {
            "interval_s": interval_ms / 1000,
            "sent": self.acked,
            "last_heard": time.monotonic(),
        }
        outcome: list[tuple[str, float, int]] = []  # (end, wait, failures)
        # One write at a time on a gRPC aio call (a second one in flight fails the call INTERNAL,
        # GRPC_CALL_ERROR_TOO_MANY_OPERATIONS): heartbeats and batches take turns.
        writing = asyncio.Lock()

        async def heartbeats() -> None:
            while True:
                await asyncio.sleep(state["interval_s"] * random.uniform(0.8, 1.2))
                beat = pb.SupervisorMessage()
                beat.heartbeat.sent_unix_ms = int(time.time() * 1000)
                async with writing:
                    await call.write(beat)

        async def sender() -> None:
            while True:
                await self._new.wait()
                self._new.clear()
                while state["sent"] < self.written:
                    batch = pb.SupervisorMessage()
                    batch.events.journal_epoch = self.journal_epoch
                    upto = min(self.written, state["sent"] + BATCH_MAX)
                    for seq in range(state["sent"] + 1, upto + 1):
                        event = batch.events.events.add(sequence=seq, timestamp_ms=int(time.time() * 1000))
                        event.log.stream = pb.LOG_STREAM_STDOUT
                        event.log.message = f"{self.sandbox_id} line {seq}"
                    # Sent before the write returns: the receiver may read its ack first.
                    state["sent"] = upto
                    async with writing:
                        await call.write(batch)

        async def receiver() -> None:
            while True:
                message = await call.read()
                state["last_heard"] = time.monotonic()
                if message is aio.EOF:
                    outcome.append(("eof", self._backoff(failures), failures + 1))
                    return
                kind = message.WhichOneof("payload")
                if kind == "event_ack":
                    ack = message.event_ack
                    if ack.journal_epoch != self.journal_epoch:
                        self.violations.append(f"ack for epoch {ack.journal_epoch!r}")
                    elif ack.acked_through_sequence < self.acked:
                        self.violations.append(
                            f"ack {ack.acked_through_sequence} went back from {self.acked}"
                        )
                    elif ack.acked_through_sequence > state["sent"]:
                        self.violations.append(f"ack {ack.acked_through_sequence} above sent {state['sent']}")
                    else:
                        self.acked = ack.acked_through_sequence
                elif kind == "heartbeat":
                    if message.heartbeat.echo_unix_ms:
                        self.rtts.append(time.time() - message.heartbeat.echo_unix_ms / 1000)
                elif kind == "reconnect":
                    hint = message.reconnect
                    self.hints.append((time.monotonic(), hint.reason, hint.delay_window_ms, address))
                    outcome.append(("hint", random.uniform(0, hint.delay_window_ms / 1000), 0))
                    return
                elif kind == "session_update":
                    update = message.session_update
                    self.updates.append(
                        (time.monotonic(), update.heartbeat_interval_ms, update.stale_after_ms)
                    )
                    if update.heartbeat_interval_ms:
                        state["interval_s"] = update.heartbeat_interval_ms / 1000
                elif kind == "session_rejected":
                    rejected = message.session_rejected
                    self.rejections.append(
                        (
                            time.monotonic(),
                            pb.RejectCode.Name(rejected.code),
                            rejected.retry_after_ms,
                            rejected.reason,
                            address,
                        )
                    )
                    outcome.append(
                        ("rejected", self._backoff(failures, rejected.retry_after_ms), failures + 1)
                    )
                    return

        async def stale() -> None:
            while True:
                left = state["last_heard"] + 3 * state["interval_s"] - time.monotonic()
                if left <= 0:
                    outcome.append(("stale", self._backoff(failures), failures + 1))
                    return
                await asyncio.sleep(left)

        self._new.set()
        tasks = [
            asyncio.create_task(heartbeats()),
            asyncio.create_task(sender()),
            asyncio.create_task(receiver()),
            asyncio.create_task(stale()),
            asyncio.create_task(stop.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except aio.AioRpcError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        record.ended_at = time.monotonic()
        if outcome:
            record.end, wait_s, failures_after = outcome[0]
        elif stop.is_set():
            record.end, wait_s, failures_after = "stopped", 0.0, 0
        else:
            errors = [
                r
                for r in results
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
            ]
            record.end = f"error: {errors[0]!r}" if errors else "error"
            wait_s, failures_after = self._backoff(failures), failures + 1
        if record.end != "hint" and record.ended_at - record.accepted_at > 5.0:
            failures_after = min(failures_after, 1)  # a session that lasted resets the backoff
        return wait_s, failures_after


async def stored_problems(database_url: str, sims: Sequence[SimSupervisor]) -> list[str]:
    """Check the gateway's events table against the simulated journals: per sandbox and journal
    epoch, every sequence of 1..acknowledged stored exactly once, nothing above what was written."""
    engine = create_async_engine(database_url)
    problems: list[str] = []
    try:
        async with engine.connect() as conn:
            for sim in sims:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT sequence FROM events WHERE sandbox_id = :sid AND journal_epoch = :epoch "
                            "ORDER BY sequence"
                        ),
                        {"sid": sim.sandbox_id, "epoch": sim.journal_epoch},
                    )
                ).all()
                sequences = [int(r[0]) for r in rows]
                if len(sequences) != len(set(sequences)):
                    problems.append(f"{sim.sandbox_id}: a sequence stored twice")
                have = set(sequences)
                missing = [s for s in range(1, sim.acked + 1) if s not in have]
                if missing:
                    problems.append(
                        f"{sim.sandbox_id}: {len(missing)} acknowledged sequences missing, first {missing[0]}"
                    )
                above = [s for s in sequences if s > sim.written]
                if above:
                    problems.append(f"{sim.sandbox_id}: sequences above written {sim.written}: {above[:3]}")
                problems.extend(f"{sim.sandbox_id}: {v}" for v in sim.violations)
    finally:
        await engine.dispose()
    return problems
