"""torch → ONNX: a model's train step, evaluation and inference as graphs devices run without torch.

Runs where torch is installed (the operator's machine, the coordinator). :func:`export_model`
turns an ``nn.Module`` into an :class:`~agent.learning.backend.ExportedModel`:

* the **train-step graph** takes every parameter (``param.<name>``), its SGD momentum buffer
  (``momentum_buffer.<name>``), the proximal anchor (``anchor.<name>``, the global weights θ_g)
  and a correction (``correction.<name>``, FedDyn's h), a batch ``x``, labels ``y`` and the
  0-d scalars ``lr``, ``momentum``, ``weight_decay``, ``mu``. It minimises
  ``L(w) + (mu/2)·‖w − anchor‖² − ⟨correction, w⟩`` (FedProx, Li et al. 2020, arXiv
  1812.06127, with ``correction = 0``; FedDyn's client objective, Acar et al. 2021, arXiv
  2111.04263, with ``mu = α``) for one step of SGD as ``torch.optim.SGD`` does it
  (``d = g + weight_decay·w``, ``buf = momentum·buf + d``, ``w −= lr·buf``) and returns ``loss``
  (the batch's mean data loss), ``new_param.<name>``, ``new_momentum_buffer.<name>`` and
  ``loss_sq_sum`` (the sum of the batch's squared per-sample data losses, for Oort's
  statistical utility; graphs exported before it lack it, and backends then report none);
* the **eval graph** takes the parameters, ``x`` and ``y`` and returns ``loss_sum`` (summed
  over the batch) and ``correct`` (right predictions; 0 for MSE), to be added up across batches;
* the **inference graph** has the parameters baked in as initializers: ``x`` → ``logits``.

Every graph has a dynamic batch axis and carries the model's
:class:`~agent.learning.backend.ModelSpec` in its ``metadata_props``.

The recipe (REFERENCES.md, "Exporting a train step to ONNX"): the step is a plain function that
calls the model through ``torch.func.functional_call`` and differentiates with
``torch.autograd.grad``; ``make_fx(tracing_mode="symbolic")`` traces forward and backward into
ATen ops, and ``torch.onnx.export(dynamo=True)`` translates that graph. The data loss is summed
and divided by the batch size: with the default mean reduction the exported gradient loses its
1/N. Backward ops without an ONNX translation are rewritten by a decomposition table:
``convolution_backward`` and ``avg_pool2d_backward`` into (transposed) convolutions, max-pool
and normalisation backward into torch's own decompositions.

``python -m coordinator.export --regenerate-demo-assets`` rewrites the digits demo's graphs and
initial weights shipped in ``agent/learning/assets/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812  # the conventional name
from torch import nn

from agent.learning.backend import (
    ANCHOR,
    CORRECTION,
    LOSS_SQ_SUM,
    LOSSES,
    MOMENTUM_BUFFER,
    NEW_MOMENTUM_BUFFER,
    NEW_PARAM,
    PARAM,
    SCALARS,
    ExportedModel,
    GraphKind,
    LossKind,
    ModelSpec,
    ParamSpec,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "ExportedModel",
    "UnsupportedModelError",
    "check_supported",
    "export_eval",
    "export_inference",
    "export_model",
    "export_train_step",
    "model_spec",
    "regenerate_demo_assets",
]

aten = torch.ops.aten

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Identity,
)
"""Leaf layers whose train step is exported and checked for gradient parity with torch.
Containers (``nn.Sequential``, a model class with its own ``forward``) may combine them."""

OPSET = 18
"""ONNX opset of the exported graphs: onnxruntime ≥ 1.14 runs it, so older devices can."""

EXAMPLE_BATCH = 4
"""Batch size of the example run that finds a model's output shape."""

_DEMO_ASSETS = Path(__file__).resolve().parent.parent / "agent" / "learning" / "assets" / "digits"


class UnsupportedModelError(ValueError):
    """A model the exporter cannot turn into a train-step graph; the message names the layer."""


# -- what can be exported -----------------------------------------------------------------------


