"""examples/synthetic_fedprox: the FedProx paper's Synthetic(α, β) generator (sizes, shapes,
heterogeneity, seeds) and the runner its README gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from examples.synthetic_fedprox.data import CLASSES, FEATURES, synthetic
from tests.examples.conftest import REPO, run_example


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


@pytest.mark.slow
def test_the_runner_prints_both_final_accuracies_and_plots(tmp_path: Path) -> None:
    """The README's command, on a smaller fleet: real agents, both jobs, the plot. FedAvg's
    job drops the stragglers' partial work, FedProx's keeps it."""
    out = run_example(
        tmp_path,
        str(REPO / "examples" / "synthetic_fedprox" / "run.py"),
        *("--devices", "10", "--rounds", "4", "--clients-per-round", "5"),
        *("--agents-per-process", "5", "--out", "out"),
    )
    for name in ("fedprox", "fedavg"):
        line = next(row for row in out.splitlines() if row.startswith(name))
        assert re.fullmatch(
            rf"{name}\s+final accuracy 0\.\d{{4}}  \(last 10 rounds 0\.\d{{4}}, "
            r"per-device mean 0\.\d{4}, 4 rounds, \d+ s\)",
            line,
        ), line
    assert re.search(r"FedProx ahead of FedAvg by [+-]0\.\d{4}", out)
    assert "plot: out/fedprox_vs_fedavg.png" in out
    assert (tmp_path / "out" / "fedprox_vs_fedavg.png").stat().st_size > 10_000
    fedprox, fedavg = (
        json.loads((tmp_path / "out" / name / "summary.json").read_text())
        for name in ("fedprox", "fedavg")
    )
    assert fedprox["updates_applied"] == 4 * 5  # partial work kept: every sampled device counts
    assert fedavg["updates_applied"] < 4 * 5  # dropped: the stragglers sampled contribute nothing
    assert fedprox["stragglers"] == fedavg["stragglers"] == 5


def test_the_shipped_model_is_model_py_exported() -> None:
    """``python examples/synthetic_fedprox/model.py`` rewrites model/ after a change."""
    pytest.importorskip("torch")
    from agent.learning.backend import ExportedModel, HyperParams
    from agent.learning.onnx_backend import OnnxBackend
    from examples.synthetic_fedprox.model import EXPORTED, LogisticRegression

    shipped = ExportedModel.read(EXPORTED)
    assert [(p.name, p.shape) for p in shipped.spec.params] == [
        ("linear.weight", (CLASSES, FEATURES)),
        ("linear.bias", (CLASSES,)),
    ]
    assert all(not v.any() for v in shipped.initial_params.values())  # zeros, as the paper
    from coordinator.export import export_model

    fresh = export_model(LogisticRegression(), LogisticRegression.input_shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, 40)
    hyper = HyperParams(lr=0.01, mu=1.0, local_steps=7, batch_size=10)
    a = OnnxBackend(shipped).train(shipped.initial_params, x, y, hyper)
    b = OnnxBackend(fresh).train(fresh.initial_params, x, y, hyper)
    for name in shipped.spec.names:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-6, atol=1e-7)
