"""The digits demo's MLP 64-128-10 (ReLU, cross-entropy) and its SGD step, in numpy.

The same model, loss and update rule as Ember's train-step graph (``coordinator/export.py``:
plain SGD, loss = sum of cross-entropies divided by the batch size) and the same batches as
``agent.learning.backend.batch_indices``: consecutive slices of seeded permutations.
"""

from __future__ import annotations

import math

import numpy as np

NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def batches(samples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    size = min(batch_size, samples)
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * size / samples)
    stream = np.concatenate([rng.permutation(samples) for _ in range(epochs)])
    return stream[: steps * size].reshape(steps, size)


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x @ params["fc1.weight"].T + params["fc1.bias"], 0.0)
    return hidden, hidden @ params["fc2.weight"].T + params["fc2.bias"]


def train(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """``steps`` SGD steps from ``params``; the new parameters and the mean loss."""
    p = {k: v.astype(np.float32).copy() for k, v in params.items()}
    losses = []
    for idx in batches(len(y), steps, batch_size, seed):
        xb, yb = x[idx], y[idx]
        hidden, logits = forward(p, xb)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        n = len(yb)
        losses.append(float(-np.log(probs[np.arange(n), yb] + 1e-12).mean()))
        grad_logits = probs
        grad_logits[np.arange(n), yb] -= 1.0
        grad_logits /= n
        grad_hidden = (grad_logits @ p["fc2.weight"]) * (hidden > 0)
        p["fc2.weight"] -= lr * (grad_logits.T @ hidden)
        p["fc2.bias"] -= lr * grad_logits.sum(axis=0)
        p["fc1.weight"] -= lr * (grad_hidden.T @ xb)
        p["fc1.bias"] -= lr * grad_hidden.sum(axis=0)
    return p, float(np.mean(losses))


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    _, logits = forward(params, x)
    return float((logits.argmax(axis=1) == y).mean())
