"""The coordinator keeps each job's newest model weights: the test plays the aggregator and
publishes model versions (msgpack, chunked) on a real mosquitto; a real store keeps them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.protocol import Topics
from agent.protocol.codec import decode_tensors, encode_tensors
from agent.protocol.messages import ModelVersion, UpdateAck
from agent.transport import Transport
from coordinator.model_keeper import ModelKeeper
from coordinator.mosquitto import MosquittoProcess
from coordinator.store import JobRecord, Store
from tests.coordinator.conftest import broker_config, eventually

DIGITS = Path(__file__).resolve().parents[2] / "agent" / "learning" / "assets" / "digits"
Array = npt.NDArray[Any]
INITIAL = (DIGITS / "initial.tensors").read_bytes()


def weights(version: int) -> dict[str, Array]:
    """Version 0 is the job's initial weights; later ones differ."""
    initial = decode_tensors(INITIAL)
    if version == 0:
        return dict(initial)
    rng = np.random.default_rng(version)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in initial.items()}


def model_version(job: str, version: int, *, final: bool = False) -> bytes:
    return ModelVersion(
        job=job, version=version, tensors=weights(version), final=final
    ).to_msgpack()


class Harness:
    def __init__(self, store: Store, aggregator: Transport, topics: Topics, url: str) -> None:
        self.store = store
        self.aggregator = aggregator
        self.topics = topics
        self.url = url
        self.keepers: list[tuple[ModelKeeper, Transport]] = []

    async def keeper(self, **options: Any) -> ModelKeeper:
        transport = Transport(broker_config(self.url), name="coordinator-test")
        transport.start()
        await transport.wait_connected(5)
        keeper = ModelKeeper(transport=transport, topics=self.topics, store=self.store, **options)
        self.keepers.append((keeper, transport))
        return keeper

    async def job(self, job_id: str) -> str:
        digest = await self.store.put_blob(INITIAL)
        record = JobRecord(
            id=job_id,
            name="digits",
            spec={},
            phase="running",
            artifacts={"initial.tensors": digest},
        )
        await self.store.save(jobs=[record])
        return job_id

    async def publish(self, job: str, payload: bytes) -> None:
        await self.aggregator.publish(self.topics.job_model(job), payload)

    async def kept(self, job: str) -> tuple[int, bool] | None:
        stored = await self.store.job_weights(job)
        return None if stored is None else (stored.version, stored.final)


@pytest.fixture
async def harness(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Harness]:
    store = await Store.open(tmp_path / "state")
    # Small chunks: every model version travels as ~10 chunk frames and is reassembled.
    async with Transport(broker_config(mosquitto.url, chunk_size=4096)) as aggregator:
        await aggregator.wait_connected(5)
        h = Harness(store, aggregator, topics, mosquitto.url)
        try:
            yield h
        finally:
            for keeper, transport in h.keepers:
                await keeper.stop()
                await transport.close()
            await store.close()


async def test_final_at_once_intermediate_versions_at_most_every_interval(
    harness: Harness,
) -> None:
    job = await harness.job("digits-aaa111")
    keeper = await harness.keeper(interval=60.0)
    keeper.job_changed(job, "running")
    await keeper.wait_following(job)
    await harness.publish(job, model_version(job, 0))
    await eventually(lambda: keeper.stats.stored == 1, what="the first version is stored")
    assert await harness.kept(job) == (0, False)
    for version in (1, 2):
        await harness.publish(job, model_version(job, version))
    # Not models: receipts, garbage, another job's version on this topic, a re-publication.
    await harness.publish(job, UpdateAck(job=job, version=2, acks={"pi": "u1"}).to_msgpack())
    await harness.publish(job, b"\x93not a message")
    await harness.publish(job, model_version("digits-other", 5))
    await harness.publish(job, model_version(job, 2))
    await eventually(lambda: keeper.stats.messages == 7, what="every message read")
    assert (keeper.stats.versions, keeper.stats.acks, keeper.stats.stale) == (4, 1, 1)
    assert keeper.stats.invalid == 2
    assert await harness.kept(job) == (0, False)  # versions 1 and 2 wait for the interval
    await harness.publish(job, model_version(job, 3, final=True))
    await eventually(lambda: keeper.stats.stored == 2, what="the final version is stored")
    stored = await harness.store.job_weights(job)
    assert stored is not None
    assert (stored.version, stored.final) == (3, True)
    kept = decode_tensors(await harness.store.get_blob(stored.digest))
    for name, value in weights(3).items():
        np.testing.assert_array_equal(kept[name], value)
    # Version 0's blob is the job's initial.tensors artifact: superseded, but kept.
    assert encode_tensors(weights(0)) == INITIAL
    assert sorted(p.name for p in harness.store.blob_dir.iterdir()) == sorted(
        [stored.digest, (await harness.store.load_jobs())[0].artifacts["initial.tensors"]]
    )
    keeper.job_changed(job, "completed")  # the final version is in: let the topic go at once
    await eventually(lambda: keeper.following == [], timeout=2, what="the topic is left")


