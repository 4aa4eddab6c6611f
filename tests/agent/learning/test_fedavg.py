"""Synchronous FedAvg rounds (McMahan et al., AISTATS 2017): the sample-weighted mean of the
sampled clients' deltas, a round that closes when all have reported or when the caller says so,
late updates counted and dropped, and the same duplicate and rejection rules as FedBuff."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learning.aggregation import Status
from agent.learning.fedavg import SyncFedAvg
from agent.learning.optimizers import FedAvgM, make_server_optimizer
from agent.learning.selection import sample_clients
from agent.protocol.codec import decode_tensors, encode_tensors

Arr = np.ndarray[Any, Any]


def model() -> dict[str, Arr]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def deltas(n: int, seed: int = 1) -> list[dict[str, Arr]]:
    rng = np.random.default_rng(seed)
    return [
        {
            k: np.asarray(rng.normal(size=v.shape) * 0.1).astype(np.float32)
            for k, v in model().items()
        }
        for _ in range(n)
    ]


def check_invariant(sync: SyncFedAvg) -> None:
    c = sync.counters
    assert c.received == c.applied + c.late + c.duplicates + c.rejected + c.stale_dropped
    assert c.versions == sync.version


def test_round_applies_the_sample_weighted_mean_and_closes_when_all_reported() -> None:
    w0 = model()
    sync = SyncFedAvg(w0)
    ds = deltas(3)
    samples = [10, 30, 60]
    rnd = sync.start_round(["a", "b", "c"])
    assert rnd.number == 0
    assert rnd.missing == {"a", "b", "c"}
    for i, (name, d, n) in enumerate(zip("abc", ds, samples, strict=True)):
        out = sync.offer(f"u{name}", 0, d, n, {"loss": float(i)}, client=name)
        assert out.status is Status.APPLIED
        assert out.weight == n
        if name != "c":
            assert out.version is None
            assert sync.version == 0
    assert out.version == 1
    assert out.metrics == pytest.approx({"loss": (0 * 10 + 1 * 30 + 2 * 60) / 100})
    assert sync.current_round is None
    result = sync.last_result
    assert result is not None
    assert result.reason == "all participants reported"
    assert result.applied == 3
    assert result.missing == frozenset()
    for key in w0:
        mean = sum(n * d[key].astype(np.float64) for n, d in zip(samples, ds, strict=True)) / 100
        np.testing.assert_allclose(sync.weights[key], w0[key] + mean, rtol=1e-6, atol=1e-7)
        uniform = sum(d[key].astype(np.float64) for d in ds) / 3
        assert not np.allclose(sync.weights[key], w0[key] + uniform, rtol=1e-4)
    check_invariant(sync)


def test_uniform_weighting() -> None:
    w0 = model()
    sync = SyncFedAvg(w0, weighting="uniform")
    ds = deltas(2)
    sync.start_round(["a", "b"])
    sync.offer("1", 0, ds[0], 1, client="a")
    sync.offer("2", 0, ds[1], 99, client="b")
    for key in w0:
        np.testing.assert_allclose(
            sync.weights[key], w0[key] + (ds[0][key] + ds[1][key]) / 2, rtol=1e-6
        )


def test_caller_closes_on_timeout_with_whoever_reported() -> None:
    w0 = model()
    sync = SyncFedAvg(w0)
    ds = deltas(2)
    sync.start_round(["a", "b", "c"])
    sync.offer("1", 0, ds[0], 5, client="a")
    sync.offer("2", 0, ds[1], 15, client="c")
    assert sync.close("timeout", round_number=7) is None  # a timer for another round
    result = sync.close("timeout", round_number=0)
    assert result is not None
    assert result.reason == "timeout"
    assert result.reported == {"a", "c"}
    assert result.missing == {"b"}
    assert result.version == 1
    for key in w0:
        mean = (5 * ds[0][key] + 15 * ds[1][key]) / 20
        np.testing.assert_allclose(sync.weights[key], w0[key] + mean, rtol=1e-6)
    assert sync.close("timeout") is None  # nothing open any more


def test_an_empty_round_makes_a_version_with_the_same_weights() -> None:
    opt = FedAvgM()
    sync = SyncFedAvg(model(), optimizer=opt)
    before = sync.weights
    sync.start_round(["a"])
    result = sync.close("timeout")
    assert result is not None
    assert result.applied == 0
    assert result.version == sync.version == 1
    assert opt.steps == 0
    for key in before:
        assert sync.weights[key] is before[key]


def test_late_updates_are_counted_and_dropped() -> None:
    sync = SyncFedAvg(model())
    ds = deltas(3)
    sync.start_round(["a", "b"])
    sync.offer("1", 0, ds[0], client="a")
    sync.close("timeout")
    after = dict(sync.weights)
    out = sync.offer("2", 0, ds[1], client="b")
    assert out.status is Status.LATE
    assert out.reason == "round 0 is closed; the current round is 1"
    sync.start_round(["a", "b"])
    assert sync.offer("3", 0, ds[2], client="b").status is Status.LATE
    assert sync.counters.late == 2
    assert sync.current_round is not None
    assert sync.current_round.reported == frozenset()
    for key in after:
        np.testing.assert_array_equal(sync.weights[key], after[key])
    check_invariant(sync)


def test_duplicates_apply_once_within_and_after_the_round() -> None:
    sync = SyncFedAvg(model())
    ds = deltas(2)
    sync.start_round(["a", "b"])
    assert sync.offer("1", 0, ds[0], client="a").applied
    assert sync.offer("1", 0, ds[0], client="a").status is Status.DUPLICATE
    assert sync.offer("2", 0, ds[1], client="b").version == 1
    # Redelivered after the round closed: a duplicate, not a late update.
    assert sync.offer("1", 0, ds[0], client="a").status is Status.DUPLICATE
    assert sync.counters.duplicates == 2
    assert sync.counters.late == 0
    check_invariant(sync)


@pytest.mark.parametrize(
    ("setup", "args", "reason"),
    [
        ("open", ("u", 0, "good", "z"), "client 'z' was not sampled for round 0"),
        ("open", ("u", 1, "good", "a"), "base version 1 is ahead of the current 0"),
        ("closed", ("u", 0, "good", "a"), "no round is open for version 0"),
        ("twice", ("u2", 0, "good", "a"), "client 'a' already reported for round 0"),
        ("open", ("u", 0, "nan", "a"), "tensor 'b' has 1 non-finite values"),
        ("open", ("u", 0, "shape", "a"), "tensor 'w': shape (3, 2), the model has (2, 3)"),
        ("open", ("", 0, "good", "a"), "update id must be a non-empty string"),
    ],
)
def test_rejections(setup: str, args: tuple[str, int, str, str], reason: str) -> None:
    sync = SyncFedAvg(model())
    if setup != "closed":
        sync.start_round(["a", "b"])
    if setup == "twice":
        sync.offer("u1", 0, deltas(1)[0], client="a")
    update_id, base, kind, client = args
    d = deltas(1)[0]
    if kind == "nan":
        d["b"][1] = np.nan
    elif kind == "shape":
        d["w"] = np.zeros((3, 2), np.float32)
    out = sync.offer(update_id, base, d, client=client)
    assert out.status is Status.REJECTED
    assert out.reason.startswith(reason)
    check_invariant(sync)


def test_round_lifecycle_errors() -> None:
    sync = SyncFedAvg(model())
    with pytest.raises(ValueError, match="at least one participant"):
        sync.start_round([])
    with pytest.raises(ValueError, match="non-empty strings without newlines"):
        sync.start_round(["a", ""])
    sync.start_round(["a"])
    with pytest.raises(RuntimeError, match="round 0 is still open"):
        sync.start_round(["b"])
    with pytest.raises(ValueError, match="weighting: expected 'samples' or 'uniform'"):
        SyncFedAvg(model(), weighting="median")  # type: ignore[arg-type]


def test_checkpoint_mid_round_resumes_identically() -> None:
    def build() -> SyncFedAvg:
        return SyncFedAvg(model(), optimizer=make_server_optimizer("fedadam", lr=0.05))

    ds = deltas(6)

    def play(sync: SyncFedAvg, steps: range) -> list[Any]:
        outcomes: list[Any] = []
        for i in steps:
            if i % 3 == 0:
                sync.start_round(["a", "b", "c"])
            outcomes.append(sync.offer(f"u{i}", sync.version, ds[i], i + 1, client="abc"[i % 3]))
        return outcomes

    straight = build()
    expected = play(straight, range(6))
    first = build()
    before = play(first, range(4))  # round 1 open, one of three reported
    resumed = build()
    resumed.load_state_dict(decode_tensors(encode_tensors(first.state_dict())))
    assert resumed.current_round == first.current_round
    after = play(resumed, range(4, 6))
    assert before + after == expected
    for key in straight.weights:
        np.testing.assert_array_equal(resumed.weights[key], straight.weights[key])
    assert resumed.counters == straight.counters


@given(
    order=st.permutations(range(5)), samples=st.lists(st.integers(1, 1000), min_size=5, max_size=5)
)
def test_arrival_order_within_a_round_does_not_matter(order: list[int], samples: list[int]) -> None:
    ds = deltas(5)
    results = []
    for sequence in (range(5), order):
        sync = SyncFedAvg(model())
        sync.start_round([f"c{i}" for i in range(5)])
        for i in sequence:
            sync.offer(f"u{i}", 0, ds[i], samples[i], client=f"c{i}")
        assert sync.version == 1
        results.append(sync.weights)
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-6, atol=1e-7)


def test_fedavg_with_client_sampling_solves_iid_least_squares() -> None:
    rng = np.random.default_rng(5)
    dim = 6
    x_true = rng.normal(size=dim)
    clients = {}
    for i in range(20):
        a = rng.normal(size=(int(rng.integers(10, 60)), dim))
        clients[f"c{i}"] = (a, a @ x_true + 0.01 * rng.normal(size=len(a)))
    a_all = np.vstack([a for a, _ in clients.values()])
    b_all = np.concatenate([b for _, b in clients.values()])
    x_opt = np.linalg.lstsq(a_all, b_all, rcond=None)[0]
    sync = SyncFedAvg({"x": np.zeros(dim)})
    for r in range(60):
        chosen = sample_clients(clients, fraction=0.25, rng=rng)
        sync.start_round(chosen)
        start = sync.weights["x"]
        for name in chosen:
            a, b = clients[name]
            y = start.copy()
            for _ in range(5):
                y -= 0.05 * a.T @ (a @ y - b) / len(a)
            sync.offer(f"{r}-{name}", r, {"x": y - start}, len(a), client=name)
        assert sync.current_round is None
    assert np.linalg.norm(sync.weights["x"] - x_opt) < 0.05


def test_an_excused_participant_is_not_waited_for_and_contributes_nothing() -> None:
    w0 = model()
    sync = SyncFedAvg(w0)
    (d,) = deltas(1)
    sync.start_round(["a", "b"])
    assert sync.excuse("b", round_number=1) is None  # not the open round: nothing changes
    assert sync.excuse("z", round_number=0) is None  # not sampled
    assert sync.excuse("b", round_number=0) is None  # the round still waits for a
    assert sync.current_round is not None
    assert sync.current_round.missing == {"a"}
    assert sync.offer("ub", 0, d, 5, client="b").status is Status.REJECTED  # excused: no report
    out = sync.offer("ua", 0, d, 5, client="a")
    assert out.version == 1
    np.testing.assert_allclose(sync.weights["w"], w0["w"] + d["w"], rtol=1e-6)
    result = sync.last_result
    assert result is not None
    assert result.reported == {"a"}
    assert result.excused == {"b"}
    assert result.missing == frozenset()
    check_invariant(sync)


def test_a_round_of_excused_participants_closes_with_the_same_weights() -> None:
    w0 = model()
    sync = SyncFedAvg(w0)
    sync.start_round(["a"])
    result = sync.excuse("a", round_number=0)
    assert result is not None
    assert result.version == 1
    assert result.reason == "all participants reported"
    np.testing.assert_array_equal(sync.weights["w"], w0["w"])


def test_excused_participants_survive_a_checkpoint() -> None:
    sync = SyncFedAvg(model())
    sync.start_round(["a", "b", "c"])
    sync.excuse("b", round_number=0)
    state = decode_tensors(encode_tensors(sync.state_dict()))
    resumed = SyncFedAvg(model())
    resumed.load_state_dict(state)
    assert resumed.current_round is not None
    assert resumed.current_round.excused == {"b"}
    assert resumed.current_round.missing == {"a", "c"}
