"""A load generator in its own process: many MQTT publishers sending as fast as they can.

``python -m bench.flood CONFIG_JSON`` connects every publisher, prints ``ready``, waits for a
line on stdin, publishes for ``seconds``, then prints one JSON line of what it sent. Running
apart from the receiver keeps the publishers' CPU out of the process being measured.

* ``raw``: one aiomqtt client per publisher, the same payload again and again at QoS 1, the
  next publish as soon as the broker acknowledges the previous one (the broker's ceiling).
  With ``window`` set, the publishers together stay at most that many messages ahead of the
  receiver, which grants more with a line ``N`` on stdin per N messages it has taken.
* ``trainers``: simulated Ember trainers, one Ember transport each, sending real
  :class:`~agent.protocol.ModelUpdate` messages (chunked like a trainer's) and, as a trainer
  does, the next one once the aggregator's receipt for the previous one has arrived (FedBuff's
  flow control). No training: the delta is random and made once. With ``shards`` set, each
  update goes as one part per aggregator shard on the shards' topics, as a trainer of a
  sharded job sends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import sys
import threading
import time
from typing import Any

import numpy as np

from agent.learning.aggregation import ModelSpec
from agent.learning.shards import SlicePlan
from agent.logs import configure_logging
from agent.memory import tune_allocator
from agent.protocol import ModelUpdate, Topics, UpdateAck, decode_message
from agent.protocol.errors import ProtocolError
from agent.transport import BrokerConfig, Transport, adopt


async def raw(config: dict[str, Any], go: asyncio.Event) -> dict[str, Any]:
    import aiomqtt

    payload = secrets.token_bytes(int(config["payload_bytes"]))
    host, port = config["host"], int(config["port"])
    sent = [0] * int(config["publishers"])
    stop = asyncio.Event()

    window = int(config.get("window", 0))
    credits = asyncio.Semaphore(window)
    loop = asyncio.get_running_loop()

    def granted() -> None:  # the lines after "go", read in a thread that never blocks exit
        for line in sys.stdin:
            try:
                for _ in range(int(line)):
                    loop.call_soon_threadsafe(credits.release)
            except RuntimeError:  # the run is over: grants still on their way find no loop
                return

    async def publisher(index: int, client: aiomqtt.Client) -> None:
        await go.wait()
        topic = f"{config['topic']}/{index}"
        while not stop.is_set():
            if window:
                await credits.acquire()
                if stop.is_set():
                    break
            await client.publish(topic, payload, qos=1, timeout=600)
            sent[index] += 1

    clients = [  # as Ember's transport runs paho (agent.transport.adopt)
        adopt(aiomqtt.Client(host, port, timeout=600, max_inflight_messages=1000))
        for _ in range(int(config["publishers"]))
    ]
    for client in clients:
        await client.__aenter__()
    try:
        tasks = [asyncio.create_task(publisher(i, c)) for i, c in enumerate(clients)]
        print("ready", flush=True)
        await go.wait()
        if window:  # after "go": one reader of stdin at a time
            threading.Thread(target=granted, daemon=True).start()
        await asyncio.sleep(float(config["seconds"]))
        stop.set()
        for _ in tasks:
            credits.release()  # a publisher waiting for a grant sees the stop
        await asyncio.wait(tasks, timeout=120)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    return {"messages": sum(sent), "bytes": sum(sent) * len(payload)}


class Receipts:
    """Receipts decoded once for all the simulated trainers of this process: each receipt
    goes to every trainer (one per commit), and 64 trainers decoding it 64 times in one process
    measured the simulation, not the aggregator (each device decodes its own copy). Every
    trainer's connection still receives and parses its copy, as a device's would."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self.decoded: dict[bytes, UpdateAck | None] = {}

    def decode(self, payload: bytes | bytearray | memoryview) -> UpdateAck | None:
        if memoryview(payload).nbytes > 64 * 1024:
            return None  # a model version: not what this flood waits for
        key = bytes(payload)
        if key not in self.decoded:
            try:
                decoded = decode_message(key, expect=UpdateAck)
            except ProtocolError:
                decoded = None
            if len(self.decoded) >= self.keep:
                del self.decoded[next(iter(self.decoded))]
            self.decoded[key] = decoded if isinstance(decoded, UpdateAck) else None
        return self.decoded[key]


RECEIPTS = Receipts()


