"""Following jobs against fake agents on a real mosquitto: dispatch, replacement, metrics,
stop rules, cancel and recovery after a crash."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import Topics
from agent.protocol.messages import CancelRole
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from coordinator.spec import JobSpec, parse_spec
from tests.coordinator.conftest import (
    Core,
    FakeAgent,
    agent_info,
    artifacts,
    eventually,
    start_core,
)


def job_spec(**algorithm: Any) -> JobSpec:
    return parse_spec(
        {
            "name": "digits",
            "model": {"onnx": "m/train_step.onnx"},
            "data": {"dataset": "digits", "min_samples": 50},
            "algorithm": {"mode": "async", "concurrency": 2, **algorithm},
            "stop": {"max_updates": 100, "target_accuracy": 0.9},
        }
    )


async def fleet(
    transport: Transport, topics: Topics, names: dict[str, int], *, aggregator: str = "gw"
) -> dict[str, FakeAgent]:
    agents = {
        aggregator: await FakeAgent(
            aggregator, transport, topics, agent_info(aggregator, labels={"role": "aggregator"})
        ).start()
    }
    for name, samples in names.items():
        info = agent_info(name, datasets=[{"name": "digits", "tags": [], "samples": samples}])
        agents[name] = await FakeAgent(name, transport, topics, info).start()
    return agents


@pytest.fixture
async def core(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, coordinator_key: Ed25519PrivateKey
) -> AsyncIterator[Core]:
    started = await start_core(mosquitto.url, topics, tmp_path / "state", coordinator_key)
    try:
        yield started
    finally:
        await started.stop()


async def retained_state(
    transport: Transport, topics: Topics, job: str, phase: str, **counts: int
) -> dict[str, Any]:
    """The job's retained state once it shows ``phase`` (and these trainer counts)."""
    sub = await transport.subscribe(topics.job_state(job))
    try:
        while True:
            state = json.loads(bytes((await sub.get(5)).payload))
            assert isinstance(state, dict)
            if state["phase"] == phase and all(
                state["trainers"].get(k) == n for k, n in counts.items()
            ):
                return state
    finally:
        await sub.close()


async def test_dispatch_run_and_complete(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200, "c": 100})
    key = core.key
    job = await core.dispatcher.submit(job_spec(), artifacts())
    job_id = job.record.id
    await eventually(lambda: job.record.phase == "dispatching", what="dispatching")

    agg_bundle = await agents["gw"].accept(key)
    assert agg_bundle.role == "aggregator"
    assert agg_bundle.job == job_id
    assert set(agg_bundle.artifacts) == set(artifacts())
    assert agg_bundle.config["algorithm"]["concurrency"] == 2
    assert agg_bundle.prefix == topics.prefix
    trainer = await agents["a"].accept(key)
    assert trainer.role == "trainer"
    assert trainer.dataset == {"name": "digits"}
    assert "inference.onnx" not in trainer.artifacts
    assert trainer.config == job.record.spec
    await agents["b"].accept(key)
    assert agents["c"].idle()

    await eventually(lambda: job.record.phase == "running", what="running")
    state = await retained_state(agents_transport, topics, job_id, "running", running=2)
    assert state["agents"]["gw"]["aggregator"]["state"] == "running"
    assert state["agents"]["a"]["trainer"] == {
        "state": "running",
        "reason": "",
        "dataset": "digits",
        "samples": 300,
    }
    assert state["agents"]["c"]["trainer"]["state"] == "standby"
    assert state["trainers"] == {"running": 2, "standby": 1}

    # The aggregator's progress events are folded into the job; a stale one is ignored.
    metrics = topics.job_metrics(job_id, "gw")
    event = {
        "event": "model_version",
        "version": 3,
        "updates_applied": 30,
        "accuracy": 0.5,
        "loss": 1.2,
    }
    await agents_transport.publish(metrics, json.dumps(event))
    await eventually(lambda: job.record.model_version == 3, what="version 3")
    await agents_transport.publish(metrics, json.dumps({**event, "version": 2, "accuracy": 0.1}))
    await agents_transport.publish(metrics, b"not json")
    event = {
        "event": "model_version",
        "version": 4,
        "updates_applied": 40,
        "accuracy": 0.95,
        "loss": 0.3,
    }
    await agents_transport.publish(metrics, json.dumps(event))
    await eventually(lambda: job.record.phase == "completed", what="completed")
    assert job.record.metrics == {"accuracy": 0.95, "loss": 0.3}
    assert job.record.updates_applied == 40
    assert job.record.reason == "target_accuracy reached (0.95 ≥ 0.9)"
    for name in ("gw", "a", "b"):
        cancel = await agents[name].cancellation()
        assert cancel.job == job_id
        assert cancel.reason.startswith("job completed")
    state = await retained_state(agents_transport, topics, job_id, "completed")
    assert state["progress"] == 1.0
    versions = await core.store.model_versions(job_id)
    assert [v["version"] for v in versions] == [3, 4]


