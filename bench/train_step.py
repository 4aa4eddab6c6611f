"""One local SGD step at batch 32: the exported train-step graph in onnxruntime against torch
eager (autograd + ``torch.optim.SGD``), measured in the same run on the same batches.

Both run through Ember's backends (:class:`~agent.learning.onnx_backend.OnnxBackend`,
:class:`~agent.learning.torch_backend.TorchBackend`), so the figures include what a device pays
around the step (batch gathering, feeding parameters back), on one thread each, as on a
Raspberry Pi that keeps a core for the agent. Models: the digits demo's MLP 64-128-10 (its
shipped graphs) and the small CNN of ``coordinator/demo/model.py`` (exported here). Momentum and
FedProx's proximal term are on, as in a real FedProx run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from agent.learning.assets import load_demo_model
from agent.learning.backend import ExportedModel, HyperParams
from agent.learning.onnx_backend import OnnxBackend
from agent.learning.torch_backend import TorchBackend
from bench.common import best_of, show, write_results
from coordinator.demo.model import Net, SmallCNN
from coordinator.export import export_model

BATCH = 32
STEPS = 200
SAMPLES = 1024
HYPER = HyperParams(lr=0.05, momentum=0.9, mu=0.01, local_steps=STEPS, batch_size=BATCH)


def models() -> dict[str, tuple[Any, ExportedModel]]:
    torch.manual_seed(0)
    cnn = SmallCNN()
    start = time.perf_counter()
    exported = export_model(cnn, (1, 8, 8))
    print(f"exported the small CNN in {time.perf_counter() - start:.1f} s")
    return {"mlp": (Net(), load_demo_model()), "cnn": (cnn, exported)}


def figures_for(label: str, module: Any, model: ExportedModel) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.random((SAMPLES, 64), dtype=np.float32)
    y = rng.integers(0, 10, SAMPLES)
    params = model.initial_params
    onnx = OnnxBackend(model, intra_op_threads=1)
    eager = TorchBackend(module, model.spec, threads=1)
    a, b = onnx.train(params, x, y, HYPER), eager.train(params, x, y, HYPER)  # warm up
    gap = max(float(np.abs(a.params[k] - b.params[k]).max()) for k in params)
    onnx_s = best_of(lambda: onnx.train(params, x, y, HYPER), 5) / STEPS
    torch_s = best_of(lambda: eager.train(params, x, y, HYPER), 5) / STEPS
    return {
        f"{label}_parameters": model.spec.num_parameters,
        f"{label}_onnxruntime_ms": onnx_s * 1e3,
        f"{label}_torch_ms": torch_s * 1e3,
        f"{label}_speedup": torch_s / onnx_s,
        f"{label}_max_param_gap": gap,
    }


def main() -> None:
    figures: dict[str, float | int | str] = {"batch": BATCH, "steps": STEPS, "threads": 1}
    for label, (module, model) in models().items():
        figures.update(figures_for(label, module, model))
    rows = [
        [
            f"{label} ({int(figures[f'{label}_parameters']):,})",
            f"{figures[f'{label}_onnxruntime_ms']:.3f}",
            f"{figures[f'{label}_torch_ms']:.3f}",
            f"{figures[f'{label}_speedup']:.2f}×",
            f"{figures[f'{label}_max_param_gap']:.1e}",
        ]
        for label in ("mlp", "cnn")
    ]
    show(
        f"train step, batch {BATCH}, 1 thread: ms per step (best of 5 runs of {STEPS} steps); "
        f"largest weight gap between the two after {STEPS} steps",
        ["model (params)", "onnxruntime", "torch eager", "speed-up", "max |Δw|"],
        rows,
    )
    print(f"wrote {write_results('train_step', figures)}")


if __name__ == "__main__":
    main()
