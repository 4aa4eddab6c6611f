"""Stopping asyncio tasks (cancel, then wait for each to finish), and waiting for an event or a
queue's next item with a timeout without losing a cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "queue_get", "wait_event"]

T = TypeVar("T")


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, suppress: tuple[type[BaseException], ...] = ()
) -> None:
    """Cancel every task in ``tasks`` (a snapshot is taken first, so a set that tasks leave
    when done may be passed), then await each in turn; its :class:`asyncio.CancelledError`,
    and any exception of a type in ``suppress``, is swallowed."""
    stopping = list(tasks)
    for task in stopping:
        task.cancel()
    for task in stopping:
        with contextlib.suppress(asyncio.CancelledError, *suppress):
            await task


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set (``True``) or ``timeout`` seconds passed (``False``).

    ``asyncio.wait_for(event.wait(), timeout)`` on Python 3.10 and 3.11 swallows a cancellation
    that arrives as the event is set (CPython gh-86296, fixed in 3.12): the waiting task goes on
    as if nothing had happened, and a role told to stop runs on. ``asyncio.wait`` does not."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


async def queue_get(queue: asyncio.Queue[T], timeout: float | None) -> T:
    """``queue``'s next item, or ``asyncio.TimeoutError`` after ``timeout`` seconds.

    ``asyncio.wait_for(queue.get(), timeout)`` on Python 3.10 and 3.11 returns the item when
    the task is cancelled as the item comes (CPython gh-86296, as :func:`wait_event`): the
    reader goes on, and a role told to stop runs on. Here the cancellation is raised; an item
    already taken then goes back into the queue (at its end), so none is lost either."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout)
    except asyncio.CancelledError:
        if getter.done() and not getter.cancelled():
            queue.put_nowait(getter.result())
        getter.cancel()
        raise
    if not done:
        getter.cancel()
        raise asyncio.TimeoutError
    return getter.result()
