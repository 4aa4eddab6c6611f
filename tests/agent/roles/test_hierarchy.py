"""Hierarchical FL over two real mosquittos joined by the bridge `ember broker bridge` writes.

The top aggregator runs on the central broker; group ``lab`` (a middle aggregator and two
trainers) on a site broker bridged to it, group ``hq`` on the central broker itself. Each role
has its own MQTT connection and state directory, as on separate agents (the daemon's runtime
is tested on its own in tests/agent/test_runtime.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.learning.assets import load_demo_model
from agent.protocol import ModelRequest, ModelVersion, Topics, decode_message
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext
from agent.roles.middle import MiddleAggregator
from agent.roles.trainer import MODEL_REQUEST_INTERVAL, RoleError, Trainer
from agent.tasks import cancel_and_wait
from agent.transport import Subscription
from coordinator.brokerkit.bridge import BridgeSettings, render_bridge
from coordinator.demo.run import DemoOptions
from coordinator.mosquitto import MosquittoProcess
from tests.agent.roles.test_learning_roles import Federation, bundle, config, digits

TARGET = DemoOptions().target_accuracy
GROUPS: dict[str, tuple[int, ...]] = {"lab": (0, 1), "hq": (2, 3)}


@dataclass
class Sites:
    federation: Federation
    central: MosquittoProcess
    site: MosquittoProcess
    """Bridged to ``central`` by the configuration ``ember broker bridge`` writes."""


@pytest.fixture
async def sites(mosquitto_factory: Any, topics: Topics, tmp_path: Path) -> AsyncIterator[Sites]:
    central = mosquitto_factory()
    bridge = render_bridge(
        BridgeSettings(
            site="lab",
            address=f"127.0.0.1:{central.port}",
            prefix=topics.prefix,
            restart_timeout=(1, 5),
        )
    )
    site = mosquitto_factory(extra_config=bridge)
    fed = Federation(central, topics, tmp_path)
    yield Sites(fed, central, site)
    for transport in fed.transports:
        await transport.close()


def grouped(mode: str, kind: str = "hierarchical", **algorithm: Any) -> dict[str, Any]:
    cfg = config(mode=mode, stop={"target_accuracy": TARGET, "max_versions": 600}, **algorithm)
    cfg["topology"] = {"kind": kind, "group_by": "site", "buffer_size": 2}
    if mode == "sync":
        cfg["topology"]["min_groups"] = 2
    return cfg


async def start_hierarchy(
    fed: Federation,
    cfg: dict[str, Any],
    central: MosquittoProcess,
    site: MosquittoProcess,
    groups: dict[str, tuple[int, ...]] = GROUPS,
) -> tuple[asyncio.Task[None], list[asyncio.Task[None]], list[asyncio.Task[None]]]:
    shards, holdout = digits(sum(len(members) for members in groups.values()))
    top = Aggregator(
        await fed.context(
            "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
        )
    )
    top_task = asyncio.create_task(top.run())
    middles, trainers = [], []
    for group, members in groups.items():
        broker = site if group == "lab" else central
        labels = {"labels": {"site": group}}
        middle = MiddleAggregator(
            await fed.context(
                f"gw-{group}", bundle("middle_aggregator", cfg, ""), {}, labels, broker=broker
            )
        )
        middles.append(asyncio.create_task(middle.run()))
        for i in members:
            trainer = Trainer(
                await fed.context(
                    f"pi-{i}",
                    bundle("trainer", cfg, "digits"),
                    {"digits": shards[i]},
                    labels,
                    broker=broker,
                )
            )
            fed.trainers.append(trainer)
            trainers.append(asyncio.create_task(trainer.run()))
    return top_task, middles, trainers


@pytest.mark.parametrize(
    ("kind", "mode"), [("hierarchical", "async"), ("hierarchical", "sync"), ("hybrid", "async")]
)
async def test_a_grouped_job_over_a_bridged_site_reaches_the_target(
    sites: Sites, kind: str, mode: str
) -> None:
    federation, central, site = sites.federation, sites.central, sites.site
    cfg = grouped(mode, kind, buffer_size=2, round_timeout=30)
    top, middles, trainers = await start_hierarchy(federation, cfg, central, site)
    await asyncio.wait_for(top, 150)
    # The final version reached both groups: across the bridge, and relayed by each middle.
    await asyncio.wait_for(asyncio.gather(*middles, *trainers), 30)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert len(completed) == 1
    assert f"target accuracy {TARGET}" in completed[0]["reason"]
    versions = federation.versions()
    assert versions[-1]["accuracy"] >= TARGET > versions[0]["accuracy"]
    # The top saw the two middle aggregators as its only trainers...
    assert versions[-1]["trainers"] == 2
    # ...and each middle sent group updates built from its own trainers' deltas.
    sent = {e["agent"]: e for e in federation.events if e["event"] == "group_update"}
    assert set(sent) == {"gw-lab", "gw-hq"}
    assert all(e["samples"] > 0 for e in sent.values())
    if kind == "hybrid":
        # Inside each group the trainers averaged by ring all-reduce, and the ring's first
        # member reported the result (the other only ever for a ring it was alone in) with
        # the samples of both; no ring chunk was refused.
        assert all(t.ring is not None and t.ring.rejected == 0 for t in federation.trainers)
        shards, _ = digits(4)
        for group, (a, b) in GROUPS.items():
            sent = sorted(federation.trainers[i].updates_sent for i in (a, b))
            assert sent[0] <= 1 < sent[1], (group, sent)
            samples = [e["samples"] for e in federation.events if e.get("group") == group]
            assert max(samples) == len(shards[a].y) + len(shards[b].y)
    else:
        assert all(t.updates_sent > 0 for t in federation.trainers)
    if mode == "async":
        # FedBuff at the top: K = 2 group updates per version, each applied once.
        assert versions[-1]["updates_applied"] == 2 * versions[-1]["version"]


async def test_a_middle_aggregator_without_its_group_label_fails_with_the_reason(
    sites: Sites,
) -> None:
    cfg = grouped("async")
    with pytest.raises(RoleError, match="no 'site' label"):
        MiddleAggregator(
            await sites.federation.context("gw", bundle("middle_aggregator", cfg, ""), {})
        )


async def test_a_hybrid_ring_goes_on_without_a_member_that_died(sites: Sites) -> None:
    federation = sites.federation
    cfg = grouped("async", "hybrid", buffer_size=2, round_timeout=3)
    groups = {"lab": (0, 1, 2), "hq": (3, 4)}
    top, _, trainers = await start_hierarchy(federation, cfg, sites.central, sites.site, groups)
    await asyncio.wait_for(
        federation.wait_for(lambda e: e["event"] == "model_version" and e["version"] >= 3), 60
    )
    trainers[1].cancel()  # pi-1, a member of lab's ring, dies mid-job
    with pytest.raises(asyncio.CancelledError):
        await trainers[1]
    dead_at = len([e for e in federation.events if e.get("group") == "lab"])
    await asyncio.wait_for(top, 150)
    completed = [e for e in federation.events if e["event"] == "completed"]
    assert f"target accuracy {TARGET}" in completed[0]["reason"]
    # lab's rings went on with its two live members: their samples, not pi-1's.
    shards, _ = digits(5)
    lab = [e["samples"] for e in federation.events if e.get("group") == "lab"][dead_at + 1 :]
    assert lab
    assert lab[-1] == len(shards[0].y) + len(shards[2].y)


async def test_a_hybrid_trainer_left_out_of_rings_asks_back_in(sites: Sites) -> None:
    # A middle leaves out of its next rings the members it did not hear from through a ring
    # that failed, until they ask again. A live member must ask soon enough: when it gave
    # the ring up, and on seeing a ring without it, never only after a quiet spell (new
    # rings without it keep coming, so that spell may never come).
    fed = sites.federation
    middle, _, task = await _hq_trainer(fed, round_timeout=1)
    requests = await middle.transport.subscribe(
        fed.topics.all_group_updates("digits", "hq"), max_messages=64
    )

    patience = 5 * MODEL_REQUEST_INTERVAL  # the trainer's quiet spell before it asks anyway
    try:
        await _next_request(requests, patience)  # joining
        without = await _relay(middle, fed.topics, ("pi-1", "pi-2"))
        await _next_request(requests, 1.5)
        # The same ring again: asked already.
        await middle.publish(fed.topics.group_model("digits", "hq"), without)
        with pytest.raises(asyncio.TimeoutError):
            await _next_request(requests, 1.5)
        began = time.monotonic()
        # pi-9 never sends its chunk: the ring fails after 1 s.
        await _relay(middle, fed.topics, ("pi-0", "pi-9"))
        alive = await _next_request(requests, patience)
        assert alive.have_version == 1
        assert time.monotonic() - began < patience / 2
    finally:
        await cancel_and_wait([task])
        await requests.close()


async def test_a_hybrid_trainer_leaves_its_ring_when_the_job_ends(sites: Sites) -> None:
    # A ring member that saw the final version before it trained sends no chunk: the others
    # must end with the job, not wait out the round's timeout for it.
    fed = sites.federation
    middle, trainer, task = await _hq_trainer(fed, round_timeout=120)
    chunks = await middle.transport.subscribe(
        fed.topics.group_ring("digits", "hq", "pi-0", "pi-9"), max_messages=8
    )
    requests = await middle.transport.subscribe(
        fed.topics.all_group_updates("digits", "hq"), max_messages=64
    )
    try:
        await _next_request(requests, 5 * MODEL_REQUEST_INTERVAL)  # joining
        await _relay(middle, fed.topics, ("pi-9", "pi-0"))  # pi-9 has already ended
        await chunks.get(30)  # pi-0 trained and is in the ring, waiting for pi-9's chunk
        began = time.monotonic()
        await _relay(middle, fed.topics, (), version=2, final=True)
        await asyncio.wait_for(asyncio.shield(task), 10)
        assert time.monotonic() - began < 10
        assert trainer.updates_sent == 0
    finally:
        await cancel_and_wait([task])
        await chunks.close()
        await requests.close()


async def _hq_trainer(
    fed: Federation, round_timeout: float
) -> tuple[RoleContext, Trainer, asyncio.Task[None]]:
    """Group hq's middle (only its connection: the test speaks for it) and trainer pi-0."""
    cfg = grouped("async", "hybrid", round_timeout=round_timeout)
    labels = {"labels": {"site": "hq"}}
    middle = await fed.context("gw-hq", bundle("middle_aggregator", cfg, ""), {}, labels)
    shards, _ = digits(2)
    trainer = Trainer(
        await fed.context("pi-0", bundle("trainer", cfg, "digits"), {"digits": shards[0]}, labels)
    )
    return middle, trainer, asyncio.create_task(trainer.run())


async def _relay(
    middle: RoleContext,
    topics: Topics,
    members: tuple[str, ...],
    version: int = 1,
    final: bool = False,
) -> bytes:
    """Publish, as hq's middle, a model version whose ring is ``members``."""
    weights = dict(load_demo_model().initial_params)
    message = ModelVersion(
        job="digits", version=version, tensors=weights, participants=list(members), final=final
    )
    payload = message.to_msgpack()
    await middle.publish(topics.group_model("digits", "hq"), payload)
    return payload


async def _next_request(requests: Subscription, within: float) -> ModelRequest:
    message = await requests.get(within)
    request = decode_message(message.payload, expect=(ModelRequest,))
    assert isinstance(request, ModelRequest)
    assert request.agent == "pi-0"
    return request
