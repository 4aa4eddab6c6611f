"""FedYogi: v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²) (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2; Yogi: Zaheer et al., NeurIPS 2018)."""

from __future__ import annotations

import numpy as np

from agent.learning.arrays import Array
from agent.learning.optimizers.adaptive import DecayingSecondMoment


class FedYogi(DecayingSecondMoment):
    """FedYogi (Reddi et al., ICLR 2021): v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²): v moves
    towards Δ² by (1−β2)·Δ² whatever the gap, where Adam moves it by (1−β2)·(Δ² − v); the rest as in
    :class:`~agent.learning.optimizers.adaptive.AdaptiveServerOptimizer`."""

    name = "fedyogi"

    def _second_moment(self, v: Array, d2: Array) -> None:
        # sign(v − Δ²) needs v and Δ² both: one temporary per tensor per model version.
        sign = np.subtract(v, d2)
        np.sign(sign, out=sign)
        d2 *= 1.0 - self.beta2
        d2 *= sign
        v -= d2
