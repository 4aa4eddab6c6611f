"""Norm bound and norm clipping of client updates: composable guards around any aggregator.

A guard looks at one update's global L2 norm (measured once, by
:meth:`~agent.learning.aggregation.ModelSpec.examine`, after the update's names, dtypes, shapes
and finiteness were checked) and answers with a factor to scale the update by, or a
:class:`Rejection`. Guards compose left to right, each seeing the norm the previous ones left;
the aggregator folds the product of the factors into the weight the delta enters its buffer
with (FedBuff's s(τ)·Δ becomes s(τ)·f·Δ), so clipping never copies a delta. The aggregators
(:class:`~agent.learning.fedbuff.FedBuffAggregator`, :class:`~agent.learning.fedavg.SyncFedAvg`)
take a sequence of guards, as Flower wraps a strategy in its clipping strategies instead of
threading a flag through every strategy.

* :class:`NormBound` (``algorithm.max_norm``): reject an update whose norm is above a bound: the
  norm-difference defence Sun et al. evaluate against model-replacement backdoors ("Can You
  Really Backdoor Federated Learning?", 2019, arXiv 1911.07963): a boosted malicious update has
  a large norm.
* :class:`NormClip` (``algorithm.clip_norm``): Δ ← Δ·min(1, C/‖Δ‖₂), the per-client update
  clipping of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
  Models", ICLR 2018, arXiv 1710.06963), which Sun et al. (2019) show limits what one client's
  update can do to the global model without rejecting honest outliers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an update is refused: a short ``code`` to count by and a ``reason`` to log."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Measured:
    """An update that passed the structural checks, with its global L2 norm and its largest
    tensor (named in rejections so an operator sees where the norm comes from)."""

    norm: float
    largest: str = ""
    largest_norm: float = 0.0


class UpdateGuard(Protocol):
    """One step of update screening: a factor to scale the update by, or a rejection."""

    def screen(self, update: Measured) -> float | Rejection: ...


@dataclass(frozen=True)
class NormBound:
    """Reject updates with ‖Δ‖₂ above ``bound`` (Sun et al. 2019, norm-difference defence)."""

    bound: float

    def __post_init__(self) -> None:
        _check_positive("max_norm", self.bound)

    def screen(self, update: Measured) -> float | Rejection:
        if update.norm <= self.bound:
            return 1.0
        return Rejection(
            "norm",
            f"update L2 norm {update.norm:.6g} exceeds the bound {self.bound:g}; "
            f"largest tensor {update.largest!r} has norm {update.largest_norm:.6g}",
        )


@dataclass(frozen=True)
class NormClip:
    """Scale updates to ‖Δ‖₂ ≤ ``clip`` (McMahan et al. 2018, DP-FedAvg's per-client clipping;
    Sun et al. 2019)."""

    clip: float

    def __post_init__(self) -> None:
        _check_positive("clip_norm", self.clip)

    def screen(self, update: Measured) -> float | Rejection:
        return 1.0 if update.norm <= self.clip else self.clip / update.norm


def screen(guards: Iterable[UpdateGuard], update: Measured) -> float | Rejection:
    """Run ``guards`` in order; the product of their factors, or the first rejection."""
    factor = 1.0
    for guard in guards:
        verdict = guard.screen(
            Measured(update.norm * factor, update.largest, update.largest_norm * factor)
        )
        if isinstance(verdict, Rejection):
            return verdict
        factor *= verdict
    return factor


def norm_guards(max_norm: float | None = None, clip_norm: float | None = None) -> list[UpdateGuard]:
    """The guards a job spec asks for: the bound first (a grossly large update is refused, not
    shrunk), then clipping."""
    guards: list[UpdateGuard] = []
    if max_norm is not None:
        guards.append(NormBound(max_norm))
    if clip_norm is not None:
        guards.append(NormClip(clip_norm))
    return guards


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value > 0 or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0 or None, got {value!r}")
