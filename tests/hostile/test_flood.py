"""An honest job beside a hostile publisher: real processes on a real mosquitto.

``ember serve`` (its embedded agent hosts the aggregator and evaluates on a held-out split) and
an ``ember-agent run`` trainer run the digits job while a stranger floods every topic they
read (both inboxes, the job's updates, model and metrics topics, the coordinator's RPC topic,
agent status documents) with thousands of hostile messages and forged chunk frames. Nothing
dies, every process logs why it refused what it refused, and the job still finishes.
"""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import Topics
from agent.protocol.bundle import RoleBundle, sign_bundle
from agent.protocol.messages import AssignRole, CancelRole, Ping
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from tests.coordinator.conftest import broker_config
from tests.coordinator.test_cli import DIGITS_ASSETS, digits_job, ember, real_fleet
from tests.hostile import test_chunks, test_coordinator, test_models, test_updates
from tests.hostile.hostile import fuzz_settings, garbage, json_garbage, mutated, not_a_map

FLOOD = 3000
"""Hostile messages at least; the flood goes on until the job has ended."""
TRAINER = "pi-trainer"
PLACEHOLDER = "digits-flood-000000"
"""A job id of the length the coordinator gives ``digits-flood`` (name, dash, 6 hex digits)."""
AGGREGATOR = "coordinator-flood"
T = TypeVar("T")

INBOX_REFUSALS = ("inbox_rejected", "role_refused", "ping_rejected", "cancel_ignored")
REFUSED = {
    "trainer inbox": ("trainer", INBOX_REFUSALS),
    "aggregator inbox": ("aggregator", INBOX_REFUSALS),
    "updates": ("aggregator", ("update_rejected", "update_not_applied", "chunk_rejected")),
    "model": ("trainer", ("model_message_rejected", "chunk_rejected")),
    "rpc": ("serve", ("rpc_request_refused", "rpc_request_failed")),
    "metrics": ("serve", ("metrics_event_refused",)),
    "status": ("serve", ("agent_document_invalid", "agent_document_too_large")),
}
"""Per target: the process that must refuse its messages, and the events that say so."""


