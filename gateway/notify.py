"""Notifications between replicas: what one replica committed, told to every other within a second.

A writer sends a :class:`Note` in the transaction that makes it true (:func:`publish`, PostgreSQL's
``pg_notify``, which the server delivers only on commit and drops on rollback), so nobody is told
of a command or event that was never stored. Every replica listens on one dedicated connection,
outside the pool (:class:`PostgresNotifier`): a pooled connection is handed to other work between
queries and would miss what arrives meanwhile.

One channel for every replica (:data:`CHANNEL`), the sandbox id in the payload, rather than a
channel per replica: the replica that POSTs a command does not need to know which one holds the
session (the row's owner may name a dead replica, and the session may move while the command is
in flight); each replica looks the sandbox up in its own registry and drops the rest. A log
follower on any replica needs every replica's events anyway. With a handful of replicas the extra
notifications are cheap; payloads are a few dozen bytes (PostgreSQL's limit is 8000).

A notification is a wake-up, never the data: whoever wakes reads the table, which stays the only
source. Notifications are lost while the listening connection is down (PostgreSQL keeps none for a
listener that is not connected), so every (re)connection calls the ``on_connect`` callbacks, which
redeliver from the table at once, and the consumers poll slowly besides.

SQLite is one process: :class:`InProcessNotifier` has the same interface and hands a note to the
subscribers once the writer says its transaction committed (:meth:`Notifier.committed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from gateway.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

#: The one channel every replica listens on (a version in the name: a future payload format
#: gets a channel of its own, so replicas of two releases never misread each other).
CHANNEL = "openshell_v1"
#: How long connecting the listening connection may take (per host; ``database.connect_timeout_s``
#: when the app passes it), and a check of it.
CONNECT_TIMEOUT_S = 5.0
#: A listening connection that has heard nothing is checked this often (a half-open TCP
#: connection is not noticed otherwise: a listener only reads).
CHECK_INTERVAL_S = 10.0
#: Reconnection backoff: full jitter, exponential from a fifth of a second up to this.
RECONNECT_MAX_S = 5.0
#: Notes sent with :meth:`Notifier.soon` wait this long for others to go out with them, in one
#: statement: a replica's event commits then cost the cluster one notifying commit per interval.
COALESCE_S = 0.075
#: At most this many distinct notes wait to go out (more are dropped: the followers' poll).
MAX_OUTGOING = 10_000
#: Past this share of PostgreSQL's notification queue in use (pg_notification_queue_usage(), read
#: at each check) the gateway warns: a listener that stopped reading (a frozen replica) pins it,
#: and once full, every notifying commit fails.
QUEUE_WARN_USAGE = 0.1


class Topic(StrEnum):
    #: A command was stored for the sandbox: its owning replica hands it to the session.
    COMMAND = "command"
    #: A command was written to its session's stream (``delivered_at`` recorded).
    DELIVERED = "delivered"
    #: Events were stored for the sandbox: its followers read them.
    EVENTS = "events"


@dataclass(frozen=True, slots=True)
class Note:
    topic: Topic
    sandbox_id: str
    #: The command's id for COMMAND and DELIVERED; empty for EVENTS.
    ref: str = ""

    def encode(self) -> str:
        return json.dumps({"t": self.topic.value, "s": self.sandbox_id, "r": self.ref}, separators=(",", ":"))

    @staticmethod
    def decode(payload: str) -> Note | None:
        """The note, or None for a payload this code does not understand (logged by the caller)."""
        try:
            doc = json.loads(payload)
            return Note(Topic(doc["t"]), str(doc["s"]), str(doc.get("r", "")))
        except (ValueError, KeyError, TypeError):
            return None


async def publish(conn: AsyncConnection, note: Note) -> None:
    """Send ``note`` in ``conn``'s transaction (PostgreSQL: delivered on commit only; identical
    notes of one transaction are delivered once). Other dialects send nothing here: the writer
    calls :meth:`Notifier.committed` after its commit."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_notify(CHANNEL, note.encode())))


Subscriber = Callable[[Note], None]


