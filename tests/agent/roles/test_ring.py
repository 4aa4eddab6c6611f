"""Ring all-reduce among a hybrid group's trainers, over a real mosquitto: every member ends
with the element-wise sum (hence the mean) numpy computes, for rings of 2 to 5 members."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.learning.ring import chunk_bounds, weighted_mean, weighted_vector
from agent.protocol import RingChunk, Topics
from agent.protocol.bundle import RoleBundle
from agent.roles.base import RoleContext
from agent.roles.ring import RingError, RingMember
from agent.transport import BrokerConfig, Transport
from coordinator.mosquitto import MosquittoProcess


@pytest.fixture
async def members(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Callable[[int], Any]]:
    transports: list[Transport] = []
    rings: list[RingMember] = []

    async def make(count: int) -> list[RingMember]:

        async def report(_event: Mapping[str, Any]) -> None:
            return None

        made = []
        for i in range(count):
            transport = Transport(BrokerConfig(urls=(mosquitto.url,), backoff_initial=0.05))
            transport.start()
            await transport.wait_connected(5)
            transports.append(transport)
            ctx = RoleContext(
                agent_id=f"pi-{i}",
                bundle=RoleBundle(job="digits", role="trainer"),
                transport=transport,
                topics=topics,
                state_dir=tmp_path / f"pi-{i}",
                datasets={},
                run_cpu=asyncio.to_thread,
                report=report,
            )
            ring = RingMember(ctx, "lab")
            await ring.start()
            made.append(ring)
        rings.extend(made)
        return made

    yield make
    for ring in rings:
        await ring.close()
    for transport in transports:
        await transport.close()


@pytest.mark.parametrize("count", [2, 3, 4, 5])
async def test_every_member_ends_with_numpy_s_mean(
    members: Callable[[int], Any], count: int
) -> None:
    ring = await members(count)
    rng = np.random.default_rng(count)
    # 1001 values: chunks of unequal sizes (1001 is not a multiple of 2, 3, 4 or 5).
    vectors = [rng.standard_normal(1001) for _ in range(count)]
    order = [f"pi-{i}" for i in reversed(range(count))]  # ring order need not be id order
    results = await asyncio.wait_for(
        asyncio.gather(
            *(m.allreduce("r1", order, v, timeout=20) for m, v in zip(ring, vectors, strict=True))
        ),
        60,
    )
    expected = np.mean(vectors, axis=0)
    for result in results:
        np.testing.assert_allclose(result / count, expected, rtol=1e-12, atol=1e-12)
    assert all(m.rejected == 0 for m in ring)


async def test_a_weighted_mean_of_tensors_through_the_ring(members: Callable[[int], Any]) -> None:
    ring = await members(3)
    deltas = [
        {"w": np.full((2, 3), float(i), np.float32), "b": np.array([i, -i], np.float32)}
        for i in range(3)
    ]
    samples = [10, 20, 70]
    vectors = [weighted_vector(d, n) for d, n in zip(deltas, samples, strict=True)]
    order = ["pi-0", "pi-1", "pi-2"]
    totals = await asyncio.gather(
        *(m.allreduce("r2", order, v, timeout=20) for m, v in zip(ring, vectors, strict=True))
    )
    mean, weight = weighted_mean(totals[0], deltas[0])
    assert weight == 100
    assert mean["w"].dtype == np.float32
    np.testing.assert_allclose(mean["w"], np.full((2, 3), (20 + 140) / 100), rtol=1e-6)
    np.testing.assert_allclose(mean["b"], [1.6, -1.6], rtol=1e-6)


async def test_a_silent_predecessor_ends_the_ring_with_the_reason(
    members: Callable[[int], Any],
) -> None:
    (alone, _quiet) = await members(2)
    with pytest.raises(RingError, match="nothing from pi-1 for reduce step 0"):
        await alone.allreduce("r3", ["pi-0", "pi-1"], np.ones(10), timeout=0.5)


async def test_a_chunk_on_someone_else_s_topic_is_refused(
    members: Callable[[int], Any], topics: Topics
) -> None:
    (target, intruder) = await members(2)
    # pi-1 writes on its own topic but claims to be pi-2: refused, counted, not used.
    forged = RingChunk(
        job="digits",
        ring="r4",
        sender="pi-2",
        phase="reduce",
        step=0,
        index=1,
        tensors={"chunk": np.ones(5)},
    )
    await intruder.ctx.transport.publish(
        topics.group_ring("digits", "lab", "pi-1", "pi-0"), forged.to_msgpack()
    )
    for _ in range(100):
        if target.rejected:
            break
        await asyncio.sleep(0.05)
    assert target.rejected == 1


def test_chunks_cover_the_vector_evenly() -> None:
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
