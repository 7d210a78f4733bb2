"""Commands reach the replica that holds their sandbox's session, whichever replica stored them.

The API stores a command and its notification in one transaction (:mod:`gateway.store.commands`,
:mod:`gateway.notify`); every replica's :class:`CommandRouter` hears it, and the one whose registry
holds the sandbox's live session reads the sandbox's deliverable commands from the table and
hands them to the session. Once the session wrote one to its stream, the router records
``delivered_at``/``delivered_by`` (only while the command is pending and unexpired, and while the
session's claim on the sandbox is still the newest: fenced like its other writes) with a
notification back, which ends the wait of the POST on whichever replica it came in
(:meth:`CommandRouter.wait_delivered`).

A notification only wakes: the table is read each time. Every ``commands.redeliver_interval_s``,
and at once whenever the listening connection (re)connects (what was sent while it was down is
lost), the router reads the deliverable commands of all its sessions in one query and hands them
over. A command the router is still handing over is not handed again; one sent twice anyway (a
hello's pending read racing the router) is dropped by the supervisor, which applies each id once.
The time a command has left is measured by the database and turned into a deadline on this
replica's clock, so the session never writes one that has expired, whatever the clocks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.config import CommandSettings
from gateway.notify import Note, Notifier, Topic
from gateway.ratelimit import RateLimitedLog
from gateway.sessions import SessionRegistry
from gateway.store import CommandRow, CommandStore, StoreError
from gateway.store.commands import APPLIED, FAILED

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Handed:
    """A command queued for a live session: ``taken`` is the future the session settles (True
    once written to its stream), ``owner_epoch`` the session's claim, which the delivery mark is
    fenced with (a paused old owner must not mark a command delivered to its dead stream)."""

    taken: asyncio.Future[bool]
    owner_epoch: int


#: Hands a command to the live session on this replica: None if none may take it, else what it
#: was handed to. ``OpenShellService.hand_off``.
HandOff = Callable[[CommandRow], "Handed | None"]
#: A hand-off is awaited at most this long past the command's expiry (the session settles the
#: future itself when the command expires in its inbox; this only bounds a session gone wrong).
HAND_OFF_SLACK_S = 1.0


class CommandRouter:
    """See the module docstring. An owned task (the periodic redelivery) and the hand-offs under
    way, all cancelled by :meth:`stop`."""

    def __init__(
        self,
        *,
        commands: CommandStore,
        registry: SessionRegistry,
        hand_off: HandOff,
        notifier: Notifier,
        replica: str,
        settings: CommandSettings,
    ) -> None:
        self._commands = commands
        self._registry = registry
        self._hand_off = hand_off
        self._notifier = notifier
        self._replica = replica
        self._settings = settings
        #: Commands being handed to a session now (by id): not handed again meanwhile.
        self._handing: set[str] = set()
        #: POSTs waiting for their command's delivery, by command id.
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failures = RateLimitedLog(log, concern="command-redelivery")

    def start(self) -> None:
        self._notifier.subscribe(self._on_note)
        # Notes may have been missed while not listening: read the table at once.
        self._notifier.on_connect(self._wake.set)
        self._ticker = asyncio.create_task(self._redeliver_forever(), name="command-redelivery")

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ticker = None
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)
        self._failures.close()

    # -- the POST's side ------------------------------------------------------------------

    async def wait_delivered(self, created: CommandRow) -> bool:
        """Wait up to ``commands.delivery_wait_s`` for the command's owning session, on any
        replica, to have written it to its stream (``delivered_at`` recorded)."""
        command_id = created.command.command_id
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(command_id, []).append(waiter)
        try:
            async with asyncio.timeout(self._settings.delivery_wait_s):
                return await waiter
        except TimeoutError:
            pass
        finally:
            waiters = self._waiting.get(command_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(command_id, None)
        # The notification may have been lost (the listener reconnecting): the table says. An
        # answered command was delivered, whether or not the mark got there first.
        try:
            row = await self._commands.get(command_id)
        except StoreError:
            return False
        return row is not None and (
            row.delivered_at is not None or row.state in (APPLIED, FAILED) or row.late_result is not None
        )

    # -- the owning replica's side --------------------------------------------------------

    def _on_note(self, note: Note) -> None:
        if note.topic is Topic.DELIVERED:
            for waiter in self._waiting.get(note.ref, ()):
                if not waiter.done():
                    waiter.set_result(True)
        elif note.topic is Topic.COMMAND and self._registry.get(note.sandbox_id) is not None:
            self._spawn(self._redeliver({note.sandbox_id}), name=f"route-{note.sandbox_id}")

    def _spawn(self, coro: Any, *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A store failure is expected in an outage (the next round tries again); else a bug.
            self._failures.log(
                logging.WARNING,
                ("route",),
                f"command routing: {exc} (the next redelivery round tries again)",
                exc_info=None if isinstance(exc, StoreError) else exc,
            )

    async def _redeliver_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.redeliver_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._redeliver(self._registry.sandbox_ids())
            except Exception as exc:
                # Any failure, not only the store's: a bug on one odd row must not end the rounds
                # (and with them every redelivery) for the life of the process without a word.
                self._failures.log(
                    logging.WARNING,
                    ("redeliver",),
                    f"command redelivery: {exc} (tried again in {self._settings.redeliver_interval_s:g}s)",
                    exc_info=None if isinstance(exc, StoreError) else exc,
                )

    async def _redeliver(self, sandbox_ids: Collection[str]) -> None:
        """Hand the deliverable commands of these sandboxes (one query) to their sessions here."""
        if not sandbox_ids:
            return
        # Taken before the query: the deadline then errs early by the read's latency, never late.
        before = datetime.now(UTC)
        for row, left in await self._commands.deliverable(sandbox_ids):
            command_id = row.command.command_id
            if command_id in self._handing:
                continue
            # The database's time left, from this replica's clock when the read began.
            local = dataclasses.replace(row, expires_at=before + left)
            handed = self._hand_off(local)
            if handed is None:
                continue  # no session here for it (any more): its next session's hello sends it
            self._handing.add(command_id)
            self._spawn(self._record(local, handed, left), name=f"deliver-{command_id}")

    async def _record(self, row: CommandRow, handed: Handed, left: timedelta) -> None:
        command_id = row.command.command_id
        try:
            try:
                async with asyncio.timeout(left.total_seconds() + HAND_OFF_SLACK_S):
                    written = await asyncio.shield(handed.taken)
            except TimeoutError:
                return
            if written:
                # Fenced with the session's claim: recorded only while it still owns the sandbox.
                await self._commands.mark_delivered(
                    row.sandbox_id, [command_id], by=self._replica, owner_epoch=handed.owner_epoch or None
                )
        finally:
            self._handing.discard(command_id)