class Notifier:
    """Hands notes to the subscribers of this process; see the module docstring."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._on_connect: list[Callable[[], None]] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` with every note (from the event loop; it must not block)."""
        self._subscribers.append(subscriber)

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever notes may have been missed: after each (re)connection."""
        self._on_connect.append(callback)

    @property
    def live(self) -> bool:
        """Whether notes are being received now (consumers poll faster while not)."""
        return True

    def committed(self, note: Note) -> None:
        """The writer's transaction that published ``note`` has committed."""

    def soon(self, note: Note) -> None:
        """Send ``note`` to every replica after the fact, outside any transaction, coalesced with
        the others of the next few dozen milliseconds (PostgreSQL; a no-op elsewhere: one process,
        whose writers poke their readers themselves). For what is committed already and may be
        lost (events: a follower polls besides); see :class:`PostgresNotifier`."""

    async def start(self) -> None:
        """Begin receiving (PostgreSQL: returns once listening, or the first attempt failed and
        the reconnection goes on in the background)."""

    async def stop(self) -> None:
        """Stop receiving and release the connection."""

    def _dispatch(self, note: Note) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(note)
            except Exception:  # one consumer's bug must not starve the others
                log.exception("a notification subscriber failed", extra={"topic": note.topic.value})

    def _connected(self) -> None:
        for callback in self._on_connect:
            try:
                callback()
            except Exception:
                log.exception("a notification reconnect callback failed")


class InProcessNotifier(Notifier):
    """SQLite (one process): a committed note goes straight to this process's subscribers."""

    @property
    def live(self) -> bool:
        # Nothing written by another process (a second gateway on the same file, a tool) is ever
        # heard of here: followers keep their fast poll, as before notifications existed.
        return False

    def committed(self, note: Note) -> None:
        self._dispatch(note)

    async def start(self) -> None:
        self._connected()


def listen_connect_args(url: URL, dialect: Dialect) -> dict[str, Any]:
    """asyncpg.connect's keyword arguments for the engine's own URL: its hosts (a multi-host URL
    and its ``target_session_attrs``, so the listener follows a failover as the pool does), its
    TLS parameters and credentials, through the dialect's own translation; minus what only
    SQLAlchemy's adapter takes."""
    _, params = dialect.create_connect_args(url)
    for adapter_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"):
        params.pop(adapter_only, None)
    return dict(params)