def collect(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """``count`` examples of ``strategy`` (hypothesis drawing, not shrinking)."""
    out: list[T] = []

    def keep(item: T) -> None:
        out.append(item)

    fuzz_settings(count)(given(strategy)(keep))()
    return out


def inbox_commands(topics: Topics, agent: str) -> st.SearchStrategy[bytes]:
    stranger = Ed25519PrivateKey.generate()
    foreign = sign_bundle(
        RoleBundle(job="evil", role="trainer", prefix=topics.prefix), stranger
    ).to_bytes()
    assign = AssignRole(job="evil", role="trainer", bundle=foreign)
    return st.one_of(
        garbage,
        not_a_map,
        json_garbage,
        mutated(assign.to_wire(), {"job": "name", "role": "name", "bundle": "bytes"}),
        st.just(assign.to_msgpack()),
        st.binary(max_size=100).map(
            lambda data: AssignRole(job="evil", role="trainer", bundle=data).to_msgpack()
        ),
        st.sampled_from([topics.agent_status(agent), "#", "x/y"]).map(
            lambda topic: Ping(reply_to=topic).to_msgpack()
        ),
        st.just(CancelRole(job="evil", role="trainer").to_msgpack()),
    )


def metric_events(topics: Topics, job: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """Events the coordinator refuses at warning level: forged job events from anyone but the
    aggregator, and garbage on the aggregator's own topic."""
    ending = st.fixed_dictionaries(
        {"event": st.sampled_from(["completed", "failed", "model_version"]), "version": st.just(99)}
    )
    impostors = st.sampled_from([TRAINER, "pi-evil", "gw"])
    return st.one_of(
        st.tuples(impostors, ending).map(
            lambda a: (topics.job_metrics(job, a[0]), json.dumps(a[1]).encode())
        ),
        st.tuples(ending, impostors).map(
            lambda a: (
                topics.job_metrics(job, AGGREGATOR),
                json.dumps({**a[0], "agent": a[1]}).encode(),
            )
        ),
        garbage.filter(lambda b: not b.strip().startswith(b"{")).map(
            lambda b: (topics.job_metrics(job, AGGREGATOR), b)
        ),
    )


def flood_plan(topics: Topics, job: str) -> list[tuple[str, str, bytes]]:
    """(target, topic, payload) for every hostile message, shuffled."""
    per = FLOOD // 7 + 1
    plan: list[tuple[str, str, bytes]] = []
    plan += [
        ("trainer inbox", topics.agent_inbox(TRAINER), p)
        for p in collect(inbox_commands(topics, TRAINER), per)
    ]
    plan += [
        ("aggregator inbox", topics.agent_inbox(AGGREGATOR), p)
        for p in collect(inbox_commands(topics, AGGREGATOR), per)
    ]
    updates = st.one_of(
        test_updates.hostile(topics, "never-applied", job).filter(
            lambda item: item[0] != topics.job_updates(job, TRAINER)
        ),
        test_chunks.forged_frames().map(lambda f: (topics.job_updates(job, "pi-evil"), f)),
    )
    plan += [("updates", topic, p) for topic, p in collect(updates, per)]
    model = st.one_of(test_models.hostile(job), test_chunks.forged_frames())
    plan += [("model", topics.job_model(job), p) for p in collect(model, per)]
    plan += [
        ("rpc", topics.rpc_requests(), p)
        for p in collect(test_coordinator.rpc_requests(topics), per)
    ]
    plan += [("metrics", t, p) for t, p in collect(metric_events(topics, job), per)]
    statuses = test_coordinator.status_documents(topics)
    plan += [("status", t, p) for t, p in collect(statuses, per)]
    random.Random(8).shuffle(plan)
    return plan


def events(log: Path) -> Counter[str]:
    """Event names in a JSON-lines log."""
    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("event"), str):
            counts[entry["event"]] += 1
    return counts


def write_job(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        textwrap.dedent(
            f"""
            name: digits-flood
            model: {{ onnx: {DIGITS_ASSETS / "train_step.onnx"} }}
            data: {{ dataset: digits, min_samples: 50, eval_dataset: digits-test }}
            algorithm:
              buffer_size: 2
              concurrency: 1
              max_norm: 100
              client: {{ local_steps: 10, batch_size: 32, lr: 0.1 }}
            stop: {{ max_versions: 30, max_minutes: 3 }}
            """
        )
    )
    return job


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_an_honest_job_finishes_beside_a_hostile_publisher(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    digits_job(tmp_path, "digits-flood")  # the data; the job is this test's own
    job_file = write_job(tmp_path)
    async with real_fleet(
        mosquitto,
        topics,
        tmp_path,
        trainer=TRAINER,
        aggregator=AGGREGATOR,
        trainer_config="[simulation]\nslowdown = 10\n",  # a job that lasts a few seconds
    ) as fleet:
        env, children, logs = fleet.env, fleet.children, fleet.logs
        await fleet.wait_feasible(job_file)
        # Drawn before the job exists (it takes seconds), for a stand-in job id of the same
        # length, replaced once the id is known: msgpack and JSON stay well-formed.
        drafted = await asyncio.to_thread(flood_plan, topics, PLACEHOLDER)
        async with Transport(broker_config(mosquitto.url), name="watcher") as watcher:
            await watcher.wait_connected(5)
            submitted = await ember("jobs", "submit", "--json", str(job_file), env=env)
            assert submitted.code == 0, submitted.err
            job_id = submitted.json()["job"]
            assert len(job_id) == len(PLACEHOLDER)
            states = await watcher.subscribe(topics.job_state(job_id))
            hostile = [
                (
                    target,
                    topic.replace(PLACEHOLDER, job_id),
                    payload.replace(stand_in, job_id.encode()),
                )
                for target, topic, payload in drafted
                for stand_in in [PLACEHOLDER.encode()]
            ]
            state: dict[str, Any] = {}
            while state.get("model_version", 0) < 1:  # the roles are at work: flood them
                state = json.loads(bytes((await states.get(60)).payload))
                assert state["phase"] in ("dispatching", "running"), state
            sent: Counter[str] = Counter()
            live: Counter[str] = Counter()
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as stranger:
                index = 0
                # Flood until the job has ended, and at least FLOOD messages.
                while index < len(hostile) or state.get("phase") not in (
                    "completed",
                    "failed",
                    "cancelled",
                ):
                    target, topic, payload = hostile[index % len(hostile)]
                    retain = target == "status"
                    await stranger.publish(topic, payload, qos=1, retain=retain)
                    sent[target] += 1
                    if state.get("phase") == "running":
                        live[target] += 1  # the job's topics count while it runs
                    index += 1
                    while (message := states.get_nowait()) is not None:
                        state = json.loads(bytes(message.payload))
                    if index % 50 == 0:
                        assert all(c.returncode is None for c in children), "a process died"
                        await asyncio.sleep(0.05)  # a paced flood: the broker keeps up
                    assert index < 60_000, f"the job did not end under the flood: {state}"
            total = sum(sent.values())
            assert total >= FLOOD
            assert state["phase"] == "completed", state
            assert state["reason"].startswith("max_versions"), state
            assert state["model_version"] == 30
            # The aggregator counted every refused update by reason, in the job state.
            by_code = state["rejected"]["by_code"]
            assert sum(by_code.values()) > 0, (state["rejected"], sent)

        # Nobody died; the coordinator answers; every process said why it refused.
        assert all(c.returncode is None for c in children)
        listed = await ember("jobs", "ls", "--json", env=env)
        assert listed.code == 0, listed.err
        assert listed.json()[0]["phase"] == "completed"
        await asyncio.sleep(1.0)  # the last refusals reach the logs
        seen = {name: events(path) for name, path in logs.items()}
        assert seen["serve"]["embedded_agent_started"] == 1  # never restarted
        for target, (process, names) in REFUSED.items():
            refused = sum(seen[process][name] for name in names)
            queue_full = seen[process]["subscription_queue_full"]
            assert refused > 0, (target, seen[process])
            if target == "metrics":  # after the job's end they are noted, not refused
                assert refused >= 0.9 * live[target], (target, live, seen[process])
            elif target not in ("model", "updates"):  # refused by several processes
                assert refused + queue_full >= 0.9 * sent[target], (target, sent, seen[process])
        for process in seen.values():
            assert process["role_crashed"] == 0
            assert process["message_route_failed"] == 0
            assert process["inbox_handler_failed"] == 0
            assert process["rpc_handler_failed"] == 0
            assert process["metrics_event_failed"] == 0
        names = {name for _, group in REFUSED.values() for name in group}
        refusals = {p: sum(counts[n] for n in names) for p, counts in seen.items()}
        print(f"flood: {total} hostile messages {dict(sent)}; refusals logged {refusals}")
