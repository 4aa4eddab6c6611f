"""The coordinator under hostile input: its RPC server, its view of the agents' status and info
documents and the job metrics topics, each through the handler the transport feeds, in one real
coordinator (``coordinator.service.Coordinator``: store, registry, dispatcher, RPC) on a real
mosquitto, with a job running on fake agents.

Every refused message has a logged reason; the job neither ends nor moves; the coordinator still
answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.protocol import Topics
from agent.protocol.messages import AgentStatus, RpcRequest
from agent.transport import Inbound, Transport
from coordinator.dispatcher import _Job
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import RpcClient
from coordinator.service import Coordinator, ServiceConfig
from tests.coordinator.conftest import TEST_TIMINGS, artifacts, broker_config, eventually
from tests.coordinator.test_dispatcher import fleet, job_spec
from tests.hostile.hostile import (
    as_json,
    feed,
    fuzz_settings,
    garbage,
    json_garbage,
    mutated,
    segments,
    undecodable,
    wrong_value,
)

RPC_EXAMPLES = 1500
METRICS_EXAMPLES = 1500
STATUS_EXAMPLES = 1000
INFO_EXAMPLES = 500


@dataclass
class Running:
    coordinator: Coordinator
    job: _Job
    topics: Topics
    agents: Transport


@pytest.fixture
async def running(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Running]:
    config = ServiceConfig(
        broker=broker_config(mosquitto.url),
        state_dir=tmp_path / "state",
        prefix=topics.prefix,
        embedded_agent=False,
        zeroconf=False,
        timings=TEST_TIMINGS,
    )
    coordinator = Coordinator(config)
    await coordinator.start()
    assert coordinator.dispatcher is not None
    assert coordinator.key is not None
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as agents:
        await agents.wait_connected(5)
        fake = await fleet(agents, topics, {"a": 300})
        job = await coordinator.dispatcher.submit(job_spec(), artifacts())
        for name in ("gw", "a"):
            await fake[name].accept(coordinator.key)
        await eventually(lambda: job.record.phase == "running", what="running")
        try:
            yield Running(coordinator, job, topics, agents)
        finally:
            await coordinator.stop()


def unchanged(job: _Job) -> None:
    assert job.record.phase == "running"
    assert (job.record.model_version, job.record.updates_applied) == (0, 0)


# -- RPC ------------------------------------------------------------------------------------------


def rpc_requests(topics: Topics) -> st.SearchStrategy[bytes]:
    """Requests the RPC server must refuse, or answer with an error (never run, never with an
    internal error)."""
    reply = topics.rpc_replies("fuzz")
    valid = RpcRequest(method="ping", reply_to=reply).to_wire()
    # Names that match no agent or job (a prefix of a real one would find it).
    missing = st.text(max_size=20).map(lambda text: f"zz{text}")
    anything = st.one_of(missing, *(wrong_value(kind) for kind in ("str", "int", "map")))
    params = st.one_of(
        st.tuples(st.just("agents.show"), st.fixed_dictionaries({"agent": anything})),
        st.tuples(st.sampled_from(["jobs.show", "jobs.cancel", "jobs.export"]), anything).map(
            lambda a: (a[0], {"job": a[1], "reason": "fuzz"})
        ),
        st.tuples(
            st.sampled_from(["jobs.plan", "jobs.submit"]),
            st.fixed_dictionaries(
                {"spec": st.one_of(wrong_value("map"), st.dictionaries(st.text(), st.text()))},
                optional={"artifacts": wrong_value("map"), "code": wrong_value("map")},
            ),
        ),
        st.tuples(
            st.text(max_size=30).filter(lambda m: m not in ("ping", "agents.ls", "jobs.ls")),
            st.just({}),
        ),
    )
    elsewhere = st.sampled_from(
        [
            topics.agent_inbox("a"),
            topics.job_state("x"),
            f"{reply}/deeper",
            "#",
            f"{topics.prefix}/coordinator/rpc/requests",
        ]
    )
    return st.one_of(
        undecodable(RpcRequest(method="ping", reply_to=reply).to_msgpack()),
        mutated(
            valid, {"method": "str", "reply_to": "str", "params": "map"}, frozenset({"params"})
        ),
        elsewhere.map(lambda topic: RpcRequest(method="ping", reply_to=topic).to_msgpack()),
        params.map(lambda a: RpcRequest(method=a[0], reply_to=reply, params=a[1]).to_msgpack()),
    )


async def test_hostile_rpc_requests_are_refused_or_answered_with_an_error(
    running: Running,
) -> None:
    rpc = running.coordinator.rpc
    assert rpc is not None
    topic = running.topics.rpc_requests()

    async def handle(payload: bytes) -> None:
        await rpc._handle(Inbound(topic, payload, False, 1))

    with capture_logs() as logs:
        tally = await feed(
            handle,
            rpc_requests(running.topics),
            RPC_EXAMPLES,
            {"rpc_request_refused": "reason", "rpc_request_failed": "reason"},
        )
    assert tally.sent >= RPC_EXAMPLES
    assert not [e for e in logs if e["event"] == "rpc_handler_failed"]  # no internal errors
    assert not tally.mention("internal error")
    assert rpc.refused == tally.events["rpc_request_refused"]
    for text in (
        "is not a reply topic",
        "unknown method",
        "no agent 'zz",
        "no job 'zz",
        "neither a JSON object nor a msgpack map",
    ):
        assert tally.mention(text), text
    unchanged(running.job)
    async with RpcClient(running.agents, running.topics) as client:
        assert (await client.call("ping", timeout=10))["jobs"] == 1


# -- job metrics ----------------------------------------------------------------------------------


def metric_events(topics: Topics, job: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """Metric events the coordinator must refuse (or, for events that are not its business,
    ignore with a noted reason): never one that moves the job."""
    ending = st.fixed_dictionaries(
        {
            "event": st.sampled_from(["completed", "failed", "model_version"]),
            "version": st.integers(0, 2**40),
            "updates_applied": st.integers(0, 2**40),
            "accuracy": st.floats(0, 1),
            "reason": st.text(max_size=50),
        }
    )
    refusal = st.fixed_dictionaries(
        {
            "event": st.sampled_from(["update_rejected", "update_stale", "update_duplicate"]),
            "reason": st.text(max_size=50),
        }
    )
    impostors = st.one_of(
        st.sampled_from(["a", "b", "gw2", "coordinator"]),
        segments,
    ).filter(lambda agent: agent != "gw")
    payloads = st.one_of(
        garbage.filter(lambda b: not b.strip().startswith(b"{")),
        json_garbage,
        st.just(b"[" * 100_000),
        st.just(b'{"event": "completed", "pad": "' + b"x" * 300_000 + b'"}'),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3),
            max_leaves=10,
        ).map(lambda value: json.dumps(value).encode()),
    )
    own = topics.job_metrics(job, "gw")
    return st.one_of(
        st.tuples(impostors.map(lambda agent: topics.job_metrics(job, agent)), payloads),
        st.tuples(st.just(own), payloads),
        st.tuples(impostors, st.one_of(ending, refusal)).map(
            lambda a: (topics.job_metrics(job, a[0]), as_json(a[1]))
        ),
        # The aggregator's topic, but the payload speaks for someone else.
        st.tuples(impostors, ending).map(lambda a: (own, as_json({**a[1], "agent": a[0]}))),
        st.tuples(
            st.sampled_from(
                [
                    f"{topics.job(job)}/metrics",
                    f"{topics.job(job)}/metrics/gw/extra",
                    f"{topics.job(job)}/state",
                    f"{topics.prefix}/jobs",
                ]
            ),
            ending.map(as_json),
        ),
        st.tuples(
            st.sampled_from(["other-job", "zz"]).map(lambda j: topics.job_metrics(j, "gw")),
            ending.map(as_json),
        ),
        st.tuples(
            st.just(own),
            st.fixed_dictionaries({"event": st.text(max_size=10)})
            .filter(
                lambda e: (
                    e["event"] not in ("completed", "failed", "model_version")
                    and not e["event"].startswith("update_")
                )
            )
            .map(as_json),
        ),
    )


async def test_hostile_metric_events_never_move_the_job(running: Running) -> None:
    dispatcher = running.coordinator.dispatcher
    assert dispatcher is not None
    job = running.job

    async def handle(item: tuple[str, bytes]) -> None:
        await dispatcher.apply_metrics(Inbound(item[0], item[1], False, 0))

    tally = await feed(
        handle,
        metric_events(running.topics, job.record.id),
        METRICS_EXAMPLES,
        {"metrics_event_refused": "reason", "metrics_event_ignored": "reason"},
    )
    assert tally.sent >= METRICS_EXAMPLES
    assert dispatcher.metrics_refused == tally.events["metrics_event_refused"]
    for text in (
        "but the job's aggregator is 'gw'",
        "invalid JSON",
        "expected a JSON object",
        "not a jobs/<job>/metrics/<agent> topic",
        "above 262144",
        "names agent",
        "no such running job",
        "not a job event",
    ):
        assert tally.mention(text), text
    unchanged(job)
    assert not job.refused  # no refusal was believed from a trainer either


# -- agent documents ------------------------------------------------------------------------------


def status_documents(topics: Topics) -> st.SearchStrategy[tuple[str, bytes]]:
    """Status documents the registry must refuse: not JSON objects, not an ``agent_status``
    message, or one that speaks for another agent."""
    valid = AgentStatus(agent="pi-x", state="online", session=1).to_wire()
    fields = {"agent": "name", "state": "str", "session": "count", "ts": "float", "reason": "str"}
    payloads = st.one_of(
        garbage.filter(bool),  # an empty payload clears a retained document: allowed
        json_garbage,
        st.just(b"[" * 100_000),
        mutated(valid, fields, frozenset({"ts", "reason"}), encode=as_json),
        st.sampled_from(["up", "ONLINE", "", "offline "]).map(
            lambda state: as_json({**valid, "state": state})
        ),
        st.sampled_from(["pi-y", "gw", "a"]).map(
            lambda agent: AgentStatus(agent=agent, state="online", session=1).to_json()
        ),
    )
    return st.tuples(st.just(topics.agent_status("pi-x")), payloads)


async def test_hostile_status_documents_are_refused(running: Running) -> None:
    registry = running.coordinator.registry
    assert registry is not None

    async def handle(item: tuple[str, bytes]) -> None:
        registry.apply(Inbound(item[0], item[1], True, 1))

    tally = await feed(
        handle,
        status_documents(running.topics),
        STATUS_EXAMPLES,
        {"agent_document_invalid": "error", "agent_document_too_large": "bytes"},
    )
    assert tally.sent >= STATUS_EXAMPLES
    assert registry.get("pi-x") is None  # never believed online (or at all)
    for text in ("agent_status names agent 'pi-y'", "must be one of 'online', 'offline'"):
        assert tally.mention(text), text
    unchanged(running.job)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
info_keys = st.sampled_from(
    [
        "arch",
        "cpu",
        "memory",
        "runtimes",
        "labels",
        "datasets",
        "accelerators",
        "os",
        "version",
        "allow_code",
        "agent",
    ]
)


async def test_hostile_info_documents_never_break_the_registry(running: Running) -> None:
    """Info documents are read leniently (what is missing or malformed becomes a listed
    problem, so ``ember agents ls`` shows why an agent is never planned), but never crash."""
    registry = running.coordinator.registry
    dispatcher = running.coordinator.dispatcher
    assert registry is not None
    assert dispatcher is not None
    topic = running.topics.agent_info("pi-i")
    sent = 0

    def one(document: dict[str, Any]) -> None:
        nonlocal sent
        registry.apply(Inbound(topic, json.dumps(document).encode(), True, 1))
        view = registry.get("pi-i")
        assert view is not None
        assert view.info is not None
        summary = view.summary()
        json.dumps(summary)  # what `ember agents ls --json` prints
        arch = document.get("arch")
        if arch is None or arch == "" or isinstance(arch, (bool, list, dict)):
            assert "arch" in summary["problems"]
        dispatcher.plan(job_spec())  # the planner reads every agent's info
        sent += 1

    documents = st.dictionaries(info_keys, json_values, max_size=8)
    fuzz_settings(INFO_EXAMPLES)(given(documents)(one))()
    assert sent >= INFO_EXAMPLES
    unchanged(running.job)
