"""Models for scikit-learn's digits (8×8 grey images, 10 classes), as the demo trains them.

Features are the 64 pixels scaled to [0, 1] (digits' 0–16 divided by 16). :class:`Net` is the
demo's model; :class:`SmallCNN` takes the same pixels as a 1×8×8 image and serves benchmarks and
tests. Both use only layers :mod:`coordinator.export` turns into train-step graphs.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 64
CLASSES = 10


class Net(nn.Module):
    """An MLP 64-128-10 (ReLU): about 98 % test accuracy trained centrally on digits."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class SmallCNN(nn.Module):
    """A small CNN on 1×8×8 images: two convolutions (stride 1, then 2), group norm, max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),  # 16×8×8
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),  # 32×4×4
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32×2×2
            nn.Flatten(),
        )
        self.head = nn.Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out
