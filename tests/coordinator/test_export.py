"""The exported train step against torch eager (autograd + torch.optim.SGD), layer type by
layer type, at several batch sizes on one graph; the eval and inference graphs; the shipped demo
assets against a fresh export."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from agent.learning.assets import load_demo_model  # noqa: E402
from agent.learning.backend import (  # noqa: E402
    ANCHOR,
    CORRECTION,
    MOMENTUM_BUFFER,
    NEW_MOMENTUM_BUFFER,
    NEW_PARAM,
    PARAM,
    ExportedModel,
    ModelSpec,
    read_graph_spec,
)
from coordinator.export import (  # noqa: E402
    UnsupportedModelError,
    check_supported,
    export_demo,
    export_eval,
    export_model,
    export_train_step,
    model_spec,
)

Arrays = dict[str, np.ndarray]
BATCHES = (32, 7, 2, 1)
# float32 end to end: observed differences are ~1e-7; these bounds leave room, not slack.
ATOL, RTOL = 1e-5, 1e-5


@dataclass
class Case:
    """A model, its exported train step (and eval graph) and how to make inputs for it."""

    module: Any
    spec: ModelSpec
    train: ort.InferenceSession
    eval: ort.InferenceSession | None = None


def session(graph: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


def make_case(module: Any, input_shape: tuple[int, ...], loss: str, *, with_eval: bool) -> Case:
    spec = model_spec(module, input_shape, loss)  # type: ignore[arg-type]
    train = session(export_train_step(module, spec))
    ev = session(export_eval(module, spec)) if with_eval else None
    return Case(module, spec, train, ev)


def mlp() -> Any:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def mlp_mse() -> Any:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def conv_a() -> Any:
    """Conv stride 1 (first: no grad-input), stride 2 on an even size (output padding 1),
    group norm, a dilated padded stride-1 conv (grad-input), max-pool dropping a row, flatten."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 4×10×10
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),  # 6×5×5
        nn.GroupNorm(3, 6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2),  # 6×5×5
        nn.MaxPool2d(2),  # 6×2×2
        nn.Flatten(),
        nn.Linear(24, 5),
    )


def conv_b() -> Any:
    """Rectangular kernel with per-axis stride and padding, plain stride-1 conv, padded
    average pooling, layer norm over three axes."""
    return nn.Sequential(
        nn.Conv2d(1, 4, (3, 2), stride=(2, 1), padding=(1, 0)),  # 4×5×8
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),  # 4×5×8
        nn.AvgPool2d(3, stride=2, padding=1),  # 4×3×4
        nn.LayerNorm([4, 3, 4]),
        nn.Flatten(),
        nn.Linear(48, 5),
    )


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    torch.manual_seed(0)
    return {
        "mlp": make_case(mlp(), (12,), "cross_entropy", with_eval=False),
        "mlp_mse": make_case(mlp_mse(), (6,), "mse", with_eval=True),
        "conv_a": make_case(conv_a(), (2, 10, 10), "cross_entropy", with_eval=True),
        "conv_b": make_case(conv_b(), (1, 9, 9), "cross_entropy", with_eval=False),
    }


# -- helpers --------------------------------------------------------------------------------------


def params_of(module: Any) -> Arrays:
    return {k: v.detach().numpy().copy() for k, v in module.named_parameters()}


def random_like(params: Arrays, seed: int, scale: float = 0.1) -> Arrays:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}


