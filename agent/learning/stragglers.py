"""Which trainers of a job lag behind the others: the aggregator's view, for dashboards.

Stragglers are the devices that take much longer than the rest to deliver an update (Bonawitz
et al., "Towards Federated Learning at Scale", MLSys 2019; the FedBuff paper, Nguyen et al.
AISTATS 2022, measures how asynchronous buffering tolerates them, and synchronous FedAvg rounds
drop them at the round deadline). This module only *names* them; it changes no aggregation.

A trainer is a straggler when

* its time per update, ``(now − first seen) / max(1, updates received)``, is more than
  ``factor`` (2) times the median time per update of the other trainers that have delivered at
  least one update: a trainer that goes silent drifts into the list as its time grows. A trainer
  that has not delivered its first update yet (which includes loading the model) is compared
  with the slowest of the others instead of their median; or
* (synchronous rounds) it missed the deadline of the last round it was sampled for, until its
  next update arrives.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

STRAGGLER_FACTOR = 2.0


@dataclass
class TrainerStats:
    """What the aggregator has seen from one trainer."""

    first_seen: float
    received: int = 0
    applied: int = 0
    dropped: int = 0
    """Updates not applied: stale, late, duplicate or rejected."""
    last_update: float | None = None
    last_staleness: int | None = None
    """Versions between the update's base version and the aggregator's version on arrival."""
    missed_round: bool = False

    def to_json(self, now: float, interval: float) -> dict[str, Any]:
        return {
            "received": self.received,
            "applied": self.applied,
            "dropped": self.dropped,
            "last_update": None if self.last_update is None else round(self.last_update, 3),
            "last_staleness": self.last_staleness,
            "seconds_per_update": round(interval, 3),
            "missed_round": self.missed_round,
        }


class StragglerTracker:
    """Per-trainer arrival statistics and the stragglers they point to."""

    def __init__(
        self, factor: float = STRAGGLER_FACTOR, clock: Callable[[], float] = time.time
    ) -> None:
        self.factor = factor
        self.clock = clock
        self.trainers: dict[str, TrainerStats] = {}

    def seen(self, agent: str) -> TrainerStats:
        """The trainer made itself known (a model request or an update)."""
        stats = self.trainers.get(agent)
        if stats is None:
            stats = self.trainers[agent] = TrainerStats(first_seen=self.clock())
        return stats

    def update(self, agent: str, *, applied: bool, staleness: int | None) -> None:
        """An update from ``agent`` arrived (applied or not)."""
        stats = self.seen(agent)
        stats.received += 1
        stats.applied += int(applied)
        stats.dropped += int(not applied)
        stats.last_update = self.clock()
        stats.last_staleness = staleness
        stats.missed_round = False

    def missed(self, agents: Iterable[str]) -> None:
        """These sampled trainers did not report before the round's deadline."""
        for agent in agents:
            self.seen(agent).missed_round = True

    def interval(self, agent: str, now: float | None = None) -> float:
        stats = self.trainers[agent]
        elapsed = (self.clock() if now is None else now) - stats.first_seen
        return max(0.0, elapsed) / max(1, stats.received)

    def stragglers(self, now: float | None = None) -> list[str]:
        """The trainers that lag, sorted by id. One sort of the intervals serves every
        trainer's "median of the others" (it is the sorted list without its own interval):
        O(N log N), where a median per trainer cost O(N² log N) on every update."""
        now = self.clock() if now is None else now
        intervals = {a: self.interval(a, now) for a in self.trainers}
        delivered = sorted(intervals[a] for a, s in self.trainers.items() if s.received)
        out = []
        for agent, stats in self.trainers.items():
            own = intervals[agent]
            typical: float | None
            if stats.received:
                typical = _median_without(delivered, bisect.bisect_left(delivered, own))
            else:
                typical = delivered[-1] if delivered else None  # the slowest of the others
            slow = typical is not None and own > self.factor * typical
            if slow or stats.missed_round:
                out.append(agent)
        return sorted(out)

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per trainer statistics as JSON, for the aggregator's progress document."""
        now = self.clock() if now is None else now
        return {
            agent: stats.to_json(now, self.interval(agent, now))
            for agent, stats in sorted(self.trainers.items())
        }


def _median_without(values: list[float], index: int) -> float | None:
    """The median of sorted ``values`` without the one at ``index`` (as
    :func:`statistics.median` gives it), or ``None`` if none is left."""
    left = len(values) - 1
    if left < 1:
        return None

    def at(k: int) -> float:
        return values[k] if k < index else values[k + 1]

    middle = left // 2
    return at(middle) if left % 2 else (at(middle - 1) + at(middle)) / 2