async def test_offline_trainers_are_replaced_in_async_mode(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200, "c": 100})
    job = await core.dispatcher.submit(job_spec(), artifacts())
    for name in ("gw", "a", "b"):
        await agents[name].accept(core.key)
    await eventually(lambda: job.record.phase == "running")
    await agents["a"].go_offline()
    bundle = await agents["c"].accept(core.key)
    assert bundle.role == "trainer"
    assignments = job.assignments
    await eventually(lambda: assignments[("c", "trainer")].state == "running")
    assert assignments[("a", "trainer")].state == "replaced"
    assert assignments[("a", "trainer")].reason == "agent offline"
    # It comes back still running the role: there is no room, so it is told to stop.
    await agents["a"].go_online()
    cancel = await agents["a"].cancellation()
    assert isinstance(cancel, CancelRole)
    assert cancel.role == "trainer"


async def test_offline_trainers_are_dropped_in_sync_mode(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200, "c": 100})
    job = await core.dispatcher.submit(job_spec(mode="sync"), artifacts())
    for name in ("gw", "a", "b", "c"):  # sync: every eligible agent takes part
        await agents[name].accept(core.key)
    await eventually(lambda: job.record.phase == "running")
    await agents["b"].go_offline()
    a = job.assignments[("b", "trainer")]
    await eventually(lambda: a.state == "dropped")
    await agents["b"].go_online()
    await eventually(lambda: a.state == "running", what="back in the next round")


async def test_refusals_are_replaced_and_a_job_nobody_can_run_fails(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200, "c": 100})
    job = await core.dispatcher.submit(job_spec(concurrency=1), artifacts())
    await agents["gw"].accept(core.key)
    for name in ("a", "b", "c"):
        _, bundle = await agents[name].assignment(core.key)
        await agents[name].set_role(
            bundle.job, "trainer", "refused", bundle=bundle.digest, reason="untrusted key"
        )
    await eventually(lambda: job.record.phase == "failed", what="failed")
    assert job.record.reason == "no trainer could run the job (last: c refused: untrusted key)"
    assert [job.assignments[(n, "trainer")].state for n in "abc"] == ["refused"] * 3


async def test_unanswered_assignments_are_sent_again_then_given_up(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200})
    job = await core.dispatcher.submit(job_spec(concurrency=1), artifacts())
    await agents["gw"].accept(core.key)
    first, _ = await agents["a"].assignment(core.key)
    again, _ = await agents["a"].assignment(core.key)  # after dispatch_timeout
    assert again.id != first.id
    await agents["b"].accept(core.key)  # a never answered: replaced
    a = job.assignments[("a", "trainer")]
    assert a.state == "failed"
    assert a.reason == "no answer from the agent after 2 assignments"
    await eventually(lambda: job.record.phase == "running")


