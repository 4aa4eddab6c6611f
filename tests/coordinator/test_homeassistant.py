"""Jobs under way as Home Assistant devices: announced, removed when they end."""

from __future__ import annotations

import json
import time

from agent.protocol import Topics
from agent.transport import Subscription, Transport
from coordinator.homeassistant import JobAnnouncer
from coordinator.mosquitto import MosquittoProcess
from tests.coordinator.conftest import broker_config


async def messages(sub: Subscription, count: int) -> dict[str, bytes]:
    seen: dict[str, bytes] = {}
    while len(seen) < count:
        message = await sub.get(timeout=10)
        seen[message.topic] = bytes(message.payload)
    return seen


async def test_jobs_are_announced_while_under_way_and_removed_when_they_end(
    agents_transport: Transport, mosquitto: MosquittoProcess, topics: Topics
) -> None:
    sub = await agents_transport.subscribe("ha/#")
    async with Transport(broker_config(mosquitto.url)) as transport:
        await transport.wait_connected(5)
        names = {"live-1": "digits", "live-2": "sensors"}
        announcer = JobAnnouncer(transport, topics, "ha", job_name=names.get, jitter=0)
        await announcer.start(
            [
                ("old-1", "completed", time.time() - 60),  # ended while nobody removed it
                ("ancient-1", "failed", time.time() - 7 * 86400),  # long gone: left alone
                ("live-1", "running", None),
            ]
        )
        first = await messages(sub, 10)
        removed = {t for t, p in first.items() if not p}
        assert removed == {t for t in first if "/ember_job_old-1/" in t}
        assert len(removed) == 5
        live = {t: json.loads(p) for t, p in first.items() if p}
        assert {c["device"]["name"] for c in live.values()} == {"Ember job digits (live-1)"}
        assert {c["state_topic"] for c in live.values()} == {topics.job_state("live-1")}

        announcer.job_changed("live-2", "planned")
        second = await messages(sub, 5)
        assert all("/ember_job_live-2/" in t and p for t, p in second.items())
        announcer.job_changed("live-2", "running")  # already announced: nothing new
        announcer.job_changed("live-1", "cancelled")
        gone = await messages(sub, 5)
        assert set(gone) == set(live)
        assert not any(gone.values())
        await announcer.stop()