def batch(spec: ModelSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    if spec.loss == "cross_entropy":
        y = rng.integers(0, spec.output_shape[0], n).astype(np.int64)
    else:
        y = rng.standard_normal((n, *spec.output_shape)).astype(np.float32)
    return x, y


@dataclass
class Step:
    loss: float
    params: Arrays
    buffers: Arrays


def graph_step(
    case: Case,
    params: Arrays,
    x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    buffers: Arrays | None = None,
    anchor: Arrays | None = None,
    correction: Arrays | None = None,
) -> Step:
    names = case.spec.names
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    feeds: dict[str, np.ndarray] = {"x": x, "y": y}
    for k in names:
        feeds[PARAM + k] = params[k]
        feeds[MOMENTUM_BUFFER + k] = (buffers or zeros)[k]
        feeds[ANCHOR + k] = (anchor or params)[k]
        feeds[CORRECTION + k] = (correction or zeros)[k]
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        feeds[name] = np.array(value, np.float32)
    feeds["mu"] = np.array(mu, np.float32)
    names_out = [o.name for o in case.train.get_outputs()]
    out = dict(zip(names_out, case.train.run(None, feeds), strict=True))
    return Step(
        float(out["loss"]),
        {k: out[NEW_PARAM + k] for k in names},
        {k: out[NEW_MOMENTUM_BUFFER + k] for k in names},
    )


def torch_step(
    case: Case,
    params: Arrays,
    x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    buffers: Arrays | None = None,
    anchor: Arrays | None = None,
    correction: Arrays | None = None,
) -> tuple[Step, Arrays]:
    """One step of torch eager: the objective's gradient by autograd, then torch.optim.SGD."""
    model = copy.deepcopy(case.module)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(torch.from_numpy(params[k]))
    opt = torch.optim.SGD(named.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if buffers is not None:
        for k, p in named.items():
            opt.state[p]["momentum_buffer"] = torch.from_numpy(buffers[k].copy())
    out = model(torch.from_numpy(x))
    target = torch.from_numpy(y)
    data = (
        F.cross_entropy(out, target)
        if case.spec.loss == "cross_entropy"
        else F.mse_loss(out, target)
    )
    objective = data
    if mu:
        objective = objective + mu / 2 * sum(
            ((p - torch.from_numpy((anchor or params)[k])) ** 2).sum() for k, p in named.items()
        )
    if correction is not None:
        objective = objective - sum(
            (p * torch.from_numpy(correction[k])).sum() for k, p in named.items()
        )
    objective.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in named.items()}
    opt.step()
    new_buffers = (
        {k: opt.state[p]["momentum_buffer"].numpy().copy() for k, p in named.items()}
        if momentum
        else {}
    )
    return Step(float(data.detach()), params_of(model), new_buffers), grads


def assert_close(actual: Arrays, expected: Arrays, what: str) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(
            actual[k], expected[k], rtol=RTOL, atol=ATOL, err_msg=f"{what} {k}"
        )


# -- the train step -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "conv_a", "conv_b"])
def test_gradients_match_torch_at_every_batch_size(cases: dict[str, Case], name: str) -> None:
    """With momentum 0 the new momentum buffer is the gradient itself: compare it with autograd
    on one graph at batch 32, 7, 2 and 1 (the batch axis is dynamic)."""
    case = cases[name]
    params = params_of(case.module)
    for i, n in enumerate(BATCHES):
        x, y = batch(case.spec, n, seed=i)
        got = graph_step(case, params, x, y)
        want, grads = torch_step(case, params, x, y)
        assert got.loss == pytest.approx(want.loss, rel=1e-6, abs=1e-6), f"batch {n}"
        assert_close(got.buffers, grads, f"batch {n} gradient")
        assert_close(got.params, want.params, f"batch {n} parameter")


def test_gradient_keeps_its_one_over_n(cases: dict[str, Case]) -> None:
    """The trap in REFERENCES.md: a mean-reduced loss exported with a gradient N times too big
    (32× at batch 32) while the loss value is right. Checked as a ratio so it reads plainly."""
    case = cases["mlp"]
    params = params_of(case.module)
    x, y = batch(case.spec, 32, seed=7)
    got = graph_step(case, params, x, y)
    _, grads = torch_step(case, params, x, y)
    ratio = np.linalg.norm(got.buffers["0.weight"]) / np.linalg.norm(grads["0.weight"])
    assert ratio == pytest.approx(1.0, abs=1e-4), f"exported gradient is {ratio:.2f}× torch's"


def test_momentum_and_weight_decay_over_several_steps(cases: dict[str, Case]) -> None:
    """Buffers fed back step after step, batches of changing size, against one stateful
    torch.optim.SGD; the first step starts from zero buffers as torch's does from none."""
    case = cases["conv_a"]
    module = copy.deepcopy(case.module)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    params = params_of(module)
    buffers = {k: np.zeros_like(v) for k, v in params.items()}
    for i, n in enumerate((32, 7, 2, 32)):
        x, y = batch(case.spec, n, seed=10 + i)
        got = graph_step(
            case, params, x, y, lr=0.05, momentum=0.9, weight_decay=1e-3, buffers=buffers
        )
        opt.zero_grad()
        F.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
        params, buffers = got.params, got.buffers
        assert_close(params, params_of(module), f"step {i}")
        assert_close(
            buffers,
            {k: opt.state[p]["momentum_buffer"].numpy() for k, p in module.named_parameters()},
            f"step {i} momentum buffer",
        )
    assert any(np.abs(b).max() > 0 for b in buffers.values())


@pytest.mark.parametrize("name", ["mlp", "conv_b"])
def test_fedprox_term_matches_torch(cases: dict[str, Case], name: str) -> None:
    """(mu/2)·‖w − anchor‖² with the anchor away from the parameters, as in FedProx's later
    local steps; momentum and weight decay on at the same time."""
    case = cases[name]
    params = params_of(case.module)
    anchor = {
        k: v + d for (k, v), d in zip(params.items(), random_like(params, 1).values(), strict=True)
    }
    buffers = random_like(params, 2)
    x, y = batch(case.spec, 7, seed=3)
    kw: dict[str, Any] = {
        "mu": 0.5,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "anchor": anchor,
        "buffers": buffers,
    }
    got = graph_step(case, params, x, y, **kw)
    want, _ = torch_step(case, params, x, y, **kw)
    assert_close(got.params, want.params, "parameter")
    assert_close(got.buffers, want.buffers, "momentum buffer")
    plain = graph_step(case, params, x, y, momentum=0.9, weight_decay=1e-3, buffers=buffers)
    assert any(not np.allclose(plain.params[k], got.params[k]) for k in params), "mu ignored"


@pytest.mark.parametrize("name", ["mlp_mse", "conv_a"])
def test_feddyn_correction_matches_torch(cases: dict[str, Case], name: str) -> None:
    """FedDyn's client objective: L(w) − ⟨h, w⟩ + (α/2)·‖w − θ^{t−1}‖², gradient checked."""
    case = cases[name]
    params = params_of(case.module)
    anchor = {
        k: v + d for (k, v), d in zip(params.items(), random_like(params, 4).values(), strict=True)
    }
    correction = random_like(params, 5, scale=0.05)
    x, y = batch(case.spec, 32, seed=6)
    kw: dict[str, Any] = {"mu": 0.1, "anchor": anchor, "correction": correction}
    got = graph_step(case, params, x, y, **kw)
    want, grads = torch_step(case, params, x, y, **kw)
    assert_close(got.buffers, grads, "objective gradient")
    assert_close(got.params, want.params, "parameter")


# -- eval and inference graphs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_mse", "conv_a"])
def test_eval_graph_matches_torch(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    assert case.eval is not None
    params = params_of(case.module)
    for n in (32, 7, 1):
        x, y = batch(case.spec, n, seed=20 + n)
        feeds = {PARAM + k: v for k, v in params.items()} | {"x": x, "y": y}
        loss_sum, correct = case.eval.run(["loss_sum", "correct"], feeds)
        with torch.no_grad():
            out = case.module(torch.from_numpy(x))
        if case.spec.loss == "cross_entropy":
            want_loss = float(F.cross_entropy(out, torch.from_numpy(y), reduction="sum"))
            want_correct = int((out.argmax(1) == torch.from_numpy(y)).sum())
        else:
            want_loss = float(F.mse_loss(out, torch.from_numpy(y))) * n
            want_correct = 0
        assert float(loss_sum) == pytest.approx(want_loss, rel=1e-5)
        assert int(correct) == want_correct
        assert correct.dtype == np.int64


# -- what cannot be exported --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), r"layer '1' \(BatchNorm1d\)"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), "groups=2"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout()), r"\(Dropout\) is not supported"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")), "padding='same'"),
        (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), "ceil_mode"),
        (nn.Sequential(nn.AvgPool2d(3, padding=1, count_include_pad=False)), "count_include_pad"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), "padding_mode"),
    ],
)
def test_unsupported_layers_are_named(module: Any, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        check_supported(module)
    with pytest.raises(UnsupportedModelError, match=message):
        export_model(module, (4,))


def test_model_with_buffers_is_refused() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(3))

    with pytest.raises(UnsupportedModelError, match="buffer 'scale'"):
        check_supported(Scaled())


