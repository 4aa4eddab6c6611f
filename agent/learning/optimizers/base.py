"""The one interface every server optimizer implements, and the state bookkeeping they share.

A server optimizer turns the aggregated client delta Δ into the next global model
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2: the clients' average
change is treated as a pseudo-gradient). It never sees the network, the clock or the clients.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from agent.learning.arrays import Array, State, Weights, owned, read_int, scalar, state_dtype


class ServerOptimizer(abc.ABC):
    """Base of the server optimizers (Reddi et al., ICLR 2021, Algorithm 2).

    :meth:`step` returns new arrays of the weights' dtypes and never writes into ``weights`` or
    ``delta`` (either may be a read-only view), nor keeps a reference to them. Arithmetic runs in
    float32 for float32 weights (float64 for float64). Per-tensor state (momentum, second moment)
    is allocated on the first step, lives in owned buffers updated in place, and is named by
    *slots*: ``state_dict()`` holds ``step`` and ``<slot>/<tensor>`` arrays, every value a numpy
    array, so :func:`agent.protocol.codec.encode_tensors` can write it.

    Not thread-safe: one caller at a time.
    """

    name: ClassVar[str]
    """The name :func:`~agent.learning.optimizers.make_server_optimizer` knows it by."""
    slots: ClassVar[tuple[str, ...]] = ()
    """Per-tensor state buffers this optimizer keeps."""
    synchronous: ClassVar[bool] = False
    """True when the rule needs every delta taken against the current model and Δ the plain
    mean over the round's participants (FedDyn): synchronous rounds only, never FedBuff."""

    def __init__(self) -> None:
        self._steps = 0
        self._state: dict[str, dict[str, Array]] = {slot: {} for slot in self.slots}

    @property
    def steps(self) -> int:
        """How many times :meth:`step` has run (kept across ``state_dict`` round trips)."""
        return self._steps

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, float]:
        """The keyword arguments that rebuild this optimizer through the factory."""

    @abc.abstractmethod
    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        """Write the new value of one tensor into ``out`` (``state_dtype`` of ``w``), updating
        this tensor's slot buffers (in :attr:`slots` order) in place."""

    def _initial(self, slot: str, w: Array) -> Array:
        """A fresh slot buffer for tensor ``w``: zeros unless a subclass says otherwise."""
        del slot
        return np.zeros(w.shape, dtype=state_dtype(w.dtype))

    def step(
        self, weights: Weights, delta: Weights, *, participants: int | None = None
    ) -> dict[str, Array]:
        """Apply one aggregated delta: returns the new weights, in ``weights``' order.

        ``participants`` is how many client updates ``delta`` averages; only rules that need it
        (FedDyn's 1/m·Σ) read it.
        """
        del participants
        if weights.keys() != delta.keys():
            missing = sorted(weights.keys() - delta.keys())
            extra = sorted(delta.keys() - weights.keys())
            raise ValueError(f"delta does not match the weights: missing {missing}, extra {extra}")
        if self._state and not any(self._state.values()):
            for slot, buffers in self._state.items():
                buffers.update({name: self._initial(slot, w) for name, w in weights.items()})
        self._check_state(weights)
        new: dict[str, Array] = {}
        for name, w in weights.items():
            d = delta[name]
            if d.shape != w.shape:
                raise ValueError(f"tensor {name!r}: delta shape {d.shape}, weights {w.shape}")
            out = np.empty(w.shape, dtype=state_dtype(w.dtype))
            self._update(w, d, out, tuple(self._state[slot][name] for slot in self.slots))
            new[name] = out if out.dtype == w.dtype else out.astype(w.dtype)
        self._steps += 1
        return new

    def state_dict(self) -> State:
        """``step`` and every slot buffer as ``<slot>/<tensor>``: arrays only, no copies (take
        one before stepping again if the state must outlive the next step)."""
        state: State = {"step": scalar(self._steps, np.int64)}
        for slot, buffers in self._state.items():
            state.update({f"{slot}/{name}": value for name, value in buffers.items()})
        return state

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """Restore what :meth:`state_dict` returned (possibly read-only views from
        ``decode_tensors``: they are copied). ``ValueError`` says what does not fit."""
        arrays = {key: np.asarray(value) for key, value in state.items()}
        steps = read_int(arrays, "step")
        if steps < 0:
            raise ValueError(f"state 'step': expected a count ≥ 0, got {steps}")
        loaded: dict[str, dict[str, Array]] = {slot: {} for slot in self.slots}
        for key, value in arrays.items():
            if key == "step":
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in loaded or not name:
                raise ValueError(f"state key {key!r} is not 'step' or one of {self.slots} slots")
            if value.dtype.kind != "f":
                raise ValueError(f"state {key!r}: expected a floating array, got {value.dtype}")
            loaded[slot][name] = owned(value, state_dtype(value.dtype))
        names = [set(buffers) for buffers in loaded.values()]
        if any(n != names[0] for n in names):
            raise ValueError(f"state slots {self.slots} do not hold the same tensors")
        for name in names[0] if names else ():
            shapes = {buffers[name].shape for buffers in loaded.values()}
            if len(shapes) > 1:
                raise ValueError(f"tensor {name!r}: slot shapes disagree: {sorted(shapes)}")
        self._state = loaded
        self._steps = steps

    def _check_state(self, weights: Weights) -> None:
        for slot, buffers in self._state.items():
            if buffers.keys() != weights.keys():
                raise ValueError(
                    f"{self.name} state {slot!r} holds tensors {sorted(buffers)}, "
                    f"the weights {sorted(weights)}"
                )
            for name, buffer in buffers.items():
                if buffer.shape != weights[name].shape:
                    raise ValueError(
                        f"{self.name} state {slot}/{name}: shape {buffer.shape}, "
                        f"weights {weights[name].shape}"
                    )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"


def check_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in the given range, else a
    ``ValueError`` naming the parameter, the range and what was given."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{name}: expected a number, got {value!r}{hint}")
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a finite value in {interval}, got {value!r}")
    return number
