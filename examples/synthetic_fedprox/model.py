"""The FedProx paper's Synthetic model: multinomial logistic regression, 60 features → 10 classes.

As in Li et al. 2020 (MLSys, arXiv 1812.06127) the weights start at zero. ``model/`` holds the
model exported once to Ember's ONNX graphs (train step with FedProx's proximal term, eval,
inference, initial weights) so the example runs without torch; rewrite them, with torch
installed, by running this file: ``python examples/synthetic_fedprox/model.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURES = 60
CLASSES = 10
EXPORTED = Path(__file__).resolve().with_name("model")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (one linear layer; softmax is in the loss), zero-initialised
    as in the FedProx paper's Synthetic experiments."""

    input_shape = (FEATURES,)

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def export(directory: Path = EXPORTED) -> list[Path]:
    """Export :class:`LogisticRegression` into ``directory`` (needs torch and onnx)."""
    from coordinator.export import export_model

    return export_model(LogisticRegression(), LogisticRegression.input_shape).write(directory)


if __name__ == "__main__":
    for path in export():
        print(path)
