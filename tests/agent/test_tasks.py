"""Waiting for an event with a timeout, and the cancellation Python 3.10/3.11's ``wait_for``
loses (CPython gh-86296): a role told to stop just as its event is set must stop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from agent.tasks import wait_event


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
