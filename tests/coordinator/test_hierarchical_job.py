"""Hierarchical and hybrid jobs end to end over two mosquittos: the coordinator and its top
aggregator on the central broker, one site's agents (its middle aggregator and trainers) on a
site broker bridged to it by the configuration ``ember broker bridge`` writes, the other site's
agents on the central broker. In the hybrid job each site's trainers average by ring all-reduce
at their site and the group's leader hosts its middle aggregator. Real agent processes, real
placement and signed bundles (``ember demo``'s machinery with a topology)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from agent.transport import BrokerConfig, Transport
from coordinator.demo.run import Demo, DemoOptions
from coordinator.mosquitto import MosquittoProcess


def bridge_config(central: MosquittoProcess, prefix: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "broker",
            "bridge",
            "--site",
            "site-0",
            "--central",
            f"127.0.0.1:{central.port}",
            "--prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("topology", ["hierarchical", "hybrid"])
async def test_a_grouped_job_over_a_bridged_site_broker(
    mosquitto_factory: Any, tmp_path: Path, topology: Literal["hierarchical", "hybrid"]
) -> None:
    central = mosquitto_factory()
    options = DemoOptions(
        agents=4,
        broker=central.url,
        out=tmp_path / "out",
        topology=topology,
        sites=2,
        max_seconds=150,
    )
    demo = Demo(options)
    site = mosquitto_factory(extra_config=bridge_config(central, demo.prefix))
    options.site_brokers["site-0"] = site.url  # agents 0 and 2 live behind the bridge
    watcher = Transport(BrokerConfig(urls=(central.url,)))
    watcher.start()
    await watcher.wait_connected(10)
    metrics = await watcher.subscribe(demo.topics.all_job_metrics(), max_messages=100_000)
    try:
        summary = await asyncio.wait_for(demo.run(), 240)
    finally:
        await watcher.close()
    assert summary.phase == "completed", summary.reason
    assert summary.final_accuracy >= options.target_accuracy
    events = []
    while (message := metrics.get_nowait()) is not None:
        events.append(json.loads(bytes(message.payload)))
    # Each site's middle aggregator sent group updates, the site's across the bridge...
    groups = {e["group"] for e in events if e.get("event") == "group_update"}
    assert groups == {"site-0", "site-1"}
    # ...and they were the top aggregator's only trainers.
    tops = [e for e in events if e.get("event") == "model_version"]
    assert tops[-1]["trainers"] == 2
