"""Waiting for an event or a queue's next item with a timeout, and the cancellation Python
3.10/3.11's ``wait_for`` loses (CPython gh-86296): a role told to stop just as its event is set
or its next message comes must stop, and the message must stay for whoever reads next."""

from __future__ import annotations

import asyncio
import sys

import pytest

from agent.tasks import queue_get, wait_event


async def test_true_once_set_false_after_the_timeout() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, event.set)
    assert await wait_event(event, 5)
    assert await wait_event(event, 0)  # already set: no wait
    event.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await wait_event(event, 0.05)
    assert loop.time() - started >= 0.05
    await asyncio.sleep(0)  # the waiter's cancellation runs
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_cancellation_that_comes_as_the_event_is_set_is_not_lost() -> None:
    async def waiting(wait: object) -> str:
        if wait is asyncio.wait_for:
            await asyncio.wait_for(event.wait(), 10)
        else:
            await wait_event(event, 10)
        return "went on"

    for wait in (wait_event, asyncio.wait_for):
        event = asyncio.Event()
        task = asyncio.create_task(waiting(wait))
        await asyncio.sleep(0.01)
        event.set()
        task.cancel()
        if wait is wait_event:
            with pytest.raises(asyncio.CancelledError):
                await task
        elif sys.version_info < (3, 12):
            # What wait_event is for: wait_for returns as if never cancelled.
            assert await task == "went on"


async def test_queue_get_returns_items_in_order_and_times_out() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    queue.put_nowait(1)
    assert await queue_get(queue, 0) == 1  # queued: no wait
    asyncio.get_running_loop().call_later(0.02, queue.put_nowait, 2)
    assert await queue_get(queue, 5) == 2
    with pytest.raises(asyncio.TimeoutError):
        await queue_get(queue, 0.05)
    await asyncio.sleep(0)  # the getter's cancellation runs
    queue.put_nowait(3)
    assert await queue_get(queue, 1) == 3  # the timed-out getter took nothing
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_cancellation_that_comes_with_an_item_is_raised_and_the_item_kept() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.create_task(queue_get(queue, 10))
    await asyncio.sleep(0.01)
    queue.put_nowait("update")
    await asyncio.sleep(0)  # the getter takes the item ...
    reader.cancel()  # ... as the reader is told to stop
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert queue.get_nowait() == "update"
