"""What FedAdagrad, FedYogi and FedAdam share (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Algorithm 2): the first moment, the update and v's initial value; each variant's
file says only how v moves.
"""

from __future__ import annotations

import abc

import numpy as np

from agent.learning.arrays import Array, state_dtype
from agent.learning.optimizers.base import ServerOptimizer, check_number


class AdaptiveServerOptimizer(ServerOptimizer):
    """The adaptive server optimizers of Reddi et al., ICLR 2021, Algorithm 2:

    m_t = β1·m_{t−1} + (1−β1)·Δ_t;  v_t from :meth:`_second_moment`;
    x_{t+1} = x_t + η·m_t / (sqrt(v_t) + τ).

    No bias correction; m_0 = 0 and v_0 = τ² (the paper asks v_{−1} ≥ τ²).
    """

    slots = ("m", "v")

    def __init__(self, *, lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__()
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.beta1 = check_number("beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.tau = check_number("tau", tau, low=0.0, low_open=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "tau": self.tau}

    @abc.abstractmethod
    def _second_moment(self, v: Array, d2: Array) -> None:
        """Move v to v_t in place, given d2 = Δ_t² (a scratch buffer this may overwrite)."""

    def _initial(self, slot: str, w: Array) -> Array:
        if slot == "v":
            return np.full(w.shape, self.tau**2, dtype=state_dtype(w.dtype))
        return super()._initial(slot, w)

    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        m, v = slots
        m *= self.beta1
        np.multiply(d, 1.0 - self.beta1, out=out, dtype=out.dtype)
        m += out
        np.multiply(d, d, out=out, dtype=out.dtype)
        self._second_moment(v, out)
        np.sqrt(v, out=out)
        out += self.tau
        np.divide(m, out, out=out)
        out *= self.lr
        out += w


class DecayingSecondMoment(AdaptiveServerOptimizer):
    """An adaptive optimizer whose v moves at rate 1−β2 (FedAdam, FedYogi; Reddi et al.,
    ICLR 2021)."""

    def __init__(
        self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, tau=tau)
        self.beta2 = check_number("beta2", beta2, low=0.0, high=1.0, high_open=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}
