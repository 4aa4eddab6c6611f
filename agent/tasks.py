"""Stopping asyncio tasks: cancel, then wait for each to finish."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]


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
