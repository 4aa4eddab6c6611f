"""Synthetic(α, β): the heterogeneous data of the FedProx paper (Li et al., MLSys 2020), seeded.

Exactly as REFERENCES.md states it (and as the paper's generator draws it, with α and β as
standard deviations): 30 devices, 60 features, 10 classes; samples per device
lognormal(4, 2) as an integer + 50; per device u_k ~ N(0, α) (shared by the means of W and b)
and B_k ~ N(0, β); mean_x[k] ~ N(B_k, 1) per feature; cov_x = diag((j+1)^-1.2), j = 0..59;
W_k ~ N(u_k, 1) of shape (60, 10) and b_k ~ N(u_k, 1) of shape (10); x ~ N(mean_x[k], cov_x);
y = argmax(softmax(x·W_k + b_k)); each device's samples split 90/10 into train and test.
The IID variant uses one global W, b ~ N(0, 1) and mean_x = 0 for every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DEVICES = 30
FEATURES = 60
CLASSES = 10


@dataclass(frozen=True)
class Device:
    """One device's local data, already split 90/10."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def synthetic(
    alpha: float, beta: float, *, iid: bool = False, devices: int = DEVICES, seed: int = 0
) -> list[Device]:
    """Synthetic(α, β) (or Synthetic-IID with ``iid=True``) for ``devices`` devices."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, devices).astype(int) + 50
    cov = np.diag(np.arange(1, FEATURES + 1, dtype=np.float64) ** -1.2)
    shared_w = rng.normal(0, 1, (FEATURES, CLASSES))
    shared_b = rng.normal(0, 1, CLASSES)
    out = []
    for k in range(devices):
        u_k = rng.normal(0, alpha)
        b_k = rng.normal(0, beta)
        if iid:
            w, b, mean = shared_w, shared_b, np.zeros(FEATURES)
        else:
            w = rng.normal(u_k, 1, (FEATURES, CLASSES))
            b = rng.normal(u_k, 1, CLASSES)
            mean = rng.normal(b_k, 1, FEATURES)
        x = rng.multivariate_normal(mean, cov, sizes[k])
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotonic: argmax of the logits
        cut = int(0.9 * sizes[k])
        out.append(
            Device(
                x[:cut].astype(np.float32),
                y[:cut].astype(np.int64),
                x[cut:].astype(np.float32),
                y[cut:].astype(np.int64),
            )
        )
    return out
