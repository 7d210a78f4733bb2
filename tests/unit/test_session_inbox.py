"""A session's Inbox keeps asyncio.Queue's behaviour as the session loop uses it: first in, first
out; a waiting get woken by a put; a get cancelled while it waits takes nothing, even when the put
that woke it came first; one reader."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sessions import Close, Inbox, Wake


async def test_items_come_out_in_order_and_a_waiting_get_is_woken() -> None:
    inbox = Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    first, second = Wake("a"), Close("b")
    inbox.put_nowait(first)
    inbox.put_nowait(second)
    assert await getter is first
    assert inbox.qsize() == 1
    assert await inbox.get() is second
    assert inbox.empty()
    # Many at once, from several writers, still in order.
    items = [Wake(str(i)) for i in range(1000)]
    for item in items:
        inbox.put_nowait(item)
    assert [await inbox.get() for _ in items] == items


@pytest.mark.parametrize("put_first", [False, True])
async def test_a_get_cancelled_while_it_waits_takes_nothing(put_first: bool) -> None:
    inbox = Inbox()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    item = Close("for the cleanup")
    if put_first:
        # The put wakes the getter, whose cancellation comes before it runs again.
        inbox.put_nowait(item)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    if not put_first:
        inbox.put_nowait(item)
    assert inbox.get_nowait() is item
    # And the inbox is usable after: a new get waits and is woken.
    again = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(item)
    assert await again is item


async def test_one_reader_only() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one reader"):
        await inbox.get()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
