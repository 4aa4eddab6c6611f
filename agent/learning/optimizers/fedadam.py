"""FedAdam: v_t = β2·v_{t−1} + (1−β2)·Δ_t² (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Algorithm 2)."""

from __future__ import annotations

from agent.learning.arrays import Array
from agent.learning.optimizers.adaptive import DecayingSecondMoment


class FedAdam(DecayingSecondMoment):
    """FedAdam (Reddi et al., ICLR 2021): v_t = β2·v_{t−1} + (1−β2)·Δ_t², no bias correction;
    the rest as in :class:`~agent.learning.optimizers.adaptive.AdaptiveServerOptimizer`."""

    name = "fedadam"

    def _second_moment(self, v: Array, d2: Array) -> None:
        v *= self.beta2
        d2 *= 1.0 - self.beta2
        v += d2
