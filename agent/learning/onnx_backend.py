"""Local training with onnxruntime and numpy alone: what a device without torch runs.

The train-step graph exported by :mod:`coordinator.export` does one SGD step of the local
objective ``L(w) + (mu/2)·‖w − anchor‖² − ⟨correction, w⟩`` (FedProx, Li et al. 2020; FedDyn's
client objective, Acar et al. 2021) with momentum and weight decay as ``torch.optim.SGD``. This
module feeds it: seeded batches drawn with numpy, the parameters and momentum buffers of one
step fed back into the next. Nothing here, or in what it imports, imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.learning.backend import (
    ANCHOR,
    CORRECTION,
    LOSS_SQ_SUM,
    MOMENTUM_BUFFER,
    NEW_MOMENTUM_BUFFER,
    NEW_PARAM,
    PARAM,
    Array,
    EvalResult,
    ExportedModel,
    HyperParams,
    ModelFormatError,
    ModelSpec,
    TrainResult,
    batch_indices,
    eval_inputs,
    eval_result,
    train_inputs,
)
from agent.protocol.codec import TensorMap

__all__ = ["OnnxBackend"]


def _scalar(value: float) -> Array:
    return np.array(value, dtype=np.float32)


class OnnxBackend:
    """:class:`~agent.learning.backend.TrainingBackend` on onnxruntime's CPU provider.

    ``intra_op_threads`` defaults to 1, so a Raspberry Pi's other cores stay free for the
    agent's event loop and the device's own work. Sessions are made once and are safe to use
    from the worker thread the role runtime trains in.
    """

    def __init__(
        self,
        model: ExportedModel,
        *,
        intra_op_threads: int = 1,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        self.model = model
        self.spec: ModelSpec = model.spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._train = ort.InferenceSession(model.train_step, options, providers=list(providers))
        self._eval = ort.InferenceSession(model.eval_step, options, providers=list(providers))
        names = self.spec.names
        self._outputs = [
            "loss",
            *(NEW_PARAM + k for k in names),
            *(NEW_MOMENTUM_BUFFER + k for k in names),
        ]
        for session, wanted in (
            (self._train, self._outputs),
            (self._eval, ["loss_sum", "correct"]),
        ):
            missing = set(wanted) - {o.name for o in session.get_outputs()}
            if missing:
                raise ModelFormatError(f"graph without the outputs {sorted(missing)}")
        # Graphs exported before the per-sample loss output still train; they report none.
        self._loss_sq = LOSS_SQ_SUM in {o.name for o in self._train.get_outputs()}
        if self._loss_sq:
            self._outputs.append(LOSS_SQ_SUM)
        self._param_keys = [PARAM + k for k in names]
        self._buffer_keys = [MOMENTUM_BUFFER + k for k in names]

    def train(
        self,
        params: Mapping[str, Array],
        x: Array,
        y: Array,
        hyper: HyperParams,
        *,
        anchor: Mapping[str, Array] | None = None,
        correction: Mapping[str, Array] | None = None,
    ) -> TrainResult:
        spec = self.spec
        inputs = train_inputs(spec, params, x, y, anchor, correction)
        start, xs, ys, centre = inputs.start, inputs.xs, inputs.ys, inputs.anchor
        zeros = {k: np.zeros_like(v) for k, v in start.items()}
        h = zeros if inputs.correction is None else inputs.correction
        feeds: dict[str, Any] = {
            "lr": _scalar(hyper.lr),
            "momentum": _scalar(hyper.momentum),
            "weight_decay": _scalar(hyper.weight_decay),
            "mu": _scalar(hyper.mu),
        }
        for name in spec.names:
            feeds[PARAM + name] = start[name]
            feeds[MOMENTUM_BUFFER + name] = zeros[name]
            feeds[ANCHOR + name] = centre[name]
            feeds[CORRECTION + name] = h[name]
        n = len(spec.names)
        losses: list[Array] = []
        loss_sq = 0.0
        samples = 0
        for idx in batch_indices(len(xs), hyper):
            feeds["x"] = xs[idx]
            feeds["y"] = ys[idx]
            out = self._train.run(self._outputs, feeds)
            losses.append(out[0])
            feeds.update(zip(self._param_keys, out[1 : 1 + n], strict=True))
            feeds.update(zip(self._buffer_keys, out[1 + n : 1 + 2 * n], strict=True))
            if self._loss_sq:
                loss_sq += float(out[-1])
            samples += len(idx)
        new: TensorMap = {name: feeds[PARAM + name] for name in spec.names}
        return TrainResult(
            params=new,
            loss=float(np.mean(losses)),
            steps=len(losses),
            samples=samples,
            loss_sq_sum=loss_sq if self._loss_sq else None,
        )

    def evaluate(
        self, params: Mapping[str, Array], x: Array, y: Array, *, batch_size: int = 1024
    ) -> EvalResult:
        spec = self.spec
        weights, xs, ys = eval_inputs(spec, params, x, y)
        feeds: dict[str, Any] = {PARAM + k: v for k, v in weights.items()}
        loss_sum = 0.0
        correct = 0
        for begin in range(0, len(xs), batch_size):
            feeds["x"] = xs[begin : begin + batch_size]
            feeds["y"] = ys[begin : begin + batch_size]
            batch_loss, batch_correct = self._eval.run(["loss_sum", "correct"], feeds)
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        return eval_result(spec, loss_sum, correct, len(xs))
