"""Client selection: seeded uniform sampling (McMahan et al. 2017) and Oort (Lai et al.,
OSDI 2021): its utility formula, exploration share, exploitation of useful fast clients, pacer."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.learning.selection import (
    OortSelector,
    RandomSelector,
    loss_sq_mean,
    sample_clients,
    statistical_utility,
)

CLIENTS = [f"agent-{i:02d}" for i in range(30)]


@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 40))
def test_sampling_is_seeded_distinct_capped_and_ignores_input_order(seed: int, count: int) -> None:
    a = sample_clients(CLIENTS, count=count, rng=seed)
    b = sample_clients(reversed(CLIENTS), count=count, rng=seed)
    assert a == b
    assert len(a) == len(set(a)) == min(count, len(CLIENTS))
    assert set(a) <= set(CLIENTS)


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.1, 3), (0.25, 8), (0.01, 1), (1.0, 30), (0.05, 2)]
)
def test_fraction_is_max_of_rounded_c_times_k_and_one(fraction: float, expected: int) -> None:
    assert len(sample_clients(CLIENTS, fraction=fraction, rng=0)) == expected


def test_sampling_is_uniform() -> None:
    rng = np.random.default_rng(0)
    counts = Counter(c for _ in range(3000) for c in sample_clients(CLIENTS[:5], count=2, rng=rng))
    for client in CLIENTS[:5]:
        assert abs(counts[client] - 1200) < 120  # 3000 × 2/5, ±~5σ


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of count and fraction"),
        ({"count": 2, "fraction": 0.5}, "exactly one of count and fraction"),
        ({"fraction": 0.0}, "fraction: expected a finite value"),
        ({"fraction": 1.5}, "fraction: expected a finite value"),
        ({"count": -1}, "count: expected an integer ≥ 0"),
    ],
)
def test_sampling_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_clients(CLIENTS, **kwargs)  # type: ignore[arg-type]


def test_random_selector_replays_with_its_seed() -> None:
    a, b = RandomSelector(seed=3), RandomSelector(seed=3)
    rounds_a = [a.select(CLIENTS, 5) for _ in range(4)]
    assert rounds_a == [b.select(set(CLIENTS), 5) for _ in range(4)]
    assert len({tuple(r) for r in rounds_a}) > 1  # the generator moves on between rounds


def test_statistical_utility_is_batch_size_times_rms_loss() -> None:
    losses = [0.5, 1.0, 2.0, 0.1]
    expected = 4 * math.sqrt((0.25 + 1.0 + 4.0 + 0.01) / 4)
    assert statistical_utility(losses) == pytest.approx(expected, rel=1e-15)
    assert statistical_utility([]) == 0.0


# -- Oort ------------------------------------------------------------------------------------------


def explore(oort: OortSelector, utilities: dict[str, float], durations: dict[str, float]) -> None:
    """One round picking every client, then feedback with U_i = 1·sqrt(u²) = u."""
    oort.select(list(utilities), len(utilities))
    for client, u in utilities.items():
        oort.update(client, num_samples=1, loss_sq_mean=u * u, duration=durations[client])


def test_oort_utility_formula() -> None:
    """Util = (clipped, min-max normalised U + sqrt(0.1·ln R / L(i))) × (T/t_i)^(α·1[T<t_i])."""
    oort = OortSelector(preferred_duration=10.0, seed=0)
    explore(oort, {"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 5.0, "b": 20.0, "c": 10.0})
    for _ in range(4):  # rounds 2–5, picking nobody: L(i) stays 1
        oort.select([], 1)
    assert oort.round == 5
    bonus = math.sqrt(0.1 * math.log(5) / 1)
    # Three clients: the 95th percentile ("lower") is the second, 2; c's 4 is clipped to it,
    # then (u − 1)/(2 − 1) normalises.
    assert oort.utility("a") == pytest.approx(0.0 + bonus, rel=1e-14)
    # Slower than T: (u + bonus) × (T/t_i)^α, α = 2.
    assert oort.utility("b") == pytest.approx((1.0 + bonus) * (10 / 20) ** 2, rel=1e-14)
    assert oort.utility("c") == pytest.approx(1.0 + bonus, rel=1e-14)  # t_i = T: no penalty
    assert oort.utility("never-seen") == 0.0
    oort.select(["a"], 1)  # round 6 picks a: L(a) = 6, its bonus shrinks
    assert oort.utility("a") == pytest.approx(math.sqrt(0.1 * math.log(6) / 6), rel=1e-14)
    assert oort.utility("c") == pytest.approx(1.0 + math.sqrt(0.1 * math.log(6)), rel=1e-14)


def test_statistical_utility_of_a_client_is_samples_times_rms_loss() -> None:
    losses = np.array([0.5, 1.0, 2.0, 0.1])
    oort = OortSelector(seed=0)
    oort.select(["a"], 1)
    oort.update("a", num_samples=4, loss_sq_mean=float(np.mean(losses**2)), duration=1.0)
    assert oort.explored["a"].utility == pytest.approx(statistical_utility(losses), rel=1e-15)


def test_loss_square_mean_from_an_updates_metrics() -> None:
    assert loss_sq_mean({"loss": 1.5, "loss_sq_sum": 12.0, "loss_samples": 4.0}) == 3.0
    # A trainer whose graph reports no per-sample losses: its mean loss squared (lower bound).
    assert loss_sq_mean({"loss": 1.5}) == 2.25
    assert loss_sq_mean({"loss": 1.5, "loss_sq_sum": 3.0, "loss_samples": 0.0}) == 2.25
    assert loss_sq_mean({"loss_sq_sum": -3.0, "loss_samples": 2.0}) == 0.0  # never negative
    assert loss_sq_mean({}) == 0.0


def test_oort_clips_an_outlier_at_the_95th_percentile() -> None:
    """One client with an absurd loss (corrupted data, or lying) is worth no more than the
    clients at the 95th percentile (Lai et al. §4.3): it cannot take every round."""
    utilities = {f"c{i:02d}": float(i + 1) for i in range(20)}
    utilities["c19"] = 1e6
    oort = OortSelector(seed=0, preferred_duration=10.0)
    explore(oort, utilities, dict.fromkeys(utilities, 1.0))
    oort.select([], 1)
    scores = oort.utilities()
    # 20 values: the "lower" 95th percentile is the 19th smallest, 19.
    assert scores["c19"] == pytest.approx(scores["c18"], rel=1e-14)
    assert scores["c18"] > scores["c17"] > scores["c00"]
    assert scores["c17"] - scores["c00"] == pytest.approx(17 / 18, rel=1e-12)


def test_oort_blacklists_the_most_picked_within_its_share() -> None:
    oort = OortSelector(seed=0, blacklist_rounds=2, blacklist_share=0.5)
    clients = ["a", "b", "c", "d"]
    for _ in range(2):
        oort.select(clients, 4)
    assert oort.blacklist() == set()  # picked twice: not more than 2 yet
    oort.select(["a", "b", "c"], 3)
    assert oort.blacklist() == {"a", "b"}  # a, b, c over the bound; half of four at most
    chosen = oort.select(clients, 4)
    assert sorted(chosen) == ["c", "d"]
    assert OortSelector(seed=0).blacklist() == set()  # off unless asked for


def test_oort_exploration_share_decays_to_its_floor() -> None:
    oort = OortSelector(seed=0)
    shares = []
    for _ in range(200):
        shares.append(oort.exploration)
        oort.select(CLIENTS, 3)
    assert shares[0] == 0.9
    assert shares[1] == pytest.approx(0.9 * 0.98)
    assert shares[10] == pytest.approx(0.9 * 0.98**10)
    assert min(shares) == 0.2
    assert shares[-1] == 0.2


def test_oort_splits_between_explored_and_unexplored() -> None:
    oort = OortSelector(seed=1, exploration=0.5, min_exploration=0.5)
    explored = CLIENTS[:10]
    oort.select(explored, 10)
    for i, client in enumerate(explored):
        oort.update(client, num_samples=10, loss_sq_mean=float(i + 1), duration=1.0)
    chosen = oort.select(CLIENTS, 10)
    assert len(chosen) == len(set(chosen)) == 10
    assert sum(c in explored for c in chosen) == 5
    # Too few unexplored: the explored fill the round (and the other way round).
    assert len(oort.select(explored + CLIENTS[10:12], 10)) == 10
    assert sum(c in explored for c in oort.select(CLIENTS[:12], 10)) >= 8


def test_oort_exploits_useful_fast_clients() -> None:
    oort = OortSelector(seed=2, exploration=0.2, min_exploration=0.2, preferred_duration=10.0)
    oort.select(CLIENTS, 30)
    for i, client in enumerate(CLIENTS):
        useful = i < 5
        slow = 5 <= i < 10  # as useful, but four times slower than T
        loss = 9.0 if useful or slow else 0.01
        oort.update(client, num_samples=100, loss_sq_mean=loss, duration=40.0 if slow else 5.0)
    picks: Counter[str] = Counter()
    for _ in range(50):
        for c in oort.select(CLIENTS, 5):
            picks[c] += 1
    useful_picks = sum(picks[c] for c in CLIENTS[:5])
    slow_picks = sum(picks[c] for c in CLIENTS[5:10])
    assert useful_picks >= 150  # 4 exploitation slots a round, almost all for the useful five
    assert slow_picks < useful_picks / 4


def test_oort_pacer_relaxes_t_when_utility_falls() -> None:
    oort = OortSelector(seed=0, preferred_duration=10.0, pacer_window=3, pacer_step=2.0)
    utilities = [9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0]
    history = []
    for u in utilities:
        oort.select(["a"], 1)
        oort.update("a", num_samples=1, loss_sq_mean=u * u, duration=1.0)
        history.append(oort.preferred_duration)
    oort.select(["a"], 1)
    history.append(oort.preferred_duration)
    # Checked every W = 3 rounds once 2W are known: after round 6 (27 > 3: relax), after
    # round 9 (3 = 3: keep), after round 12 (3 < 15: keep).
    assert history == [10.0] * 6 + [12.0] * 7


def test_oort_starts_t_at_the_median_duration_when_not_given() -> None:
    oort = OortSelector(seed=0)
    oort.select(["a", "b", "c"], 3)
    for client, seconds in zip("abc", [1.0, 4.0, 9.0], strict=True):
        oort.update(client, num_samples=1, loss_sq_mean=1.0, duration=seconds)
    oort.select(["a", "b", "c"], 1)
    assert oort.preferred_duration == 4.0
    assert oort.pacer_step == pytest.approx(0.4)


def test_oort_is_reproducible_with_a_seed() -> None:
    def run(seed: int) -> list[list[str]]:
        oort = OortSelector(seed=seed)
        out = []
        for r in range(10):
            chosen = oort.select(CLIENTS, 4)
            out.append(chosen)
            for c in chosen:
                oort.update(c, num_samples=10 + r, loss_sq_mean=1.0 + len(c), duration=2.0)
        return out

    assert run(4) == run(4)
    assert run(4) != run(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exploration": 1.5}, "exploration: expected a finite value"),
        ({"exploration": 0.1}, "exploration: expected a finite value in \\[0.2"),
        ({"alpha": -1}, "alpha"),
        ({"pacer_window": 0}, "pacer_window: expected an integer ≥ 1"),
        ({"preferred_duration": 0.0}, "preferred_duration"),
        ({"blacklist_rounds": 0}, "blacklist_rounds: expected an integer ≥ 1"),
        ({"clip_percentile": 0.0}, "clip_percentile"),
    ],
)
def test_oort_settings_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OortSelector(**kwargs)  # type: ignore[arg-type]


def test_oort_feedback_is_checked() -> None:
    oort = OortSelector()
    with pytest.raises(ValueError, match="loss_sq_mean"):
        oort.update("a", num_samples=1, loss_sq_mean=float("nan"), duration=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        oort.update("a", num_samples=-1, loss_sq_mean=1.0, duration=1.0)
