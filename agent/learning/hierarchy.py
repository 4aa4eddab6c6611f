"""Hierarchical and hybrid FL: the job's topology as roles read it, and the middle tier's rule.

Hierarchical FL follows Liu et al., "Client-Edge-Cloud Hierarchical Federated Learning" (ICC
2020) in its κ2 = 1 form (Flame's hierarchical topology): trainers of a group send their deltas
to a middle aggregator near them, which aggregates them (FedBuff with its own K, or a
synchronous round) and sends the mean delta upstream to the top aggregator as one update whose
sample count is the group's. Hybrid FL (Flame's hybrid topology) averages a group's deltas by
ring all-reduce among the trainers themselves (:mod:`agent.learning.ring`); the group's middle
aggregator then only relays model versions and forwards the ring's one result upstream.

A role learns its group from its own agent's labels: the value of the topology's ``group_by``
label (the planner groups agents by the same label, so both see the same groups).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.learning.arrays import Array, Weights
from agent.learning.optimizers.base import ServerOptimizer

Kind = Literal["two_tier", "hierarchical", "hybrid"]
KINDS: tuple[str, ...] = ("two_tier", "hierarchical", "hybrid")


class TopologyError(ValueError):
    """The bundle's topology cannot be followed on this agent; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    """``topology`` of a job spec: two-tier (the default), hierarchical (Liu et al. 2020) or
    hybrid (Flame's). The coordinator's spec parser builds it from the YAML (with its checks);
    roles read it back from their bundle's configuration."""

    kind: Kind = "two_tier"
    group_by: str | None = None
    """The agent label whose value names an agent's group (``site``, ``building``, ...)."""
    buffer_size: int = 2
    """Hierarchical, async: the middle aggregator's K (updates per delta sent upstream)."""
    min_groups: int = 1
    """Groups the top aggregator waits for before its first sync round."""

    @property
    def grouped(self) -> bool:
        """True when trainers talk to a group (hierarchical or hybrid), not to the top."""
        return self.kind != "two_tier"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Topology:
        raw = config.get("topology") or {}
        if isinstance(raw, str):
            raw = {"kind": raw}
        if not isinstance(raw, Mapping):
            raise TopologyError(f"topology: expected a map, got {type(raw).__name__}")
        kind = raw.get("kind", "two_tier")
        if kind not in KINDS:
            raise TopologyError(f"topology.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        group_by = raw.get("group_by")
        if kind != "two_tier" and (not isinstance(group_by, str) or not group_by):
            raise TopologyError(f"topology.group_by: a {kind} job needs the label to group by")
        topology = cls(
            kind=kind,
            group_by=group_by,
            buffer_size=int(raw.get("buffer_size", 2)),
            min_groups=int(raw.get("min_groups", 1)),
        )
        if topology.buffer_size < 1 or topology.min_groups < 1:
            raise TopologyError("topology.buffer_size and topology.min_groups must be ≥ 1")
        return topology

    def group_of(self, labels: Mapping[str, Any]) -> str:
        """This agent's group: the value of its ``group_by`` label."""
        assert self.group_by is not None
        value = labels.get(self.group_by)
        if value is None or str(value) == "":
            raise TopologyError(
                f"this agent has no {self.group_by!r} label, and the job groups agents by it"
            )
        return str(value)


class Forward(ServerOptimizer):
    """The middle aggregator's update rule (Liu et al. 2020, edge aggregation, κ2 = 1): the
    aggregated delta is not applied to the model but kept, to be sent upstream as the group's
    update; the model stays the global version the middle relays."""

    name = "forward"

    def __init__(self) -> None:
        super().__init__()
        self._taken: dict[str, Array] | None = None

    def hyperparameters(self) -> dict[str, float]:
        return {}

    def _update(self, w: Array, d: Array, out: Array, slots: tuple[Array, ...]) -> None:
        del d, slots
        np.copyto(out, w)

    def step(
        self, weights: Weights, delta: Weights, *, participants: int | None = None
    ) -> dict[str, Array]:
        self._taken = {name: np.array(value, copy=True) for name, value in delta.items()}
        return super().step(weights, delta, participants=participants)

    def take(self) -> dict[str, Array] | None:
        """The last aggregated delta (once), or ``None`` when none was made since."""
        taken, self._taken = self._taken, None
        return taken
