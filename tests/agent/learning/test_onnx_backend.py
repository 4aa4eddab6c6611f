"""Training with onnxruntime alone, on the demo model shipped with the agent (no torch needed)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.learning.assets import DEMO_MODEL_DIR, load_demo_model
from agent.learning.backend import (
    ARTIFACTS,
    LOSS_SQ_SUM,
    MOMENTUM_BUFFER,
    NEW_MOMENTUM_BUFFER,
    NEW_PARAM,
    PARAM,
    ExportedModel,
    HyperParams,
    ModelFormatError,
    ModelSpec,
    batch_indices,
    read_graph_spec,
)
from agent.learning.onnx_backend import OnnxBackend
from agent.protocol.codec import decode_tensors, encode_tensors

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model() -> ExportedModel:
    return load_demo_model()


@pytest.fixture(scope="module")
def backend(model: ExportedModel) -> OnnxBackend:
    return OnnxBackend(model)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16).astype(np.float32), y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_importing_the_onnx_backend_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import agent.learning.onnx_backend, agent.learning.assets\n"
        "assert 'torch' not in sys.modules, 'agent.learning.onnx_backend imported torch'\n"
        "import agent.learning.torch_backend\n"
        "assert 'torch' not in sys.modules, 'agent.learning.torch_backend imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_shipped_demo_model_is_small_and_described(model: ExportedModel) -> None:
    total = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert total < 256 * 1024
    assert model.spec.names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert model.spec.input_shape == (64,)
    assert model.spec.loss == "cross_entropy"


def test_demo_model_learns_digits(
    backend: OnnxBackend, model: ExportedModel, digits: tuple
) -> None:
    x_train, y_train, x_test, y_test = digits
    before = backend.evaluate(model.initial_params, x_test, y_test)
    result = backend.train(
        model.initial_params,
        x_train,
        y_train,
        HyperParams(lr=0.1, momentum=0.9, local_epochs=5, batch_size=32),
    )
    after = backend.evaluate(result.params, x_test, y_test)
    assert result.steps == int(np.ceil(5 * 1400 / 32))
    assert result.samples == result.steps * 32
    assert before.accuracy is not None
    assert before.accuracy < 0.3
    assert after.accuracy is not None
    assert after.accuracy >= 0.93
    assert after.loss < before.loss
    assert after.samples == len(x_test)


def test_one_step_is_the_graph_applied_once(backend: OnnxBackend, model: ExportedModel) -> None:
    """A run of one step feeds the graph exactly: zero momentum buffers, anchor = params."""
    rng = np.random.default_rng(1)
    x = rng.random((5, 64), dtype=np.float32)
    y = rng.integers(0, 10, 5)
    hyper = HyperParams(lr=0.2, momentum=0.5, mu=0.3, local_steps=1, batch_size=5)
    result = backend.train(model.initial_params, x, y, hyper)
    (idx,) = batch_indices(5, hyper)
    session = ort.InferenceSession(model.train_step, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {"x": x[idx], "y": y[idx]}
    for k, v in model.initial_params.items():
        feeds |= {PARAM + k: v, MOMENTUM_BUFFER + k: np.zeros_like(v)}
        feeds |= {"anchor." + k: v, "correction." + k: np.zeros_like(v)}
    for name, value in (("lr", 0.2), ("momentum", 0.5), ("weight_decay", 0.0), ("mu", 0.3)):
        feeds[name] = np.array(value, np.float32)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    for k in model.spec.names:
        np.testing.assert_array_equal(result.params[k], out[NEW_PARAM + k])
    assert result.loss == pytest.approx(float(out["loss"]))
    assert all(np.any(out[NEW_MOMENTUM_BUFFER + k]) for k in model.spec.names)
    # Σ of the squared per-sample cross-entropies of the batch, recomputed from the logits.
    logits = backend_logits(model, x[idx])
    shifted = logits - logits.max(axis=1, keepdims=True)
    per_sample = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(5), y[idx]]
    assert float(out[LOSS_SQ_SUM]) == pytest.approx(float(np.sum(per_sample**2)), rel=1e-5)
    assert result.loss_sq_sum == pytest.approx(float(out[LOSS_SQ_SUM]))


def backend_logits(model: ExportedModel, x: np.ndarray) -> np.ndarray:
    """The demo model's logits for ``x`` at its initial weights (the inference graph)."""
    assert model.inference is not None
    session = ort.InferenceSession(model.inference, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    return np.asarray(logits, dtype=np.float64)


def test_a_graph_without_the_loss_square_output_still_trains(
    model: ExportedModel, tmp_path: Path
) -> None:
    """Train-step graphs exported before ``loss_sq_sum`` existed keep working; they report none."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load_from_string(model.train_step)
    kept = [o for o in proto.graph.output if o.name != LOSS_SQ_SUM]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    old = dataclasses.replace(model, train_step=proto.SerializeToString())
    rng = np.random.default_rng(2)
    x, y = rng.random((8, 64), dtype=np.float32), rng.integers(0, 10, 8)
    result = OnnxBackend(old).train(model.initial_params, x, y, HyperParams(local_steps=2))
    assert result.loss_sq_sum is None
    assert np.isfinite(result.loss)


def test_momentum_is_carried_across_the_steps_of_a_run(
    backend: OnnxBackend, model: ExportedModel, digits: tuple
) -> None:
    x, y = digits[0][:64], digits[1][:64]
    p = model.initial_params
    with_momentum = backend.train(p, x, y, HyperParams(momentum=0.9, local_steps=2))
    without = backend.train(p, x, y, HyperParams(momentum=0.0, local_steps=2))
    first = backend.train(p, x, y, HyperParams(momentum=0.9, local_steps=1))
    # The first step is the same either way (buffers start at zero); the second differs.
    np.testing.assert_allclose(
        first.params["fc2.bias"],
        backend.train(p, x, y, HyperParams(momentum=0.0, local_steps=1)).params["fc2.bias"],
        rtol=1e-6,
    )
    assert not np.allclose(with_momentum.params["fc2.bias"], without.params["fc2.bias"])


def test_proximal_term_and_correction(
    backend: OnnxBackend, model: ExportedModel, digits: tuple
) -> None:
    x, y = digits[0][:200], digits[1][:200]
    p = model.initial_params
    hyper = HyperParams(lr=0.1, mu=1.0, local_steps=20)
    # The anchor defaults to the starting point; zero correction is no correction.
    default = backend.train(p, x, y, hyper)
    explicit = backend.train(
        p, x, y, hyper, anchor=p, correction={k: np.zeros_like(v) for k, v in p.items()}
    )
    for k in p:
        np.testing.assert_array_equal(default.params[k], explicit.params[k])
    # A strong proximal pull keeps the run nearer its anchor than plain SGD does.
    plain = backend.train(p, x, y, HyperParams(lr=0.1, local_steps=20))

    def drift(params: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum((params[k] - p[k]) ** 2) for k in p))

    assert drift(default.params) < drift(plain.params)
    # A constant correction h adds h·lr per step to every weight (it is a constant gradient).
    h = {k: np.full_like(v, 0.01) for k, v in p.items()}
    tilted = backend.train(p, x, y, HyperParams(lr=0.1, local_steps=1), correction=h)
    base = backend.train(p, x, y, HyperParams(lr=0.1, local_steps=1))
    np.testing.assert_allclose(
        tilted.params["fc2.bias"] - base.params["fc2.bias"], 0.001, rtol=1e-3
    )


def test_batches_are_seeded_full_and_cover_every_sample() -> None:
    hyper = HyperParams(batch_size=8, local_steps=10, seed=3)
    batches = list(batch_indices(20, hyper))
    assert len(batches) == 10
    assert all(len(b) == 8 for b in batches)
    stream = np.concatenate(batches)
    assert sorted(stream[:20]) == list(range(20))  # epoch one: each sample once
    assert sorted(stream[20:40]) == list(range(20))
    again = np.concatenate(list(batch_indices(20, hyper)))
    np.testing.assert_array_equal(stream, again)
    other = np.concatenate(list(batch_indices(20, HyperParams(batch_size=8, local_steps=10))))
    assert not np.array_equal(stream, other)
    small = list(batch_indices(3, HyperParams(batch_size=32, local_steps=2)))
    assert [sorted(b) for b in small] == [[0, 1, 2], [0, 1, 2]]
    assert HyperParams(local_epochs=2.5, batch_size=10).steps_for(100) == 25


def test_evaluation_adds_up_across_batches(
    backend: OnnxBackend, model: ExportedModel, digits: tuple
) -> None:
    x, y = digits[2], digits[3]
    whole = backend.evaluate(model.initial_params, x, y)
    pieces = backend.evaluate(model.initial_params, x, y, batch_size=7)
    assert pieces.loss == pytest.approx(whole.loss, rel=1e-5)
    assert pieces.accuracy == whole.accuracy
    assert pieces.samples == whole.samples == len(x)


def test_read_only_decoded_params_and_threads(model: ExportedModel, digits: tuple) -> None:
    """Weights decoded off the wire are read-only views; they train as they are."""
    params = decode_tensors(encode_tensors(model.initial_params))
    assert not params["fc1.weight"].flags.writeable
    backend = OnnxBackend(model, intra_op_threads=2)
    result = backend.train(params, digits[0][:64], digits[1][:64], HyperParams(local_steps=2))
    assert result.steps == 2
    assert np.isfinite(result.loss)
    # An aggregator's float64 weights are cast, not refused.
    wide = {k: v.astype(np.float64) for k, v in params.items()}
    again = backend.train(wide, digits[0][:64], digits[1][:64], HyperParams(local_steps=2))
    for k in params:
        np.testing.assert_array_equal(again.params[k], result.params[k])


def test_mismatched_inputs_are_refused(backend: OnnxBackend, model: ExportedModel) -> None:
    p = dict(model.initial_params)
    x = np.zeros((4, 64), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ModelFormatError, match=r"params.fc1.bias: expected float32\[128\]"):
        backend.train(p | {"fc1.bias": np.zeros(3, np.float32)}, x, y, HyperParams())
    with pytest.raises(ModelFormatError, match=r"missing \['fc2.bias'\]"):
        backend.train({k: v for k, v in p.items() if k != "fc2.bias"}, x, y, HyperParams())
    with pytest.raises(ModelFormatError, match=r"fc2.bias: expected float32\[10\], got int64"):
        backend.train(p | {"fc2.bias": np.zeros(10, np.int64)}, x, y, HyperParams())
    with pytest.raises(ValueError, match=r"x: expected \(n, 64\)"):
        backend.train(p, np.zeros((4, 63), np.float32), y, HyperParams())
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\), got 0..10"):
        backend.train(p, x, np.array([0, 1, 2, 10]), HyperParams())
    with pytest.raises(ValueError, match="integer class labels"):
        backend.train(p, x, y.astype(np.float32), HyperParams())
    with pytest.raises(ValueError, match="hyper-parameter lr"):
        HyperParams(lr=0)


def test_artifacts_roundtrip_and_refusals(model: ExportedModel) -> None:
    artifacts = model.to_artifacts()
    assert set(artifacts) == set(ARTIFACTS.values())
    again = ExportedModel.from_artifacts(artifacts)
    assert again.spec == model.spec
    trainer = ExportedModel.from_artifacts(
        {k: v for k, v in artifacts.items() if k != "inference.onnx"} | {"other": b""}
    )
    assert trainer.inference is None
    assert "inference.onnx" not in trainer.to_artifacts()
    OnnxBackend(trainer)
    with pytest.raises(ModelFormatError, match="missing"):
        ExportedModel.from_artifacts({k: v for k, v in artifacts.items() if k != "eval.onnx"})
    swapped = artifacts | {"eval.onnx": artifacts["train_step.onnx"]}
    with pytest.raises(ModelFormatError, match="a train_step graph, not the eval graph"):
        ExportedModel.from_artifacts(swapped)
    with pytest.raises(ModelFormatError, match="not a loadable ONNX model"):
        read_graph_spec(b"\x08\x01junk", "train_step")
    with pytest.raises(ModelFormatError, match="initial_params"):
        ExportedModel.from_artifacts(
            artifacts | {"initial.tensors": encode_tensors({"fc1.weight": np.zeros(2, np.float32)})}
        )


def test_spec_metadata_roundtrip(model: ExportedModel) -> None:
    meta = model.spec.to_metadata("eval")
    assert ModelSpec.from_metadata(meta, graph="eval") == model.spec
    with pytest.raises(ModelFormatError, match="format"):
        ModelSpec.from_metadata(meta | {"ember.format": "99"})
    with pytest.raises(ModelFormatError, match="unknown loss"):
        ModelSpec.from_metadata(meta | {"ember.loss": "hinge"})


def test_the_wheel_ships_the_demo_model(tmp_path: Path) -> None:
    """``ember demo`` on a pip-installed agent finds its graphs: hatchling packs them."""
    wheel = pytest.importorskip("hatchling.builders.wheel")
    (path,) = wheel.WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    for artifact in ARTIFACTS.values():
        assert f"agent/learning/assets/digits/{artifact}" in names
