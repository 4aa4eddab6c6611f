"""The torch backend against the onnxruntime backend: same batches, same hyper-parameters,
same deltas; for the demo MLP (its shipped graphs) and the small CNN (exported here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agent.learning.assets import load_demo_model  # noqa: E402
from agent.learning.backend import ExportedModel, HyperParams, ModelFormatError  # noqa: E402
from agent.learning.onnx_backend import OnnxBackend  # noqa: E402
from agent.learning.torch_backend import TorchBackend, torch_available  # noqa: E402
from coordinator.demo.model import Net, SmallCNN  # noqa: E402
from coordinator.export import export_eval, export_train_step, model_spec  # noqa: E402

# Twenty steps of float32 SGD with momentum in two runtimes: observed gaps are ~1e-7.
ATOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Any, ExportedModel]]:
    torch.manual_seed(1)
    cnn = SmallCNN()
    spec = model_spec(cnn, (1, 8, 8), "cross_entropy")
    exported = ExportedModel(  # no inference graph: trainers do without one
        spec=spec,
        train_step=export_train_step(cnn, spec),
        eval_step=export_eval(cnn, spec),
        inference=None,
        initial_params={k: v.detach().numpy().copy() for k, v in cnn.named_parameters()},
    )
    return {"mlp": (Net(), load_demo_model()), "cnn": (cnn, exported)}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    return (x[:600] / 16).astype(np.float32), y[:600]


HYPERS = {
    "sgd": HyperParams(lr=0.1, local_steps=20, batch_size=32),
    "fedprox": HyperParams(
        lr=0.05, momentum=0.9, weight_decay=1e-4, mu=0.1, local_steps=20, batch_size=32, seed=4
    ),
    "feddyn": HyperParams(lr=0.05, mu=0.01, local_steps=20, batch_size=25, seed=5),
}


@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_deltas_match_the_onnx_backend(
    models: dict[str, tuple[Any, ExportedModel]], digits: tuple, name: str, hyper: str
) -> None:
    module, model = models[name]
    onnx, eager = OnnxBackend(model), TorchBackend(module, model.spec)
    x, y = digits
    start = model.initial_params
    rng = np.random.default_rng(0)
    # Start away from the anchor, as a client does after an earlier round.
    params = {
        k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()
    }
    kw: dict[str, Any] = {"anchor": start}
    if hyper == "feddyn":
        kw["correction"] = {
            k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()
        }
    a = onnx.train(params, x, y, HYPERS[hyper], **kw)
    b = eager.train(params, x, y, HYPERS[hyper], **kw)
    assert (a.steps, a.samples) == (b.steps, b.samples) == (20, 20 * HYPERS[hyper].batch_size)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    # Oort's per-sample losses: Σ loss² over every sample the run visited, in both runtimes.
    assert a.loss_sq_sum is not None
    assert b.loss_sq_sum is not None
    assert a.loss_sq_sum == pytest.approx(b.loss_sq_sum, rel=1e-4)
    assert a.loss_sq_sum >= a.samples * a.loss**2 * (1 - 1e-4)  # mean of squares ≥ square of mean
    for k in start:
        delta_a, delta_b = a.params[k] - params[k], b.params[k] - params[k]
        assert np.abs(delta_b).max() > 1e-4, f"{k} did not move"
        np.testing.assert_allclose(delta_a, delta_b, rtol=0, atol=ATOL, err_msg=k)


def test_evaluation_matches(models: dict[str, tuple[Any, ExportedModel]], digits: tuple) -> None:
    module, model = models["cnn"]
    x, y = digits
    a = OnnxBackend(model).evaluate(model.initial_params, x, y, batch_size=100)
    b = TorchBackend(module, model.spec).evaluate(model.initial_params, x, y, batch_size=64)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.accuracy == b.accuracy
    assert a.samples == b.samples == len(x)


def test_the_job_module_is_left_alone(
    models: dict[str, tuple[Any, ExportedModel]], digits: tuple
) -> None:
    module, model = models["mlp"]
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    TorchBackend(module, model.spec).train(
        model.initial_params, *digits, HyperParams(local_steps=3)
    )
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_module_that_does_not_fit_the_spec_is_refused(
    models: dict[str, tuple[Any, ExportedModel]],
) -> None:
    _, mlp = models["mlp"]
    with pytest.raises(ModelFormatError, match="SmallCNN parameters: missing"):
        TorchBackend(SmallCNN(), mlp.spec)
    with pytest.raises(ModelFormatError, match=r"fc1.weight: expected float32\[128, 64\]"):
        TorchBackend(Net(hidden=32), mlp.spec)


def test_torch_is_reported_available() -> None:
    assert torch_available()
