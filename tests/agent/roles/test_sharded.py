"""Sharded FedBuff over a real mosquitto: two aggregator shards, each owning half of the
parameters, an assembler, and trainers sending each shard only its slice of every delta.

Each role has its own MQTT connection and state directory, as on separate agents.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from agent.learning.aggregation import ModelSpec
from agent.learning.assets import load_demo_model
from agent.learning.shards import SlicePlan
from agent.protocol import ModelUpdate, ModelVersion, UpdateAck, decode_message
from agent.protocol.bundle import RoleBundle
from agent.roles.assembler import ShardAssembler
from agent.roles.shard import AggregatorShard
from agent.roles.trainer import Trainer
from tests.agent.roles.test_learning_roles import Federation, config, digits
from tests.agent.roles.test_learning_roles import federation as federation  # the fixture

SHARDS = 2


def role_bundle(role: str, cfg: dict[str, Any], dataset: str = "") -> RoleBundle:
    return RoleBundle(
        job="digits",
        role=role,
        config=cfg,
        dataset={"name": dataset} if dataset else {},
        artifacts=load_demo_model().to_artifacts(),
    )


def assert_same_ids(assembled: list[str], applied: list[list[str]]) -> None:
    """No update applied twice, and every shard applied the same ones in the same order: the
    assembled model's, then (a shard the final commit found ahead) a few more."""
    for ids in applied:
        assert len(ids) == len(set(ids))
        assert ids[: len(assembled)] == assembled
    shortest = min(applied, key=len)
    assert all(ids[: len(shortest)] == shortest for ids in applied)


async def start_sharded(
    fed: Federation, cfg: dict[str, Any], clients: int
) -> tuple[ShardAssembler, list[AggregatorShard], list[asyncio.Task[None]]]:
    parts, holdout = digits(clients)
    assembler = ShardAssembler(
        await fed.context(
            "hub",
            role_bundle("shard_assembler", cfg, "digits-holdout"),
            {"digits-holdout": holdout},
        )
    )
    shards = [
        AggregatorShard(
            await fed.context(f"agg-{s}", role_bundle("aggregator_shard", {**cfg, "shard": s}), {})
        )
        for s in range(SHARDS)
    ]
    tasks = [asyncio.create_task(assembler.run())]
    tasks += [asyncio.create_task(shard.run()) for shard in shards]
    for i, part in enumerate(parts):
        ctx = await fed.context(f"pi-{i}", role_bundle("trainer", cfg, "digits"), {"digits": part})
        trainer = Trainer(ctx)
        fed.trainers.append(trainer)
        tasks.append(asyncio.create_task(trainer.run()))
    return assembler, shards, tasks


async def test_sharded_fedbuff_reaches_target_accuracy(federation: Federation) -> None:
    cfg = config(shards=SHARDS)
    assembler, shards, tasks = await start_sharded(federation, cfg, clients=4)
    # The assembler ends the job, then the shards stop on its final commit and the trainers on
    # the final version.
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert len(completed) == 1
    assert "target accuracy 0.9 reached" in completed[0]["reason"]
    versions = federation.versions()
    assert versions[0]["version"] == 0
    assert versions[-1]["accuracy"] >= 0.9 > versions[0]["accuracy"]
    # FedBuff: K = 3 updates per version, each applied once, the same ones on every shard.
    assert versions[-1]["updates_applied"] == 3 * versions[-1]["version"]
    assembled = assembler.algo.applied_ids.export()
    assert_same_ids(assembled, [shard.fedbuff.applied_ids.export() for shard in shards])
    assert all(shard.algo.version >= assembler.algo.version for shard in shards)
    assert sum(t.updates_sent for t in federation.trainers) >= len(assembled)


async def restart(
    fed: Federation, role: AggregatorShard | ShardAssembler
) -> AggregatorShard | ShardAssembler:
    """The same role on the same agent and state directory, as after a crash of its process."""
    ctx = role.ctx
    again = await fed.context(ctx.agent_id, ctx.bundle, dict(ctx.datasets))
    return type(role)(again)


@pytest.mark.parametrize("who", ["shard", "assembler"])
async def test_a_restarted_shard_or_assembler_loses_and_repeats_nothing(
    federation: Federation, who: str
) -> None:
    cfg = config(shards=SHARDS, stop={"max_versions": 12})
    assembler, shards, tasks = await start_sharded(federation, cfg, clients=4)
    await asyncio.wait_for(federation.wait_for(lambda e: e.get("version", 0) >= 3), 60)
    index = SHARDS if who == "shard" else 0  # tasks: the assembler, the shards, the trainers
    victim: AggregatorShard | ShardAssembler = shards[-1] if who == "shard" else assembler
    tasks[index].cancel()
    await asyncio.gather(tasks[index], return_exceptions=True)
    await asyncio.sleep(0.5)  # trainers go on sending; no version can be made meanwhile
    revived = await restart(federation, victim)
    if isinstance(revived, ShardAssembler):
        assembler = revived
    else:
        shards[-1] = revived
    tasks[index] = asyncio.create_task(revived.run())
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert len(completed) == 1
    assert completed[0]["version"] >= 12
    assembled = assembler.algo.applied_ids.export()
    assert_same_ids(assembled, [shard.fedbuff.applied_ids.export() for shard in shards])
    assert len(assembled) == 3 * assembler.algo.version


async def test_a_part_one_shard_refuses_is_acknowledged_and_dropped_everywhere(
    federation: Federation,
) -> None:
    cfg = config(shards=SHARDS, stop={"max_versions": 8})
    assembler, shards, tasks = await start_sharded(federation, cfg, clients=2)
    ctx = await federation.context("mallory", role_bundle("trainer", cfg, "digits"), {})
    receipts = await ctx.transport.subscribe(ctx.topics.job_model("digits"))
    initial = load_demo_model().initial_params
    parts = SlicePlan(ModelSpec.of(initial), SHARDS).split(
        {name: np.zeros_like(value) for name, value in initial.items()}
    )
    name = next(iter(parts[1]))
    parts[1][name] = parts[1][name][:-1]  # one element short: the wrong shape for shard 1
    update = ModelUpdate(job="digits", agent="mallory", base_version=0, num_samples=10, tensors={})
    for shard, part in enumerate(parts):
        payload = dataclasses.replace(update, tensors=part).to_msgpack()
        await ctx.transport.publish(ctx.topics.shard_updates("digits", shard, "mallory"), payload)
    while True:  # the assembler's receipt names it: mallory may go on
        message = await asyncio.wait_for(receipts.get(), 30)
        ack = decode_message(message.payload, expect=(UpdateAck, ModelVersion))
        if isinstance(ack, UpdateAck) and ack.acks.get("mallory") == update.id:
            break
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert shards[1].rejections.get("shape") == 1
    assert not shards[0].rejections  # it held its part, until the commit that dropped it
    for shard in shards:
        assert update.id not in shard.fedbuff.applied_ids
        assert update.id not in shard.store.parts  # dropped with a commit after the refusal
    assert_same_ids(
        assembler.algo.applied_ids.export(),
        [shard.fedbuff.applied_ids.export() for shard in shards],
    )
