"""Local training with torch, for devices that have it: eager autograd and ``torch.optim.SGD``.

It trains the job's model class on the same objective as the exported train-step graph,
``L(w) + (mu/2)·‖w − anchor‖² − ⟨correction, w⟩`` (FedProx, Li et al. 2020; FedDyn's client
objective, Acar et al. 2021), written the way a torch user would write it, and draws the same
seeded batches (:func:`~agent.learning.backend.batch_indices`): given the same parameters,
data and hyper-parameters it returns the deltas :class:`~agent.learning.onnx_backend.OnnxBackend`
returns, to float32 rounding. torch is imported when a backend is made, never when this module
is imported, so an agent without torch imports it freely.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.learning.backend import (
    Array,
    EvalResult,
    HyperParams,
    ModelFormatError,
    ModelSpec,
    TrainResult,
    batch_indices,
    eval_inputs,
    eval_result,
    train_inputs,
)

if TYPE_CHECKING:
    import torch

__all__ = ["TorchBackend", "torch_available"]


def torch_available() -> bool:
    """Whether torch can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class TorchBackend:
    """:class:`~agent.learning.backend.TrainingBackend` in torch eager mode.

    ``module`` is the job's model (an ``nn.Module``; a private copy is trained), ``spec`` the
    model's :class:`~agent.learning.backend.ModelSpec` (from its exported graphs), against which
    the module's parameters are checked. ``threads`` sets ``torch.set_num_threads`` (a
    process-wide setting) when given.
    """

    def __init__(self, module: Any, spec: ModelSpec, *, threads: int | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self._module: torch.nn.Module = copy.deepcopy(module).float()
        self._params: dict[str, torch.nn.Parameter] = dict(self._module.named_parameters())
        spec.check_params(
            {k: np.empty(tuple(p.shape), np.float32) for k, p in self._params.items()},
            f"{type(module).__name__} parameters",
        )
        if any(True for _ in self._module.buffers()):
            raise ModelFormatError("the torch backend trains stateless modules (no buffers)")

    def _load(self, params: Mapping[str, Array]) -> None:
        import torch

        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(torch.tensor(params[name]))  # a copy: decoded arrays are read-only

    def _data_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F  # noqa: N812

        if self.spec.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    def _sample_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each sample's data loss; their mean is :meth:`_data_loss` (MSE averages a sample's
        outputs, as the exported graphs do)."""
        import torch.nn.functional as F  # noqa: N812

        if self.spec.loss == "cross_entropy":
            return F.cross_entropy(out, y, reduction="none")
        return F.mse_loss(out, y, reduction="none").reshape(out.shape[0], -1).mean(dim=1)

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
        import torch

        inputs = train_inputs(self.spec, params, x, y, anchor, correction)
        xs, ys = inputs.xs, inputs.ys
        anchors = {k: torch.from_numpy(np.array(v)) for k, v in inputs.anchor.items()}
        corrections = (
            None
            if inputs.correction is None
            else {k: torch.from_numpy(np.array(v)) for k, v in inputs.correction.items()}
        )
        self._load(inputs.start)
        self._module.train()
        optimizer = torch.optim.SGD(
            self._params.values(),
            lr=hyper.lr,
            momentum=hyper.momentum,
            weight_decay=hyper.weight_decay,
        )
        x_all, y_all = torch.from_numpy(xs), torch.from_numpy(ys)
        losses: list[float] = []
        loss_sq = 0.0
        samples = 0
        for idx in batch_indices(len(xs), hyper):
            index = torch.from_numpy(idx)
            optimizer.zero_grad(set_to_none=True)
            per_sample = self._sample_losses(self._module(x_all[index]), y_all[index])
            data_loss = per_sample.mean()
            objective = data_loss
            if hyper.mu:
                prox = [((p - anchors[k]) ** 2).sum() for k, p in self._params.items()]
                objective = objective + hyper.mu / 2 * torch.stack(prox).sum()
            if corrections is not None:
                tilt = [(p * corrections[k]).sum() for k, p in self._params.items()]
                objective = objective - torch.stack(tilt).sum()
            torch.autograd.backward(objective)
            optimizer.step()
            losses.append(float(data_loss.detach()))
            loss_sq += float((per_sample.detach() ** 2).sum())
            samples += len(idx)
        new = {k: p.detach().numpy().copy() for k, p in self._params.items()}
        return TrainResult(
            params=new,
            loss=float(np.mean(losses)),
            steps=len(losses),
            samples=samples,
            loss_sq_sum=loss_sq,
        )

    def evaluate(
        self, params: Mapping[str, Array], x: Array, y: Array, *, batch_size: int = 1024
    ) -> EvalResult:
        import torch

        spec = self.spec
        weights, xs, ys = eval_inputs(spec, params, x, y)
        self._load(weights)
        self._module.eval()
        loss_sum = 0.0
        correct = 0
        with torch.no_grad():
            for begin in range(0, len(xs), batch_size):
                xb = torch.from_numpy(xs[begin : begin + batch_size])
                yb = torch.from_numpy(ys[begin : begin + batch_size])
                out = self._module(xb)
                loss_sum += float(self._data_loss(out, yb)) * len(xb)
                if spec.loss == "cross_entropy":
                    correct += int((out.argmax(dim=1) == yb).sum())
        return eval_result(spec, loss_sum, correct, len(xs))
