"""The aggregator's updates topics under hostile input: the role's own handler (what the
transport feeds it), a real aggregator with the digits model on a real mosquitto.

Every message is refused with a logged, reported and counted reason; the model and the buffer do
not move; an honest update afterwards is still applied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from agent.learning.assets import load_demo_model
from agent.protocol import ModelRequest, ModelUpdate, Topics
from agent.roles.aggregator import Aggregator
from agent.transport import Inbound
from coordinator.mosquitto import MosquittoProcess
from tests.agent.roles.test_learning_roles import Federation, bundle, config, digits
from tests.hostile.hostile import (
    broken_tensors,
    feed,
    mutated,
    segments,
    undecodable,
)

EXAMPLES = 2500
JOB = "digits"
EVIL = "pi-evil"
MAX_NORM = 50.0
UPDATE_FIELDS = {
    "job": "name",
    "agent": "name",
    "base_version": "count",
    "num_samples": "count",
    "tensors": "tensors",
    "metrics": "map",
}
REFUSALS = {"update_rejected": "reason", "update_not_applied": "reason"}


def honest_delta(scale: float = 0.01, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(value.shape) * scale).astype(value.dtype)
        for name, value in load_demo_model().initial_params.items()
    }


def update(job: str = JOB, **fields: Any) -> ModelUpdate:
    values: dict[str, Any] = {
        "job": job,
        "agent": EVIL,
        "base_version": 0,
        "num_samples": 10,
        "tensors": honest_delta(),
        **fields,
    }
    return ModelUpdate(**values)


def semantic(
    topics: Topics, applied_id: str, job: str = JOB
) -> st.SearchStrategy[tuple[str, bytes]]:
    """Well-formed updates that must still be refused: not shaped like the model, above the
    norm bound, ahead of the current version, replayed, for another job, from another agent."""
    own = topics.job_updates(job, EVIL)
    delta = honest_delta()
    names = sorted(delta)

    def shaped(kind: str, index: int) -> bytes:
        tensors = dict(delta)
        name = names[index % len(names)]
        if kind == "dtype":
            tensors[name] = tensors[name].astype(np.float64)
        elif kind == "shape":
            tensors[name] = np.zeros((*tensors[name].shape, 2), np.float32)
        elif kind == "missing":
            del tensors[name]
        elif kind == "extra":
            tensors[f"{name}.evil"] = tensors[name]
        elif kind == "norm":
            tensors = {k: v * np.float32(1e4) for k, v in delta.items()}
        return update(job, tensors=tensors).to_msgpack()

    return st.one_of(
        st.tuples(
            st.sampled_from(["dtype", "shape", "missing", "extra", "norm"]), st.integers(0, 99)
        ).map(lambda a: (own, shaped(*a))),
        st.integers(1, 2**40).map(
            lambda ahead: (own, update(job, base_version=ahead).to_msgpack())
        ),
        st.just((own, update(job, id=applied_id).to_msgpack())),
        segments.filter(lambda agent: agent != EVIL).map(
            lambda agent: (own, update(job, agent=agent).to_msgpack())
        ),
        st.sampled_from(["other-job", "digits2"]).map(
            lambda other: (own, update(other).to_msgpack())
        ),
        st.sampled_from(["pi-honest", "x"]).map(
            lambda agent: (topics.job_updates(job, agent), update(job).to_msgpack())
        ),
    )


def hostile(
    topics: Topics, applied_id: str, job: str = JOB
) -> st.SearchStrategy[tuple[str, bytes]]:
    """Everything the updates topics can carry that an aggregator must refuse."""
    valid = update(job)
    wire = valid.to_wire()
    request = ModelRequest(job=job, agent=EVIL).to_wire()
    own = topics.job_updates(job, EVIL)
    request_fields = {"job": "name", "agent": "name", "have_version": "int"}
    malformed = st.one_of(
        undecodable(valid.to_msgpack()),
        mutated(wire, UPDATE_FIELDS, frozenset({"metrics"})),
        mutated(request, request_fields, frozenset({"have_version"})),
        broken_tensors(wire),
    ).map(lambda payload: (own, payload))
    return st.one_of(malformed, semantic(topics, applied_id, job))


@pytest.fixture
async def aggregator(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[tuple[Aggregator, Federation]]:
    fed = Federation(mosquitto, topics, tmp_path)
    _, holdout = digits(2)
    cfg = config(buffer_size=100_000, max_norm=MAX_NORM, clip_norm=5.0)
    ctx = await fed.context(
        "agg", bundle("aggregator", cfg, "digits-holdout"), {"digits-holdout": holdout}
    )
    role = Aggregator(ctx)
    await role.prepare()
    try:
        yield role, fed
    finally:
        for transport in fed.transports:
            await transport.close()


async def test_hostile_updates_are_refused_with_their_reasons(
    aggregator: tuple[Aggregator, Federation],
) -> None:
    role, fed = aggregator
    own = fed.topics.job_updates(JOB, EVIL)
    honest = update()
    await role.handle(Inbound(own, honest.to_msgpack(), False, 1))
    assert role.algo.counters.applied == 1
    weights = {k: np.array(v) for k, v in role.algo.weights.items()}

    async def handle(item: tuple[str, bytes]) -> None:
        await role.handle(Inbound(item[0], item[1], False, 1))

    tally = await feed(handle, hostile(fed.topics, honest.id), EXAMPLES, REFUSALS)

    assert tally.sent >= EXAMPLES
    # Counted by reason code, every one of them, in what the aggregator reports.
    assert sum(role.rejections.values()) + role.algo.counters.duplicates == tally.sent
    assert {"malformed", "sender", "job", "dtype", "shape", "names", "norm", "version"} <= set(
        role.rejections
    ), role.rejections
    for text in (
        "neither a JSON object nor a msgpack map",
        "non-finite values",
        "exceeds the bound 50",
        "is ahead of the current 0",
        "update id already applied",
        f"arrived on {own}",
        "for job 'other-job'",
        "the model has float32",
    ):
        assert tally.mention(text), text
    # Nothing hostile reached the model or the buffer; an honest update still counts.
    assert role.algo.counters.applied == 1
    for name, value in role.algo.weights.items():
        np.testing.assert_array_equal(value, weights[name])
    await role.handle(Inbound(own, update(tensors=honest_delta(seed=1)).to_msgpack(), False, 1))
    assert role.algo.counters.applied == 2
    # The flood was counted, and reported only at the event budget's rate.
    reported = [e for e in fed.events if e["event"].startswith("update_")]
    assert 0 < len(reported) < tally.sent / 10


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"tensors": {"dense": np.zeros(3, np.float32)}}, "names", "is missing from the update"),
        ({"base_version": 7}, "version", "base version 7 is ahead of the current 0"),
        ({"job": "other-job"}, "job", "model_update for job 'other-job' arrived on job"),
        ({"agent": "pi-honest"}, "sender", "model_update from 'pi-honest' arrived on"),
    ],
)
async def test_a_sample_of_reasons_is_exact(
    aggregator: tuple[Aggregator, Federation], change: Mapping[str, Any], code: str, reason: str
) -> None:
    role, fed = aggregator
    topic = fed.topics.job_updates(JOB, EVIL)
    await role.handle(Inbound(topic, update(**change).to_msgpack(), False, 1))
    assert role.rejections == {code: 1}
    [event] = [e for e in fed.events if e["event"] == "update_rejected"]
    assert event["code"] == code
    assert reason in event["reason"]
