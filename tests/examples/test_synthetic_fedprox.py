"""The FedProx paper's Synthetic(α, β) generator: sizes, shapes, heterogeneity, seeds."""

from __future__ import annotations

import numpy as np

from examples.synthetic_fedprox.data import CLASSES, FEATURES, synthetic


def test_shapes_sizes_and_split() -> None:
    devices = synthetic(1.0, 1.0, seed=3)
    assert len(devices) == 30
    for d in devices:
        n = len(d.y_train) + len(d.y_test)
        assert n >= 50
        assert len(d.y_train) == int(0.9 * n)
        assert d.x_train.shape == (len(d.y_train), FEATURES)
        assert d.x_train.dtype == np.float32
        assert d.y_train.dtype == np.int64
        assert d.y_train.min() >= 0
        assert d.y_train.max() < CLASSES
    sizes = [len(d.y_train) + len(d.y_test) for d in devices]
    assert max(sizes) > 5 * min(sizes)  # log-normal: a few devices hold most of the data


def test_seeded_and_heterogeneous() -> None:
    a, b = synthetic(1.0, 1.0, seed=7), synthetic(1.0, 1.0, seed=7)
    assert all(np.array_equal(x.x_train, y.x_train) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].x_train, synthetic(1.0, 1.0, seed=8)[0].x_train)

    # Non-IID: devices disagree on their majority class far more than IID devices do.
    def spread(devices: list) -> float:  # type: ignore[type-arg]
        hist = np.array(
            [np.bincount(d.y_train, minlength=CLASSES) / len(d.y_train) for d in devices]
        )
        return float(np.mean(np.std(hist, axis=0)))

    assert spread(a) > spread(synthetic(0.0, 0.0, iid=True, seed=7))