async def test_waits_in_planned_until_the_fleet_can_take_it(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    trainer = await FakeAgent(
        "a", agents_transport, topics, agent_info("a", datasets=[{"name": "digits", "samples": 80}])
    ).start()
    job = await core.dispatcher.submit(job_spec(), artifacts())
    await eventually(lambda: job.record.reason.startswith("waiting: no online agent can host"))
    assert job.record.phase == "planned"
    gateway = await FakeAgent(
        "gw", agents_transport, topics, agent_info("gw", labels={"role": "aggregator"})
    ).start()
    await gateway.accept(core.key)
    await trainer.accept(core.key)
    await eventually(lambda: job.record.phase == "running")


async def test_aggregator_failure_fails_the_job_and_cancel_stops_roles(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300})
    job = await core.dispatcher.submit(job_spec(), artifacts())
    bundle = await agents["gw"].accept(core.key)
    await agents["a"].accept(core.key)
    await eventually(lambda: job.record.phase == "running")
    await agents["gw"].set_role(
        bundle.job, "aggregator", "failed", bundle=bundle.digest, reason="NaN loss"
    )
    await eventually(lambda: job.record.phase == "failed")
    assert job.record.reason == "aggregator on gw failed: NaN loss"
    assert (await agents["a"].cancellation()).reason.startswith("job failed")

    second = await core.dispatcher.submit(job_spec(), artifacts())
    await agents["gw"].accept(core.key)
    await agents["a"].accept(core.key)
    await eventually(lambda: second.record.phase == "running")
    await core.dispatcher.cancel(second.record.id, "wrong data")
    assert second.record.phase == "cancelled"
    for name in ("gw", "a"):
        cancel = await agents[name].cancellation()
        assert cancel.job == second.record.id
        assert cancel.reason == "job cancelled: wrong data"
    with pytest.raises(ValueError, match="already cancelled"):
        await core.dispatcher.cancel(second.record.id)


async def test_job_ending_events_count_only_from_the_aggregator(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300})
    job = await core.dispatcher.submit(job_spec(), artifacts())
    await agents["gw"].accept(core.key)
    await agents["a"].accept(core.key)
    await eventually(lambda: job.record.phase == "running")
    final = {
        "event": "completed",
        "reason": "converged",
        "version": 5,
        "updates_applied": 50,
        "accuracy": 0.8,
        "elapsed": 12.5,
    }
    # Job-ending events from anyone but the aggregator's agent are refused: a trainer, an agent
    # naming the aggregator in its payload, the old shared topic.
    refused = core.dispatcher.metrics_refused
    forged = [
        (topics.job_metrics(job.record.id, "a"), final),
        (topics.job_metrics(job.record.id, "a"), {**final, "agent": "gw"}),
        (topics.job_metrics(job.record.id, "gw"), {**final, "agent": "a"}),
        (topics.job_metrics(job.record.id, "a"), {"event": "failed", "reason": "forged"}),
        (topics.job_metrics(job.record.id, "a"), {**final, "event": "model_version"}),
    ]
    for topic, event in forged:
        await agents_transport.publish(topic, json.dumps(event))
    await eventually(lambda: core.dispatcher.metrics_refused == refused + len(forged))
    await agents_transport.publish(f"{topics.job(job.record.id)}/metrics", json.dumps(final))
    assert job.record.phase == "running"
    assert job.record.model_version == 0
    await agents_transport.publish(topics.job_metrics(job.record.id, "gw"), json.dumps(final))
    await eventually(lambda: job.record.phase == "completed")
    assert job.record.reason == "converged"
    assert (job.record.model_version, job.record.updates_applied) == (5, 50)
    assert job.record.metrics == {"accuracy": 0.8}


async def test_a_finished_aggregator_role_waits_for_its_completed_event(
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    coordinator_key: Ed25519PrivateKey,
    agents_transport: Transport,
) -> None:
    """The role's ``finished`` state and the ``completed`` event travel apart; the event names
    the final version, so the job waits for it (for ``finish_grace``) before ending on the role
    state alone."""
    core = await start_core(
        mosquitto.url, topics, tmp_path / "state", coordinator_key, finish_grace=1.5
    )
    try:
        agents = await fleet(agents_transport, topics, {"a": 300})
        job = await core.dispatcher.submit(job_spec(), artifacts())
        bundle = await agents["gw"].accept(core.key)
        await agents["a"].accept(core.key)
        await eventually(lambda: job.record.phase == "running")
        await agents["gw"].set_role(bundle.job, "aggregator", "finished", bundle=bundle.digest)
        await eventually(lambda: job.assignments[("gw", "aggregator")].state == "finished")
        await asyncio.sleep(0.5)  # five ticks
        assert job.record.phase == "running"
        completed = {"event": "completed", "reason": "max_versions reached (6)", "version": 6}
        await agents_transport.publish(
            topics.job_metrics(job.record.id, "gw"), json.dumps(completed)
        )
        await eventually(lambda: job.record.phase == "completed")
        assert job.record.reason == "max_versions reached (6)"
        assert job.record.model_version == 6

        # The event lost (a broker failover): the role state ends the job after the grace.
        second = await core.dispatcher.submit(job_spec(), artifacts())
        bundle = await agents["gw"].accept(core.key)
        await agents["a"].accept(core.key)
        await eventually(lambda: second.record.phase == "running")
        await agents["gw"].set_role(bundle.job, "aggregator", "finished", bundle=bundle.digest)
        started = time.monotonic()
        await eventually(lambda: second.record.phase == "completed", timeout=10)
        assert time.monotonic() - started >= 1.0
        assert second.record.reason == "the aggregator finished"
    finally:
        await core.stop()


