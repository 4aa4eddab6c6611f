"""FedAdagrad: v_t = v_{t−1} + Δ_t² (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Algorithm 2)."""

from __future__ import annotations

from agent.learning.arrays import Array
from agent.learning.optimizers.adaptive import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al., ICLR 2021): v_t = v_{t−1} + Δ_t²; the rest as in
    :class:`~agent.learning.optimizers.adaptive.AdaptiveServerOptimizer`. Has no β2."""

    name = "fedadagrad"

    def _second_moment(self, v: Array, d2: Array) -> None:
        v += d2