def check_supported(module: nn.Module) -> None:
    """Refuse, naming the layer, any leaf layer outside :data:`SUPPORTED_LAYERS`, any
    configuration of a supported one whose backward is not exported, and any buffer (running
    statistics, as BatchNorm keeps, have no place in a stateless train step)."""
    for name, layer in module.named_modules():
        where = name or type(module).__name__
        if any(True for _ in layer.children()):
            continue  # a container: its leaves are checked
        if not isinstance(layer, SUPPORTED_LAYERS):
            supported = ", ".join(cls.__name__ for cls in SUPPORTED_LAYERS)
            raise UnsupportedModelError(
                f"layer {where!r} ({type(layer).__name__}) is not supported by the train-step "
                f"export; supported layers: {supported}"
            )
        problem = _layer_problem(layer)
        if problem:
            raise UnsupportedModelError(f"layer {where!r} ({type(layer).__name__}): {problem}")
    for name, _ in module.named_buffers():
        raise UnsupportedModelError(
            f"buffer {name!r}: the train-step export handles stateless layers only "
            "(no running statistics)"
        )


def _layer_problem(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"groups={layer.groups}: only groups=1 is exported"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}: only 'zeros' is exported"
        if isinstance(layer.padding, str):
            return f"padding={layer.padding!r}: give the padding as numbers"
    if isinstance(layer, nn.MaxPool2d | nn.AvgPool2d) and layer.ceil_mode:
        return "ceil_mode=True is not exported"
    if isinstance(layer, nn.MaxPool2d) and layer.return_indices:
        return "return_indices=True is not exported"
    if isinstance(layer, nn.AvgPool2d) and layer.padding and not layer.count_include_pad:
        return "padding with count_include_pad=False is not exported"
    return None


def model_spec(module: nn.Module, input_shape: Sequence[int], loss: LossKind) -> ModelSpec:
    """The spec of ``module`` fed samples of ``input_shape`` (no batch axis), trained on
    ``loss``."""
    if loss not in LOSSES:
        raise ValueError(f"loss: must be one of {list(LOSSES)}, got {loss!r}")
    shape = tuple(int(d) for d in input_shape)
    with torch.no_grad():
        out = module(torch.zeros((EXAMPLE_BATCH, *shape)))
    if not isinstance(out, torch.Tensor) or out.shape[0] != EXAMPLE_BATCH:
        raise UnsupportedModelError("the model must return one tensor with the batch axis first")
    if loss == "cross_entropy" and out.dim() != 2:
        raise UnsupportedModelError(
            f"cross-entropy needs logits of shape (batch, classes), the model returns "
            f"{tuple(out.shape)}"
        )
    params = tuple(
        ParamSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
        for name, p in module.named_parameters()
    )
    if any(p.dtype != "float32" for p in params):
        raise UnsupportedModelError("parameters must be float32")
    return ModelSpec(params=params, loss=loss, input_shape=shape, output_shape=tuple(out.shape[1:]))


# -- backward ops rewritten in ops ONNX has -----------------------------------------------------


