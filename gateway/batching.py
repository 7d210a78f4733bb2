"""Group commit: many callers' items handed to one call of a batch function.

A hello's store work is latency-bound, not CPU-bound (issue 22): each of its statements is a round
trip through the aiosqlite thread or to PostgreSQL whose completion waits for the busy event loop
to come round, so a burst of hellos run one transaction each spends most of its time waiting.
A :class:`Batcher` runs one batch at a time: the items submitted while it runs wait and form the
next one, so an idle gateway adds no latency (a lone item is a batch of one, run at once) and the
batches grow with the load, up to ``max_size``.

No library on PyPI does this (the few "aiobatch"-like packages are timer-based, unmaintained or for
model inference); it is small enough to own.

Cancellation: a caller cancelled while its item waits is dropped from the batch (nothing of it
runs). A caller cancelled while its batch runs does not cancel the batch (the other callers need
it): its cancellation is delivered once the batch has ended, so a caller that undoes its item
when it gives up (the hello's claim, ``OpenShellService._within``'s ``undo``) undoes it after
whatever the batch wrote, never before.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.tasks import BackgroundTasks

log = logging.getLogger(__name__)

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(eq=False, slots=True)
class _Waiting(Generic[_In, _Out]):
    item: _In
    answer: asyncio.Future[_Out]
    #: Taken into a batch: from then on its caller's cancellation waits for the batch's end.
    taken: bool = False
    #: Set once the batch holding the item has ended (whatever its outcome).
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Batcher(Generic[_In, _Out]):
    """Runs ``run`` on batches of submitted items, one batch at a time.

    ``run`` gets the items of a batch (in submission order) and returns one outcome per item, in
    the same order: its result, or an exception for that item alone (raised to its caller). An
    exception ``run`` raises fails every caller of the batch with it. The batches run in a task of
    ``tasks`` (cancelled with its owner); :meth:`close` refuses new items."""

    def __init__(
        self,
        run: Callable[[Sequence[_In]], Awaitable[Sequence[_Out | BaseException]]],
        *,
        name: str,
        tasks: BackgroundTasks,
        max_size: int = 100,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self._run = run
        self._name = name
        self._tasks = tasks
        self._max_size = max_size
        self._waiting: collections.deque[_Waiting[_In, _Out]] = collections.deque()
        self._running: asyncio.Task[None] | None = None
        self._closed = False
        #: How many batches ran, and how many items they held (for tests and the logs).
        self.batches = 0
        self.items = 0

    async def submit(self, item: _In) -> _Out:
        """The outcome of ``item``, run in the next batch (see the module docstring)."""
        if self._closed:
            raise RuntimeError(f"{self._name}: closed")
        waiting: _Waiting[_In, _Out] = _Waiting(item, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._running is None:
            self._running = self._tasks.spawn(self._drain(), name=self._name)
        try:
            return await asyncio.shield(waiting.answer)
        except asyncio.CancelledError:
            if not waiting.taken:
                waiting.answer.cancel()  # still waiting: dropped from the batch
                raise
            # Its batch runs: not cancelled (the others need it); this caller's cancellation
            # waits for its end, so an undo it triggers comes after the batch's writes.
            await asyncio.shield(waiting.ended.wait())
            if waiting.answer.done() and not waiting.answer.cancelled():
                waiting.answer.exception()  # retrieved: nobody else will
            raise

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch: list[_Waiting[_In, _Out]] = []
                while self._waiting and len(batch) < self._max_size:
                    waiting = self._waiting.popleft()
                    if not waiting.answer.cancelled():  # a caller cancelled while it waited
                        waiting.taken = True
                        batch.append(waiting)
                if batch:
                    await self._one(batch)
        finally:
            self._running = None
            # Cancelled (the owner shutting down) with items still waiting: they are failed.
            self._settle_all(self._waiting, RuntimeError(f"{self._name}: closed"))
            self._waiting.clear()

    async def _one(self, batch: list[_Waiting[_In, _Out]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            outcomes = await self._run([w.item for w in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"{self._name}: the batch function returned {len(outcomes)} outcomes "
                    f"for {len(batch)} items"
                )
        except asyncio.CancelledError:
            self._settle_all(batch, RuntimeError(f"{self._name}: cancelled (shutting down)"))
            raise
        except Exception as exc:
            log.debug("batch failed: %s", exc, extra={"batcher": self._name, "items": len(batch)})
            self._settle_all(batch, exc)
            return
        for w, outcome in zip(batch, outcomes, strict=True):
            if not w.answer.done():
                if isinstance(outcome, BaseException):
                    w.answer.set_exception(outcome)
                else:
                    w.answer.set_result(outcome)
            w.ended.set()

    @staticmethod
    def _settle_all(waiting: Iterable[_Waiting[_In, _Out]], exc: BaseException) -> None:
        for w in waiting:
            if not w.answer.done():
                w.answer.set_exception(exc)
            w.ended.set()

    def close(self) -> None:
        """Refuse new items; those already submitted are still run (or failed, when the owner's
        ``BackgroundTasks.close`` cancels the batches' task)."""
        self._closed = True