async def test_large_bundles_are_chunked(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300})
    big = artifacts(size=9_000_000)  # above the 4 MiB frames of MQTT 5
    await core.dispatcher.submit(job_spec(), big)
    bundle = await agents["a"].accept(core.key)
    assert bundle.artifacts["train_step.onnx"] == big["train_step.onnx"]
    assert core.transport.stats.frames_out > core.transport.stats.messages_out


async def test_a_crashed_coordinator_resumes(
    mosquitto: MosquittoProcess,
    agents_transport: Transport,
    topics: Topics,
    tmp_path: Path,
    coordinator_key: Ed25519PrivateKey,
) -> None:
    state_dir = tmp_path / "state"
    first = await start_core(mosquitto.url, topics, state_dir, coordinator_key)
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200})
    job = await first.dispatcher.submit(job_spec(), artifacts())
    job_id = job.record.id
    bundles = {name: await agents[name].accept(first.key) for name in ("gw", "a", "b")}
    await eventually(lambda: job.assignments[("b", "trainer")].state == "running")
    await eventually(lambda: job.record.phase == "running")
    await first.dispatcher.stop()  # the crash: nothing flushed, nothing closed cleanly
    await first.registry.stop()
    await first.transport.close()
    await first.store.close()
    await agents["b"].forget_roles()  # meanwhile b restarted and lost its roles

    second = await start_core(mosquitto.url, topics, state_dir, coordinator_key)
    try:
        resumed = second.dispatcher.jobs[job_id]
        assert resumed.record.phase == "running"
        await retained_state(agents_transport, topics, job_id, "running")
        # b does not report the role: it is sent again, with the same bundle; a and gw are not.
        _, again = await agents["b"].assignment(second.key)
        assert again.digest == bundles["b"].digest  # deterministic: same job, role, dataset
        await agents["b"].set_role(job_id, "trainer", "running", bundle=again.digest)
        await eventually(lambda: resumed.assignments[("b", "trainer")].state == "running")
        for name in ("gw", "a"):
            assert agents[name].idle()
    finally:
        await second.stop()