def _transposed_output_padding(
    size_in: int, size_out: int, kernel: int, stride: int, padding: int, dilation: int
) -> int:
    """Output padding that makes a transposed convolution give back ``size_in``."""
    return size_in - ((size_out - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1)


def _convolution_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,  # ATen's argument name
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.convolution_backward`` of a 2-D, non-transposed, groups=1 convolution, in
    ``aten.convolution`` (which ONNX has as Conv and ConvTranspose)."""
    if transposed or groups != 1 or input.dim() != 4:
        raise NotImplementedError(
            "convolution backward is exported for 2-D convolutions with groups=1 only"
        )
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        # Transposed convolution of grad-output with the weight, padded out to the input's size.
        extra = [
            _transposed_output_padding(
                input.shape[2 + axis],
                grad_output.shape[2 + axis],
                weight.shape[2 + axis],
                stride[axis],
                padding[axis],
                dilation[axis],
            )
            for axis in range(2)
        ]
        grad_input = aten.convolution(
            grad_output, weight, None, stride, padding, dilation, True, extra, 1
        )
    if output_mask[1]:
        # Input (channels as batch) convolved with grad-output (batch as channels): stride and
        # dilation change places; the result can overhang the kernel, so it is cropped.
        full = aten.convolution(
            input.transpose(0, 1),
            grad_output.transpose(0, 1),
            None,
            dilation,
            padding,
            stride,
            False,
            [0, 0],
            1,
        )
        grad_weight = full[:, :, : weight.shape[2], : weight.shape[3]].transpose(0, 1)
    if output_mask[2]:
        grad_bias = grad_output.sum([0, 2, 3])
    return grad_input, grad_weight, grad_bias


def _avg_pool2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,  # ATen's argument name
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    """``aten.avg_pool2d_backward`` as a transposed convolution of every channel with a
    constant kernel 1/divisor (exact when every window has the same divisor: no ceil mode, and
    padding counted or absent, which :func:`check_supported` ensures)."""
    if ceil_mode or (any(padding) and not count_include_pad):
        raise NotImplementedError("avg_pool2d backward: ceil_mode or uncounted padding")
    kh, kw = kernel_size[0], kernel_size[-1]
    strides = list(stride) if stride else [kh, kw]
    if len(strides) == 1:
        strides = strides * 2
    pads = list(padding) * 2 if len(padding) == 1 else list(padding)
    n, c, h, w = input.shape
    ho, wo = grad_output.shape[2], grad_output.shape[3]
    kernel = torch.full(
        (1, 1, kh, kw), 1.0 / (divisor_override or kh * kw), dtype=grad_output.dtype
    )
    extra = [
        _transposed_output_padding(h, ho, kh, strides[0], pads[0], 1),
        _transposed_output_padding(w, wo, kw, strides[1], pads[1], 1),
    ]
    planes = grad_output.reshape(n * c, 1, ho, wo)
    grad: torch.Tensor = aten.convolution(
        planes, kernel, None, strides, pads, [1, 1], True, extra, 1
    )
    return grad.reshape(n, c, h, w)


def _decompositions() -> dict[Any, Callable[..., Any]]:
    from torch._decomp import get_decompositions

    table: dict[Any, Callable[..., Any]] = dict(
        get_decompositions(
            [
                aten.max_pool2d_with_indices_backward,
                aten.native_group_norm_backward,
                aten.native_layer_norm_backward,
            ]
        )
    )
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    return table


# -- the traced functions -----------------------------------------------------------------------


def _data_loss_sum(
    out: torch.Tensor, y: torch.Tensor, loss: LossKind, outputs: int
) -> torch.Tensor:
    """The data loss summed over the batch. MSE averages over a sample's outputs first, so that
    ``sum / batch`` equals ``nn.MSELoss()`` (mean over every element)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="sum")
    return F.mse_loss(out, y, reduction="sum") / outputs


