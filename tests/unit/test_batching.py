"""gateway.batching.Batcher: one batch in flight, the next formed by what arrived meanwhile, each
caller given its own outcome; cancellation drops a waiting item and never cancels a running batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.batching import Batcher
from gateway.tasks import BackgroundTasks


class Recorder:
    """A batch function that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.ended: list[list[int]] = []

    async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        self.ended.append(list(items))
        if any(i < 0 for i in items if i == -99):
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_item_runs_at_once_and_a_burst_forms_the_next_batch() -> None:
    tasks = BackgroundTasks("test")
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks, max_size=4)
    assert await batcher.submit(1) == 10
    assert run.batches == [[1]]
    run.release.clear()
    run.started.clear()
    first = asyncio.create_task(batcher.submit(2))
    await run.started.wait()
    # While the first batch runs, ten more arrive: they wait, and form batches of at most 4.
    rest = [asyncio.create_task(batcher.submit(n)) for n in range(3, 13)]
    await _settle()
    assert run.batches == [[1], [2]]
    run.release.set()
    assert await first == 20
    assert await asyncio.gather(*rest) == [n * 10 for n in range(3, 13)]
    assert run.batches[2:] == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12]]
    assert batcher.batches == 5 and batcher.items == 12
    await tasks.close()
    assert len(tasks) == 0


async def test_each_caller_gets_its_own_outcome_and_a_failed_batch_fails_each() -> None:
    tasks = BackgroundTasks("test")
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks)
    run.release.clear()
    blocker = asyncio.create_task(batcher.submit(0))
    await run.started.wait()
    good, bad = asyncio.create_task(batcher.submit(1)), asyncio.create_task(batcher.submit(-1))
    await _settle()
    run.release.set()
    await blocker
    assert await good == 10
    with pytest.raises(ValueError, match="bad -1"):
        await bad
    # A batch function that raises: every caller of that batch gets the error, later ones run.
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in (5, -99, 6)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert await batcher.submit(7) == 70
    await tasks.close()


async def test_a_caller_cancelled_while_waiting_is_dropped_from_its_batch() -> None:
    tasks = BackgroundTasks("test")
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks)
    run.release.clear()
    blocker = asyncio.create_task(batcher.submit(0))
    await run.started.wait()
    gone = asyncio.create_task(batcher.submit(1))
    kept = asyncio.create_task(batcher.submit(2))
    await _settle()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    run.release.set()
    await blocker
    assert await kept == 20
    assert run.batches == [[0], [2]]  # 1 never ran
    await tasks.close()


async def test_a_caller_cancelled_while_its_batch_runs_does_not_cancel_it_and_waits_for_its_end() -> None:
    """The others of the batch need it; and a caller undoing its item after a cancellation (the
    hello's claim) must undo it after the batch's writes, so its cancellation is delivered then."""
    tasks = BackgroundTasks("test")
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks)
    run.release.clear()
    leaving = asyncio.create_task(batcher.submit(1))
    staying = asyncio.create_task(batcher.submit(2))
    await run.started.wait()
    assert run.batches == [[1, 2]]
    leaving.cancel()
    await _settle()
    assert not leaving.done()  # held until the batch ends
    run.release.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert run.ended == [[1, 2]]  # it ended before the cancellation was delivered
    assert await staying == 20
    await tasks.close()


async def test_closing_the_owner_fails_the_running_batch_and_the_waiting_items() -> None:
    tasks = BackgroundTasks("test")
    run = Recorder()
    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks)
    run.release.clear()
    running = asyncio.create_task(batcher.submit(1))
    await run.started.wait()
    waiting = asyncio.create_task(batcher.submit(2))
    await _settle()
    batcher.close()
    await tasks.close()
    for task in (running, waiting):
        with pytest.raises(RuntimeError, match=r"shutting down|closed"):
            await task
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(3)


async def test_many_concurrent_callers_under_random_cancellation_each_get_their_own_answer() -> None:
    """The property, harder: hundreds of callers, some cancelled at random points; every caller
    not cancelled gets exactly its own item's outcome, every item runs at most once."""
    import random

    rng = random.Random(7)
    tasks = BackgroundTasks("test")
    seen: list[int] = []

    async def run(items: Sequence[int]) -> list[int | BaseException]:
        seen.extend(items)
        await asyncio.sleep(rng.random() / 500)
        return [i + 1 for i in items]

    batcher: Batcher[int, int] = Batcher(run, name="t", tasks=tasks, max_size=16)
    callers = {i: asyncio.create_task(batcher.submit(i)) for i in range(400)}
    for i in rng.sample(range(400), 100):
        await asyncio.sleep(rng.random() / 1000)
        callers[i].cancel()
    results = await asyncio.gather(*callers.values(), return_exceptions=True)
    for i, result in zip(callers, results, strict=True):
        if not isinstance(result, asyncio.CancelledError):
            assert result == i + 1
    assert len(seen) == len(set(seen))
    assert sum(not isinstance(r, asyncio.CancelledError) for r in results) <= len(seen)
    await tasks.close()
