"""Ring all-reduce, the arithmetic: how a vector is cut into chunks and who sends which chunk
at each step (Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", JPDC 2009; the ring Flame's hybrid topology runs inside a group).

With N members in a ring, member r sends to r + 1 and receives from r − 1. Reduce-scatter:
at step s (0 ≤ s < N − 1) r sends chunk (r − s) mod N and adds the chunk (r − s − 1) mod N it
receives into its own; afterwards r holds the complete sum of chunk (r + 1) mod N. All-gather:
at step s r sends chunk (r + 1 − s) mod N and keeps the chunk (r − s) mod N it receives.
Each member sends and receives 2(N − 1)/N of the vector, whatever N is.

A hybrid group averages its trainers' deltas weighted by sample count: each member reduces
n_i·Δ_i with n_i appended (:func:`weighted_vector`), so one all-reduce gives Σ n_i·Δ_i and
Σ n_i (:func:`weighted_mean`). Pure numpy; the transport side is :mod:`agent.roles.ring`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agent.learning.arrays import Array


def chunk_bounds(length: int, members: int) -> list[tuple[int, int]]:
    """``members`` contiguous [start, stop) ranges covering ``length`` elements, sizes
    differing by at most one (as ``numpy.array_split``)."""
    if members < 1:
        raise ValueError(f"a ring needs at least one member, got {members}")
    base, extra = divmod(length, members)
    bounds, start = [], 0
    for i in range(members):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def reduce_step(rank: int, members: int, step: int) -> tuple[int, int]:
    """(chunk sent, chunk received) by ``rank`` at reduce-scatter step ``step``."""
    return (rank - step) % members, (rank - step - 1) % members


def gather_step(rank: int, members: int, step: int) -> tuple[int, int]:
    """(chunk sent, chunk received) by ``rank`` at all-gather step ``step``."""
    return (rank + 1 - step) % members, (rank - step) % members


def weighted_vector(tensors: Mapping[str, Array], weight: float) -> Array:
    """weight·(every tensor flattened, in name order), then ``weight`` itself: float64."""
    parts = [np.asarray(tensors[name], dtype=np.float64).ravel() for name in sorted(tensors)]
    flat = np.concatenate([*parts, np.zeros(1)]) if parts else np.zeros(1)
    flat[:-1] *= weight
    flat[-1] = weight
    return flat


def weighted_mean(total: Array, like: Mapping[str, Array]) -> tuple[dict[str, Array], float]:
    """Back from the all-reduced :func:`weighted_vector`: Σ n_i·Δ_i / Σ n_i as tensors shaped
    and typed like ``like``, and Σ n_i."""
    weight = float(total[-1])
    if not weight > 0:
        raise ValueError(f"the ring's total weight is {weight}")
    out: dict[str, Array] = {}
    start = 0
    for name in sorted(like):
        ref = np.asarray(like[name])
        stop = start + ref.size
        out[name] = (total[start:stop] / weight).reshape(ref.shape).astype(ref.dtype)
        start = stop
    if start != total.size - 1:
        raise ValueError(f"the ring's vector has {total.size - 1} values, the model {start}")
    return out, weight
