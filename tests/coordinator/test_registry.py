"""The fleet registry from retained agent documents on a real broker, and from zeroconf."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from agent.protocol import Topics
from agent.protocol.messages import AgentStatus
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from coordinator.registry import LanBrowser, Registry
from tests.coordinator.conftest import FakeAgent, agent_info, broker_config, eventually


@pytest.fixture
async def registry(mosquitto: MosquittoProcess, topics: Topics) -> AsyncIterator[Registry]:
    async with Transport(broker_config(mosquitto.url)) as transport:
        await transport.wait_connected(5)
        reg = Registry(transport, topics)
        await reg.start()
        try:
            yield reg
        finally:
            await reg.stop()


async def test_retained_documents_build_the_fleet(
    agents_transport: Transport, mosquitto: MosquittoProcess, topics: Topics
) -> None:
    # Agents published before the coordinator started: the retained documents are replayed.
    pi = await FakeAgent(
        "pi-1",
        agents_transport,
        topics,
        agent_info(
            "pi-1",
            datasets=[
                {"name": "digits", "tags": ["vision"], "samples": 300, "feature_shape": [64]}
            ],
        ),
    ).start()
    await pi.set_role("job-1", "trainer", "running", bundle="ab" * 32)
    async with Transport(broker_config(mosquitto.url)) as transport:
        await transport.wait_connected(5)
        changes: list[tuple[str, str]] = []
        reg = Registry(transport, topics)
        reg.listen(lambda agent, leaf: changes.append((agent, leaf)))
        await reg.start()
        try:
            await eventually(
                lambda: (a := reg.get("pi-1")) is not None and bool(a.roles) and a.online
            )
            view = reg.get("pi-1")
            assert view is not None
            assert view.info is not None
            assert view.info.arch == "aarch64"
            assert view.info.memory_mb == 4096
            assert view.info.onnxruntime == "1.17.0"
            assert view.info.torch is None
            assert view.info.os == "Debian GNU/Linux 12"
            assert view.info.datasets[0].feature_shape == (64,)
            assert view.running_roles() == ["job-1/trainer"]
            summary = view.summary()
            assert summary["datasets"][0]["samples"] == 300
            assert summary["running_roles"] == ["job-1/trainer"]
            assert {leaf for _, leaf in changes} >= {"status", "info", "roles"}

            await agents_transport.publish(
                topics.agent_telemetry("pi-1"), json.dumps({"cpu_percent": 12.5}), qos=0
            )
            await eventually(lambda: reg.get("pi-1").telemetry is not None)  # type: ignore[union-attr]
            await pi.go_offline()
            await eventually(lambda: not reg.get("pi-1").online)  # type: ignore[union-attr]
            assert reg.get("pi-1").offline_reason == "connection lost"  # type: ignore[union-attr]

            # Junk never breaks the registry.
            await agents_transport.publish(
                topics.agent_info("junk"), b"\xff\x00 not json", retain=True
            )
            await agents_transport.publish(topics.agent_info("list"), b"[1, 2]", retain=True)
            # A status is read as strictly as a message: online/offline drives placement.
            await agents_transport.publish(
                topics.agent_status("bare"), b'{"state": "online"}', retain=True
            )
            forged = AgentStatus(agent="pi-1", state="online", session=1).to_json()
            await agents_transport.publish(topics.agent_status("other"), forged, retain=True)
            ok = AgentStatus(agent="ok", state="online", session=1).to_json()
            await agents_transport.publish(topics.agent_status("ok"), ok, retain=True)
            await eventually(lambda: reg.get("ok") is not None)
            assert reg.get("junk") is None
            assert reg.get("list") is None
            assert reg.get("bare") is None
            assert reg.get("other") is None

            # Clearing every retained document forgets the agent.
            for leaf in ("status", "info", "roles", "telemetry"):
                await agents_transport.publish(topics.agent("pi-1", leaf), b"", retain=True)
            await eventually(lambda: reg.get("pi-1") is None)
        finally:
            await reg.stop()
        for leaf in ("info", "status"):
            for name in ("junk", "list", "bare", "other", "ok"):
                await agents_transport.publish(topics.agent(name, leaf), b"", retain=True)


async def test_zeroconf_annotates_lan_presence(registry: Registry) -> None:
    from agent.discovery import Advertiser, txt_record

    properties = txt_record(
        agent_id="pi-lan",
        version="0.1.0",
        arch="aarch64",
        datasets=["digits"],
        info_topic=registry.topics.agent_info("pi-lan"),
        prefix=registry.topics.prefix,
    )
    browser = LanBrowser(registry, interfaces=["127.0.0.1"])
    await browser.start()
    advertiser = Advertiser(agent_id="pi-lan", properties=properties, interfaces=["127.0.0.1"])
    await advertiser.start()
    try:
        await eventually(lambda: registry.get("pi-lan") is not None, timeout=15)
        view = registry.get("pi-lan")
        assert view is not None
        assert not view.online
        assert view.lan is not None
        assert view.lan["addresses"] == ["127.0.0.1"]
        assert view.lan["properties"]["ds"] == "digits"
    finally:
        await advertiser.close()
        await browser.stop()
