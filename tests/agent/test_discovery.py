"""DNS-SD advertisement over mDNS on loopback, browsed with a real zeroconf client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.discovery import SERVICE_TYPE, Advertiser, dataset_list, fit, txt_record
from agent.protocol.topics import Topics
from coordinator.mosquitto import free_port
from tests.agent.conftest import AgentProcess, agent_toml, make_npz


def test_txt_entries_fit_255_bytes() -> None:
    names = [f"dataset-number-{i:04d}" for i in range(100)]
    listed = dataset_list(names)
    assert len(f"ds={listed}".encode()) <= 255
    kept = listed.split(",")
    assert kept[-1] == f"+{100 - (len(kept) - 1)}"
    assert kept[:-1] == names[: len(kept) - 1]
    assert dataset_list(["a", "b"]) == "a,b"
    assert dataset_list([]) == ""
    assert len(("info=" + fit("info", "é" * 300)).encode()) <= 255
    record = txt_record(
        agent_id="x" * 128,
        version="0.1.0",
        arch="aarch64",
        datasets=names,
        info_topic="p/" * 200,
        prefix="p",
    )
    assert record["txtvers"] == "1"
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in record.items())


@pytest.fixture
async def browser() -> AsyncIterator[AsyncZeroconf]:
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        yield zc
    finally:
        await zc.async_close()


async def find(zc: AsyncZeroconf, instance: str, timeout: float = 10) -> AsyncServiceInfo:
    """Browse ``_ember-agent._tcp`` until ``instance`` shows up, then resolve it."""
    seen = asyncio.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == instance and state_change is ServiceStateChange.Added:
            seen.set()

    browse = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        await asyncio.wait_for(seen.wait(), timeout)
    finally:
        await browse.async_cancel()
    info = AsyncServiceInfo(SERVICE_TYPE, instance)
    assert await info.async_request(zc.zeroconf, 3000)
    return info


async def test_advertiser_is_found_by_a_browse_on_loopback(browser: AsyncZeroconf) -> None:
    properties = txt_record(
        agent_id="pi-zc",
        version="0.1.0",
        arch="aarch64",
        datasets=["digits", "iris"],
        info_topic="ember/v1/agents/pi-zc/info",
        prefix="ember/v1",
    )
    advertiser = Advertiser(agent_id="pi-zc", properties=properties, interfaces=["127.0.0.1"])
    await advertiser.start()
    try:
        assert advertiser.registered.is_set()
        info = await find(browser, f"pi-zc.{SERVICE_TYPE}")
        assert info.decoded_properties == properties
        assert info.parsed_addresses() == ["127.0.0.1"]
    finally:
        await advertiser.close()


async def test_a_running_agent_is_found(
    browser: AsyncZeroconf,
    start_agent: Callable[..., Awaitable[AgentProcess]],
    topics: Topics,
    tmp_path: Path,
) -> None:
    data = make_npz(tmp_path / "d.npz")
    config = agent_toml(
        state_dir=tmp_path / "state",
        broker_url=f"mqtt://127.0.0.1:{free_port()}",  # discovery does not need the broker
        topics=topics,
        agent_id="pi-zeroconf",
        zeroconf=True,
        datasets=[{"name": "digits", "path": str(data)}],
    )
    agent = await start_agent(config)
    info = await find(browser, f"pi-zeroconf.{SERVICE_TYPE}", timeout=20)
    txt = info.decoded_properties
    assert txt["id"] == "pi-zeroconf"
    assert txt["ds"] == "digits"
    assert txt["info"] == topics.agent_info("pi-zeroconf")
    assert txt["v"]
    assert txt["arch"]
    assert await agent.stop() == 0
