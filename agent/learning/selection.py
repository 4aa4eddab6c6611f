"""Client selection: uniform random sampling (McMahan et al., AISTATS 2017) and Oort's guided
participant selection (Lai et al., "Oort: Efficient Federated Learning via Guided Participant
Selection", OSDI 2021, arXiv 2010.06081).

Both selectors answer ``select(available, count) -> list[str]`` and are seeded, so a run can be
replayed. Candidates are sorted before sampling, so the order ``available`` comes in (a set, a
dict of live agents) never changes the choice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agent.learning.optimizers.base import check_number

Seed = int | np.random.Generator | None


class ClientSelector(Protocol):
    """Picks the clients of the next round."""

    def select(self, available: Iterable[str], count: int) -> list[str]:
        """Up to ``count`` distinct clients from ``available``."""
        ...


def sample_clients(
    available: Iterable[str],
    *,
    count: int | None = None,
    fraction: float | None = None,
    rng: Seed = None,
) -> list[str]:
    """A uniform sample without replacement (McMahan et al., AISTATS 2017: m = max(C·K, 1)).

    Give exactly one of ``count`` (m, capped at the number available) or ``fraction`` (C in
    (0, 1]: m = max(round(C·K), 1)). ``rng`` is a seed or a numpy ``Generator``.
    """
    pool = sorted(set(available))
    if (count is None) == (fraction is None):
        raise ValueError("give exactly one of count and fraction")
    if fraction is not None:
        share = check_number("fraction", fraction, low=0.0, high=1.0, low_open=True)
        wanted = max(math.floor(share * len(pool) + 0.5), 1)
    else:
        wanted = _check_count(count)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    wanted = min(wanted, len(pool))
    picked = generator.choice(len(pool), size=wanted, replace=False)
    return [pool[int(i)] for i in picked]


class RandomSelector:
    """Uniform random selection (McMahan et al., AISTATS 2017), seeded."""

    def __init__(self, seed: Seed = None) -> None:
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def select(self, available: Iterable[str], count: int) -> list[str]:
        """``count`` clients (or all there are) drawn uniformly without replacement."""
        return sample_clients(available, count=count, rng=self._rng)


def statistical_utility(losses: npt.ArrayLike) -> float:
    """Oort's statistical utility of one client's round (Lai et al., OSDI 2021):
    |B_i|·sqrt((1/|B_i|)·Σ_{k∈B_i} loss_k²), from the per-sample losses of the batches B_i it
    trained on."""
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return 0.0
    return float(values.size * math.sqrt(float(np.mean(np.square(values)))))


def loss_sq_mean(metrics: Mapping[str, float]) -> float:
    """The mean squared per-sample training loss Oort's statistical utility needs, from an
    update's ``loss_sq_sum`` and ``loss_samples``; from a trainer whose graph does not report
    them, the square of its mean loss (a lower bound, by Jensen's inequality)."""
    total, count = metrics.get("loss_sq_sum"), metrics.get("loss_samples")
    if total is not None and count:
        return max(float(total), 0.0) / float(count)
    loss = float(metrics.get("loss", 0.0))
    return loss * loss


@dataclass
class ClientRecord:
    """What Oort (Lai et al., OSDI 2021) knows of an explored client."""

    utility: float
    """Statistical utility of its last round, |B_i|·sqrt((1/|B_i|)·Σ loss²)."""
    duration: float
    """t_i: how long its last round took (seconds)."""
    last_picked: int
    """L(i): the selection round it was last picked in (1-based)."""
    picks: int = 0
    """How many rounds it was picked in (the blacklist counts them)."""


class OortSelector:
    """Oort's guided participant selection (Lai et al., OSDI 2021, §4 and Algorithm 1).

    Each :meth:`select` is one selection round R = 1, 2, …; :meth:`update` is a client's
    feedback. For an explored client i (one that reported):

        U_i    = |B_i|·sqrt((1/|B_i|)·Σ_{k∈B_i} loss_k²)              statistical utility
        u_i    = (min(U_i, c) − m) / (M − m)                            clipped, normalised
        Util_i = (u_i + sqrt(0.1·ln R / L(i))) × (T/t_i)^(α·1[T < t_i])

    ``c`` is the ``clip_percentile`` (95th) of the explored clients' U, so one outlier (a
    corrupted or adversarial client with a huge loss) cannot take every round (§4.3); ``m`` and
    ``M`` are the smallest and largest clipped U, so the temporal-uncertainty bonus for clients
    not picked recently (L(i) the round i was last picked) weighs the same whatever the loss's
    scale: the min-max normalisation is the authors' released implementation's (FedScale's
    ``oort`` module), the paper leaves the scale open. Clients slower than the developer's
    preferred round duration T pay (T/t_i)^α, α = 2.

    A round takes εK unexplored clients at random (the paper samples them by speed where it is
    known; Ember knows none for an unexplored client) and (1−ε)K explored ones: those with
    Util at least ``cutoff`` × the (1−ε)K-th best are admitted and sampled in proportion to
    Util. ε starts at 0.9 and is multiplied by 0.98 after each round, down to 0.2. When one
    group is short, the other fills the round.

    Pacer (Algorithm 1): T starts at ``preferred_duration`` or, if not given, at the median
    duration of the explored clients the first time any are known. The statistical utility fed
    back in each round is summed; every W = ``pacer_window`` rounds, once 2W rounds are known,
    if the last W rounds brought less than the W before them (the utility stalls), T grows by
    Δ = ``pacer_step`` (default a tenth of the first T) so slower clients with useful data are
    let back in.

    Blacklist (§4.3): a client picked in more than ``blacklist_rounds`` rounds is left out, most
    picked first and at most ``blacklist_share`` of the clients picked so far, so
    over-represented data does not dominate the model. Off unless ``blacklist_rounds`` is
    given (as in FedScale).
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        exploration: float = 0.9,
        exploration_decay: float = 0.98,
        min_exploration: float = 0.2,
        cutoff: float = 0.95,
        clip_percentile: float = 95.0,
        preferred_duration: float | None = None,
        pacer_window: int = 20,
        pacer_step: float | None = None,
        blacklist_rounds: int | None = None,
        blacklist_share: float = 0.3,
        seed: Seed = None,
    ) -> None:
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.min_exploration = check_number("min_exploration", min_exploration, low=0.0, high=1.0)
        self.exploration = check_number(
            "exploration", exploration, low=self.min_exploration, high=1.0
        )
        self.exploration_decay = check_number(
            "exploration_decay", exploration_decay, low=0.0, high=1.0, low_open=True
        )
        self.cutoff = check_number("cutoff", cutoff, low=0.0, high=1.0)
        self.clip_percentile = check_number(
            "clip_percentile", clip_percentile, low=0.0, high=100.0, low_open=True
        )
        self.preferred_duration = (
            None
            if preferred_duration is None
            else check_number("preferred_duration", preferred_duration, low=0.0, low_open=True)
        )
        self.pacer_window = _check_count(pacer_window, "pacer_window", minimum=1)
        self.pacer_step = (
            None
            if pacer_step is None
            else check_number("pacer_step", pacer_step, low=0.0, low_open=True)
        )
        self.blacklist_rounds = (
            None
            if blacklist_rounds is None
            else _check_count(blacklist_rounds, "blacklist_rounds", minimum=1)
        )
        self.blacklist_share = check_number("blacklist_share", blacklist_share, low=0.0, high=1.0)
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._clients: dict[str, ClientRecord] = {}
        self._picks: dict[str, int] = {}
        self._round = 0
        self._round_utility = 0.0
        self._history: deque[float] = deque(maxlen=2 * self.pacer_window)

    @property
    def round(self) -> int:
        """R: rounds selected so far."""
        return self._round

    @property
    def explored(self) -> dict[str, ClientRecord]:
        """What is known of each explored client."""
        return dict(self._clients)

    def update(
        self, client: str, *, num_samples: int, loss_sq_mean: float, duration: float
    ) -> None:
        """Feedback from ``client``'s round: |B_i| (the samples it holds and trained on), the
        mean of its squared per-sample training losses, and how long the round took it."""
        samples = _check_count(num_samples, "num_samples", minimum=0)
        mean_sq = check_number("loss_sq_mean", loss_sq_mean, low=0.0)
        seconds = check_number("duration", duration, low=0.0)
        utility = samples * math.sqrt(mean_sq)
        record = self._clients.get(client)
        last = record.last_picked if record is not None else max(self._round, 1)
        self._clients[client] = ClientRecord(utility, seconds, last, self._picks.get(client, 0))
        self._round_utility += utility

    def blacklist(self) -> set[str]:
        """Clients left out for having been picked in more than ``blacklist_rounds`` rounds:
        the most picked first, at most ``blacklist_share`` of the clients picked so far."""
        if self.blacklist_rounds is None:
            return set()
        over = [c for c, n in self._picks.items() if n > self.blacklist_rounds]
        over.sort(key=lambda c: (-self._picks[c], c))
        return set(over[: math.floor(self.blacklist_share * len(self._picks))])

    def utilities(self) -> dict[str, float]:
        """Util(i) of every explored client at the current round (see the class docstring)."""
        if not self._clients:
            return {}
        names = sorted(self._clients)
        raw = np.array([self._clients[c].utility for c in names], dtype=np.float64)
        clipped = np.minimum(raw, np.percentile(raw, self.clip_percentile, method="lower"))
        low, span = float(clipped.min()), float(np.ptp(clipped))
        normalised = (clipped - low) / span if span > 0 else np.zeros_like(clipped)
        rounds = max(self._round, 1)
        deadline = self.preferred_duration
        out = {}
        for name, u in zip(names, normalised, strict=True):
            record = self._clients[name]
            value = float(u) + math.sqrt(0.1 * math.log(rounds) / max(record.last_picked, 1))
            if deadline is not None and deadline < record.duration:
                value *= (deadline / record.duration) ** self.alpha
            out[name] = value
        return out

    def utility(self, client: str) -> float:
        """Util(i) for an explored client at the current round (0 for an unexplored one)."""
        return self.utilities().get(client, 0.0)

    def select(self, available: Iterable[str], count: int) -> list[str]:
        """One round's participants: up to ``count`` of ``available`` (fewer only when the
        blacklist leaves fewer)."""
        wanted = _check_count(count)
        banned = self.blacklist()
        pool = sorted(set(available) - banned)
        self._close_round()
        explored = [c for c in pool if c in self._clients]
        unexplored = [c for c in pool if c not in self._clients]
        wanted = min(wanted, len(pool))
        n_explore = min(round(self.exploration * wanted), len(unexplored))
        n_exploit = min(wanted - n_explore, len(explored))
        n_explore = min(wanted - n_exploit, len(unexplored))
        chosen = self._exploit(explored, n_exploit)
        chosen += sample_clients(unexplored, count=n_explore, rng=self._rng) if n_explore else []
        for client in chosen:
            self._picks[client] = self._picks.get(client, 0) + 1
            if client in self._clients:
                self._clients[client].last_picked = self._round
                self._clients[client].picks = self._picks[client]
        self.exploration = max(self.min_exploration, self.exploration * self.exploration_decay)
        return chosen

    def _exploit(self, explored: Sequence[str], n: int) -> list[str]:
        if n <= 0:
            return []
        scores = self.utilities()
        utilities = np.array([scores[c] for c in explored], dtype=np.float64)
        threshold = self.cutoff * float(np.sort(utilities)[::-1][n - 1])
        admitted = np.flatnonzero(utilities >= threshold)
        weights = utilities[admitted]
        # In proportion to utility; uniformly if too few have any (choice needs n non-zero p).
        p = weights / weights.sum() if np.count_nonzero(weights > 0) >= n else None
        picked = self._rng.choice(admitted, size=n, replace=False, p=p)
        return [explored[int(i)] for i in picked]

    def _close_round(self) -> None:
        """Start round R + 1: record the utility the last round brought, run the pacer."""
        if self._round:
            self._history.append(self._round_utility)
        self._round_utility = 0.0
        self._round += 1
        if self.preferred_duration is None and self._clients:
            self.preferred_duration = float(np.median([r.duration for r in self._clients.values()]))
        if self.preferred_duration is not None and self.pacer_step is None:
            self.pacer_step = self.preferred_duration / 10
        window = self.pacer_window
        done = self._round - 1
        if len(self._history) == 2 * window and done % window == 0:
            older = sum(list(self._history)[:window])
            recent = sum(list(self._history)[window:])
            if recent < older and self.preferred_duration is not None and self.pacer_step:
                self.preferred_duration += self.pacer_step


def _check_count(value: object, name: str = "count", *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")
    return int(value)
