"""Background tasks owned by the component that starts them, as kopf owns its daemons.

Every long-lived loop of the gateway (the drain's pacing, the rebalancer, the heartbeat governor)
is started through a :class:`BackgroundTasks` of its owner, and :meth:`BackgroundTasks.close`
cancels them all on shutdown and waits a bounded time for them to end. A task that dies of an
exception is logged at once with its traceback (a loop that stops silently is how a replica would
stop rebalancing without anyone noticing); a cancelled one is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How long ``close`` waits for cancelled tasks by default.
CLOSE_WAIT_S = 2.0


class BackgroundTasks:
    """A set of named tasks with one owner; ``close`` cancels the rest and waits for them."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
        """Start ``coro`` as a task of this owner (refused once closed: the coroutine is closed)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._owner}: cannot start {name} after close()")
        task = asyncio.create_task(coro, name=f"{self._owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, *, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Cancel every task still running and wait up to ``timeout_s`` for them to end; a task
        that ignores its cancellation that long is named in a warning and left to the loop."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            log.warning(
                "%s: task %s did not end within %.1fs of its cancellation",
                self._owner,
                task.get_name(),
                timeout_s,
            )