def test_cross_entropy_needs_class_logits() -> None:
    with pytest.raises(UnsupportedModelError, match=r"logits of shape \(batch, classes\)"):
        model_spec(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 5, 5), "cross_entropy")


# -- the shipped demo model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_demo() -> ExportedModel:
    return export_demo()


def test_graphs_carry_the_spec_and_roundtrip_as_artifacts(fresh_demo: ExportedModel) -> None:
    spec = fresh_demo.spec
    assert spec.names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert spec.input_shape == (64,)
    assert spec.output_shape == (10,)
    assert spec.loss == "cross_entropy"
    assert read_graph_spec(fresh_demo.train_step, "train_step") == spec
    assert read_graph_spec(fresh_demo.eval_step, "eval") == spec
    assert read_graph_spec(fresh_demo.inference, "inference") == spec
    again = ExportedModel.from_artifacts(fresh_demo.to_artifacts())
    assert again.spec == spec
    assert again.train_step == fresh_demo.train_step
    assert_close(dict(again.initial_params), dict(fresh_demo.initial_params), "initial")


def test_shipped_demo_assets_match_a_fresh_export(fresh_demo: ExportedModel) -> None:
    """``python -m coordinator.export --regenerate-demo-assets`` after changing the demo model
    or the exporter; this fails until then."""
    shipped = load_demo_model()
    assert shipped.spec == fresh_demo.spec
    assert_close(dict(shipped.initial_params), dict(fresh_demo.initial_params), "initial weights")
    rng = np.random.default_rng(0)
    params = dict(shipped.initial_params)
    x = rng.random((9, 64), dtype=np.float32)
    y = rng.integers(0, 10, 9)
    feeds: dict[str, np.ndarray] = {"x": x, "y": y}
    for k, v in params.items():
        feeds[PARAM + k] = v
        feeds[MOMENTUM_BUFFER + k] = 0.1 * np.ones_like(v)
        feeds[ANCHOR + k] = v + 0.01
        feeds[CORRECTION + k] = 0.01 * np.ones_like(v)
    for name, value in (("lr", 0.1), ("momentum", 0.9), ("weight_decay", 1e-3), ("mu", 0.1)):
        feeds[name] = np.array(value, np.float32)
    eval_feeds = {k: v for k, v in feeds.items() if k.startswith(PARAM) or k in ("x", "y")}
    for kind, graph_feeds in (
        ("train_step", feeds),
        ("eval_step", eval_feeds),
        ("inference", {"x": x}),
    ):
        got = session(getattr(shipped, kind)).run(None, graph_feeds)
        want = session(getattr(fresh_demo, kind)).run(None, graph_feeds)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=kind)


