"""Server optimizers, one a file behind :class:`ServerOptimizer` (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021), and the factory that builds one by name.

>>> opt = make_server_optimizer("fedadam", lr=0.05)
>>> new_weights = opt.step(weights, mean_delta)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Any

from agent.learning.optimizers.base import ServerOptimizer
from agent.learning.optimizers.fedadagrad import FedAdagrad
from agent.learning.optimizers.fedadam import FedAdam
from agent.learning.optimizers.fedavg import FedAvg
from agent.learning.optimizers.fedavgm import FedAvgM
from agent.learning.optimizers.fedyogi import FedYogi

SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
"""Optimizer classes by the name job specs use."""


def make_server_optimizer(name: str, **params: Any) -> ServerOptimizer:
    """The server optimizer called ``name`` (case-insensitive) with hyper-parameters ``params``.

    ``ValueError`` names an unknown optimizer or parameter (listing the accepted ones) or a value
    out of range.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    cls = SERVER_OPTIMIZERS.get(key)
    if cls is None:
        raise ValueError(
            f"unknown server optimizer {name!r}; known: {', '.join(sorted(SERVER_OPTIMIZERS))}"
        )
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"{key}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    try:
        return cls(**params)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "make_server_optimizer",
]
