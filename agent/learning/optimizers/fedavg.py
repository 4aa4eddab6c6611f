"""FedAvg's server step with a server learning rate: w ← w + η·Δ.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (η = 1 is the original); the server learning rate as in Reddi et al., ICLR 2021.
"""

from __future__ import annotations

import numpy as np

from agent.learning.arrays import Array
from agent.learning.optimizers.base import ServerOptimizer, check_number


class FedAvg(ServerOptimizer):
    """FedAvg (McMahan et al., AISTATS 2017) with server learning rate η (Reddi et al.,
    ICLR 2021): x_{t+1} = x_t + η·Δ_t. Stateless."""

    name = "fedavg"

    def __init__(self, *, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = check_number("lr", lr, low=0.0, low_open=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        if self.lr == 1.0:
            np.add(w, d, out=out, dtype=out.dtype)
        else:
            np.multiply(d, self.lr, out=out, dtype=out.dtype)
            out += w