def test_zero_parameters_stay_initializers_of_the_inference_graph() -> None:
    """A zero-initialised model (the FedProx paper's logistic regression) once lost its bias to
    the exporter's constant folding, and ``ember jobs export`` could not put weights in."""
    import onnx

    from coordinator.onnx_model import with_weights

    model = nn.Linear(6, 3)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    exported = export_model(model, (6,))
    assert exported.inference is not None
    graph = onnx.load_from_string(exported.inference)
    assert {i.name for i in graph.graph.initializer} == {"weight", "bias"}
    weights = {"weight": np.ones((3, 6), np.float32), "bias": np.arange(3, dtype=np.float32)}
    x = np.ones((2, 6), np.float32)
    (logits,) = session(with_weights(exported.inference, weights)).run(["logits"], {"x": x})
    np.testing.assert_allclose(logits, [[6, 7, 8], [6, 7, 8]])


def test_inference_graph_is_the_model(fresh_demo: ExportedModel) -> None:
    from coordinator.demo.model import Net

    net = Net()
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(torch.from_numpy(fresh_demo.initial_params[k]))
        x = torch.rand(5, 64)
        want = net(x).numpy()
    (logits,) = session(fresh_demo.inference).run(["logits"], {"x": x.numpy()})
    np.testing.assert_allclose(logits, want, rtol=RTOL, atol=ATOL)