class SimulatedTrainer:
    """One trainer identity: its own transport, its updates topic, receipts on the model topic."""

    def __init__(self, agent: str, config: dict[str, Any], delta: dict[str, np.ndarray]) -> None:
        self.agent = agent
        self.job = str(config["job"])
        self.topics = Topics(str(config["prefix"]))
        self.transport = Transport(
            BrokerConfig(urls=(str(config["url"]),), backoff_initial=0.05), name=agent
        )
        self.template_id = secrets.token_hex(16)
        update = ModelUpdate(
            id=self.template_id,
            job=self.job,
            agent=agent,
            base_version=0,
            num_samples=100,
            tensors=delta,
        )
        shards = int(config.get("shards", 0))
        # Encoded once; each update's id is written over the last one's in place (its parts
        # are acknowledged by then): a real trainer encodes on its own device, and the
        # ceiling's publishers do not copy their payload per message either.
        self.templates = (
            [(self.topics.job_updates(self.job, agent), bytearray(update.to_msgpack()))]
            if not shards
            else [
                # A sharded aggregator's trainer: one part per shard, as agent.roles.trainer.
                (
                    self.topics.shard_updates(self.job, shard, agent),
                    bytearray(dataclasses.replace(update, tensors=part).to_msgpack()),
                )
                for shard, part in enumerate(SlicePlan(ModelSpec.of(delta), shards).split(delta))
            ]
        )
        self.id_at = [template.index(self.template_id.encode()) for _, template in self.templates]
        self.acked: str | None = None
        self.ack = asyncio.Event()
        self.version = 0
        self.sent = 0
        self.bytes = 0
        self.unacknowledged = 0

    async def start(self) -> None:
        self.transport.start()
        await self.transport.wait_connected(30)
        self.models = await self.transport.subscribe(self.topics.job_model(self.job))
        self.follower = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for message in self.models:
            decoded = RECEIPTS.decode(message.payload)
            if decoded is not None and self.agent in decoded.acks:
                self.acked = decoded.acks[self.agent]
                self.version = decoded.version
                self.ack.set()

    async def run(self, go: asyncio.Event, stop: asyncio.Event, ack_timeout: float) -> None:
        await go.wait()
        while not stop.is_set():
            update_id = secrets.token_hex(16)
            self.ack.clear()
            for (_, template), at in zip(self.templates, self.id_at, strict=True):
                template[at : at + len(update_id)] = update_id.encode()
            parts = self.templates
            # Side by side, as agent.roles.delivery sends a sharded update's parts.
            await asyncio.gather(
                *(self.transport.publish(topic, part, timeout=600) for topic, part in parts)
            )
            self.bytes += sum(len(part) for _, part in parts)
            self.sent += 1
            deadline = time.monotonic() + ack_timeout
            while self.acked != update_id and time.monotonic() < deadline:
                self.ack.clear()
                try:
                    await asyncio.wait_for(self.ack.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            if self.acked != update_id:
                self.unacknowledged += 1

    async def close(self) -> None:
        self.follower.cancel()
        await self.transport.close()


async def trainers(config: dict[str, Any], go: asyncio.Event) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    delta = {
        name: (rng.standard_normal(shape, dtype=np.float32) * 1e-3)
        for name, shape in config["tensors"]
    }
    simulated = [
        SimulatedTrainer(f"{config['agent_prefix']}{i}", config, delta)
        for i in range(int(config["publishers"]))
    ]
    await asyncio.gather(*(t.start() for t in simulated))
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(t.run(go, stop, float(config.get("ack_timeout", 30))))
        for t in simulated
    ]
    print("ready", flush=True)
    await go.wait()
    await asyncio.sleep(float(config["seconds"]))
    stop.set()
    await asyncio.wait(tasks, timeout=300)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    result = {
        "messages": sum(t.sent for t in simulated),
        "bytes": sum(t.bytes for t in simulated),
        "unacknowledged": sum(t.unacknowledged for t in simulated),
    }
    for trainer in simulated:
        await trainer.close()
    return result


async def main_async(config: dict[str, Any]) -> dict[str, Any]:
    go = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def wait_for_go() -> None:
        await loop.run_in_executor(None, sys.stdin.readline)
        go.set()

    waiter = asyncio.create_task(wait_for_go())
    runner = raw if config["mode"] == "raw" else trainers
    try:
        return await runner(config, go)
    finally:
        waiter.cancel()


def main() -> None:
    configure_logging("warning")
    tune_allocator()  # as ember-agent run does: trainers (and the ceiling's clients) alike
    config = json.loads(sys.argv[1])
    result = asyncio.run(main_async(config))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
