"""The aggregator keeps every update a burst of trainers sends, however small the transport's
default queue: FedBuff's flow control (one update in flight per trainer) is the bound; and
refuses one with non-finite values."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.learning.assets import load_demo_model
from agent.protocol import ModelUpdate, Topics
from agent.protocol.bundle import RoleBundle
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext
from agent.transport import BrokerConfig, Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import eventually

TRAINERS = 6


async def test_a_burst_from_every_trainer_is_kept(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    model = load_demo_model()
    update_bytes = sum(t.nbytes for t in model.initial_params.values())
    # The aggregator's transport would queue only two updates by default.
    small = BrokerConfig(urls=(mosquitto.url,), backoff_initial=0.05, queue_bytes=2 * update_bytes)
    transports: list[Transport] = []
    reported: list[Mapping[str, Any]] = []

    async def connect(config: BrokerConfig) -> Transport:
        transport = Transport(config)
        transport.start()
        await transport.wait_connected(5)
        transports.append(transport)
        return transport

    async def report(event: Mapping[str, Any]) -> None:
        reported.append(event)

    config = {
        "name": "burst",
        "algorithm": {"mode": "async", "buffer_size": 1000, "concurrency": TRAINERS},
        "stop": {},
    }
    bundle = RoleBundle(
        job="burst", role="aggregator", config=config, dataset={}, artifacts=model.to_artifacts()
    )
    ctx = RoleContext(
        agent_id="agg",
        bundle=bundle,
        transport=await connect(small),
        topics=topics,
        state_dir=tmp_path,
        datasets={},
        run_cpu=asyncio.to_thread,
        report=report,
    )
    aggregator = Aggregator(ctx)
    task = asyncio.create_task(aggregator.run())
    try:
        await eventually(lambda: bool(reported))
        senders = [await connect(BrokerConfig(urls=(mosquitto.url,))) for _ in range(TRAINERS)]
        delta = {k: np.full_like(v, 1e-3) for k, v in model.initial_params.items()}
        await asyncio.gather(
            *(
                sender.publish(
                    topics.job_updates("burst", f"t{i}"),
                    ModelUpdate(
                        job="burst", agent=f"t{i}", base_version=0, num_samples=10, tensors=delta
                    ).to_msgpack(),
                )
                for i, sender in enumerate(senders)
            )
        )
        await eventually(lambda: aggregator.algo.counters.received == TRAINERS)
        assert aggregator.algo.counters.applied == TRAINERS
        # Non-finite values are refused by the algorithm's own check (the aggregator decodes
        # without the codec's): counted, reported with the tensor's count, never applied.
        name = next(iter(delta))
        poisoned = {**delta, name: delta[name].copy()}
        poisoned[name].reshape(-1)[:3] = np.nan
        bad = ModelUpdate(job="burst", agent="t0", base_version=0, num_samples=10, tensors=poisoned)
        with np.errstate(invalid="ignore"):
            payload = bad.to_msgpack()
        await senders[0].publish(topics.job_updates("burst", "t0"), payload)
        await eventually(lambda: aggregator.rejections.get("non_finite") == 1)
        assert aggregator.algo.counters.applied == TRAINERS
        refused = [e for e in reported if e.get("event") == "update_rejected"]
        assert refused[-1]["code"] == "non_finite"
        assert f"tensor {name!r} has 3 non-finite values" in refused[-1]["reason"]
        assert refused[-1]["update"] == bad.id
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for transport in transports:
            await transport.close()
