"""The demo's data: scikit-learn's digits, split non-IID across agents by a Dirichlet prior.

Label skew as in Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification"): for every class, the share each client gets is drawn from
Dir(α); small α gives each client a few dominant classes. A stratified held-out split stays with
the aggregator for evaluation and never reaches a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Shard:
    """One client's local data."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def save(self, path: Path) -> Path:
        """As an ``.npz`` with arrays ``x`` and ``y``, the agent's dataset format."""
        np.savez(path, x=self.x, y=self.y)
        return path


def load_digits_scaled() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Digits as float32 features in [0, 1] (8×8 pixels flattened) and int64 labels."""
    from sklearn.datasets import load_digits  # the demo extra; shipped with scikit-learn

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def holdout_split(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], fraction: float, seed: int
) -> tuple[Shard, Shard]:
    """Stratified split into (train, held-out)."""
    rng = np.random.default_rng(seed)
    test_idx: list[npt.NDArray[np.intp]] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(members[: max(1, round(len(members) * fraction))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return Shard(x[train], y[train]), Shard(x[test], y[test])


def dirichlet_shards(
    data: Shard, clients: int, alpha: float, seed: int, min_samples: int = 20
) -> list[Shard]:
    """Split ``data`` into ``clients`` label-skewed shards (Dir(α) per class).

    Redraws until every shard holds at least ``min_samples`` samples, so no agent is empty.
    """
    if clients < 1:
        raise ValueError(f"clients must be ≥ 1, got {clients}")
    if clients * min_samples > len(data.y):
        raise ValueError(f"{len(data.y)} samples cannot give {clients} clients {min_samples} each")
    rng = np.random.default_rng(seed)
    labels = np.unique(data.y)
    for _ in range(1000):
        parts: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(clients)]
        for label in labels:
            members = rng.permutation(np.flatnonzero(data.y == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        indices = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(i) for i in indices) >= min_samples:
            return [Shard(data.x[i], data.y[i]) for i in indices]
    raise RuntimeError(f"no Dirichlet(α={alpha}) split gave every client {min_samples} samples")