async def test_a_trailing_write_and_superseded_blobs_go(harness: Harness) -> None:
    job = await harness.job("digits-bbb222")
    keeper = await harness.keeper(interval=0.3)
    keeper.job_changed(job, "dispatching")
    await keeper.wait_following(job)
    await harness.publish(job, model_version(job, 1))
    await eventually(lambda: keeper.stats.stored == 1)
    first = await harness.store.job_weights(job)
    await harness.publish(job, model_version(job, 2))
    # No further message comes: version 2 is still written once the interval has passed.
    await eventually(lambda: keeper.stats.stored == 2, timeout=3)
    assert await harness.kept(job) == (2, False)
    assert first is not None
    assert not harness.store.blob_path(first.digest).exists()


async def test_the_final_version_after_the_job_ended_and_a_flush_after_the_grace(
    harness: Harness,
) -> None:
    late, unfinished = await harness.job("digits-ccc333"), await harness.job("digits-ddd444")
    keeper = await harness.keeper(interval=60.0, final_grace=1.0)
    for job in (late, unfinished):
        keeper.job_changed(job, "running")
        await keeper.wait_following(job)
        await harness.publish(job, model_version(job, 1))
    await eventually(lambda: keeper.stats.stored == 2)
    await harness.publish(unfinished, model_version(unfinished, 2))  # waits for the interval
    await eventually(lambda: keeper.stats.versions == 3)
    # A stop rule ended both jobs (metric events) before the aggregator's final version came.
    keeper.job_changed(late, "completed")
    keeper.job_changed(unfinished, "cancelled")
    await harness.publish(late, model_version(late, 2, final=True))
    await eventually(lambda: keeper.following == [], timeout=5, what="both topics left")
    assert await harness.kept(late) == (2, True)
    assert await harness.kept(unfinished) == (2, False)  # flushed when the grace ran out


async def test_a_clean_stop_writes_what_is_pending_and_a_restart_goes_on(
    harness: Harness,
) -> None:
    job = await harness.job("digits-eee555")
    keeper = await harness.keeper(interval=60.0)
    keeper.start([(job, "running"), ("digits-planned", "planned"), ("old", "completed")])
    assert keeper.following == [job]
    await keeper.wait_following(job)
    for version in (1, 2):
        await harness.publish(job, model_version(job, version))
    await eventually(lambda: keeper.stats.versions == 2)
    assert await harness.kept(job) == (1, False)
    await keeper.stop()
    assert await harness.kept(job) == (2, False)
    again = await harness.keeper(interval=60.0)
    again.start([(job, "running")])
    await again.wait_following(job)
    await harness.publish(job, model_version(job, 2))  # the aggregator republishes: known
    await harness.publish(job, model_version(job, 3))
    await eventually(lambda: again.stats.versions == 2)
    assert again.stats.stale == 1
    await eventually(lambda: again.stats.stored == 1)  # the first write after a start is at once
    assert await harness.kept(job) == (3, False)
