"""``ember serve --homeassistant``: every job that is under way as a Home Assistant device.

Home Assistant MQTT discovery (see :mod:`agent.protocol.homeassistant`): when a job is
submitted the coordinator publishes retained discovery configs whose sensors read the job's
retained ``jobs/<id>/state`` (phase, model version, accuracy, updates applied, progress); when
the job ends (completed, failed, cancelled) it removes them with empty retained payloads, as
Home Assistant expects. Configs are published again after every reconnection and whenever Home
Assistant announces itself on ``<discovery prefix>/status``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import structlog

from agent.homeassistant import DiscoveryPublisher
from agent.protocol.homeassistant import job_discovery
from agent.protocol.topics import Topics
from agent.transport import Transport

log = structlog.get_logger("ember.homeassistant")

TERMINAL = frozenset({"completed", "failed", "cancelled"})
REMOVE_ON_START = 24 * 3600.0
"""At start, remove the configs of jobs that ended within this many seconds (in case the
coordinator stopped between a job's end and the removal)."""


class JobAnnouncer:
    """Discovery configs for the jobs under way, following the dispatcher's job changes."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        discovery_prefix: str,
        *,
        job_name: Callable[[str], str | None],
        jitter: float | None = None,
    ) -> None:
        self.topics = topics
        self.prefix = discovery_prefix
        self.job_name = job_name
        options = {} if jitter is None else {"jitter": jitter}
        self.publisher = DiscoveryPublisher(transport, discovery_prefix, **options)

    async def start(self, jobs: Iterable[tuple[str, str, float | None]]) -> None:
        """``jobs``: (id, phase, finished_at) of every job the coordinator knows."""
        now = time.time()
        for job_id, phase, finished in jobs:
            if phase not in TERMINAL:
                self.job_changed(job_id, phase)
            elif finished is not None and now - finished < REMOVE_ON_START:
                self._remove(job_id)
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.close()

    def job_changed(self, job_id: str, phase: str) -> None:
        """The dispatcher's listener: announce a job under way, remove one that ended."""
        key = f"job:{job_id}"
        if phase in TERMINAL:
            if key in self.publisher.devices:
                log.info("homeassistant_job_removed", job=job_id, phase=phase)
            self._remove(job_id)
        elif key not in self.publisher.devices:
            name = self.job_name(job_id) or job_id
            self.publisher.set(key, job_discovery(self.prefix, job_id, name, self.topics))
            log.info("homeassistant_job_announced", job=job_id)

    def _remove(self, job_id: str) -> None:
        key = f"job:{job_id}"
        if key not in self.publisher.devices:
            # Not announced by this process: name the topics so they can be cleared.
            self.publisher.set(key, job_discovery(self.prefix, job_id, job_id, self.topics))
        self.publisher.remove(key)
