"""FedBuff: buffered asynchronous aggregation (Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, arXiv 2106.06639).

Trainers pull model version t_i, train, and send Δ_i = y_Q − y_0 against the model they started
from with t_i. On arrival at version t: τ = t − t_i; buffer += s(τ)·Δ_i; k += 1. When k == K:
Δ̄ = buffer / K (divided by K, not by Σ s(τ): REFERENCES.md), the server optimizer applies Δ̄,
t += 1, and the buffer is reset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from agent.learning.aggregation import BaseAggregator, Outcome, Status
from agent.learning.arrays import Weights, read_int
from agent.learning.clipping import UpdateGuard
from agent.learning.optimizers import FedAvg, ServerOptimizer
from agent.learning.staleness import Staleness


class FedBuffAggregator(BaseAggregator):
    """FedBuff's server (Nguyen et al., AISTATS 2022): a buffer of K staleness-weighted deltas,
    then one server-optimizer step per K updates.

    * ``buffer_size``: K.
    * ``optimizer``: the server optimizer (default :class:`FedAvg` with η = 1: w ← w + Δ̄).
    * ``staleness``: s(τ) and the optional max staleness (default 1/sqrt(1+τ), no bound).
    * ``max_norm``: reject deltas whose global L2 norm exceeds it.
    * ``guards``: more update guards after the bound, e.g.
      :class:`~agent.learning.clipping.NormClip` (their factor scales the delta).
    * ``accumulate_dtype``: float32 (default) or float64 for the buffer.
    * ``remember_ids``: how many applied update ids are kept to refuse duplicates.
    * ``version``: the version of ``weights``.

    Sample counts weigh only the reported metrics: FedBuff weighs deltas by staleness alone.
    Pure numpy and not thread-safe: offer from one thread at a time.
    """

    def __init__(
        self,
        weights: Mapping[str, npt.ArrayLike],
        *,
        buffer_size: int = 10,
        optimizer: ServerOptimizer | None = None,
        staleness: Staleness | None = None,
        max_norm: float | None = None,
        accumulate_dtype: npt.DTypeLike = np.float32,
        remember_ids: int = 100_000,
        version: int = 0,
        guards: Sequence[UpdateGuard] = (),
    ) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size: expected an integer ≥ 1, got {buffer_size!r}")
        rule = optimizer if optimizer is not None else FedAvg()
        if rule.synchronous:
            raise ValueError(
                f"{type(rule).__name__} needs synchronous rounds (deltas against the current "
                "model), not FedBuff"
            )
        super().__init__(
            weights,
            optimizer=rule,
            max_norm=max_norm,
            accumulate_dtype=accumulate_dtype,
            remember_ids=remember_ids,
            version=version,
            guards=guards,
        )
        self._k = buffer_size
        self._staleness = staleness if staleness is not None else Staleness()

    @property
    def buffer_size(self) -> int:
        """K: updates per model version."""
        return self._k

    @property
    def pending(self) -> int:
        """k: updates in the buffer now."""
        return self._buffer.count

    @property
    def staleness(self) -> Staleness:
        """The staleness weighting."""
        return self._staleness

    def offer(
        self,
        update_id: str,
        base_version: int,
        delta: Weights,
        num_samples: int = 1,
        metrics: Mapping[str, float] | None = None,
    ) -> Outcome:
        """Offer one trainer's delta Δ_i against version ``base_version`` = t_i.

        Checks, in order: the id (a repeat of an applied id is a duplicate), ``num_samples``,
        the staleness (t_i ahead of t is rejected; τ above the bound is dropped as stale), the
        delta against the model (names, dtypes, shapes, finite values, norm bound). Then
        buffer += s(τ)·Δ_i; the K-th update makes a new version, reported in the outcome's
        ``version`` with the mean ``metrics`` of its updates. ``delta`` is only read.
        """
        verdict = self._screen(update_id, base_version, num_samples)
        if verdict is not None:
            return verdict
        tau = self._version - int(base_version)
        if tau < 0:
            return self._reject(
                update_id,
                f"base version {base_version} is ahead of the current {self._version}",
                "version",
            )
        if self._staleness.too_stale(tau):
            self._counters.stale_dropped += 1
            return Outcome(
                Status.STALE,
                update_id,
                reason=f"staleness {tau} exceeds the maximum {self._staleness.max_staleness}",
                staleness=tau,
            )
        factor = self._check(update_id, delta)
        if isinstance(factor, Outcome):
            return factor
        weight = self._staleness.weight(tau)
        self._accept(update_id, delta, weight, int(num_samples), metrics, scale=factor)
        if self._buffer.count < self._k:
            return Outcome(Status.APPLIED, update_id, staleness=tau, weight=weight)
        version, mean_metrics = self._advance(self._k)
        return Outcome(
            Status.APPLIED,
            update_id,
            staleness=tau,
            weight=weight,
            version=version,
            metrics=mean_metrics,
        )

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """See :meth:`BaseAggregator.load_state_dict`; the buffer (k and the weighted sum) comes
        back too, so the next offers give exactly what they would have without the restart."""
        pending = read_int({k: np.asarray(v) for k, v in state.items()}, "buffer/count")
        if pending >= self._k:
            raise ValueError(f"checkpoint holds {pending} buffered updates, K is {self._k}")
        super().load_state_dict(state)
