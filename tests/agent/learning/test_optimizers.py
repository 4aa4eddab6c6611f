"""Server optimizers against the formulas of Reddi et al., ICLR 2021 (REFERENCES.md), step by
step; their state survives state_dict and Ember's tensor codec bit for bit."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learning.optimizers import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)
from agent.learning.optimizers.adaptive import AdaptiveServerOptimizer
from agent.protocol.codec import decode_tensors, encode_tensors

Arr = np.ndarray[Any, Any]


def reference(name: str, params: dict[str, float], w: Arr, deltas: list[Arr]) -> Arr:
    """The formulas as REFERENCES.md writes them, in float64, one line each."""
    lr = params.get("lr", 1.0 if name in ("fedavg", "fedavgm") else 1e-2)
    beta = params.get("momentum", 0.9)
    b1 = params.get("beta1", 0.9)
    b2 = params.get("beta2", 0.99)
    tau = params.get("tau", 1e-3)
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.full_like(w, tau**2)
    for d in (x.astype(np.float64) for x in deltas):
        if name == "fedavg":
            w = w + lr * d
            continue
        if name == "fedavgm":
            m = beta * m + d
            w = w + lr * m
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d**2
        elif name == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        w = w + lr * m / (np.sqrt(v) + tau)
    return w


def problem(
    dtype: type, steps: int = 5, seed: int = 0
) -> tuple[dict[str, Arr], list[dict[str, Arr]]]:
    rng = np.random.default_rng(seed)
    weights: dict[str, Arr] = {
        "w": rng.normal(size=(4, 3)).astype(dtype),
        "b": rng.normal(size=3).astype(dtype),
    }
    deltas: list[dict[str, Arr]] = [
        {k: np.asarray(rng.normal(size=v.shape) * 0.1).astype(dtype) for k, v in weights.items()}
        for _ in range(steps)
    ]
    return weights, deltas


def run(
    opt: ServerOptimizer, weights: dict[str, Arr], deltas: list[dict[str, Arr]]
) -> dict[str, Arr]:
    for delta in deltas:
        weights = opt.step(weights, delta)
    return weights


NON_DEFAULT: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 0.7},
    "fedavgm": {"lr": 0.7, "momentum": 0.5},
    "fedadam": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 1e-2},
    "fedyogi": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 1e-2},
    "fedadagrad": {"lr": 0.05, "beta1": 0.8, "tau": 1e-2},
}


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
@pytest.mark.parametrize("params", ["defaults", "custom"])
def test_matches_the_formulas_over_several_steps(name: str, params: str) -> None:
    kwargs = NON_DEFAULT[name] if params == "custom" else {}
    weights, deltas = problem(np.float64, steps=6)
    got = run(make_server_optimizer(name, **kwargs), weights, deltas)
    for key in weights:
        want = reference(name, kwargs, weights[key], [d[key] for d in deltas])
        np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_float32_in_float32_out_and_state(name: str) -> None:
    weights, deltas = problem(np.float32, steps=4)
    opt = make_server_optimizer(name)
    got = run(opt, weights, deltas)
    for key in weights:
        assert got[key].dtype == np.float32
        want = reference(name, {}, weights[key], [d[key] for d in deltas])
        np.testing.assert_allclose(got[key], want, rtol=2e-5, atol=1e-6)
    for key, value in opt.state_dict().items():
        if key != "step":
            assert value.dtype == np.float32, key


def test_fedadam_by_hand() -> None:
    """Two steps of FedAdam with the defaults on one number, written out."""
    opt = FedAdam()
    w = {"x": np.array([1.0])}
    d = {"x": np.array([0.5])}
    w = opt.step(w, d)
    m1 = 0.1 * 0.5  # β1·0 + (1−β1)·Δ
    v1 = 0.99 * 1e-6 + 0.01 * 0.25  # β2·τ² + (1−β2)·Δ²
    x1 = 1.0 + 0.01 * m1 / (math.sqrt(v1) + 1e-3)
    assert w["x"][0] == pytest.approx(x1, rel=1e-14)
    w = opt.step(w, d)
    m2 = 0.9 * m1 + 0.1 * 0.5
    v2 = 0.99 * v1 + 0.01 * 0.25
    assert w["x"][0] == pytest.approx(x1 + 0.01 * m2 / (math.sqrt(v2) + 1e-3), rel=1e-14)


def test_fedyogi_sign_rule_by_hand() -> None:
    """Yogi's v rises by (1−β2)Δ² when Δ² > v and falls by (1−β2)Δ² when Δ² < v (Adam would
    move by (1−β2)(Δ² − v) instead): τ = 0.1 so v₀ = τ² = 0.01, β1 = 0, β2 = 0.5, η = 1."""
    yogi = FedYogi(lr=1.0, beta1=0.0, beta2=0.5, tau=0.1)
    adam = FedAdam(lr=1.0, beta1=0.0, beta2=0.5, tau=0.1)
    w = {"x": np.array([0.0])}
    # Step 1: Δ² = 0.04 > v₀ = 0.01, sign(v − Δ²) = −1: v₁ = 0.01 + 0.5·0.04 = 0.03.
    w1 = yogi.step(w, {"x": np.array([0.2])})
    assert yogi.state_dict()["v/x"][0] == pytest.approx(0.03, rel=1e-14)
    assert w1["x"][0] == pytest.approx(0.2 / (math.sqrt(0.03) + 0.1), rel=1e-14)
    adam.step(w, {"x": np.array([0.2])})
    assert adam.state_dict()["v/x"][0] == pytest.approx(0.025, rel=1e-14)  # 0.5·0.01 + 0.5·0.04
    # Step 2: Δ² = 0.01 < v₁ = 0.03, sign = +1: v₂ = 0.03 − 0.5·0.01 = 0.025.
    w2 = yogi.step(w1, {"x": np.array([0.1])})
    assert yogi.state_dict()["v/x"][0] == pytest.approx(0.025, rel=1e-14)
    assert w2["x"][0] == pytest.approx(w1["x"][0] + 0.1 / (math.sqrt(0.025) + 0.1), rel=1e-14)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_second_moment_starts_at_tau_squared(cls: type[AdaptiveServerOptimizer]) -> None:
    opt = cls(tau=0.05)
    # A zero delta leaves Yogi's and Adagrad's v at v₀ and scales Adam's by β2.
    opt.step({"x": np.zeros(3)}, {"x": np.zeros(3)})
    decay = 0.99 if cls is FedAdam else 1.0
    np.testing.assert_allclose(opt.state_dict()["v/x"], decay * 0.05**2, rtol=1e-15)
    # and the first real step divides by sqrt(v) + τ with that v.
    opt = cls(tau=0.05)
    new = opt.step({"x": np.zeros(1)}, {"x": np.array([1e-3])})
    v = opt.state_dict()["v/x"][0]
    assert new["x"][0] == pytest.approx(0.01 * 0.1 * 1e-3 / (math.sqrt(v) + 0.05), rel=1e-13)


def test_no_bias_correction() -> None:
    """Adam's bias correction would divide m by 1−β1 and v by 1−β2; Reddi et al. do not.
    β1 = 0.9, β2 = 0.5, Δ = 1: uncorrected step ≈ η·0.1/0.707, corrected ≈ η·1/1."""
    new = FedAdam(beta2=0.5).step({"x": np.zeros(1)}, {"x": np.ones(1)})
    v = 0.5 * 1e-6 + 0.5
    uncorrected = 0.01 * 0.1 / (math.sqrt(v) + 1e-3)
    corrected = 0.01 * (0.1 / 0.1) / (math.sqrt(v / 0.5) + 1e-3)
    assert new["x"][0] == pytest.approx(uncorrected, rel=1e-13)
    assert corrected > 5 * uncorrected


def test_fedavgm_momentum_accumulates_undamped_deltas() -> None:
    """m_t = β·m_{t−1} + Δ_t (not (1−β)·Δ): constant Δ = 1, β = 0.5, η = 1 → steps 1, 1.5, 1.75."""
    opt = FedAvgM(lr=1.0, momentum=0.5)
    w: dict[str, Arr] = {"x": np.zeros(1)}
    positions = []
    for _ in range(3):
        w = opt.step(w, {"x": np.ones(1)})
        positions.append(w["x"][0])
    assert positions == pytest.approx([1.0, 2.5, 4.25], rel=1e-15)


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_read_only_inputs_are_read_not_written(name: str) -> None:
    weights, deltas = problem(np.float32, steps=3)
    for arrays in [weights, *deltas]:
        for array in arrays.values():
            array.flags.writeable = False
    before = [{k: v.copy() for k, v in d.items()} for d in [weights, *deltas]]
    opt = make_server_optimizer(name)
    new = run(opt, weights, deltas)
    for original, copy in zip([weights, *deltas], before, strict=True):
        for key in original:
            np.testing.assert_array_equal(original[key], copy[key])
    for key in new:
        assert new[key].flags.writeable
        assert not np.shares_memory(new[key], weights[key])


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
@pytest.mark.parametrize("through_codec", [False, True])
def test_state_round_trip_resumes_exactly(name: str, through_codec: bool) -> None:
    weights, deltas = problem(np.float32, steps=6)
    straight = make_server_optimizer(name, **NON_DEFAULT[name])
    expected = run(straight, weights, deltas)

    first = make_server_optimizer(name, **NON_DEFAULT[name])
    middle = run(first, weights, deltas[:3])
    state = first.state_dict()
    if through_codec:
        state = decode_tensors(encode_tensors(state))
        middle = decode_tensors(encode_tensors(middle))  # read-only views, as a checkpoint gives
    else:
        state = {k: v.copy() for k, v in state.items()}
    resumed = make_server_optimizer(name, **NON_DEFAULT[name])
    resumed.load_state_dict(state)
    assert resumed.steps == 3
    got = run(resumed, middle, deltas[3:])
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert resumed.steps == straight.steps == 6


def test_state_dict_is_codec_ready_before_the_first_step() -> None:
    state = FedAdam().state_dict()
    assert list(state) == ["step"]
    assert int(decode_tensors(encode_tensors(state))["step"]) == 0


def test_load_state_dict_refuses_what_does_not_fit() -> None:
    opt = FedAdam()
    with pytest.raises(ValueError, match="lacks 'step'"):
        opt.load_state_dict({})
    with pytest.raises(ValueError, match="not 'step' or one of"):
        opt.load_state_dict({"step": np.array(1), "q/x": np.zeros(2)})
    with pytest.raises(ValueError, match="same tensors"):
        opt.load_state_dict({"step": np.array(1), "m/x": np.zeros(2)})
    with pytest.raises(ValueError, match="shapes disagree"):
        opt.load_state_dict({"step": np.array(1), "m/x": np.zeros(2), "v/x": np.zeros(3)})
    opt.load_state_dict({"step": np.array(1), "m/x": np.zeros(2), "v/x": np.ones(2)})
    with pytest.raises(ValueError, match="state 'm' holds tensors"):
        opt.step({"y": np.zeros(2)}, {"y": np.zeros(2)})
    with pytest.raises(ValueError, match="state m/x: shape"):
        opt.step({"x": np.zeros(4)}, {"x": np.zeros(4)})


def test_step_refuses_a_delta_that_does_not_match() -> None:
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        FedAvg().step({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1), "c": np.zeros(1)})
    with pytest.raises(ValueError, match="delta shape"):
        FedAvg().step({"a": np.zeros(2)}, {"a": np.zeros(3)})


def test_factory_builds_each_by_name_with_defaults() -> None:
    assert isinstance(make_server_optimizer("FedAvg"), FedAvg)
    assert make_server_optimizer("fedavg").hyperparameters() == {"lr": 1.0}
    assert make_server_optimizer("fedavgm").hyperparameters() == {"lr": 1.0, "momentum": 0.9}
    defaults = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert make_server_optimizer("fedadam").hyperparameters() == defaults
    assert make_server_optimizer("fedyogi").hyperparameters() == defaults
    assert make_server_optimizer("fedadagrad").hyperparameters() == {
        "lr": 1e-2,
        "beta1": 0.9,
        "tau": 1e-3,
    }
    assert repr(make_server_optimizer("fedavg", lr=0.5)) == "FedAvg(lr=0.5)"


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedsgd", {}, "unknown server optimizer 'fedsgd'; known: fedadagrad, fedadam"),
        ("fedadagrad", {"beta2": 0.9}, "fedadagrad: unknown parameter beta2; accepted: lr, beta1"),
        ("fedavg", {"momentum": 0.9, "x": 1}, "unknown parameters momentum, x"),
        ("fedadam", {"beta1": 1.0}, r"beta1: expected a finite value in \[0.0, 1.0\), got 1.0"),
        ("fedavg", {"lr": 0}, r"lr: expected a finite value in \(0.0, inf\]"),
        ("fedavg", {"lr": float("nan")}, "lr: expected a finite value"),
        ("fedyogi", {"tau": -1e-3}, "tau: expected a finite value"),
        ("fedavgm", {"momentum": True}, "momentum: expected a number, got True"),
        ("fedadam", {"tau": "1e-3"}, "YAML reads 1e-3 as a string"),
    ],
)
def test_factory_errors_are_clear(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_server_optimizer(name, **params)


@given(
    name=st.sampled_from(sorted(SERVER_OPTIMIZERS)),
    deltas=st.lists(
        st.lists(st.floats(-10, 10, allow_subnormal=False), min_size=3, max_size=3),
        min_size=1,
        max_size=8,
    ),
)
def test_any_delta_sequence_follows_the_formulas(name: str, deltas: list[list[float]]) -> None:
    w0 = np.array([0.3, -1.0, 2.0])
    seq = [np.array(d) for d in deltas]
    opt = make_server_optimizer(name)
    w: dict[str, Arr] = {"x": w0}
    for d in seq:
        w = opt.step(w, {"x": d})
    np.testing.assert_allclose(w["x"], reference(name, {}, w0, seq), rtol=1e-9, atol=1e-12)
