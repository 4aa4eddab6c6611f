"""The demo's data split: disjoint, complete, label-skewed, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.demo.data import dirichlet_shards, holdout_split, load_digits_scaled


def test_digits_split_is_disjoint_complete_and_skewed() -> None:
    x, y = load_digits_scaled()
    assert x.dtype == np.float32
    assert 0.0 <= x.min() <= x.max() <= 1.0
    train, test = holdout_split(x, y, 0.2, seed=0)
    assert len(train.y) + len(test.y) == len(y)
    assert set(np.unique(test.y)) == set(range(10))
    shards = dirichlet_shards(train, clients=6, alpha=0.5, seed=0)
    assert sum(len(s.y) for s in shards) == len(train.y)
    assert min(len(s.y) for s in shards) >= 20
    rows = {tuple(r) for s in shards for r in np.c_[s.x, s.y]}
    assert len(rows) == len({tuple(r) for r in np.c_[train.x, train.y]})
    # Non-IID: each shard's most common class is far above the 10 % of a uniform split.
    top_share = [np.bincount(s.y, minlength=10).max() / len(s.y) for s in shards]
    assert np.mean(top_share) > 0.25
    again = dirichlet_shards(train, clients=6, alpha=0.5, seed=0)
    assert all(np.array_equal(a.y, b.y) for a, b in zip(shards, again, strict=True))


def test_impossible_splits_say_why() -> None:
    x, y = load_digits_scaled()
    train, _ = holdout_split(x, y, 0.2, seed=0)
    with pytest.raises(ValueError, match="cannot give 1000 clients 20 each"):
        dirichlet_shards(train, clients=1000, alpha=0.5, seed=0)
