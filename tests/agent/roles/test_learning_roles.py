"""Trainer and aggregator roles federating over a real mosquitto, in one process.

Each simulated agent has its own MQTT connection, role context and state directory; the model
is the digits demo's shipped ONNX graphs (no torch). The agent daemon's runtime is tested on its
own (tests/agent/test_runtime.py); here the roles' protocol and algorithms are under test.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.learning.aggregation import ModelSpec
from agent.learning.assets import load_demo_model
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.protocol import (
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    Topics,
    UpdateAck,
    decode_message,
)
from agent.protocol.bundle import RoleBundle
from agent.roles.aggregator import Aggregator, last_version_of
from agent.roles.base import RoleContext
from agent.roles.checkpoints import Checkpoints
from agent.roles.trainer import RoleError, Trainer
from agent.transport import BrokerConfig, Inbound, Transport
from coordinator.demo.data import dirichlet_shards, holdout_split, load_digits_scaled
from coordinator.mosquitto import MosquittoProcess


@dataclass
class Data:
    name: str
    x: npt.NDArray[np.generic]
    y: npt.NDArray[np.generic]


@dataclass
class Federation:
    broker: MosquittoProcess
    topics: Topics
    root: Path
    transports: list[Transport] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    trainers: list[Trainer] = field(default_factory=list)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], since: int = 0) -> None:
        """Until an event (from the ``since``-th on) satisfies ``predicate``."""
        async with self.changed:
            await self.changed.wait_for(lambda: any(predicate(e) for e in self.events[since:]))

    async def context(
        self,
        agent: str,
        bundle: RoleBundle,
        datasets: Mapping[str, Data],
        extras: dict[str, Any] | None = None,
        broker: MosquittoProcess | None = None,
    ) -> RoleContext:
        url = (broker or self.broker).url
        transport = Transport(BrokerConfig(urls=(url,), backoff_initial=0.05))
        transport.start()
        await transport.wait_connected(5)
        self.transports.append(transport)

        async def report(event: Mapping[str, Any]) -> None:
            self.events.append({"agent": agent, **event})
            async with self.changed:
                self.changed.notify_all()
            await transport.publish(
                self.topics.job_metrics(bundle.job, agent), json.dumps(event), qos=0
            )

        state = self.root / agent / bundle.job / bundle.role
        state.mkdir(parents=True, exist_ok=True)
        return RoleContext(
            agent_id=agent,
            bundle=bundle,
            transport=transport,
            topics=self.topics,
            state_dir=state,
            datasets=datasets,
            run_cpu=asyncio.to_thread,
            report=report,
            extras=extras or {},
        )

    def versions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "model_version"]


@pytest.fixture
async def federation(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Federation]:
    fed = Federation(mosquitto, topics, tmp_path)
    yield fed
    for transport in fed.transports:
        await transport.close()


@functools.cache
def digits(clients: int) -> tuple[list[Data], Data]:
    x, y = load_digits_scaled()
    train, test = holdout_split(x, y, 0.2, seed=0)
    shards = dirichlet_shards(train, clients, alpha=0.5, seed=0)
    return [Data("digits", s.x, s.y) for s in shards], Data("digits-holdout", test.x, test.y)


def bundle(role: str, config: dict[str, Any], dataset: str) -> RoleBundle:
    artifacts = load_demo_model().to_artifacts()
    if role != "aggregator":
        artifacts.pop("inference.onnx", None)
    return RoleBundle(
        job="digits", role=role, config=config, dataset={"name": dataset}, artifacts=artifacts
    )


def config(**algorithm: Any) -> dict[str, Any]:
    stop = algorithm.pop("stop", {"target_accuracy": 0.9, "max_versions": 60})
    return {
        "name": "digits",
        "algorithm": {
            "mode": "async",
            "buffer_size": 3,
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
            "client": {"local_steps": 20, "batch_size": 32, "lr": 0.1},
            **algorithm,
        },
        "stop": stop,
    }


async def start_federation(
    fed: Federation,
    cfg: dict[str, Any],
    clients: int,
    slowdown: dict[int, float] | None = None,
    partial: frozenset[int] = frozenset(),
) -> tuple[asyncio.Task[None], list[asyncio.Task[None]]]:
    shards, holdout = digits(clients)
    aggregator = Aggregator(
        await fed.context(
            "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
        )
    )
    agg_task = asyncio.create_task(aggregator.run())
    trainers = []
    for i, shard in enumerate(shards):
        extras = {"slowdown": (slowdown or {}).get(i, 1.0), "partial_work": i in partial}
        ctx = await fed.context(
            f"pi-{i}", bundle("trainer", cfg, "digits"), {"digits": shard}, extras
        )
        trainer = Trainer(ctx)
        fed.trainers.append(trainer)
        trainers.append(asyncio.create_task(trainer.run()))
    return agg_task, trainers


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_federation_reaches_target_accuracy(federation: Federation, mode: str) -> None:
    # Sync rounds wait for all four trainers: the round opens on a version the trainers have
    # already seen without a round, so they must take the re-published one.
    cfg = config(mode=mode, round_timeout=20, min_trainers=4 if mode == "sync" else 1)
    agg, trainers = await start_federation(federation, cfg, clients=4)
    await asyncio.wait_for(agg, 90)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)  # every trainer saw the final version
    versions = federation.versions()
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert len(completed) == 1
    assert "target accuracy 0.9 reached" in completed[0]["reason"]
    assert versions[0]["version"] == 0
    assert versions[-1]["accuracy"] >= 0.9 > versions[0]["accuracy"]
    if mode == "async":
        # FedBuff: K = 3 updates per version, each applied once.
        assert versions[-1]["updates_applied"] == 3 * versions[-1]["version"]
    else:
        assert versions[-1]["counters"]["late"] >= 0


async def test_aggregator_resumes_from_its_checkpoint(federation: Federation) -> None:
    cfg = config(stop={"max_versions": 6})
    agg, trainers = await start_federation(federation, cfg, clients=3)
    await asyncio.wait_for(
        federation.wait_for(lambda e: e["event"] == "model_version" and e["version"] >= 2), 30
    )
    agg.cancel()  # the aggregator's agent dies
    with pytest.raises(asyncio.CancelledError):
        await agg
    before = max(e["version"] for e in federation.versions())
    seen = len(federation.versions())
    _, holdout = digits(3)
    ctx = await federation.context(
        "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
    )
    saved = Checkpoints(ctx.state_dir / "checkpoints").load_latest()
    assert saved is not None
    checkpointed = saved[1]["last_version"]["version"]
    resumed = Aggregator(ctx)
    await asyncio.wait_for(resumed.run(), 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    after = [e for e in federation.versions() if e["agent"] == "agg"]
    assert after[-1]["version"] == 6
    # Versions continue from the checkpoint instead of restarting at 0.
    restarted = [e["version"] for e in after if e["version"] <= before]
    assert restarted.count(0) == 1
    assert resumed.algo.counters.applied == 3 * 6
    # Its first event repeats the version it resumed at, evaluated as before the stop (the
    # report may not have gone out before it): the coordinator merges what it already has.
    again = federation.versions()[seen]
    assert again["version"] == checkpointed >= before
    assert "accuracy" in again
    reported = {e["version"]: e for e in federation.versions()[:seen]}
    if again["version"] in reported:  # else it was stopped between checkpoint and report
        assert again["accuracy"] == reported[again["version"]]["accuracy"]
        assert again["updates_applied"] == reported[again["version"]]["updates_applied"]


def test_a_checkpoint_keeps_the_newest_version_s_record_and_older_ones_still_resume() -> None:
    record = {"version": 4, "elapsed": 1.5, "updates_applied": 12, "accuracy": 0.9}
    assert last_version_of({"last_version": record}) == record
    # Written before last_version: every version's record, the newest last.
    assert last_version_of({"history": [{"version": 3}, record]}) == record
    assert last_version_of({"history": []}) == last_version_of({}) == {}


async def test_final_version_stops_trainers(federation: Federation) -> None:
    cfg = config(stop={"max_versions": 1})
    agg, trainers = await start_federation(federation, cfg, clients=2)
    await asyncio.wait_for(agg, 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    assert all(t.done() and t.exception() is None for t in trainers)


async def test_trainer_without_its_dataset_fails_with_the_reason(federation: Federation) -> None:
    ctx = await federation.context("pi-x", bundle("trainer", config(), "digits"), {})
    with pytest.raises(RoleError, match="dataset 'digits' is not on this agent"):
        await Trainer(ctx).run()


async def test_garbage_on_the_update_topic_is_rejected_and_reported(federation: Federation) -> None:
    cfg = config(stop={"max_versions": 2})
    agg, trainers = await start_federation(federation, cfg, clients=2)
    # Once version 0 is announced the aggregator is subscribed and will see the garbage.
    await asyncio.wait_for(federation.wait_for(lambda e: e["event"] == "model_version"), 30)
    await federation.transports[0].publish(
        federation.topics.job_updates("digits", "evil"), b"\x93junk"
    )
    await asyncio.wait_for(agg, 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    rejected = [e for e in federation.events if e["event"] == "update_rejected"]
    assert rejected
    assert "neither a JSON object nor a msgpack map" in rejected[0]["reason"]


async def test_published_versions_decode_as_model_versions(federation: Federation) -> None:
    cfg = config(stop={"max_versions": 1})
    watcher = federation.transports
    listener = Transport(BrokerConfig(urls=(federation.broker.url,)))
    listener.start()
    await listener.wait_connected(5)
    watcher.append(listener)
    sub = await listener.subscribe(federation.topics.job_model("digits"))
    agg, trainers = await start_federation(federation, cfg, clients=2)
    await asyncio.wait_for(agg, 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    versions: list[ModelVersion] = []
    acks: list[UpdateAck] = []
    while (message := sub.get_nowait()) is not None:
        decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
        (versions if isinstance(decoded, ModelVersion) else acks).append(decoded)
    assert acks  # every update got a receipt on the same topic
    assert versions[-1].final
    assert versions[-1].version == 1
    assert set(versions[-1].tensors) == set(load_demo_model().spec.names)


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(
            {
                "mode": "sync",
                "min_trainers": 4,
                "server_optimizer": {"name": "feddyn"},
                "client": {"local_steps": 20, "batch_size": 32, "lr": 0.1, "feddyn_alpha": 0.01},
            },
            id="feddyn-sync",
        ),
        pytest.param(
            {
                "mode": "sync",
                "min_trainers": 4,
                "clients_per_round": 3,
                "selection": "oort",
                "server_optimizer": {"name": "fedavgm", "lr": 1.0, "momentum": 0.5},
            },
            id="oort-fedavgm-sync",
        ),
        pytest.param(
            {
                "server_optimizer": {"name": "fedadam", "lr": 0.01},
                "client": {
                    "local_steps": 20,
                    "batch_size": 32,
                    "lr": 0.1,
                    "proximal_mu": 0.1,
                    "momentum": 0.5,
                },
            },
            id="fedprox-fedadam-async",
        ),
    ],
)
async def test_other_algorithms_learn(federation: Federation, algorithm: dict[str, Any]) -> None:
    """FedDyn (with its client state), Oort sampling, FedAvgM, FedAdam and FedProx all move the
    global model from chance to a useful accuracy on non-IID digits."""
    cfg = config(stop={"target_accuracy": 0.8, "max_versions": 80}, round_timeout=20, **algorithm)
    agg, trainers = await start_federation(federation, cfg, clients=4)
    await asyncio.wait_for(agg, 120)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert "target accuracy 0.8 reached" in completed[0]["reason"]
    if algorithm["server_optimizer"]["name"] == "feddyn":
        state = list((federation.root).glob("pi-*/digits/trainer/feddyn_state.tensors"))
        assert len(state) == 4  # every trainer keeps ∇L_k(θ_k) across its rounds
    if algorithm.get("clients_per_round") == 3:
        rounds = [e for e in federation.versions() if e["version"] > 0]
        assert all(e["updates_applied"] % 3 == 0 for e in rounds)


async def test_updates_naming_another_agent_than_their_topic_are_rejected(
    federation: Federation,
) -> None:
    # ACLs let an agent write only its own updates topic: an update (or model request) that
    # names another agent must not be counted, acknowledged or let into a round as that agent.
    cfg = config(buffer_size=2, stop={"max_versions": 1})
    _, holdout = digits(2)
    ctx = await federation.context(
        "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
    )
    aggregator = Aggregator(ctx)
    task = asyncio.create_task(aggregator.run())
    try:
        await asyncio.wait_for(federation.wait_for(lambda e: e["event"] == "model_version"), 30)
        zeros = {k: np.zeros_like(v) for k, v in load_demo_model().initial_params.items()}
        evil = federation.topics.job_updates("digits", "evil")
        for victim in ("pi-0", "pi-1"):
            update = ModelUpdate(
                job="digits", agent=victim, base_version=0, num_samples=10, tensors=zeros
            )
            await federation.transports[0].publish(evil, update.to_msgpack())
        request = ModelRequest(job="digits", agent="pi-2", have_version=-1)
        await federation.transports[0].publish(evil, request.to_msgpack())
        await asyncio.wait_for(
            federation.wait_for(
                lambda e: sum(x["event"] == "update_rejected" for x in federation.events) >= 3
            ),
            10,
        )
        assert aggregator.algo.counters.as_dict()["applied"] == 0
        assert aggregator.trainers == set()
        assert not aggregator._acks
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def start_aggregator(
    federation: Federation, cfg: dict[str, Any]
) -> tuple[Aggregator, asyncio.Task[None]]:
    """An aggregator role on its own connection (again on the same state: a restart)."""
    _, holdout = digits(2)
    ctx = await federation.context(
        "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
    )
    aggregator = Aggregator(ctx)
    return aggregator, asyncio.create_task(aggregator.run())


async def test_acknowledged_updates_survive_an_aggregator_restart(federation: Federation) -> None:
    # A trainer does not send an acknowledged update again: FedBuff's buffer must be on disk
    # before the receipt goes out, not only when the K-th update makes a version.
    cfg = config(buffer_size=3, stop={"max_versions": 1})
    start = functools.partial(start_aggregator, federation, cfg)
    aggregator, task = await start()
    listener = federation.transports[0]
    acks = await listener.subscribe(federation.topics.job_model("digits"))
    await asyncio.wait_for(federation.wait_for(lambda e: e["event"] == "model_version"), 30)
    zeros = {k: np.zeros_like(v) for k, v in load_demo_model().initial_params.items()}
    for agent in ("pi-0", "pi-1"):
        update = ModelUpdate(
            job="digits", agent=agent, base_version=0, num_samples=10, tensors=zeros
        )
        await listener.publish(federation.topics.job_updates("digits", agent), update.to_msgpack())
    acked: dict[str, str] = {}
    while len(acked) < 2:
        message = await acks.get(timeout=10)
        decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
        if isinstance(decoded, UpdateAck):
            acked.update(decoded.acks)
    task.cancel()  # the aggregator's agent dies right after acknowledging
    await asyncio.gather(task, return_exceptions=True)
    assert aggregator.algo.counters.applied == 2

    resumed, task = await start()
    for _ in range(100):  # up to 5 s for the resumed aggregator to read its checkpoint
        await asyncio.sleep(0.05)
        if getattr(resumed, "algo", None) is not None and resumed.algo.counters.applied:
            break
    assert resumed.algo.counters.applied == 2
    assert isinstance(resumed.algo, FedBuffAggregator)
    assert resumed.algo.pending == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_sync_round_resumes_with_its_acknowledged_updates_once(
    federation: Federation,
) -> None:
    """A synchronous FedAvg round open when its aggregator dies goes on after the restart with
    the updates it acknowledged (saved before the receipt), and a resent one counts once."""
    cfg = config(mode="sync", min_trainers=2, round_timeout=120, stop={"max_versions": 5})
    topics = federation.topics
    start = functools.partial(start_aggregator, federation, cfg)
    _, task = await start()
    listener = federation.transports[0]
    models = await listener.subscribe(topics.job_model("digits"))
    await asyncio.wait_for(federation.wait_for(lambda e: e["event"] == "model_version"), 30)
    for agent in ("pi-0", "pi-1"):
        request = ModelRequest(job="digits", agent=agent, have_version=-1)
        await listener.publish(topics.job_updates("digits", agent), request.to_msgpack())
    zeros = {k: np.zeros_like(v) for k, v in load_demo_model().initial_params.items()}
    update = ModelUpdate(job="digits", agent="pi-0", base_version=0, num_samples=10, tensors=zeros)
    sent = False
    while True:
        decoded = decode_message((await models.get(timeout=10)).payload)
        if isinstance(decoded, ModelVersion) and decoded.participants and not sent:
            assert sorted(decoded.participants) == ["pi-0", "pi-1"]
            await listener.publish(topics.job_updates("digits", "pi-0"), update.to_msgpack())
            sent = True
        if isinstance(decoded, UpdateAck) and decoded.acks.get("pi-0") == update.id:
            break
    task.cancel()  # the aggregator's agent dies mid-round, right after the receipt
    await asyncio.gather(task, return_exceptions=True)

    before = len(federation.events)
    resumed, task = await start()
    # The resumed aggregator reports its version once it takes updates again, as a trainer
    # hears it is back: an update sent before then is gone with the clean session (CI once
    # resent it while the aggregator was still reading its checkpoint, and the duplicate was
    # never seen).
    await asyncio.wait_for(
        federation.wait_for(lambda e: e["event"] == "model_version", since=before), 30
    )
    assert isinstance(resumed.algo, SyncFedAvg)
    current = resumed.algo.current_round
    assert current is not None
    assert current.number == 0
    assert current.reported == {"pi-0"}
    # The trainer did not see the receipt and sends the update again: a duplicate, not a second
    # report; pi-1's update then closes the round with both.
    await listener.publish(topics.job_updates("digits", "pi-0"), update.to_msgpack())
    other = ModelUpdate(job="digits", agent="pi-1", base_version=0, num_samples=10, tensors=zeros)
    await listener.publish(topics.job_updates("digits", "pi-1"), other.to_msgpack())
    for _ in range(200):
        await asyncio.sleep(0.05)
        if resumed.algo.version == 1:
            break
    counters = resumed.algo.counters
    assert (resumed.algo.version, counters.applied, counters.duplicates) == (1, 2, 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_simulated_slow_device_contributes_less(federation: Federation) -> None:
    """``[simulation] slowdown`` makes a trainer take that many times as long per update."""
    cfg = config(buffer_size=1, stop={"max_versions": 40})
    agg, trainers = await start_federation(federation, cfg, clients=2, slowdown={0: 50.0})
    await asyncio.wait_for(agg, 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    slow, fast = federation.trainers
    assert slow.updates_sent * 4 < fast.updates_sent


@pytest.mark.parametrize("policy", ["keep", "drop"])
async def test_partial_work_is_kept_or_dropped_as_the_job_says(
    federation: Federation, policy: str
) -> None:
    """``[simulation] partial_work`` cuts a trainer's local runs short (the FedProx paper's
    stragglers); ``algorithm.partial_work`` keeps that work (FedProx) or drops it (FedAvg), and a
    sync round does not wait for a dropped straggler."""
    cfg = config(
        mode="sync",
        min_trainers=3,
        round_timeout=30,
        partial_work=policy,
        stop={"max_versions": 4},
    )
    started = asyncio.get_running_loop().time()
    agg, trainers = await start_federation(federation, cfg, clients=3, partial=frozenset({0}))
    await asyncio.wait_for(agg, 60)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    assert asyncio.get_running_loop().time() - started < 30  # no round waited for its timeout
    dropped = [e for e in federation.events if e["event"] == "update_dropped"]
    last = federation.versions()[-1]
    assert last["version"] == 4
    if policy == "keep":
        assert not dropped
        assert last["updates_applied"] == 3 * 4
    else:
        assert {e["agent"] for e in dropped} == {"pi-0"}
        assert (
            len({e["update"] for e in dropped}) == 4
        )  # one per round (a resent one is dropped too)
        assert "partial work dropped" in dropped[0]["reason"]
        assert last["updates_applied"] == 2 * 4


async def test_oort_chooses_which_idle_trainers_fedbuff_starts(federation: Federation) -> None:
    """FedBuff with Oort (Lai et al. 2021): at most C = 2 of the 5 trainers are named to start
    in any version, every trainer is explored, and the job still reaches its target."""
    cfg = config(
        selection="oort",
        concurrency=2,
        buffer_size=2,
        stop={"target_accuracy": 0.85, "max_versions": 150},
    )
    listener = Transport(BrokerConfig(urls=(federation.broker.url,)))
    listener.start()
    await listener.wait_connected(5)
    federation.transports.append(listener)
    sub = await listener.subscribe(federation.topics.job_model("digits"))
    agg, trainers = await start_federation(federation, cfg, clients=5)
    await asyncio.wait_for(agg, 150)
    await asyncio.wait_for(asyncio.gather(*trainers), 30)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert "target accuracy 0.85 reached" in completed[0]["reason"]
    named: list[list[str]] = []
    while (message := sub.get_nowait()) is not None:
        decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
        if isinstance(decoded, ModelVersion) and not decoded.final:
            named.append(decoded.participants)
    assert named
    assert all(1 <= len(p) <= 2 for p in named)
    assert {a for p in named for a in p} == {f"pi-{i}" for i in range(5)}
    assert all(t.updates_sent > 0 for t in federation.trainers)


async def test_a_trainer_keeps_the_final_version_over_a_late_republish(
    federation: Federation,
) -> None:
    # The aggregator may answer a model request with the same version just after the final
    # one went out: the trainer must still end, not train on for an aggregator that is gone.
    shards, _ = digits(2)
    ctx = await federation.context(
        "pi-0", bundle("trainer", config(), "digits"), {"digits": shards[0]}
    )
    trainer = Trainer(ctx)
    trainer.spec = ModelSpec.of(load_demo_model().initial_params)
    topic = federation.topics.job_model("digits")
    weights = dict(load_demo_model().initial_params)
    for final in (True, False):
        version = ModelVersion(job="digits", version=7, tensors=weights, final=final)
        trainer.handle(Inbound(topic, version.to_msgpack(), False, 1))
    assert trainer._latest is not None
    assert trainer._latest.final
    assert (await trainer._next_version(6, topic)).final
