"""Baking kept weights into a job's inference graph: the digits MLP, checked against numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from agent.protocol.codec import decode_tensors
from coordinator.onnx_model import ModelExportError, smoke_test, with_weights

DIGITS = Path(__file__).resolve().parents[2] / "agent" / "learning" / "assets" / "digits"
Array = npt.NDArray[Any]


def mlp(weights: dict[str, Array], x: Array) -> Array:
    """The digits MLP's forward pass: fc1 → ReLU → fc2 (torch.nn.Linear: x @ W.T + b)."""
    hidden = np.maximum(x @ weights["fc1.weight"].T + weights["fc1.bias"], 0.0)
    out: Array = hidden @ weights["fc2.weight"].T + weights["fc2.bias"]
    return out


def run(model: bytes, x: Array) -> Array:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {"x": x})
    return np.asarray(logits)


@pytest.fixture(scope="module")
def inference() -> bytes:
    return (DIGITS / "inference.onnx").read_bytes()


@pytest.fixture(scope="module")
def initial() -> dict[str, Array]:
    return dict(decode_tensors((DIGITS / "initial.tensors").read_bytes()))


def trained(initial: dict[str, Array], seed: int = 1) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in initial.items()}


def test_the_weights_replace_the_initializers(inference: bytes, initial: dict[str, Array]) -> None:
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    before = run(inference, x)
    np.testing.assert_allclose(before, mlp(initial, x), rtol=1e-4, atol=1e-5)
    weights = trained(initial)
    model = with_weights(inference, weights, metadata={"ember.version": "7"})
    after = run(model, x)
    np.testing.assert_allclose(after, mlp(weights, x), rtol=1e-4, atol=1e-5)
    assert not np.allclose(after, before, atol=1e-2)
    loaded = onnx.load_from_string(model)
    assert [i.name for i in loaded.graph.initializer] == list(initial)  # same order, no extras
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props["ember.version"] == "7"
    assert props["ember.graph"] == "inference"  # the graph's own metadata is kept
    onnx.checker.check_model(loaded)
    assert smoke_test(model).outputs == {"logits": (1, 10)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda w: {**w, "fc3.weight": np.zeros((2, 2), np.float32)},
            "not initializers of the graph: fc3.weight",
        ),
        (
            lambda w: {k: v for k, v in w.items() if k != "fc2.bias"},
            "parameters of the graph without weights: fc2.bias",
        ),
        (
            lambda w: {**w, "fc1.weight": w["fc1.weight"][:, :32]},
            "fc1.weight: the graph has float32[128, 64], the weights float32[128, 32]",
        ),
        (
            lambda w: {**w, "fc2.bias": w["fc2.bias"].astype(np.float64)},
            "fc2.bias: the graph has float32[10], the weights float64[10]",
        ),
        (
            lambda w: {**w, "fc2.bias": np.full(10, np.nan, np.float32)},
            "fc2.bias: non-finite values",
        ),
    ],
)
def test_weights_that_do_not_fit_are_refused_with_the_reason(
    inference: bytes, initial: dict[str, Array], change: Any, reason: str
) -> None:
    with pytest.raises(ModelExportError) as caught:
        with_weights(inference, change(initial))
    assert str(caught.value) == f"weights do not fit the inference graph: {reason}"


def test_every_problem_is_named_at_once(inference: bytes, initial: dict[str, Array]) -> None:
    weights = {k.replace("fc", "layer"): v for k, v in initial.items()}
    with pytest.raises(ModelExportError) as caught:
        with_weights(inference, weights)
    message = str(caught.value)
    assert "not initializers of the graph: layer1.bias, layer1.weight" in message
    assert "parameters of the graph without weights: fc1.bias, fc1.weight" in message


def test_an_unreadable_graph_is_refused() -> None:
    with pytest.raises(ModelExportError, match="not a readable ONNX model"):
        with_weights(b"inference graph", {})
    with pytest.raises(ModelExportError, match="onnxruntime cannot load the model"):
        smoke_test(b"\x00not onnx")