async def test_job_state_summarises_history_stragglers_and_refusals(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300, "b": 200})
    job = await core.dispatcher.submit(job_spec(), artifacts())
    job_id = job.record.id
    for name in ("gw", "a", "b"):
        await agents[name].accept(core.key)
    await eventually(lambda: job.record.phase == "running", what="running")
    metrics = topics.job_metrics(job_id, "gw")
    counters = {"received": 9, "applied": 6, "stale_dropped": 2, "rejected": 1, "versions": 2}
    for version, accuracy in ((0, 0.1), (1, 0.6), (2, 0.4)):
        event = {
            "event": "model_version",
            "version": version,
            "updates_applied": 3 * version,
            "accuracy": accuracy,
            "loss": 2.0 - version,
            "counters": counters,
            "rejected": {"norm": version, "malformed": 4},
            "stragglers": ["b"] if version == 2 else [],
        }
        await agents_transport.publish(metrics, json.dumps(event))
    refusals = [
        {"event": "update_stale", "agent": "b", "update": "u1", "reason": "staleness 9 > 8"},
        {"event": "update_rejected", "agent": "gw", "topic": f"{topics.prefix}/x/b", "reason": "r"},
        {"event": "update_duplicate", "agent": "a", "update": "u2", "reason": "seen"},
        {"event": "update_stale", "agent": "b", "update": "u3", "reason": "staleness 10 > 8"},
    ]
    for refusal in refusals:
        await agents_transport.publish(metrics, json.dumps(refusal))
    await eventually(lambda: len(job.recent_refusals) == 4, what="refusals folded")
    state = await retained_state(agents_transport, topics, job_id, "running")
    while (
        state["rejected"]["count"] < 4
        or state["model_version"] < 2
        or state["trainers"].get("running") != 2  # b's roles document may come later
    ):
        state = await retained_state(agents_transport, topics, job_id, "running")
    assert state["participants"] == ["a", "b"]
    assert state["stragglers"] == ["b"]
    assert state["counters"] == counters
    assert state["rejected"]["by_kind"] == {"stale": 2, "rejected": 1, "duplicate": 1}
    assert state["rejected"]["by_code"] == {"norm": 2, "malformed": 4}
    recent = state["rejected"]["recent"]
    assert [(r["kind"], r["agent"], r["reason"]) for r in recent] == [
        ("stale", "b", "staleness 9 > 8"),
        ("rejected", "b", "r"),  # the writer of the topic, not the aggregator's host
        ("duplicate", "a", "seen"),
        ("stale", "b", "staleness 10 > 8"),
    ]
    history = state["history"]
    assert history["versions"] == 3
    assert history["best_accuracy"] == 0.6
    assert history["best_accuracy_version"] == 1
    assert history["lowest_loss"] == 0.0
    assert [(p["version"], p["accuracy"]) for p in history["points"]] == [
        (0, 0.1),
        (1, 0.6),
        (2, 0.4),
    ]


def test_history_summary_keeps_first_last_and_evenly_spread_points() -> None:
    from coordinator.dispatcher import HISTORY_POINTS, history_point, history_summary

    points = [history_point(v, 1000.0 + v, v, {"accuracy": v / 500}) for v in range(501)]
    summary = history_summary(points)
    versions = [p["version"] for p in summary["points"]]
    assert len(versions) == HISTORY_POINTS
    assert versions[0] == 0
    assert versions[-1] == 500
    assert versions == sorted(set(versions))
    assert summary["versions"] == 501
    assert summary["best_accuracy"] == 1.0
    assert history_summary([]) == {
        "versions": 0,
        "best_accuracy": None,
        "best_accuracy_version": None,
        "lowest_loss": None,
        "points": [],
    }


