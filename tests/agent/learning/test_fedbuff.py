"""FedBuff's server (Nguyen et al., AISTATS 2022) exactly as REFERENCES.md writes it: buffer +=
s(τ)·Δ, Δ̄ = buffer / K, then the server optimizer; duplicates, stale and bad updates are
counted and never reach the model; a checkpoint resumes bit for bit."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learning.aggregation import AppliedIds, Counters, Status, stored_applied_ids
from agent.learning.arrays import decode_strings, encode_strings
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.optimizers import FedAdam, FedAvg, make_server_optimizer
from agent.learning.staleness import Staleness
from agent.protocol.codec import decode_tensors, encode_tensors

Arr = np.ndarray[Any, Any]


def model(seed: int = 0, dtype: type = np.float32) -> dict[str, Arr]:
    rng = np.random.default_rng(seed)
    return {
        "dense.weight": rng.normal(size=(3, 4)).astype(dtype),
        "dense.bias": rng.normal(size=4).astype(dtype),
    }


def deltas(n: int, seed: int = 1, dtype: type = np.float32) -> list[dict[str, Arr]]:
    rng = np.random.default_rng(seed)
    return [
        {k: np.asarray(rng.normal(size=v.shape) * 0.1).astype(dtype) for k, v in model().items()}
        for _ in range(n)
    ]


def check_invariant(agg: FedBuffAggregator) -> None:
    c = agg.counters
    assert c.received == c.applied + c.stale_dropped + c.duplicates + c.rejected + c.late
    assert c.applied == c.versions * agg.buffer_size + agg.pending


def test_k1_every_update_makes_a_version() -> None:
    w0 = model()
    agg = FedBuffAggregator(w0, buffer_size=1)
    ds = deltas(3)
    out = agg.offer("a", 0, ds[0])
    assert out.status is Status.APPLIED
    assert out.version == 1
    assert out.weight == 1.0
    for key in w0:
        np.testing.assert_allclose(agg.weights[key], w0[key] + ds[0][key], rtol=1e-6)
    # An update trained from version 0 arriving at version 1 has τ = 1: weight 1/sqrt(2).
    before = dict(agg.weights)
    out = agg.offer("b", 0, ds[1])
    assert out.staleness == 1
    assert out.weight == 1 / math.sqrt(2)
    assert out.version == 2
    for key in w0:
        np.testing.assert_allclose(
            agg.weights[key], before[key] + ds[1][key] / math.sqrt(2), rtol=1e-6
        )
    assert agg.version == 2
    assert agg.counters.versions == 2
    check_invariant(agg)


def test_k10_divides_the_staleness_weighted_sum_by_k_not_by_the_weights() -> None:
    w0 = model()
    agg = FedBuffAggregator(w0, buffer_size=10, version=5)
    ds = deltas(10)
    bases = [5, 4, 3, 5, 0, 1, 2, 5, 5, 4]
    for i, (delta, base) in enumerate(zip(ds, bases, strict=True)):
        out = agg.offer(f"u{i}", base, delta)
        assert out.applied
        assert out.weight == 1 / math.sqrt(1 + 5 - base)
        if i < 9:
            assert out.version is None
            assert agg.pending == i + 1
            assert agg.version == 5
            for key in w0:  # the model does not move before the buffer is full
                np.testing.assert_array_equal(agg.weights[key], w0[key])
    assert out.version == 6
    assert agg.pending == 0
    weights = [1 / math.sqrt(1 + 5 - b) for b in bases]
    for key in w0:
        total = sum(s * d[key].astype(np.float64) for s, d in zip(weights, ds, strict=True))
        np.testing.assert_allclose(agg.weights[key], w0[key] + total / 10, rtol=1e-5, atol=1e-7)
        wrong = w0[key] + total / sum(weights)  # ÷Σs(τ), what some implementations do
        assert not np.allclose(agg.weights[key], wrong, rtol=1e-3)
    check_invariant(agg)


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [
        (Staleness(), lambda tau: 1 / math.sqrt(1 + tau)),
        (Staleness(kind="constant"), lambda tau: 1.0),
        (Staleness(kind="polynomial", exponent=1.5), lambda tau: (1 + tau) ** -1.5),
    ],
)
def test_staleness_weights_are_exact(staleness: Staleness, expected: Any) -> None:
    agg = FedBuffAggregator(model(), buffer_size=100, staleness=staleness, version=7)
    for tau, delta in enumerate(deltas(8)):
        out = agg.offer(f"u{tau}", 7 - tau, delta)
        assert out.staleness == tau
        assert out.weight == expected(tau)


def test_max_staleness_drops_and_counts() -> None:
    agg = FedBuffAggregator(
        model(), buffer_size=100, staleness=Staleness(max_staleness=2), version=4
    )
    ds = deltas(4)
    assert agg.offer("ok", 2, ds[0]).applied  # τ = 2: the bound itself is kept
    out = agg.offer("old", 1, ds[1])  # τ = 3
    assert out.status is Status.STALE
    assert out.staleness == 3
    assert out.reason == "staleness 3 exceeds the maximum 2"
    assert agg.offer("older", 0, ds[2]).status is Status.STALE
    assert agg.counters.stale_dropped == 2
    assert agg.pending == 1
    # A stale update's id is not applied: nothing in the buffer, not remembered.
    assert "old" not in agg.applied_ids
    check_invariant(agg)


def test_duplicate_ids_apply_once_even_after_a_version_bump() -> None:
    w0 = model()
    agg = FedBuffAggregator(w0, buffer_size=2)
    ds = deltas(3)
    assert agg.offer("x", 0, ds[0]).applied
    dup = agg.offer("x", 0, ds[0])
    assert dup.status is Status.DUPLICATE
    assert dup.reason == "update id already applied"
    assert agg.pending == 1
    assert agg.offer("y", 0, ds[1]).version == 1
    after = {k: v.copy() for k, v in agg.weights.items()}
    # Redelivered after the version moved on (QoS 1): still a duplicate, the model unchanged.
    assert agg.offer("x", 0, ds[0]).status is Status.DUPLICATE
    assert agg.offer("y", 0, ds[1]).status is Status.DUPLICATE
    assert agg.pending == 0
    for key in w0:
        np.testing.assert_array_equal(agg.weights[key], after[key])
    assert agg.counters.duplicates == 3
    assert agg.counters.applied == 2
    check_invariant(agg)


def bad(kind: str) -> dict[str, Arr]:
    d = deltas(1)[0]
    if kind == "missing":
        del d["dense.bias"]
    elif kind == "extra":
        d["other"] = np.zeros(2, np.float32)
    elif kind == "shape":
        d["dense.bias"] = np.zeros(5, np.float32)
    elif kind == "dtype":
        d["dense.weight"] = d["dense.weight"].astype(np.float64)
    elif kind == "nan":
        d["dense.bias"][2] = np.nan
    elif kind == "inf":
        d["dense.weight"][0, 0] = -np.inf
        d["dense.weight"][1, 1] = np.inf
    elif kind == "list":
        d["dense.bias"] = [0.0, 0.0, 0.0, 0.0]  # type: ignore[assignment]
    elif kind == "norm":
        d["dense.weight"] = np.full((3, 4), 10.0, np.float32)
    return d


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "tensor 'dense.bias' is missing from the update"),
        ("extra", "tensor 'other' is not in the model"),
        ("shape", r"tensor 'dense.bias': shape (5,), the model has (4,)"),
        ("dtype", "tensor 'dense.weight': dtype float64, the model has float32"),
        ("nan", "tensor 'dense.bias' has 1 non-finite values"),
        ("inf", "tensor 'dense.weight' has 2 non-finite values"),
        ("list", "tensor 'dense.bias': expected a numpy array, got list"),
        ("norm", "update L2 norm 34.6"),
    ],
)
def test_rejections_name_the_tensor_and_change_nothing(kind: str, reason: str) -> None:
    agg = FedBuffAggregator(model(), buffer_size=2, max_norm=5.0)
    assert agg.offer("first", 0, deltas(1, seed=9)[0]).applied
    state = {k: v.copy() for k, v in agg.state_dict().items()}
    out = agg.offer("bad", 0, bad(kind))
    assert out.status is Status.REJECTED
    assert out.reason.startswith(reason)
    if kind == "norm":
        assert "exceeds the bound 5; largest tensor 'dense.weight' has norm 34.6" in out.reason
    assert agg.counters.rejected == 1
    assert agg.pending == 1
    assert "bad" not in agg.applied_ids
    after = agg.state_dict()
    for key, value in state.items():
        if not key.startswith("counters/"):
            np.testing.assert_array_equal(after[key], value)
    check_invariant(agg)


def test_norm_bound_admits_deltas_within_it() -> None:
    d = {"x": np.array([3.0, 4.0], np.float32)}
    agg = FedBuffAggregator({"x": np.zeros(2, np.float32)}, buffer_size=5, max_norm=5.0)
    assert agg.offer("a", 0, d).applied
    assert agg.offer("b", 0, {"x": d["x"] * 1.001}).status is Status.REJECTED
    # The bound is on the whole update's norm, not each tensor's: 3 and 4 make 5.
    two = {"x": np.zeros(1, np.float32), "y": np.zeros(1, np.float32)}
    agg = FedBuffAggregator(two, buffer_size=5, max_norm=4.5)
    out = agg.offer("c", 0, {"x": np.array([3.0], np.float32), "y": np.array([4.0], np.float32)})
    assert out.status is Status.REJECTED
    assert out.reason == ("update L2 norm 5 exceeds the bound 4.5; largest tensor 'y' has norm 4")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("", 0), "update id must be a non-empty string"),
        (("a\nb", 0), "has a newline"),
        (("x" * 300, 0), "longer than 256"),
        (("u", 3), "base version 3 is ahead of the current 2"),
        (("u", 1.0), "base version must be an integer"),
    ],
)
def test_bad_ids_and_versions_are_rejected(args: tuple[Any, Any], reason: str) -> None:
    agg = FedBuffAggregator(model(), version=2)
    out = agg.offer(args[0], args[1], deltas(1)[0])
    assert out.status is Status.REJECTED
    assert reason in out.reason
    assert agg.counters.rejected == 1


@pytest.mark.parametrize("samples", [0, -3, 2.5, True])
def test_bad_sample_counts_are_rejected(samples: Any) -> None:
    out = FedBuffAggregator(model()).offer("u", 0, deltas(1)[0], samples)
    assert out.status is Status.REJECTED
    assert "num_samples must be an integer ≥ 1" in out.reason


def test_read_only_deltas_from_the_codec_are_accepted_and_untouched() -> None:
    w0 = model()
    agg = FedBuffAggregator(w0, buffer_size=2)
    received = [decode_tensors(encode_tensors(d)) for d in deltas(4)]
    for d in received:
        assert not d["dense.weight"].flags.writeable
    copies = [{k: v.copy() for k, v in d.items()} for d in received]
    for i, d in enumerate(received):
        assert agg.offer(f"u{i}", agg.version, d).applied
    for d, c in zip(received, copies, strict=True):
        for key in d:
            np.testing.assert_array_equal(d[key], c[key])
    assert agg.version == 2


def test_published_versions_are_read_only_and_never_change() -> None:
    agg = FedBuffAggregator(model(), buffer_size=1)
    agg.offer("a", 0, deltas(1)[0])
    v1 = agg.weights
    snapshot = {k: v.copy() for k, v in v1.items()}
    with pytest.raises(ValueError, match="read-only"):
        v1["dense.bias"][0] = 1.0
    with pytest.raises(TypeError):
        v1["dense.bias"] = np.zeros(4)  # type: ignore[index]
    agg.offer("b", 1, deltas(1, seed=5)[0])
    for key in snapshot:
        np.testing.assert_array_equal(v1[key], snapshot[key])
        assert not np.array_equal(agg.weights[key], snapshot[key])


def test_the_initial_weights_are_copied() -> None:
    w0 = model()
    agg = FedBuffAggregator(w0)
    w0["dense.bias"][:] = 99.0
    assert not np.any(agg.weights["dense.bias"] == 99.0)


def test_server_optimizer_gets_the_mean_delta() -> None:
    w0 = model()
    ds = deltas(6)
    agg = FedBuffAggregator(w0, buffer_size=3, optimizer=make_server_optimizer("fedadam", lr=0.1))
    reference = FedAdam(lr=0.1)
    expected: dict[str, Arr] = dict(w0)
    for i, d in enumerate(ds):
        agg.offer(f"u{i}", agg.version, d)
        if i % 3 == 2:
            mean = {k: (ds[i - 2][k] + ds[i - 1][k] + d[k]) / 3 for k in w0}
            expected = reference.step(expected, mean)
    for key in w0:
        np.testing.assert_allclose(agg.weights[key], expected[key], rtol=1e-6)
    assert agg.optimizer.steps == 2


def test_float64_accumulation() -> None:
    w0 = model()
    ds = deltas(4)
    agg = FedBuffAggregator(w0, buffer_size=4, accumulate_dtype=np.float64)
    for i, d in enumerate(ds):
        agg.offer(f"u{i}", 0, d)
    assert agg.state_dict()["buffer/sums/dense.bias"].dtype == np.float64
    for key in w0:
        assert agg.weights[key].dtype == np.float32
        expected = w0[key].astype(np.float64) + sum(d[key].astype(np.float64) for d in ds) / 4
        np.testing.assert_allclose(agg.weights[key], expected, rtol=1e-6)


def test_metrics_are_sample_weighted_per_version() -> None:
    agg = FedBuffAggregator(model(), buffer_size=3)
    ds = deltas(3)
    agg.offer("a", 0, ds[0], 10, {"loss": 1.0, "accuracy": 0.5})
    agg.offer("b", 0, ds[1], 30, {"loss": 2.0, "nan": float("nan")})
    out = agg.offer("c", 0, ds[2], 60, {"loss": 0.5})
    assert out.version == 1
    assert out.metrics == pytest.approx({"loss": (10 + 60 + 30) / 100, "accuracy": 0.5})


def test_offering_a_big_delta_allocates_nothing_model_sized() -> None:
    big = {"w": np.zeros(2_000_000, np.float32)}  # 8 MB
    agg = FedBuffAggregator(big, buffer_size=4, version=3)
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(size=2_000_000).astype(np.float32)}
    agg.offer("warm", 3, delta)
    tracemalloc.start()
    try:
        assert agg.offer("stale", 0, delta).weight == 0.5  # the scaled path
        assert agg.offer("fresh", 3, delta).weight == 1.0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer_size": 0}, "buffer_size: expected an integer ≥ 1"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"version": -1}, "version"),
        ({"remember_ids": 0}, "remember_ids"),
        ({"accumulate_dtype": np.int32}, "accumulate_dtype must be floating"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedBuffAggregator(model(), **kwargs)


def test_integer_tensors_cannot_be_aggregated() -> None:
    with pytest.raises(ValueError, match="tensor 'steps' has dtype int64"):
        FedBuffAggregator({"steps": np.zeros(1, np.int64)})


def test_applied_ids_are_bounded_oldest_first() -> None:
    ids = AppliedIds(capacity=3)
    for name in "abcd":
        ids.add(name)
    assert ids.export() == ["b", "c", "d"]
    assert "a" not in ids
    assert len(ids) == 3
    agg = FedBuffAggregator(model(), buffer_size=1, remember_ids=2)
    ds = deltas(3)
    for i in range(3):
        agg.offer(f"u{i}", agg.version, ds[i])
    assert agg.applied_ids.export() == ["u1", "u2"]


@given(
    capacity=st.integers(1, 6),
    added=st.lists(st.sampled_from(["a", "bb", "ccc", "é", "u-17", "x" * 40]), max_size=40),
    packs=st.sets(st.integers(0, 40)),
)
def test_applied_ids_packed_as_they_come_and_go(
    capacity: int, added: list[str], packs: set[int]
) -> None:
    """The checkpoint's encoding of the ids, kept up to date id by id (evictions, ids added
    again), is always what encoding them all afresh gives, and reads back to the same ids."""
    ids = AppliedIds(capacity=capacity)
    for step, update_id in enumerate(added):
        ids.add(update_id)
        if step in packs:
            assert ids.packed().tobytes() == encode_strings(ids.export()).tobytes()
    assert ids.packed().tobytes() == encode_strings(ids.export()).tobytes()
    assert decode_strings(ids.packed()) == ids.export()


@given(
    capacity=st.integers(1, 6),
    added=st.lists(st.sampled_from(["a", "bb", "ccc", "é", "u-17", "x" * 40]), max_size=40),
    at=st.integers(0, 40),
)
def test_applied_ids_cut_at_a_mark_read_back_whole(
    capacity: int, added: list[str], at: int
) -> None:
    """A checkpoint keeps the ids older than its version apart from the newer ones: the two
    parts, read back older first, remember exactly the ids, in order; the newer part holds
    only ids added after the mark unless an id added again reordered them."""
    ids = AppliedIds(capacity=capacity)
    mark = ids.mark()
    for step, update_id in enumerate(added):
        if step == at:
            mark = ids.mark()
        ids.add(update_id)
    if at >= len(added):
        mark = ids.mark()
    older, newer = ids.packed_split(mark)
    assert ids.packed_since(mark).tobytes() == newer.tobytes()
    resumed = AppliedIds(capacity, decode_strings(older))
    for update_id in decode_strings(newer):
        resumed.add(update_id)
    assert resumed.export() == ids.export()
    if len(set(added)) == len(added):  # nothing added again
        assert decode_strings(newer) == [i for i in ids.export() if i in added[at:]]


def test_a_checkpoint_keeps_older_ids_apart_from_newer_ones() -> None:
    agg = FedBuffAggregator(model(), buffer_size=2)
    ds = deltas(5)
    for i in range(2):
        agg.offer(f"u{i}", agg.version, ds[i])
    assert agg.version == 1
    first_save = agg.state_dict()  # the generation's older ids go to disk with this one
    agg.offer("u2", agg.version, ds[2])
    later = agg.state_dict()  # and later commits of the generation write the rest only
    assert int(later["ids_generation"]) == int(first_save["ids_generation"])
    without = agg.state_dict(older_ids=False)  # what such a commit takes: no copy of the rest
    assert "older_ids" not in without
    assert without["applied_ids"].tobytes() == later["applied_ids"].tobytes()
    assert decode_strings(first_save["older_ids"]) == ["u0", "u1"]
    assert decode_strings(later["applied_ids"]) == ["u2"]
    state = {k: v for k, v in later.items() if k != "older_ids"}
    state["older_ids"] = first_save["older_ids"]
    assert stored_applied_ids(state) == ["u0", "u1", "u2"]
    resumed = FedBuffAggregator(model(), buffer_size=2)
    resumed.load_state_dict(decode_tensors(encode_tensors(state)))
    assert resumed.applied_ids.export() == ["u0", "u1", "u2"]
    assert resumed.offer("u0", 0, ds[0]).status is Status.DUPLICATE
    again = resumed.state_dict()  # cut where the checkpoint it came from was cut
    assert decode_strings(again["older_ids"]) == ["u0", "u1"]
    assert decode_strings(again["applied_ids"]) == ["u2"]


def test_a_checkpoint_with_every_id_in_one_part_still_resumes() -> None:
    # As checkpoints were written before the ids were split.
    agg = FedBuffAggregator(model(), buffer_size=2)
    ds = deltas(3)
    for i in range(3):
        agg.offer(f"u{i}", agg.version, ds[i])
    state = dict(agg.state_dict())
    state["applied_ids"] = encode_strings(agg.applied_ids.export())
    del state["older_ids"]
    assert stored_applied_ids(state) == ["u0", "u1", "u2"]
    resumed = FedBuffAggregator(model(), buffer_size=2)
    resumed.load_state_dict(state)
    assert resumed.applied_ids.export() == ["u0", "u1", "u2"]
    assert resumed.offer("u1", 0, ds[1]).status is Status.DUPLICATE


def test_an_id_with_a_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="newline"):
        AppliedIds().add("a\nb")


# -- checkpoint and resume -------------------------------------------------------------------------


def feed(agg: FedBuffAggregator, ds: list[dict[str, Arr]], start: int) -> list[Any]:
    """Offer ds with a mix of fresh, stale, duplicate and bad updates; return the outcomes."""
    outcomes = []
    for i, d in enumerate(ds, start):
        base = max(agg.version - i % 3, 0)
        outcomes.append(agg.offer(f"u{i}", base, d, 1 + i, {"loss": float(i)}))
        if i % 4 == 0:
            outcomes.append(agg.offer(f"u{i}", base, d))  # a redelivery
    return outcomes


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm", "fedyogi"])
def test_checkpoint_resume_gives_identical_results(optimizer: str) -> None:
    def build() -> FedBuffAggregator:
        return FedBuffAggregator(
            model(),
            buffer_size=4,
            optimizer=make_server_optimizer(optimizer),
            staleness=Staleness(max_staleness=1),
        )

    ds = deltas(20)
    straight = build()
    expected = feed(straight, ds, 0)

    first = build()
    before = feed(first, ds[:11], 0)  # 2 versions and 2 updates pending
    assert first.pending == 2
    assert first.version == 2
    payload = encode_tensors(first.state_dict())
    del first
    resumed = build()
    resumed.load_state_dict(decode_tensors(payload))
    after = feed(resumed, ds[11:], 11)
    assert before + after == expected
    for key in straight.weights:
        np.testing.assert_array_equal(resumed.weights[key], straight.weights[key])
    assert resumed.counters == straight.counters
    assert resumed.version == straight.version
    assert resumed.applied_ids.export() == straight.applied_ids.export()
    # A redelivery of an update applied before the checkpoint is still a duplicate.
    assert resumed.offer("u1", 0, ds[1]).status is Status.DUPLICATE


def test_load_refuses_a_checkpoint_of_another_model() -> None:
    agg = FedBuffAggregator(model(), buffer_size=2)
    state = agg.state_dict()
    other = FedBuffAggregator({"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="checkpoint weights: tensors"):
        other.load_state_dict(state)
    state["weights/dense.bias"] = np.zeros(4, np.float64)
    with pytest.raises(ValueError, match=r"tensor 'dense\.bias' is float64"):
        FedBuffAggregator(model()).load_state_dict(state)
    agg.offer("a", 0, deltas(1)[0])
    small = FedBuffAggregator(model(), buffer_size=1)
    with pytest.raises(ValueError, match="holds 1 buffered updates, K is 1"):
        small.load_state_dict(agg.state_dict())
    with pytest.raises(ValueError, match="lacks 'buffer/count'"):
        small.load_state_dict({})


# -- properties -----------------------------------------------------------------------------------


@given(
    order=st.permutations(range(6)),
    bases=st.lists(st.integers(0, 3), min_size=6, max_size=6),
)
def test_order_within_one_buffer_does_not_matter(order: list[int], bases: list[int]) -> None:
    ds = deltas(6)
    results = []
    for sequence in (range(6), order):
        agg = FedBuffAggregator(model(), buffer_size=6, version=3)
        for i in sequence:
            agg.offer(f"u{i}", bases[i], ds[i])
        assert agg.version == 4
        results.append(agg.weights)
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-6, atol=1e-7)


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["fresh", "stale", "ahead", "dup", "nan", "shape"]), st.integers(0, 4)
    ),
    max_size=40,
)


@given(actions=ACTIONS, k=st.integers(1, 5))
def test_counters_account_for_every_offer(actions: list[tuple[str, int]], k: int) -> None:
    agg = FedBuffAggregator(model(), buffer_size=k, staleness=Staleness(max_staleness=2))
    d = deltas(1)[0]
    ids: list[str] = []
    for n, (kind, back) in enumerate(actions):
        uid = f"u{n}"
        base = agg.version - back
        if kind == "dup" and ids:
            uid = ids[back % len(ids)]
        elif kind == "ahead":
            base = agg.version + 1 + back
        elif kind == "nan" or kind == "shape":
            base = agg.version
        offer = {"nan": bad("nan"), "shape": bad("shape")}.get(kind, d)
        out = agg.offer(uid, max(base, 0) if kind != "ahead" else base, offer)
        if out.applied:
            ids.append(uid)
        check_invariant(agg)
    c = agg.counters
    assert c.applied == len(ids) == len(set(ids))
    assert agg.version == c.versions
    assert isinstance(c, Counters)


# -- does it learn ---------------------------------------------------------------------------------


def test_fedbuff_solves_least_squares_with_stale_clients() -> None:
    """20 clients hold rows of a least-squares problem; 6 train at once from whatever version
    they pulled and finish in random order, so updates arrive with staleness up to ~10."""
    rng = np.random.default_rng(42)
    dim, rows = 8, 30
    x_true = rng.normal(size=dim)
    data = []
    for _ in range(20):
        a = rng.normal(size=(rows, dim))
        data.append((a, a @ x_true + 0.01 * rng.normal(size=rows)))
    a_all = np.vstack([a for a, _ in data])
    b_all = np.concatenate([b for _, b in data])
    x_opt = np.linalg.lstsq(a_all, b_all, rcond=None)[0]

    def loss(x: Arr) -> float:
        return float(np.mean((a_all @ x - b_all) ** 2))

    def train(x: Arr, client: int) -> Arr:
        a, b = data[client]
        y = x.astype(np.float64)
        for _ in range(5):
            y = y - 0.05 * a.T @ (a @ y - b) / rows
        return (y - x).astype(np.float32)

    agg = FedBuffAggregator(
        {"x": np.zeros(dim, np.float32)},
        buffer_size=3,
        optimizer=FedAvg(lr=1.0),
        staleness=Staleness(max_staleness=20),
    )
    in_flight = [(c, agg.version, agg.weights["x"]) for c in rng.choice(20, 6, replace=False)]
    seen = []
    for n in range(600):
        client, base, start = in_flight.pop(int(rng.integers(len(in_flight))))
        seen.append(agg.version - base)
        agg.offer(f"u{n}", base, {"x": train(start, client)})
        in_flight.append((int(rng.integers(20)), agg.version, agg.weights["x"]))
    assert max(seen) >= 5
    assert agg.counters.stale_dropped == 0
    assert loss(agg.weights["x"]) < loss(x_opt) * 1.05 + 1e-6
    assert np.linalg.norm(agg.weights["x"] - x_opt) < 0.02
