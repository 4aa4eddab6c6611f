"""Jobs under way as Home Assistant devices: announced, removed when they end."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from agent.process import stop_process
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


async def test_ember_serve_homeassistant_announces_its_embedded_agent(
    agents_transport: Transport, mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    from tests.coordinator.test_cli import environment, spawn_serve

    sub = await agents_transport.subscribe("hass/#")
    env = environment(mosquitto, topics)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = await spawn_serve(
            env,
            tmp_path / "state",
            sink,
            "--homeassistant",
            "--homeassistant-prefix",
            "hass",
            "--agent-id",
            "hub",
            "--no-zeroconf",
        )
    try:
        configs = await messages(sub, 6)
    finally:
        await stop_process(process, 15)
    assert {t.split("/")[2] for t in configs} == {"ember_agent_hub"}, log.read_text()
    states = {json.loads(p)["state_topic"] for p in configs.values()}
    assert states == {topics.agent_status("hub"), topics.agent_telemetry("hub")}


async def test_ember_serve_refuses_a_bad_discovery_prefix(tmp_path: Path) -> None:
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.cli",
        "serve",
        "--state-dir",
        str(tmp_path),
        "--homeassistant-prefix",
        "ha/#",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 2
    assert err.decode().strip() == (
        "Error: --homeassistant-prefix: 'ha/#' is not a valid topic without wildcards"
    )
