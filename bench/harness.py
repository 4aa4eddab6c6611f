"""Ember roles hosted in the benchmark's own process, each with its own MQTT connection.

The same wiring as the agent's role runtime (a transport, topics, a state directory, CPU work
in worker threads, progress events), without the daemon around it, so a benchmark can read the
role's counters directly. Bundles are built here unsigned: signature checks are the runtime's
job and cost nothing per update.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.learning.backend import ExportedModel
from agent.protocol import Topics
from agent.protocol.bundle import RoleBundle
from agent.roles.aggregator import Aggregator
from agent.roles.base import LocalDataset, RoleContext
from agent.transport import BrokerConfig, Transport


def job_config(
    name: str, *, mode: str, buffer_size: int, concurrency: int, min_trainers: int = 1
) -> dict[str, Any]:
    """A job's ``bundle.config`` (the coordinator's normalised spec), plain FedAvg on the server,
    no stop rule: the benchmark stops the role."""
    return {
        "name": name,
        "algorithm": {
            "mode": mode,
            "buffer_size": buffer_size,
            "concurrency": concurrency,
            "min_trainers": min_trainers,
            "round_timeout": 120,
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
        },
        "stop": {},
    }


def bundle(
    job: str, role: str, config: dict[str, Any], model: ExportedModel, dataset: str = ""
) -> RoleBundle:
    artifacts = model.to_artifacts()
    if role == "trainer":
        artifacts.pop("inference.onnx", None)
    return RoleBundle(
        job=job,
        role=role,
        config=config,
        dataset={"name": dataset} if dataset else {},
        artifacts=artifacts,
    )


@dataclass
class Host:
    """Role contexts on one broker; :meth:`close` ends every connection they opened."""

    url: str
    topics: Topics
    root: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    transports: list[Transport] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def context(
        self,
        agent: str,
        role_bundle: RoleBundle,
        datasets: Mapping[str, LocalDataset] | None = None,
        **broker: Any,
    ) -> RoleContext:
        transport = Transport(
            BrokerConfig(urls=(self.url,), backoff_initial=0.05, **broker), name=agent
        )
        transport.start()
        await transport.wait_connected(30)
        self.transports.append(transport)

        async def report(event: Mapping[str, Any]) -> None:
            self.events.append({"agent": agent, **event})
            self.changed.set()
            await transport.publish(
                self.topics.job_metrics(role_bundle.job, agent), json.dumps(event), qos=0
            )

        state = self.root / agent / role_bundle.job / role_bundle.role
        state.mkdir(parents=True, exist_ok=True)
        return RoleContext(
            agent_id=agent,
            bundle=role_bundle,
            transport=transport,
            topics=self.topics,
            state_dir=state,
            datasets=datasets or {},
            run_cpu=asyncio.to_thread,
            report=report,
        )

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()


async def start_aggregator(
    url: str, root: Path, job: str, config: dict[str, Any], model: ExportedModel
) -> tuple[Host, Aggregator, asyncio.Task[None]]:
    """Ember's aggregator role for ``job`` under a topic prefix of its own, once it has
    subscribed to the updates and published its first version."""
    host = Host(url, Topics(f"bench/{secrets.token_hex(3)}"), root / job)
    aggregator = Aggregator(
        await host.context("aggregator", bundle(job, "aggregator", config, model))
    )
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(host.changed.wait(), 60)
    return host, aggregator, task


async def stop_aggregator(host: Host, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await host.close()
