"""Staleness weighting for asynchronous aggregation, a piece composed into FedBuff.

An update trained from model version t_i and arriving at version t has staleness τ = t − t_i and
enters the aggregate scaled by s(τ):

* ``"sqrt"`` (default): s(τ) = 1/sqrt(1+τ) — FedBuff, Nguyen et al., "Federated Learning with
  Buffered Asynchronous Aggregation", AISTATS 2022;
* ``"polynomial"``: s(τ) = (1+τ)^−a, a > 0 — FedAsync, Xie et al., "Asynchronous Federated
  Optimization", 2019 (a = 0.5 is FedBuff's rule);
* ``"constant"``: s(τ) = 1 — FedAsync's constant function.

With ``max_staleness`` set, updates with τ > max_staleness are dropped (and counted) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast, get_args

StalenessKind = Literal["sqrt", "constant", "polynomial"]
STALENESS_KINDS: tuple[str, ...] = get_args(StalenessKind)


@dataclass(frozen=True, kw_only=True)
class Staleness:
    """How much an update of staleness τ counts (FedBuff, Nguyen et al., AISTATS 2022:
    1/sqrt(1+τ); FedAsync, Xie et al. 2019: constant and (1+τ)^−a), and how stale is too stale.

    ``Staleness()`` is FedBuff's rule without a bound.
    """

    kind: StalenessKind = "sqrt"
    exponent: float = 0.5
    """a in (1+τ)^−a; used by ``"polynomial"`` only."""
    max_staleness: int | None = None
    """Drop updates with τ above this; ``None`` keeps every update."""

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ValueError(
                f"unknown staleness weighting {self.kind!r}; known: {', '.join(STALENESS_KINDS)}"
            )
        exponent = self.exponent
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
            raise ValueError(f"staleness exponent: expected a number, got {exponent!r}")
        if not (math.isfinite(exponent) and exponent > 0):
            raise ValueError(f"staleness exponent: expected a finite value > 0, got {exponent}")
        bound = self.max_staleness
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise ValueError(f"max_staleness: expected an integer or None, got {bound!r}")
        if bound is not None and bound < 0:
            raise ValueError(f"max_staleness: expected a value ≥ 0, got {bound}")

    def too_stale(self, tau: int) -> bool:
        """True when an update of staleness ``tau`` is to be dropped."""
        return self.max_staleness is not None and tau > self.max_staleness

    def weight(self, tau: int) -> float:
        """s(τ) for τ ≥ 0."""
        if tau < 0:
            raise ValueError(f"staleness must be ≥ 0, got {tau}")
        if self.kind == "sqrt":
            return 1.0 / math.sqrt(1.0 + tau)
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.exponent)
        return 1.0

    def __call__(self, tau: int) -> float:
        return self.weight(tau)


def make_staleness(
    name: str = "sqrt", *, exponent: float = 0.5, max_staleness: int | None = None
) -> Staleness:
    """The staleness weighting called ``name`` (``sqrt``, ``constant`` or ``polynomial``)."""
    kind = name.strip().lower() if isinstance(name, str) else name
    if kind not in STALENESS_KINDS:
        raise ValueError(
            f"unknown staleness weighting {name!r}; known: {', '.join(STALENESS_KINDS)}"
        )
    return Staleness(kind=cast(StalenessKind, kind), exponent=exponent, max_staleness=max_staleness)
