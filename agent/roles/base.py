"""The contract between the agent's role runtime and the roles it hosts.

A role is asynchronous code that talks to the broker only through its :class:`RoleContext`
(declare subscriptions, publish) and pushes CPU-bound work (training, aggregation math) off the
event loop with :meth:`RoleContext.run_cpu`, so presence, telemetry and watchdog pings never
stall. The runtime owns the lifecycle: it starts :meth:`Role.run`, cancels it on a ``cancel_role``
command, and reports a crash without letting it take the daemon down.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from agent.protocol.bundle import RoleBundle
from agent.protocol.topics import Topics
from agent.transport import Inbound, NotConnectedError, Subscription, Transport

T = TypeVar("T")
log = structlog.get_logger("ember.roles")

PUBLISH_RETRY_INITIAL = 1.0
PUBLISH_RETRY_MAX = 30.0


class LocalDataset(Protocol):
    """A dataset held on this device: features ``x`` and labels ``y`` (never leave the device)."""

    @property
    def name(self) -> str: ...

    @property
    def x(self) -> npt.NDArray[np.generic]: ...

    @property
    def y(self) -> npt.NDArray[np.generic]: ...


@dataclass
class RoleContext:
    """What a running role may use: its bundle, the transport, topics, its own state directory,
    the local datasets, a way to run CPU-bound work off the event loop, and a progress reporter."""

    agent_id: str
    bundle: RoleBundle
    transport: Transport
    topics: Topics
    state_dir: Path
    """A directory of this role's own, kept across restarts of the agent."""
    datasets: Mapping[str, LocalDataset]
    run_cpu: Callable[..., Awaitable[Any]]
    """``await ctx.run_cpu(fn, *args)``: ``fn(*args)`` off the event loop; returns its result."""
    report: Callable[[Mapping[str, Any]], Awaitable[None]]
    """Publish a progress/metrics event for this role (JSON on this agent's metrics topic of the
    job)."""
    extras: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[Mapping[str, Any]], None] = lambda _fields: None
    """``ctx.progress({"state": "training", ...})``: merge these fields into this role's entry
    of the retained ``jobs/<job>/agents/<agent>/progress`` document (published at most once per
    second; the runtime adds ``since`` and the end state). A value may be a function of no
    arguments, called when the document is published: for a field that costs something to
    compute and changes with every message (an aggregator's per-trainer statistics)."""

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and keep trying until the broker takes it: a role outlives a
        flapping link. Each failed attempt is logged with its reason; cancellation stops it."""
        delay = PUBLISH_RETRY_INITIAL
        while True:
            try:
                await self.transport.publish(topic, payload)
                return
            except NotConnectedError as exc:
                log.warning("role_publish_retry", topic=topic, reason=str(exc), seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PUBLISH_RETRY_MAX)


class Role(abc.ABC):
    """Base of every role. Subclasses set ``kind`` and implement :meth:`run`."""

    kind: ClassVar[str]

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    async def run(self) -> None:
        """Do the role's work; return when it is finished. Cancellation stops it."""


ROLE_TYPES: dict[str, type[Role]] = {}
"""Role classes by the ``role`` name bundles use."""

R = TypeVar("R", bound=type[Role])


def register_role(cls: R) -> R:
    """Class decorator adding a role class to :data:`ROLE_TYPES` under its ``kind``."""
    if cls.kind in ROLE_TYPES:
        raise TypeError(f"role {cls.kind!r} is registered twice")
    ROLE_TYPES[cls.kind] = cls
    return cls


async def pump(subscription: Subscription, put: Callable[[Inbound], object]) -> None:
    """Hand every message of ``subscription`` to ``put`` (a role's inbox), so that one loop
    serves several subscriptions in arrival order."""
    async for message in subscription:
        put(message)
