"""Stopping asyncio tasks (cancel, then wait for each to finish) and waiting for an event with a
timeout without losing a cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait", "wait_event"]


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
