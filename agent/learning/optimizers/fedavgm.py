"""FedAvgM: server momentum, m_t = β·m_{t−1} + Δ_t; x_{t+1} = x_t + η·m_t.

Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019; written as in Reddi et al., ICLR 2021 (REFERENCES.md).
"""

from __future__ import annotations

import numpy as np

from agent.learning.arrays import Array
from agent.learning.optimizers.base import ServerOptimizer, check_number


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019; Reddi et al., ICLR 2021):
    m_t = β·m_{t−1} + Δ_t, x_{t+1} = x_t + η·m_t, m_0 = 0."""

    name = "fedavgm"
    slots = ("m",)

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        (m,) = slots
        m *= self.momentum
        m += d
        np.multiply(m, self.lr, out=out)
        out += w
