"""Naming stragglers from arrival times, with a clock the test drives."""

from __future__ import annotations

import statistics

from hypothesis import given
from hypothesis import strategies as st

from agent.learning.stragglers import StragglerTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_trainer_ten_times_slower_is_a_straggler() -> None:
    clock = Clock()
    tracker = StragglerTracker(clock=clock)
    for agent in ("fast-1", "fast-2", "slow"):
        tracker.seen(agent)
    for second in range(1, 21):
        clock.now = 1000.0 + second
        tracker.update("fast-1", applied=True, staleness=0)
        tracker.update("fast-2", applied=True, staleness=1)
        if second % 10 == 0:
            tracker.update("slow", applied=False, staleness=9)
    assert tracker.stragglers() == ["slow"]
    stats = tracker.snapshot()
    assert stats["slow"]["received"] == 2
    assert stats["slow"]["dropped"] == 2
    assert stats["slow"]["last_staleness"] == 9
    assert stats["slow"]["seconds_per_update"] == 10.0
    assert stats["fast-1"]["seconds_per_update"] == 1.0


def test_a_silent_trainer_drifts_into_the_list_and_a_lone_one_never_does() -> None:
    clock = Clock()
    tracker = StragglerTracker(clock=clock)
    tracker.seen("a")
    clock.now += 100
    assert tracker.stragglers() == []  # nobody to compare with
    for agent in ("b", "c"):
        tracker.seen(agent)
    tracker.seen("a")  # seeing it again changes nothing
    for _ in range(5):
        clock.now += 1
        for agent in ("a", "b", "c"):
            tracker.update(agent, applied=True, staleness=0)
    assert tracker.stragglers() == ["a"]  # 105 s for 5 updates against 1 s each
    for _ in range(30):
        clock.now += 1
        for agent in ("a", "b"):
            tracker.update(agent, applied=True, staleness=0)
    assert tracker.stragglers() == ["c"]  # c went quiet for 30 s: 7 s per update now


def test_missing_a_round_deadline_counts_until_the_next_update() -> None:
    clock = Clock()
    tracker = StragglerTracker(clock=clock)
    tracker.seen("a")
    tracker.seen("b")
    tracker.missed(["b"])
    assert tracker.stragglers() == ["b"]
    tracker.update("b", applied=True, staleness=0)
    assert tracker.stragglers() == []


def test_a_newcomer_gets_the_slowest_others_time_for_its_first_update() -> None:
    clock = Clock()
    tracker = StragglerTracker(clock=clock)
    for agent, updates in (("a", 10), ("b", 8), ("c", 6)):
        tracker.seen(agent)
        for _ in range(updates):
            tracker.update(agent, applied=True, staleness=0)
    clock.now += 10
    tracker.seen("new")
    clock.now += 4  # a: 1.4 s, b: 1.75 s, c: 2.33 s per update; new: 4 s, no update yet
    assert tracker.stragglers() == []  # 4 < 2 × 2.33 (twice the median, 3.5, would name it)
    clock.now += 2
    assert tracker.stragglers() == ["new"]  # 6 > 2 × 2.67


def reference_stragglers(tracker: StragglerTracker, now: float) -> list[str]:
    """The definition, computed the obvious way (a median of the others per trainer)."""
    intervals = {a: tracker.interval(a, now) for a in tracker.trainers}
    delivered = {a for a, s in tracker.trainers.items() if s.received}
    out = []
    for agent, stats in tracker.trainers.items():
        others = [intervals[a] for a in delivered if a != agent]
        typical = (statistics.median if stats.received else max)(others) if others else 0.0
        if (others and intervals[agent] > tracker.factor * typical) or stats.missed_round:
            out.append(agent)
    return sorted(out)


@given(
    trainers=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 30), st.booleans()), max_size=25
    ),
    elapsed=st.integers(0, 100),
)
def test_the_fast_straggler_rule_is_the_definition(
    trainers: list[tuple[int, int, bool]], elapsed: int
) -> None:
    """Trainers first seen at various times with various update counts (ties included): the
    one-sort computation names exactly who the definition names."""
    clock = Clock()
    tracker = StragglerTracker(clock=clock)
    for i, (seen_at, updates, missed) in enumerate(trainers):
        clock.now = 1000.0 + seen_at
        tracker.seen(f"t{i}")
        for _ in range(updates):
            tracker.update(f"t{i}", applied=True, staleness=0)
        if missed:
            tracker.missed([f"t{i}"])
    now = 1051.0 + elapsed
    assert tracker.stragglers(now) == reference_stragglers(tracker, now)
