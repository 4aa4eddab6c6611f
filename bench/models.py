"""Models of a given size for the benchmarks: the digits demo's MLP 64-H-10, exported once.

10 K parameters is the demo model itself (H = 128, 9,610 parameters, shipped with the agent);
bigger sizes widen the hidden layer (75·H + 10 parameters) and are exported with
:func:`coordinator.export.export_model` into ``bench/.cache`` the first time they are asked for.
"""

from __future__ import annotations

from pathlib import Path

from agent.learning.assets import load_demo_model
from agent.learning.backend import ExportedModel
from bench.common import CACHE

DEMO_HIDDEN = 128


def hidden_for(parameters: int) -> int:
    """The hidden width whose MLP 64-H-10 has about ``parameters`` parameters (the demo's for
    10 K or fewer)."""
    if parameters <= 10_000:
        return DEMO_HIDDEN
    return max(1, round((parameters - 10) / 75))


def parameter_count(parameters: int) -> int:
    """How many parameters :func:`mlp` of ``parameters`` really has."""
    return 75 * hidden_for(parameters) + 10


def mlp(parameters: int) -> ExportedModel:
    """The digits MLP with about ``parameters`` parameters, as devices train it."""
    hidden = hidden_for(parameters)
    if hidden == DEMO_HIDDEN:
        return load_demo_model()
    directory = CACHE / f"mlp-64-{hidden}-10"
    if (directory / "initial.tensors").exists():
        return ExportedModel.read(directory)
    import torch

    from coordinator.demo.model import Net
    from coordinator.export import export_model

    torch.manual_seed(0)
    model = export_model(Net(hidden=hidden), (64,), "cross_entropy")
    tmp = Path(str(directory) + ".tmp")
    model.write(tmp)
    tmp.rename(directory)
    return model


def tensor_layout(model: ExportedModel) -> list[tuple[str, list[int]]]:
    """Names and shapes of the model's parameters, in order (for simulated trainers)."""
    return [(name, list(model.initial_params[name].shape)) for name in model.spec.names]
