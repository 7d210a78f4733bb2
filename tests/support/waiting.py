"""Waiting in async tests for a condition that the system reaches on its own time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


async def until(
    predicate: Callable[[], object] | Callable[[], Awaitable[object]],
    *,
    within: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Call ``predicate`` (sync or async) until it returns something truthy, and return that; an
    AssertionError naming ``what`` when ``within`` seconds pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)