async def test_a_role_cancelled_by_its_stopping_agent_is_sent_again(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    """An agent that stops (SIGTERM, or the embedded agent of a killed coordinator) cancels its
    roles itself and says so: not the job's end. Once it is back, the role is sent again."""
    agents = await fleet(agents_transport, topics, {"a": 300})
    job = await core.dispatcher.submit(job_spec(), artifacts())
    bundle = await agents["gw"].accept(core.key)
    await agents["a"].accept(core.key)
    await eventually(lambda: job.record.phase == "running")
    gw = agents["gw"]
    await gw.set_role(
        job.record.id, "aggregator", "cancelled", bundle=bundle.digest, reason="agent stopping"
    )
    await gw.go_offline("stopping")
    await gw.go_online()
    _, again = await gw.assignment(core.key)
    assert again.digest == bundle.digest
    await gw.set_role(job.record.id, "aggregator", "running", bundle=again.digest)
    await eventually(lambda: job.assignments[("gw", "aggregator")].state == "running")
    assert job.record.phase == "running"


async def test_a_group_whose_middle_aggregator_goes_offline_gets_another(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    def member(name: str, site: str, samples: int) -> dict[str, Any]:
        datasets = [{"name": "digits", "tags": [], "samples": samples}]
        return agent_info(name, labels={"site": site}, datasets=datasets)

    infos = {
        "gw": agent_info("gw", labels={"role": "aggregator"}),
        "lab-gw": agent_info("lab-gw", labels={"role": "aggregator", "site": "lab"}),
        "lab-a": member("lab-a", "lab", 300),
        "hq-a": member("hq-a", "hq", 200),
        "hq-b": member("hq-b", "hq", 100),
    }
    agents = {n: await FakeAgent(n, agents_transport, topics, i).start() for n, i in infos.items()}
    spec = parse_spec(
        {
            **job_spec().to_dict(),
            "topology": {"kind": "hierarchical", "group_by": "site", "min_groups": 2},
        }
    )
    job = await core.dispatcher.submit(spec, artifacts())
    roles = {name: {(await agents[name].accept(core.key)).role} for name in ("gw", "lab-gw")}
    assert roles == {"gw": {"aggregator"}, "lab-gw": {"middle_aggregator"}}
    await agents["lab-a"].accept(core.key)
    # hq has no gateway: its strongest member hosts its middle aggregator and trains too.
    hq_a = {(await agents["hq-a"].accept(core.key)).role for _ in range(2)}
    assert hq_a == {"trainer", "middle_aggregator"}
    await eventually(lambda: job.record.phase == "running")
    await agents["hq-a"].go_offline()
    hq_b = {(await agents["hq-b"].accept(core.key)).role for _ in range(2)}
    assert hq_b == {"trainer", "middle_aggregator"}
    middle = job.assignments[("hq-b", "middle_aggregator")]
    await eventually(lambda: middle.state == "running")
    assert job.assignments[("hq-a", "middle_aggregator")].state == "replaced"
    assert job.assignments[("lab-gw", "middle_aggregator")].state == "running"


async def test_a_sharded_job_runs_once_every_shard_runs_and_fails_with_any_of_them(
    core: Core, agents_transport: Transport, topics: Topics
) -> None:
    agents = await fleet(agents_transport, topics, {"a": 300})
    info = agent_info("gw2", labels={"role": "aggregator"})
    agents["gw2"] = await FakeAgent("gw2", agents_transport, topics, info).start()
    job = await core.dispatcher.submit(job_spec(shards=2), artifacts())
    job_id = job.record.id
    await eventually(lambda: job.record.phase == "dispatching", what="dispatching")
    assembler = await agents["gw"].assignment(core.key)
    assert assembler[1].role == "shard_assembler"
    _, shard0 = await agents["gw2"].assignment(core.key)
    assert (shard0.role, shard0.config["shard"]) == ("aggregator_shard", 0)
    assert "inference.onnx" not in shard0.artifacts
    await agents["gw"].set_role(job_id, "shard_assembler", "running", bundle=assembler[1].digest)
    await agents["a"].accept(core.key)
    # Not running while shard 1 (the assembler's host, last) has not started.
    _, shard1 = await agents["gw"].assignment(core.key)
    assert shard1.config["shard"] == 1
    assert shard1.digest != shard0.digest
    await agents["gw2"].set_role(job_id, "aggregator_shard", "running", bundle=shard0.digest)
    await eventually(
        lambda: (
            job.assignments[("gw2", "aggregator_shard")].state == "running"
            and job.assignments[("a", "trainer")].state == "running"
        ),
        what="shard 0 and the trainer running",
    )
    await core.dispatcher.reconcile()
    assert job.record.phase == "dispatching"
    state = core.dispatcher.state_document(job)
    assert state["agents"]["gw2"]["aggregator_shard"]["shard"] == 0
    await agents["gw"].set_role(job_id, "aggregator_shard", "running", bundle=shard1.digest)
    await eventually(lambda: job.record.phase == "running", what="running")

    # A shard's refusal of an update's part counts as the job's; a model version from a
    # shard's host does not (only the assembler's).
    refusal = {"event": "update_rejected", "topic": "t/x/pi", "reason": "NaN", "code": "nan"}
    await agents_transport.publish(topics.job_metrics(job_id, "gw2"), json.dumps(refusal))
    await eventually(lambda: job.refused.get("rejected") == 1, what="the shard's refusal")
    version = {"event": "model_version", "version": 3, "updates_applied": 6, "accuracy": 0.5}
    await agents_transport.publish(topics.job_metrics(job_id, "gw2"), json.dumps(version))
    await eventually(lambda: core.dispatcher.metrics_refused == 1, what="refused version")
    assert job.record.model_version == 0

    # The shard's slice of the model lives only in its checkpoints: the job fails with it.
    await agents["gw2"].set_role(
        job_id, "aggregator_shard", "failed", bundle=shard0.digest, reason="disk full"
    )
    await eventually(lambda: job.record.phase == "failed", what="failed")
    assert job.record.reason == "aggregator shard 0 on gw2 failed: disk full"
    assert (await agents["a"].cancellation()).reason.startswith("job failed")
