"""Norm bound and clipping as guards around FedBuff and FedAvg rounds (Sun et al. 2019;
McMahan et al. 2018): what enters the aggregate, what is refused, and with which reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.learning.aggregation import ModelSpec, Status
from agent.learning.clipping import Measured, NormBound, NormClip, Rejection, norm_guards, screen
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator

ZERO = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}


def delta(a: tuple[float, float], b: float) -> dict[str, np.ndarray]:
    return {"a": np.array(a, np.float32), "b": np.array([b], np.float32)}


def test_clipping_scales_a_large_delta_to_the_bound_and_leaves_small_ones() -> None:
    agg = FedBuffAggregator(ZERO, buffer_size=2, guards=[NormClip(1.0)])
    big = agg.offer("big", 0, delta((3.0, 0.0), 4.0))  # norm 5: scaled by 1/5
    assert big.applied
    small = agg.offer("small", 0, delta((0.5, 0.0), 0.0))  # norm 0.5: as is
    assert small.version == 1
    # FedBuff divides by K = 2: ((0.6, 0) + (0.5, 0)) / 2 and (0.8 + 0) / 2.
    np.testing.assert_allclose(agg.weights["a"], [0.55, 0.0], rtol=1e-6)
    np.testing.assert_allclose(agg.weights["b"], [0.4], rtol=1e-6)
    assert agg.counters.rejected == 0


def test_clipping_in_sync_rounds_shrinks_the_delta_not_its_weight_in_the_mean() -> None:
    agg = SyncFedAvg(ZERO, guards=norm_guards(clip_norm=1.0))
    agg.start_round(["x", "y"])
    assert agg.offer("u1", 0, delta((10.0, 0.0), 0.0), num_samples=1, client="x").applied
    done = agg.offer("u2", 0, delta((0.0, 0.0), 1.0), num_samples=1, client="y")
    assert done.version == 1
    # Each delta clipped to norm 1 and averaged with weight 1/2: a clipped update is not
    # down-weighted (which would renormalise the clipping away).
    np.testing.assert_allclose(agg.weights["a"], [0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(agg.weights["b"], [0.5], rtol=1e-6)


def test_the_bound_rejects_before_clipping_and_counts_the_reason() -> None:
    agg = FedBuffAggregator(ZERO, buffer_size=5, guards=norm_guards(max_norm=4.0, clip_norm=1.0))
    out = agg.offer("u", 0, delta((3.0, 0.0), 4.0))
    assert out.status is Status.REJECTED
    assert out.code == "norm"
    assert out.reason == "update L2 norm 5 exceeds the bound 4; largest tensor 'b' has norm 4"
    assert agg.counters.rejected == 1
    assert agg.offer("v", 0, delta((2.0, 0.0), 0.0)).applied  # within the bound: clipped


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ({"a": np.zeros(2, np.float32)}, "names"),
        ({**ZERO, "c": np.zeros(1, np.float32)}, "names"),
        ({"a": np.zeros(2, np.float64), "b": np.zeros(1, np.float32)}, "dtype"),
        ({"a": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, "shape"),
        (delta((math.nan, 0.0), 0.0), "non_finite"),
        (delta((0.0, 0.0), math.inf), "non_finite"),
        ({"a": [0.0, 0.0], "b": np.zeros(1, np.float32)}, "structure"),
    ],
)
def test_rejections_carry_a_code(bad: dict[str, object], code: str) -> None:
    agg = FedBuffAggregator(ZERO, buffer_size=5, guards=[NormClip(1.0)])
    out = agg.offer("u", 0, bad)  # type: ignore[arg-type]
    assert (out.status, out.code) == (Status.REJECTED, code)
    assert out.reason


def test_guards_compose_in_order() -> None:
    update = Measured(10.0, "a", 10.0)
    assert screen([NormClip(5.0), NormClip(1.0)], update) == pytest.approx(0.1)
    # Clipping first brings the norm under the bound: the bound then sees the clipped norm.
    assert screen([NormClip(2.0), NormBound(3.0)], update) == pytest.approx(0.2)
    assert isinstance(screen([NormBound(3.0), NormClip(2.0)], update), Rejection)
    assert screen([], update) == 1.0
    assert NormClip(1.0).screen(Measured(0.0)) == 1.0


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, True])
def test_bad_bounds_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        NormClip(value)
    with pytest.raises(ValueError, match="max_norm"):
        NormBound(value)


def test_examine_measures_what_it_admits() -> None:
    spec = ModelSpec.of(ZERO)
    measured = spec.examine(delta((3.0, 0.0), 4.0))
    assert measured == Measured(5.0, "b", 4.0)
    assert spec.problem(delta((3.0, 0.0), 4.0), max_norm=5.0) is None


def test_the_job_spec_reaches_the_aggregators_guards() -> None:
    from agent.learning.plan import TrainingPlan
    from coordinator.spec import SpecError, parse_spec

    def spec(**algorithm: object) -> dict[str, object]:
        return {
            "name": "j",
            "model": {"onnx": "m/train_step.onnx"},
            "data": {"dataset": "d"},
            "algorithm": algorithm,
            "stop": {"max_versions": 1},
        }

    plan = TrainingPlan.from_config(parse_spec(spec(max_norm=10, clip_norm=2.5)).to_dict())
    assert (plan.max_norm, plan.clip_norm) == (10.0, 2.5)
    assert TrainingPlan.from_config(parse_spec(spec()).to_dict()).clip_norm is None
    with pytest.raises(SpecError, match="clip_norm"):
        parse_spec(spec(clip_norm=0))
