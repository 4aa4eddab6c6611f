"""From a trainer's update to the new model version at the trainers, and Flower's round time.

Ember: the real aggregator role and N simulated trainers (one Ember transport each, no
training) on a mosquitto of the benchmark's own, in this process.

* FedBuff, K = 1 and K = 10: the trainers send K − 1 updates and wait for the aggregator's
  receipts; then one more update completes the buffer. A sample is the time from just before
  that last update is published to a trainer holding the decoded new version (every trainer
  gives one sample per version).
* Synchronous FedAvg: every trainer named in the round sends its update when the round's
  version arrives; a sample is the time from the last of those publishes to the next version at
  each trainer, and the round time is from one version reaching every trainer to the next.

Flower: ``flower-superlink`` and N ``flower-supernode`` processes on loopback, a numpy-only
ServerApp that sends the P parameters to every node and averages the echoed replies
(evaluation off), per-round wall time with the first round dropped (it starts the ClientApps).

The aggregator checkpoints every version (with fsync) before publishing it, as in production;
no held-out evaluation is bound, so no version waits for one.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.logs import configure_logging
from agent.protocol import (
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    Topics,
    UpdateAck,
    decode_message,
)
from agent.transport import BrokerConfig, Transport
from bench.common import FLOWER, bench_broker, percentile, scaled, show, write_results
from bench.harness import job_config, start_aggregator, stop_aggregator
from bench.models import mlp, parameter_count

TRAINERS = 8
PARAMETERS = 10_000


class ProbeTrainer:
    """A trainer identity that records when each model version reaches it."""

    def __init__(
        self, agent: str, url: str, topics: Topics, job: str, changed: asyncio.Event
    ) -> None:
        self.agent = agent
        self.job = job
        self.topics = topics
        self.transport = Transport(BrokerConfig(urls=(url,), backoff_initial=0.05), name=agent)
        self.arrivals: dict[int, float] = {}
        self.latest: ModelVersion | None = None
        self.acked: set[str] = set()
        self.changed = changed
        """Set by every trainer of the run on every message, so a wait may span them all."""

    async def start(self) -> None:
        self.transport.start()
        await self.transport.wait_connected(30)
        self.models = await self.transport.subscribe(self.topics.job_model(self.job))
        self.follower = asyncio.create_task(self._follow())
        request = ModelRequest(job=self.job, agent=self.agent, have_version=-1)
        await self.transport.publish(self.updates_topic, request.to_msgpack())

    @property
    def updates_topic(self) -> str:
        return self.topics.job_updates(self.job, self.agent)

    async def _follow(self) -> None:
        async for message in self.models:
            try:
                decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
            except ProtocolError:
                continue
            now = time.perf_counter()
            if isinstance(decoded, UpdateAck):
                if self.agent in decoded.acks:
                    self.acked.add(decoded.acks[self.agent])
            elif isinstance(decoded, ModelVersion):
                self.arrivals.setdefault(decoded.version, now)
                if self.latest is None or decoded.version >= self.latest.version:
                    self.latest = decoded
            self.changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.agent}: condition not met in {timeout} s")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                continue

    async def send(self, base: ModelVersion, delta: dict[str, np.ndarray]) -> tuple[str, float]:
        """Publish one update against ``base``; its id and when the publish began."""
        update = ModelUpdate(
            job=self.job,
            agent=self.agent,
            base_version=base.version,
            num_samples=100,
            tensors=delta,
        )
        payload = update.to_msgpack()
        began = time.perf_counter()
        await self.transport.publish(self.updates_topic, payload)
        return update.id, began

    async def close(self) -> None:
        self.follower.cancel()
        await self.transport.close()


async def ember_case(
    url: str, root: Path, mode: str, k: int, trainers: int, parameters: int, probes: int
) -> dict[str, Any]:
    model = await asyncio.to_thread(mlp, parameters)
    job = f"latency-{mode}-{k}-{secrets.token_hex(2)}"
    config = job_config(
        "latency",
        mode=mode,
        buffer_size=k,
        concurrency=trainers,
        min_trainers=trainers if mode == "sync" else 1,
    )
    host, _, task = await start_aggregator(url, root, job, config, model)
    topics = host.topics
    changed = asyncio.Event()
    probes_list = [ProbeTrainer(f"t{i}", url, topics, job, changed) for i in range(trainers)]
    rng = np.random.default_rng(0)
    delta = {
        name: rng.standard_normal(value.shape, dtype=np.float32) * 1e-4
        for name, value in model.initial_params.items()
    }
    samples: list[float] = []
    rounds: list[float] = []
    try:
        for trainer in probes_list:
            await trainer.start()

        def current() -> int:
            return min(t.latest.version if t.latest else -1 for t in probes_list)

        def everyone_has(version: int) -> bool:
            return all(version in t.arrivals for t in probes_list)

        if mode == "sync":
            # The first round opens once every trainer has announced itself.
            await probes_list[0].wait_for(
                lambda: all(t.latest is not None and t.latest.participants for t in probes_list)
            )
        else:
            await probes_list[0].wait_for(lambda: everyone_has(0))
        for probe in range(probes + 1):  # the first version is a warm-up
            version = current()
            base = probes_list[0].latest
            assert base is not None
            if mode == "sync":
                chosen = [t for t in probes_list if t.agent in base.participants]
                sent = await asyncio.gather(*(t.send(base, delta) for t in chosen))
                last = max(began for _, began in sent)
                reached = max(t.arrivals[version] for t in probes_list)
            else:
                for i in range(k - 1):
                    sender = probes_list[i % trainers]
                    update_id, _ = await sender.send(base, delta)
                    await sender.wait_for(lambda s=sender, u=update_id: u in s.acked)
                _, last = await probes_list[(k - 1) % trainers].send(base, delta)
                reached = last
            for trainer in probes_list:
                await trainer.wait_for(lambda t=trainer, v=version: max(t.arrivals) > v)
            new = version + 1
            arrivals = [t.arrivals[new] for t in probes_list]
            if probe > 0:
                samples += [(a - last) * 1000 for a in arrivals]
                if mode == "sync":
                    rounds.append(max(arrivals) - reached)
    finally:
        for trainer in probes_list:
            await trainer.close()
        await stop_aggregator(host, task)
    name = "fedavg" if mode == "sync" else f"fedbuff_k{k}"
    figures = {
        f"{name}_p50_ms": percentile(samples, 50),
        f"{name}_p99_ms": percentile(samples, 99),
        f"{name}_samples": len(samples),
    }
    if rounds:
        figures[f"{name}_round_s"] = percentile(rounds, 50)
    return figures


async def flower_rounds(root: Path, trainers: int, parameters: int, rounds: int) -> dict[str, Any]:
    from bench.flower import FlowerFederation

    with FlowerFederation(root / "flower", [{"partition-id": i} for i in range(trainers)]) as fed:
        lines = await fed.run(
            {"mode": "rounds", "params": parameters, "rounds": rounds + 1},
            expect_lines=rounds + 1,
            timeout=60 + 30 * (rounds + 1),
        )
    times = [line["seconds"] for line in lines[1:]]
    return {
        "flower_round_s": percentile(times, 50),
        "flower_round_p99_s": percentile(times, 99),
        "flower_rounds": len(times),
    }


async def run() -> dict[str, Any]:
    trainers = scaled(TRAINERS, 2)
    probes = scaled(30, 3)
    cases = [("async", 1), ("async", 10), ("sync", trainers)]
    figures: dict[str, Any] = {
        "trainers": trainers,
        "parameters": parameter_count(PARAMETERS),
        "probes": probes,
    }
    with tempfile.TemporaryDirectory(prefix="ember-latency-") as tmp:
        broker = bench_broker(Path(tmp) / "broker")
        try:
            for mode, k in cases:
                figures.update(
                    await ember_case(broker.url, Path(tmp), mode, k, trainers, PARAMETERS, probes)
                )
        finally:
            broker.stop()
        if FLOWER:
            figures.update(await flower_rounds(Path(tmp), trainers, PARAMETERS, scaled(6, 2)))
            figures["flower_vs_ember_round"] = figures["flower_round_s"] / figures["fedavg_round_s"]
    return figures


ROWS = (("fedbuff_k1", "FedBuff K=1"), ("fedbuff_k10", "FedBuff K=10"), ("fedavg", "FedAvg (sync)"))


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    show(
        f"update → new model version at {figures['trainers']} trainers, "
        f"{figures['parameters']:,} parameters (ms)",
        ["algorithm", "p50", "p99", "samples"],
        [
            [label, figures[f"{key}_p50_ms"], figures[f"{key}_p99_ms"], figures[f"{key}_samples"]]
            for key, label in ROWS
        ],
    )
    if "flower_round_s" in figures:
        show(
            "round time (s), median",
            ["system", "s/round"],
            [
                ["Ember FedAvg (sync)", figures["fedavg_round_s"]],
                ["Flower 1.40 deployment", figures["flower_round_s"]],
            ],
        )
    print(f"wrote {write_results('latency', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"{figures['trainers']} trainers, {figures['parameters']:,}-parameter model, "
        f"{figures['probes']} versions per case after a warm-up. Bar: p50 ≤ 50 ms.",
        "",
        "| algorithm | update → new version p50 (ms) | p99 (ms) | samples |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROWS:
        lines.append(
            f"| {label} | {figures[f'{key}_p50_ms']:,.1f} | {figures[f'{key}_p99_ms']:,.1f} | "
            f"{figures[f'{key}_samples']} |"
        )
    if "flower_round_s" in figures:
        lines += [
            "",
            "| round time, same N and P | median (s) | vs Ember |",
            "|---|---:|---:|",
            f"| Ember synchronous FedAvg | {figures['fedavg_round_s']:.3f} | 1.00× |",
            f"| Flower 1.40 (SuperLink + {figures['trainers']} SuperNodes, "
            f"{figures['flower_rounds']} rounds, first dropped) | "
            f"{figures['flower_round_s']:.3f} | {figures['flower_vs_ember_round']:,.0f}× slower |",
        ]
    return lines


if __name__ == "__main__":
    main()
