"""The slice plan of a sharded aggregator: every parameter in exactly one slice, balanced by
bytes, the same plan everywhere, and split/join as inverses."""

from __future__ import annotations

import numpy as np
import pytest

from agent.learning.aggregation import ModelSpec
from agent.learning.shards import SlicePlan


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc1.weight": rng.normal(size=(64, 33)).astype(np.float32),
        "fc1.bias": rng.normal(size=(64,)).astype(np.float32),
        "fc2.weight": rng.normal(size=(10, 64)).astype(np.float64),
        "fc2.bias": rng.normal(size=(10,)).astype(np.float32),
    }


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_every_element_is_in_exactly_one_slice(shards: int) -> None:
    plan = SlicePlan(ModelSpec.of(model()), shards)
    seen = {name: np.zeros(np.asarray(t).size, dtype=int) for name, t in model().items()}
    for pieces in plan.slices:
        assert pieces, "no slice is empty"
        for piece in pieces:
            seen[piece.tensor][piece.start : piece.stop] += 1
    assert all((count == 1).all() for count in seen.values())


@pytest.mark.parametrize("shards", [2, 3, 5, 8])
def test_slices_are_balanced_by_bytes(shards: int) -> None:
    weights = model()
    plan = SlicePlan(ModelSpec.of(weights), shards)
    total = sum(t.nbytes for t in weights.values())
    sizes = [plan.nbytes(s) for s in range(shards)]
    assert sum(sizes) == total
    # Each cut is within one element (at most 8 bytes here) of its even share.
    assert max(abs(size - total / shards) for size in sizes) <= 16


def test_a_single_large_tensor_is_cut() -> None:
    weights = {"w": np.arange(11_000_001, dtype=np.float32)}
    plan = SlicePlan(ModelSpec.of(weights), 2)
    assert [[p.key for p in pieces] for pieces in plan.slices] == [
        ["w[0:5500000]"],
        ["w[5500000:11000001]"],
    ]
    parts = plan.split(weights)
    assert np.shares_memory(parts[0]["w[0:5500000]"], weights["w"])  # no copy on the way out


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_split_then_join_gives_the_model_back(shards: int) -> None:
    weights = model()
    plan = SlicePlan(ModelSpec.of(weights), shards)
    parts = plan.split(weights)
    for shard, part in enumerate(parts):
        assert ModelSpec.of(part).problem(part) is None
        assert plan.slice_spec(shard).problem(part) is None
    joined = plan.join(parts)
    assert list(joined) == list(weights)
    for name, tensor in weights.items():
        assert joined[name].dtype == tensor.dtype
        np.testing.assert_array_equal(joined[name], tensor)


def test_the_plan_is_deterministic() -> None:
    spec = ModelSpec.of(model())
    assert SlicePlan(spec, 3).slices == SlicePlan(ModelSpec.of(model()), 3).slices


def test_whole_tensors_keep_their_names() -> None:
    plan = SlicePlan(ModelSpec.of(model()), 1)
    assert [p.key for p in plan.slices[0]] == list(model())


def test_refuses_impossible_plans() -> None:
    spec = ModelSpec.of({"w": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="shards"):
        SlicePlan(spec, 0)
    with pytest.raises(ValueError, match="cannot be cut into 4"):
        SlicePlan(spec, 4)
    with pytest.raises(ValueError, match="expected 1 slices"):
        SlicePlan(spec, 1).join([])