class PostgresNotifier(Notifier):
    """LISTEN on one connection of its own, reconnected with backoff when it breaks; an owned
    task, cancelled by :meth:`stop`."""

    def __init__(
        self, url: URL, dialect: Dialect, *, replica: str, connect_timeout_s: float = CONNECT_TIMEOUT_S
    ) -> None:
        super().__init__()
        self._connect_args = listen_connect_args(url, dialect)
        self._connect_timeout_s = connect_timeout_s
        #: Shown in pg_stat_activity: an operator (or a test) finds this replica's listener by it.
        self.application_name = f"openshell-listen {replica}"[:63]
        self._task: asyncio.Task[None] | None = None
        self._live = False
        self._first = asyncio.Event()
        #: In an outage (logged once when it begins, once when it ends).
        self._down = False
        #: The listening connection while it listens; it also sends the notes of :meth:`soon`
        #: (one statement at a time: the lock).
        self._conn: Any = None
        self._conn_lock = asyncio.Lock()
        #: The payloads :meth:`soon` was given, sent by the owned task ``_sender``.
        self._outgoing: dict[str, None] = {}
        self._send = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        #: pg_notification_queue_usage() at the last check (0..1), None before the first.
        self.queue_usage: float | None = None
        self._queue_high = False
        self._send_failures = RateLimitedLog(log, concern="notify-send")

    @property
    def live(self) -> bool:
        return self._live

    def soon(self, note: Note) -> None:
        if len(self._outgoing) < MAX_OUTGOING:
            self._outgoing[note.encode()] = None
            self._send.set()

    async def _send_forever(self) -> None:
        while True:
            await self._send.wait()
            # Outside any transaction and coalesced: a transaction that notifies takes a
            # cluster-wide lock at its commit, held through the WAL flush (and a synchronous
            # standby's answer), so a note in every event batch's transaction serialised every
            # replica's commits. Lost if not listening now: the followers poll fast meanwhile.
            await asyncio.sleep(COALESCE_S)
            self._send.clear()
            payloads, self._outgoing = list(self._outgoing), {}
            conn = self._conn
            if conn is None or not payloads:
                continue
            try:
                async with self._conn_lock:
                    await conn.execute(
                        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                        CHANNEL,
                        payloads,
                        timeout=self._connect_timeout_s,
                    )
            except Exception as exc:  # the listener notices a dead connection itself
                self._send_failures.log(
                    logging.WARNING,
                    ("send",),
                    f"notifications: {len(payloads)} note(s) not sent ({_describe(exc)}); "
                    "followers see the events at their next poll",
                )

    async def start(self) -> None:
        self._sender = asyncio.create_task(self._send_forever(), name="notify-sender")
        self._task = asyncio.create_task(self._run(), name="notify-listener")
        # The first attempt, bounded: a database down at start is the reconnect loop's to handle.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout_s * 2):
                await self._first.wait()

    async def stop(self) -> None:
        for task in (self._sender, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sender = self._task = None
        self._send_failures.close()

    async def _run(self) -> None:
        while True:
            # A fresh backoff for each outage: one long ago must not slow the next reconnection.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_random_exponential(multiplier=0.2, max=RECONNECT_MAX_S),
                before_sleep=self._failed,
            ):
                with attempt:
                    await self._listen_once()
            # Listened, then the connection broke: reconnect at once.
            self._outage("the listening connection was lost")

    def _failed(self, state: RetryCallState) -> None:
        self._first.set()  # start() waits no longer: the database is away
        exc = state.outcome.exception() if state.outcome is not None else None
        self._outage(_describe(exc))

    def _outage(self, reason: str) -> None:
        # Once per outage: a database away for an hour must not write a line per attempt.
        if not self._down:
            self._down = True
            log.warning(
                "notifications: the listening connection is down, reconnecting with backoff "
                "(commands are redelivered from the table meanwhile, followers poll): %s",
                reason,
            )

    async def _listen_once(self) -> None:
        """Listen until the connection breaks (returns) or cannot be made (raises)."""
        # Not at the top: gateway.store imports this module.
        from gateway.store.db import connect_each_host  # noqa: PLC0415

        # Each host of a multi-host URL in turn, each with its own timeout: a first host that drops
        # packets must not keep the listener from the primary behind it.
        conn = await connect_each_host(
            {**self._connect_args, "server_settings": {"application_name": self.application_name}},
            timeout_s=self._connect_timeout_s,
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._received)
            self._live = True
            self._conn = conn
            self._first.set()
            if self._down:
                self._down = False
                log.info("notifications: listening again; redelivering from the table")
            # Notes sent while nobody listened are lost: the consumers read the table now.
            self._connected()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CHECK_INTERVAL_S):
                        await lost.wait()
                if not lost.is_set():
                    try:
                        # The check is a measurement too: see QUEUE_WARN_USAGE.
                        async with self._conn_lock:
                            usage = await conn.fetchval(
                                "SELECT pg_notification_queue_usage()", timeout=self._connect_timeout_s
                            )
                    except Exception:  # a dead connection: reconnect
                        return
                    self._queue_usage(float(usage))
        finally:
            self._live = False
            self._conn = None
            with contextlib.suppress(Exception):
                conn.terminate()

    def _queue_usage(self, usage: float) -> None:
        self.queue_usage = usage
        # Once when it rises past the mark and once when it is back under half of it.
        if not self._queue_high and usage >= QUEUE_WARN_USAGE:
            self._queue_high = True
            log.warning(
                "notifications: PostgreSQL's notification queue is %.0f%% full: a listener that "
                "stopped reading (a frozen replica: see application_name 'openshell-listen <id>' in "
                "pg_stat_activity) holds it; when it is full every notifying commit fails",
                usage * 100,
            )
        elif self._queue_high and usage < QUEUE_WARN_USAGE / 2:
            self._queue_high = False
            log.info("notifications: PostgreSQL's notification queue is %.0f%% full again", usage * 100)

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        note = Note.decode(payload)
        if note is None:
            log.warning("notifications: a payload this gateway does not understand ignored: %.200r", payload)
            return
        self._dispatch(note)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def notifier_for(
    url: URL, dialect: Dialect, *, replica: str, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> Notifier:
    """The notifier for the engine's database: PostgreSQL listens, anything else is one process."""
    if dialect.name == "postgresql":
        return PostgresNotifier(url, dialect, replica=replica, connect_timeout_s=connect_timeout_s)
    return InProcessNotifier()
