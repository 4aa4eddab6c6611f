"""Staleness weightings: FedBuff's 1/sqrt(1+τ) (Nguyen et al. 2022) and FedAsync's constant and
polynomial (1+τ)^−a (Xie et al. 2019), with an optional bound."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learning.staleness import Staleness, make_staleness


@given(st.integers(0, 10_000))
def test_sqrt_is_fedbuffs_rule_and_polynomial_half_agrees(tau: int) -> None:
    assert Staleness().weight(tau) == 1 / math.sqrt(1 + tau)
    assert make_staleness("polynomial", exponent=0.5)(tau) == pytest.approx(1 / math.sqrt(1 + tau))
    assert make_staleness("constant")(tau) == 1.0
    assert make_staleness("polynomial", exponent=2)(tau) == pytest.approx((1 + tau) ** -2.0)


@given(st.integers(0, 1000), st.floats(0.01, 4))
def test_weights_are_in_0_1_and_non_increasing(tau: int, a: float) -> None:
    for s in (Staleness(), Staleness(kind="polynomial", exponent=a)):
        assert 0 < s(tau + 1) <= s(tau) <= s(0) == 1.0


def test_max_staleness_bounds_inclusively() -> None:
    s = make_staleness("sqrt", max_staleness=3)
    assert not s.too_stale(3)
    assert s.too_stale(4)
    assert not Staleness().too_stale(10**9)
    assert Staleness(max_staleness=0).too_stale(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "hinge"},
            "unknown staleness weighting 'hinge'; known: sqrt, constant, polynomial",
        ),
        ({"name": "polynomial", "exponent": 0}, "exponent: expected a finite value > 0"),
        ({"name": "polynomial", "exponent": "1"}, "exponent: expected a number"),
        ({"max_staleness": -1}, "max_staleness: expected a value ≥ 0"),
        ({"max_staleness": 2.5}, "max_staleness: expected an integer or None"),
    ],
)
def test_bad_settings_are_refused_clearly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_staleness(**kwargs)


def test_negative_staleness_is_an_error() -> None:
    with pytest.raises(ValueError, match="staleness must be ≥ 0"):
        Staleness().weight(-1)
