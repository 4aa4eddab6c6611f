"""An agent announcing itself to Home Assistant (MQTT discovery) on a real mosquitto."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.homeassistant import DiscoveryPublisher
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Subscription, Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import FAST_BROKER, AgentProcess, agent_toml, next_json
from tests.ha_templates import render

StartAgent = Callable[..., Awaitable[AgentProcess]]


async def configs(sub: Subscription, count: int, timeout: float = 20) -> dict[str, bytes]:
    """The next ``count`` discovery messages, by topic."""
    seen: dict[str, bytes] = {}
    while len(seen) < count:
        message = await sub.get(timeout=timeout)
        seen[message.topic] = bytes(message.payload)
    return seen


async def test_an_agent_is_a_device_whose_sensors_read_its_topics(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = agent_toml(
        state_dir=tmp_path / "state",
        broker_url=mosquitto.url,
        topics=topics,
        agent_id="pi-ha",
        telemetry=0.2,
        extra='[homeassistant]\nenabled = true\ndiscovery_prefix = "ha-test"\n',
    )
    discovery = await watcher.subscribe("ha-test/+/+/+/config")
    telemetry = await watcher.subscribe(topics.agent_telemetry("pi-ha"))
    status = await watcher.subscribe(topics.agent_status("pi-ha"))
    await start_agent(config)
    first = await configs(discovery, 6)
    assert all(t.startswith("ha-test/") and t.endswith("/config") for t in first)
    sample = json.dumps(await next_json(telemetry, 20, agent="pi-ha"))
    online = json.dumps(await next_json(status, 20, state="online"))
    for payload in first.values():
        entity = json.loads(payload)
        state = sample if entity["state_topic"] == topics.agent_telemetry("pi-ha") else online
        rendered = render(entity["value_template"], state)
        assert rendered not in ("", "None") or entity["name"] == "Temperature", entity["name"]
        for availability in entity.get("availability", []):
            assert render(availability["value_template"], online) == "online"

    # Home Assistant restarts and says so: the configs come again.
    await watcher.publish("ha-test/status", b"online", qos=1)
    assert await configs(discovery, 6) == first


async def test_removed_devices_get_empty_retained_configs(
    mosquitto: MosquittoProcess, watcher: Transport
) -> None:
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST_BROKER)) as transport:
        await transport.wait_connected(5)  # else the connect hook publishes everything again
        publisher = DiscoveryPublisher(transport, "ha", jitter=0)
        await publisher.start()
        sub = await watcher.subscribe("ha/#")
        publisher.set("dev", {"ha/sensor/n/a/config": b'{"a":1}', "ha/sensor/n/b/config": b"{}"})
        assert await configs(sub, 2) == {
            "ha/sensor/n/a/config": b'{"a":1}',
            "ha/sensor/n/b/config": b"{}",
        }
        publisher.set("dev", {"ha/sensor/n/a/config": b'{"a":2}'})  # b is gone from the device
        assert await configs(sub, 2) == {
            "ha/sensor/n/a/config": b'{"a":2}',
            "ha/sensor/n/b/config": b"",
        }
        publisher.remove("dev")
        assert await configs(sub, 1) == {"ha/sensor/n/a/config": b""}
        # Nothing retained is left for Home Assistant to find: a new subscriber's first
        # message is a marker published after it subscribed.
        late = await transport.subscribe("ha/#")
        await transport.publish("ha/marker", b"x", qos=1)
        assert (await late.get(timeout=10)).topic == "ha/marker"
        await publisher.close()


def test_the_homeassistant_section_is_checked() -> None:
    config = parse_config('[homeassistant]\nenabled = true\ndiscovery_prefix = "hass"\n')
    assert config.homeassistant.enabled
    assert config.homeassistant.discovery_prefix == "hass"
    assert not parse_config("").homeassistant.enabled
    with pytest.raises(ConfigError, match=r"homeassistant\.discovery_prefix"):
        parse_config('[homeassistant]\ndiscovery_prefix = "ha/#"\n')
    with pytest.raises(ConfigError, match=r"homeassistant\.enabled"):
        parse_config("[homeassistant]\nenabled = 3\n")
