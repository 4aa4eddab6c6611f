"""The in-place scaled add every aggregator applies each update with."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.learning.arrays import BLOCK_ELEMENTS, new_scratch, scaled_add

SIZES = st.sampled_from(
    [1, 7, BLOCK_ELEMENTS - 1, BLOCK_ELEMENTS, BLOCK_ELEMENTS + 1, 3 * BLOCK_ELEMENTS + 5]
)


@settings(max_examples=30, deadline=None)
@given(
    size=SIZES,
    alpha=st.floats(-4.0, 4.0, allow_nan=False),
    acc_dtype=st.sampled_from([np.float32, np.float64]),
    x_dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_scaled_add_matches_numpy_across_block_edges(
    size: int, alpha: float, acc_dtype: type, x_dtype: type, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    acc = rng.standard_normal(size).astype(acc_dtype).reshape(-1, 1)
    x = rng.standard_normal(size).astype(x_dtype).reshape(-1, 1)
    x.flags.writeable = False  # received tensors are read-only views
    expected = acc + (x.astype(acc_dtype) * acc_dtype(alpha)).astype(acc_dtype)

    scaled_add(acc, alpha, x, new_scratch(acc_dtype))

    np.testing.assert_allclose(acc, expected, rtol=1e-6, atol=1e-6)


def test_scaled_add_by_one_is_a_plain_add() -> None:
    acc = np.arange(10, dtype=np.float32)
    scaled_add(acc, 1.0, np.ones(10, dtype=np.float32), new_scratch(np.float32))
    assert acc.tolist() == pytest.approx(list(range(1, 11)))
