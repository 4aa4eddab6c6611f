"""A trainer's model topic under hostile input: the role's own handler (what the transport feeds
it), the digits model, a real mosquitto.

A version that is malformed, for another job or not shaped like the job's model (it used to reach
the training backend and end the role) is refused with a logged reason; so is a receipt for
another job. The trainer keeps waiting for a usable version and takes the honest one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from agent.learning.aggregation import ModelSpec
from agent.learning.assets import load_demo_model
from agent.protocol import ModelVersion, Topics, UpdateAck
from agent.roles.trainer import Trainer
from agent.transport import Inbound
from coordinator.mosquitto import MosquittoProcess
from tests.agent.roles.test_learning_roles import Federation, bundle, config, digits
from tests.hostile.hostile import (
    broken_tensors,
    feed,
    mutated,
    undecodable,
)

EXAMPLES = 1500
JOB = "digits"
VERSION_FIELDS = {
    "job": "name",
    "version": "count",
    "tensors": "tensors",
    "metrics": "map",
    "participants": "list",
    "final": "bool",
}


def weights() -> dict[str, np.ndarray]:
    return dict(load_demo_model().initial_params)


def misshapen(kind: str, index: int, job: str = JOB) -> bytes:
    tensors = weights()
    names = sorted(tensors)
    name = names[index % len(names)]
    if kind == "dtype":
        tensors[name] = tensors[name].astype(np.float64)
    elif kind == "shape":
        tensors[name] = tensors[name].reshape(-1)[:-1].copy()
    elif kind == "missing":
        del tensors[name]
    else:
        tensors[f"{name}.evil"] = tensors[name]
    return ModelVersion(job=job, version=index, tensors=tensors).to_msgpack()


def hostile(job: str = JOB) -> st.SearchStrategy[bytes]:
    """Everything a model topic can carry that a trainer must refuse."""
    version = ModelVersion(job=job, version=3, tensors=weights())
    ack = UpdateAck(job=job, version=3, acks={"pi-0": "u1"}).to_wire()
    other_job = st.sampled_from(["other-job", "digits2"])
    return st.one_of(
        undecodable(version.to_msgpack()),
        mutated(version.to_wire(), VERSION_FIELDS, frozenset({"metrics", "participants", "final"})),
        mutated(ack, {"job": "name", "version": "count", "acks": "map"}, frozenset({"acks"})),
        broken_tensors(version.to_wire()),
        st.tuples(st.sampled_from(["dtype", "shape", "missing", "extra"]), st.integers(0, 99)).map(
            lambda a: misshapen(*a, job=job)
        ),
        other_job.map(lambda job: ModelVersion(job=job, version=1, tensors=weights()).to_msgpack()),
        other_job.map(lambda job: UpdateAck(job=job, version=1, acks={"pi-0": "x"}).to_msgpack()),
    )


@pytest.fixture
async def trainer(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Trainer]:
    fed = Federation(mosquitto, topics, tmp_path)
    shards, _ = digits(2)
    ctx = await fed.context("pi-0", bundle("trainer", config(), "digits"), {"digits": shards[0]})
    role = Trainer(ctx)
    role.spec = ModelSpec.of(load_demo_model().initial_params)  # what run() reads from the bundle
    try:
        yield role
    finally:
        for transport in fed.transports:
            await transport.close()


async def test_hostile_model_messages_are_refused_with_their_reasons(trainer: Trainer) -> None:
    topic = trainer.ctx.topics.job_model(JOB)

    async def handle(payload: bytes) -> None:
        trainer.handle(Inbound(topic, payload, False, 1))

    # Every way of misshaping every tensor once, whatever hypothesis draws besides.
    kinds = ("dtype", "shape", "missing", "extra")
    every = [misshapen(kind, index) for kind in kinds for index in range(len(weights()))]
    tally = await feed(
        handle, hostile(), EXAMPLES, {"model_message_rejected": "reason"}, explicit=every
    )

    assert tally.sent >= EXAMPLES
    assert trainer.rejected == tally.sent
    for text in (
        "tensor 'fc1.bias': dtype float64, the model has float32",
        "the model has (128,)",
        "is missing from the update",
        "is not in the model",
        "model_version for job 'other-job'",
        "update_ack for job",
        "non-finite values",
    ):
        assert tally.mention(text), text
    assert trainer._latest is None  # nothing hostile became the model to train on
    honest = ModelVersion(job=JOB, version=1, tensors=weights())
    trainer.handle(Inbound(topic, honest.to_msgpack(), False, 1))
    assert trainer._latest is not None
    assert trainer._latest.version == 1
