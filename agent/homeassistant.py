"""Keeping Home Assistant MQTT discovery configs on the broker (agent and coordinator alike).

Home Assistant's MQTT discovery protocol: configs are retained, published again after every
(re)connection and whenever Home Assistant announces itself with ``online`` on
``<discovery prefix>/status`` (its birth message; after a short random delay, as Home Assistant
recommends, so a fleet does not answer all at once), and removed with an empty retained
payload. The documents themselves come from :mod:`agent.protocol.homeassistant`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping

import structlog

from agent.protocol.homeassistant import STATUS_LEAF
from agent.tasks import cancel_and_wait
from agent.transport import NotConnectedError, Subscription, Transport

log = structlog.get_logger("ember.homeassistant")

BIRTH_JITTER = 2.0
"""Seconds (at most, uniformly drawn) to wait before answering Home Assistant's birth message."""


class DiscoveryPublisher:
    """Retained discovery configs grouped by device: set, removed, republished on demand."""

    def __init__(
        self, transport: Transport, discovery_prefix: str, *, jitter: float = BIRTH_JITTER
    ) -> None:
        self.transport = transport
        self.prefix = discovery_prefix
        self.jitter = jitter
        self.devices: dict[str, dict[str, bytes]] = {}
        """device key → config topic → payload: what should be on the broker."""
        self._removals: set[str] = set()
        """Config topics whose removal (empty retained payload) is not out yet."""
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._birth: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/{STATUS_LEAF}"

    async def start(self) -> None:
        """Follow Home Assistant's status and publish after every connection."""
        self.transport.on_connect(self._on_connect)
        self._birth = await self.transport.subscribe(self.status_topic, qos=1, max_messages=16)
        self._tasks = [
            asyncio.create_task(self._follow_birth(self._birth), name="ha-birth"),
            asyncio.create_task(self._publish(), name="ha-publish"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks, suppress=(Exception,))
        if self._birth is not None:
            await self._birth.close()

    def set(self, device: str, configs: Mapping[str, bytes]) -> None:
        """Keep ``configs`` (topic → payload) for ``device`` on the broker, replacing its old
        ones (configs it no longer has are removed)."""
        old = self.devices.get(device, {})
        self.devices[device] = dict(configs)
        self._removals.update(set(old) - set(configs))
        self._removals.difference_update(configs)
        for topic in sorted(set(old) - set(configs)) + sorted(configs):
            self._queue.put_nowait(topic)

    def remove(self, device: str) -> None:
        """Remove every entity of ``device`` from Home Assistant."""
        for topic in sorted(self.devices.pop(device, {})):
            self._removals.add(topic)
            self._queue.put_nowait(topic)

    def republish(self) -> None:
        for topic in sorted(self._removals) + sorted(self._current()):
            self._queue.put_nowait(topic)

    def _current(self) -> dict[str, bytes]:
        return {t: p for configs in self.devices.values() for t, p in configs.items()}

    async def _on_connect(self, _session: int) -> None:
        self.republish()

    async def _follow_birth(self, birth: Subscription) -> None:
        async for message in birth:
            if bytes(message.payload).strip() != b"online":
                continue
            delay = random.uniform(0, self.jitter)
            log.info("homeassistant_online", republish_in=round(delay, 2))
            await asyncio.sleep(delay)
            self.republish()

    async def _publish(self) -> None:
        while True:
            topic = await self._queue.get()
            # What the topic should carry *now*: a later set or remove wins over the queue.
            payload = self._current().get(topic, b"" if topic in self._removals else None)
            if payload is None:
                continue
            try:
                await self.transport.publish(topic, payload, qos=1, retain=True, timeout=30)
            except NotConnectedError:
                continue  # everything is queued again on connect
            except Exception:
                log.exception("discovery_publish_failed", topic=topic)
                continue
            if not payload:
                with contextlib.suppress(KeyError):
                    self._removals.remove(topic)