def _sample_losses(
    out: torch.Tensor, y: torch.Tensor, loss: LossKind, outputs: int
) -> torch.Tensor:
    """The data loss of each sample of the batch (their sum is :func:`_data_loss_sum`)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return F.mse_loss(out, y, reduction="none").reshape(out.shape[0], -1).sum(dim=1) / outputs


def _train_step_function(module: nn.Module, spec: ModelSpec) -> Callable[..., tuple[Any, ...]]:
    names = spec.names
    n = len(names)
    outputs = math.prod(spec.output_shape)

    def train_step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = args[:n]
        buffers, anchors, corrections = args[n : 2 * n], args[2 * n : 3 * n], args[3 * n : 4 * n]
        x, y, lr, momentum, weight_decay, mu = args[4 * n :]
        out = torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))
        # Sum, then divide: the mean reduction loses its 1/N in the exported gradient.
        per_sample = _sample_losses(out, y, spec.loss, outputs)
        loss = per_sample.sum() / x.shape[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        new_params, new_buffers = [], []
        with torch.no_grad():
            for p, buf, anchor, correction, g in zip(
                params, buffers, anchors, corrections, grads, strict=True
            ):
                d = (torch.zeros_like(p) if g is None else g) + mu * (p - anchor) - correction
                d = d + weight_decay * p
                new_buf = momentum * buf + d
                new_params.append(p - lr * new_buf)
                new_buffers.append(new_buf)
        loss_sq_sum = (per_sample.detach() ** 2).sum()
        return (loss.detach(), *new_params, *new_buffers, loss_sq_sum)

    return train_step


def _eval_function(module: nn.Module, spec: ModelSpec) -> Callable[..., tuple[Any, ...]]:
    names = spec.names
    n = len(names)
    outputs = math.prod(spec.output_shape)

    def evaluate(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = args[n:]
        out = torch.func.functional_call(module, dict(zip(names, args[:n], strict=True)), (x,))
        loss_sum = _data_loss_sum(out, y, spec.loss, outputs)
        if spec.loss == "cross_entropy":
            correct = (out.argmax(dim=1) == y).sum()
        else:
            correct = torch.zeros((), dtype=torch.int64)
        return loss_sum, correct

    return evaluate


def _traced_batch_size(spec: ModelSpec) -> int:
    """A batch size for tracing that equals no other input's dimension. Symbolic tracing gives
    equal sizes one symbol ("duck shaping"): a batch of 4 beside a LayerNorm over 4 channels
    would be specialised to 4 with them. 0, 1 and 2 are specialised anyway."""
    taken = {*spec.input_shape, *spec.output_shape, *(d for p in spec.params for d in p.shape)}
    return next(n for n in range(3, 10_000) if n not in taken)


def _example_batch(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = _traced_batch_size(spec)
    x = torch.randn((n, *spec.input_shape), generator=generator)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.output_shape[0], (n,), generator=generator)
    else:
        y = torch.randn((n, *spec.output_shape), generator=generator)
    return x, y


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's chatter (training-mode and deprecation warnings, torchvision)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace_and_export(
    function: Callable[..., tuple[Any, ...]],
    args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    batched: Sequence[str],
    spec: ModelSpec,
    kind: GraphKind,
) -> bytes:
    from torch.fx.experimental.proxy_tensor import make_fx

    with _quiet_export():
        graph = make_fx(function, tracing_mode="symbolic", decomposition_table=_decompositions())(
            *args
        )
        graph.eval()
        batch = torch.export.Dim("batch", min=2)
        program = torch.onnx.export(
            graph,
            tuple(a.detach() for a in args),
            dynamo=True,
            dynamic_shapes=tuple({0: batch} if n in batched else None for n in input_names),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=OPSET,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    got = [i.name for i in proto.graph.input]
    if got != list(input_names):
        raise RuntimeError(f"{kind} graph: inputs {got}, expected {list(input_names)}")
    used = {name for node in proto.graph.node for name in node.input}
    used |= {o.name for o in proto.graph.output}
    unused = [name for name in got if name not in used]
    if unused:
        # Example tensors that alias one another are traced as one input, leaving the others
        # dangling: a momentum buffer read from the correction's place, say.
        raise RuntimeError(f"{kind} graph: inputs {unused} are not used")
    return _with_metadata(proto, spec, kind)


def _with_metadata(proto: Any, spec: ModelSpec, kind: GraphKind) -> bytes:
    """The graph's bytes with the spec in its metadata and without the exporter's per-node
    provenance (FX node text, stack traces: seven eighths of a small graph's bytes). Refuses a
    graph whose batch axis came out fixed (the exporter falls back to that silently)."""
    (x,) = [i for i in proto.graph.input if i.name == "x"]
    if not x.type.tensor_type.shape.dim[0].dim_param:
        raise RuntimeError(f"{kind} graph: the batch axis of x was specialised to a constant")
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for key, value in spec.to_metadata(kind).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "ember"
    blob: bytes = proto.SerializeToString()
    return blob


def _param_tensors(module: nn.Module, spec: ModelSpec, *, grad: bool) -> list[torch.Tensor]:
    named = dict(module.named_parameters())
    return [named[n].detach().clone().requires_grad_(grad) for n in spec.names]


def export_train_step(module: nn.Module, spec: ModelSpec) -> bytes:
    """The train-step graph of ``module`` (see the module docstring for its inputs/outputs)."""
    check_supported(module)
    params = _param_tensors(module, spec, grad=True)
    # Every example input its own tensor: inputs that alias are traced as one graph input.
    buffers = [torch.zeros_like(p, requires_grad=False) for p in params]
    anchors = [p.detach().clone() for p in params]
    corrections = [torch.zeros_like(p, requires_grad=False) for p in params]
    x, y = _example_batch(spec)
    scalars = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.9, 1e-4, 0.01)]
    names = spec.names
    input_names = [
        *(PARAM + n for n in names),
        *(MOMENTUM_BUFFER + n for n in names),
        *(ANCHOR + n for n in names),
        *(CORRECTION + n for n in names),
        "x",
        "y",
        *SCALARS,
    ]
    output_names = [
        "loss",
        *(NEW_PARAM + n for n in names),
        *(NEW_MOMENTUM_BUFFER + n for n in names),
        LOSS_SQ_SUM,
    ]
    return _trace_and_export(
        _train_step_function(module, spec),
        [*params, *buffers, *anchors, *corrections, x, y, *scalars],
        input_names,
        output_names,
        ("x", "y"),
        spec,
        "train_step",
    )


def export_eval(module: nn.Module, spec: ModelSpec) -> bytes:
    """The eval graph: parameters, ``x``, ``y`` → ``loss_sum``, ``correct``."""
    check_supported(module)
    x, y = _example_batch(spec)
    return _trace_and_export(
        _eval_function(module, spec),
        [*_param_tensors(module, spec, grad=False), x, y],
        [*(PARAM + n for n in spec.names), "x", "y"],
        ["loss_sum", "correct"],
        ("x", "y"),
        spec,
        "eval",
    )


def export_inference(
    module: nn.Module, spec: ModelSpec, params: Mapping[str, npt.ArrayLike] | None = None
) -> bytes:
    """The inference graph ``x`` → ``logits`` with ``params`` (default: the module's own) baked
    in as initializers; what ``ember jobs export`` hands out as the final model."""
    check_supported(module)
    model = copy.deepcopy(module).eval()
    if params is not None:
        spec.check_params({k: np.asarray(v) for k, v in params.items()}, "params")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(np.array(params[name], dtype=np.float32)))
    x, _ = _example_batch(spec)
    with _quiet_export():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=2)},),
            input_names=["x"],
            output_names=["logits"],
            opset_version=OPSET,
            verbose=False,
            # The optimiser folds parameters that happen to be zero (a zero-initialised bias)
            # into the graph: every parameter must stay an initializer for with_weights.
            optimize=False,
        )
    assert program is not None
    return _with_metadata(program.model_proto, spec, "inference")


def export_model(
    module: nn.Module, input_shape: Sequence[int], loss: LossKind = "cross_entropy"
) -> ExportedModel:
    """Export ``module``'s train step, eval and inference graphs; its current parameters become
    the initial weights. ``input_shape`` is one sample's shape, without the batch axis
    (``(64,)`` for digits' features, ``(1, 8, 8)`` for a CNN on the same images)."""
    check_supported(module)
    spec = model_spec(module, input_shape, loss)
    initial = {name: p.detach().cpu().numpy().copy() for name, p in module.named_parameters()}
    return ExportedModel(
        spec=spec,
        train_step=export_train_step(module, spec),
        eval_step=export_eval(module, spec),
        inference=export_inference(module, spec),
        initial_params=initial,
    )


# -- the demo's shipped graphs ------------------------------------------------------------------

DEMO_SEED = 0
DEMO_INPUT_SHAPE = (64,)


def demo_module() -> nn.Module:
    """The digits demo's model (``coordinator/demo/model.py``'s ``Net``), seeded."""
    from coordinator.demo.model import Net

    torch.manual_seed(DEMO_SEED)
    return Net()


def export_demo() -> ExportedModel:
    """A fresh export of the digits demo model, as shipped in the agent's assets."""
    return export_model(demo_module(), DEMO_INPUT_SHAPE, "cross_entropy")


def regenerate_demo_assets(directory: Path = _DEMO_ASSETS) -> list[Path]:
    """Rewrite the demo model's graphs and initial weights shipped with the agent."""
    return export_demo().write(directory)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator.export", description=__doc__)
    parser.add_argument(
        "--regenerate-demo-assets",
        action="store_true",
        help=f"rewrite the digits demo's graphs and weights in {_DEMO_ASSETS}",
    )
    args = parser.parse_args(argv)
    if not args.regenerate_demo_assets:
        parser.error("nothing to do: pass --regenerate-demo-assets")
    for path in regenerate_demo_assets():
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
