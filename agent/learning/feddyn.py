"""FedDyn: federated learning with dynamic regularization (Acar et al., ICLR 2021,
arXiv 2111.04263).

Device k in round t solves θ_k = argmin L_k(θ) − ⟨∇L_k(θ_k^{t−1}), θ⟩ + (α/2)‖θ − θ^{t−1}‖²
(in the train-step graph), then updates its state ∇L_k(θ_k^t) = ∇L_k(θ_k^{t−1}) − α(θ_k^t − θ^{t−1})
with :func:`client_state_update`. The server (m devices in all, P_t this round's participants):

    h^t = h^{t−1} − α·(1/m)·Σ_{k∈P_t}(θ_k^t − θ^{t−1})
    θ^t = mean_{k∈P_t} θ_k^t − (1/α)·h^t

Trainers send Δ_k = θ_k^t − θ^{t−1} (Ember's deltas are against the model they started from),
so with Δ̄ the plain mean over P_t: h^t = h^{t−1} − α·(|P_t|/m)·Δ̄ and θ^t = θ^{t−1} + Δ̄ − h^t/α.
:class:`FedDynServer` is that rule behind the server-optimizer interface, for synchronous
rounds (:class:`~agent.learning.fedavg.SyncFedAvg`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.learning.arrays import Array, Weights, new_scratch, scaled_add, state_dtype
from agent.learning.optimizers.base import ServerOptimizer, check_number


class FedDynServer(ServerOptimizer):
    """FedDyn's server state and update (Acar et al., ICLR 2021): keeps h (slot ``h``, h^0 = 0),
    α and m, the number of devices in the federation.

    :meth:`step` takes Δ̄, the *plain* mean of this round's deltas θ_k^t − θ^{t−1}, and
    ``participants`` = |P_t| (all m when omitted); :meth:`aggregate` takes the client models
    θ_k^t themselves, as the paper writes it.
    """

    name = "feddyn"
    slots = ("h",)
    synchronous = True

    def __init__(self, *, alpha: float = 0.01, num_devices: int) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, low_open=True)
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices: expected an integer ≥ 1, got {num_devices!r}")
        self.num_devices = num_devices
        self._fraction = 1.0
        self._scratch: dict[np.dtype[np.floating], Array] = {}

    def hyperparameters(self) -> dict[str, float]:
        return {"alpha": self.alpha, "num_devices": self.num_devices}

    @property
    def h(self) -> Mapping[str, Array]:
        """h^t by tensor (empty before the first step)."""
        return dict(self._state["h"])

    def step(
        self, weights: Weights, delta: Weights, *, participants: int | None = None
    ) -> dict[str, Array]:
        """θ^t from θ^{t−1} = ``weights`` and Δ̄ = ``delta`` averaged over ``participants``."""
        count = self.num_devices if participants is None else participants
        if not 1 <= count <= self.num_devices:
            raise ValueError(f"participants: expected 1…{self.num_devices}, got {count}")
        self._fraction = count / self.num_devices
        return super().step(weights, delta)

    def aggregate(self, weights: Weights, client_models: Sequence[Weights]) -> dict[str, Array]:
        """θ^t from θ^{t−1} = ``weights`` and the participants' models θ_k^t."""
        if not client_models:
            raise ValueError("FedDyn needs at least one client model")
        mean: dict[str, Array] = {}
        for name, w in weights.items():
            acc = np.zeros(w.shape, dtype=state_dtype(w.dtype))
            for model in client_models:
                acc += model[name]
            acc /= len(client_models)
            acc -= w
            mean[name] = acc
        return self.step(weights, mean, participants=len(client_models))

    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        (h,) = slots
        scratch = self._scratch.get(out.dtype)
        if scratch is None:
            scratch = self._scratch[out.dtype] = new_scratch(out.dtype)
        scaled_add(h, -self.alpha * self._fraction, d, scratch)
        np.add(w, d, out=out, dtype=out.dtype)
        scaled_add(out, -1.0 / self.alpha, h, scratch)


def client_state_update(
    state: Weights, local_weights: Weights, global_weights: Weights, *, alpha: float
) -> dict[str, Array]:
    """A FedDyn device's new state (Acar et al., ICLR 2021):
    ∇L_k(θ_k^t) = ∇L_k(θ_k^{t−1}) − α·(θ_k^t − θ^{t−1}).

    ``state`` is ∇L_k(θ_k^{t−1}) (zeros before the device's first round, see
    :func:`initial_client_state`), ``local_weights`` θ_k^t, ``global_weights`` θ^{t−1}, the model
    the round started from. Returns new arrays; the inputs are only read.
    """
    alpha = check_number("alpha", alpha, low=0.0, low_open=True)
    new: dict[str, Array] = {}
    for name, previous in state.items():
        out = np.subtract(
            local_weights[name], global_weights[name], dtype=state_dtype(previous.dtype)
        )
        out *= -alpha
        out += previous
        new[name] = out
    return new


def initial_client_state(weights: Weights) -> dict[str, Array]:
    """∇L_k(θ_k^0) as FedDyn starts it: zeros shaped like the model."""
    return {name: np.zeros(w.shape, dtype=state_dtype(w.dtype)) for name, w in weights.items()}
