"""A job's training plan as the roles on a device read it from their bundle.

The coordinator validates the operator's YAML job spec (``coordinator/spec.py``) and ships it,
normalised, as ``bundle.config``. This module reads the part the roles need into typed values,
with the same defaults, and refuses anything out of range with the field's path, so a bundle
from a newer or careless coordinator fails loudly at assignment instead of mid-job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.learning.backend import HyperParams

Mode = Literal["async", "sync"]


class PlanError(ValueError):
    """``bundle.config`` cannot be followed; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class StopRules:
    """When a job ends: the first rule met wins."""

    target_accuracy: float | None = None
    max_updates: int | None = None
    max_versions: int | None = None
    max_minutes: float | None = None

    def reason(
        self, *, accuracy: float | None, updates: int, versions: int, minutes: float
    ) -> str | None:
        """Why the job should stop now, or ``None``."""
        target = self.target_accuracy
        if target is not None and accuracy is not None and accuracy >= target:
            return f"target accuracy {target} reached ({accuracy:.4f})"
        if self.max_updates is not None and updates >= self.max_updates:
            return f"{updates} updates applied (max_updates {self.max_updates})"
        if self.max_versions is not None and versions >= self.max_versions:
            return f"{versions} model versions (max_versions {self.max_versions})"
        if self.max_minutes is not None and minutes >= self.max_minutes:
            return f"{minutes:.1f} minutes (max_minutes {self.max_minutes})"
        return None


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """Algorithm, client hyper-parameters and stop rules of one job (FedBuff by default)."""

    job_name: str = ""
    mode: Mode = "async"
    buffer_size: int = 10
    concurrency: int = 10
    min_trainers: int = 1
    selection: str = "random"
    """How trainers are sampled, ``random`` or ``oort`` (Lai et al. 2021): the participants of
    each sync round; with ``oort`` in async mode also which idle trainers FedBuff starts next,
    ``concurrency`` at a time (with ``random`` every trainer trains all the time)."""
    clients_per_round: int | None = None
    """Sync rounds: trainers sampled per round (``None``: all known trainers, up to concurrency)."""
    round_timeout: float = 60.0
    """Sync rounds: seconds before a round closes with whoever reported; FedBuff with Oort:
    seconds before a started trainer that has not reported frees its slot."""
    oort_preferred_duration: float | None = None
    """Oort's T, the developer-preferred round duration in seconds (``None``: the median of the
    first measured durations)."""
    oort_blacklist_rounds: int | None = None
    """Oort leaves out clients picked in more rounds than this (``None``: no blacklist)."""
    staleness_weight: str = "sqrt"
    staleness_max: int | None = None
    server_optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg", "lr": 1.0})
    client: HyperParams = field(default_factory=HyperParams)
    feddyn_alpha: float | None = None
    """FedDyn (Acar et al. 2021): α of the client objective and server correction, if used."""
    max_norm: float | None = None
    """Reject deltas whose L2 norm is above this (:class:`~agent.learning.clipping.NormBound`)."""
    clip_norm: float | None = None
    """Scale deltas down to this L2 norm (:class:`~agent.learning.clipping.NormClip`)."""
    partial_work: str = "keep"
    """An update from fewer local steps than planned: ``keep`` aggregates it (FedProx), ``drop``
    leaves it out (FedAvg as Li et al. 2020 run it: stragglers are dropped)."""
    eval_every: int = 1
    shards: int = 1
    """Aggregator shards (sharded FedBuff): each owns a slice of the parameters and trainers
    send it only its slice of every delta (:mod:`agent.learning.shards`)."""
    stop: StopRules = field(default_factory=StopRules)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainingPlan:
        algorithm = _section(config, "algorithm")
        client = _section(algorithm, "client", "algorithm.")
        staleness = _section(algorithm, "staleness", "algorithm.")
        stop = _section(config, "stop")
        oort = _section(algorithm, "oort", "algorithm.")
        optimizer = dict(_section(algorithm, "server_optimizer", "algorithm.")) or {
            "name": "fedavg",
            "lr": 1.0,
        }
        try:
            hyper = HyperParams(
                lr=float(client.get("lr", 0.05)),
                momentum=float(client.get("momentum", 0.0)),
                weight_decay=float(client.get("weight_decay", 0.0)),
                # FedDyn's α plays FedProx's μ in the local objective (backend.py).
                mu=float(client.get("feddyn_alpha") or client.get("proximal_mu") or 0.0),
                local_steps=int(client.get("local_steps", 10)),
                local_epochs=_opt_float(client.get("local_epochs")),
                batch_size=int(client.get("batch_size", 32)),
            )
        except (TypeError, ValueError) as exc:
            raise PlanError(f"algorithm.client: {exc}") from None
        mode = algorithm.get("mode", "async")
        if mode not in ("async", "sync"):
            raise PlanError(f"algorithm.mode: must be async or sync, got {mode!r}")
        plan = cls(
            job_name=str(config.get("name", "")),
            mode=mode,
            buffer_size=_int(algorithm, "buffer_size", 10, "algorithm."),
            concurrency=_int(algorithm, "concurrency", 10, "algorithm."),
            min_trainers=_int(algorithm, "min_trainers", 1, "algorithm."),
            selection=str(algorithm.get("selection", "random")),
            clients_per_round=_opt_int(algorithm.get("clients_per_round")),
            round_timeout=float(algorithm.get("round_timeout") or 60.0),
            oort_preferred_duration=_opt_float(oort.get("preferred_duration")),
            oort_blacklist_rounds=_opt_int(oort.get("blacklist_rounds")),
            staleness_weight=str(staleness.get("weight", "sqrt")),
            staleness_max=_opt_int(staleness.get("max")),
            server_optimizer=optimizer,
            client=hyper,
            feddyn_alpha=_opt_float(client.get("feddyn_alpha")),
            max_norm=_opt_float(algorithm.get("max_norm")),
            clip_norm=_opt_float(algorithm.get("clip_norm")),
            partial_work=str(algorithm.get("partial_work", "keep")),
            eval_every=_int(algorithm, "eval_every", 1, "algorithm."),
            shards=_int(algorithm, "shards", 1, "algorithm."),
            stop=StopRules(
                target_accuracy=_opt_float(stop.get("target_accuracy")),
                max_updates=_opt_int(stop.get("max_updates")),
                max_versions=_opt_int(stop.get("max_versions", stop.get("max_rounds"))),
                max_minutes=_opt_float(stop.get("max_minutes")),
            ),
        )
        if plan.selection not in ("random", "oort"):
            raise PlanError(f"algorithm.selection: must be random or oort, got {plan.selection!r}")
        if plan.partial_work not in ("keep", "drop"):
            raise PlanError(
                f"algorithm.partial_work: must be keep or drop, got {plan.partial_work!r}"
            )
        if plan.shards > 1 and plan.mode != "async":
            raise PlanError("algorithm.shards: sharded aggregation runs with mode: async")
        if plan.round_timeout <= 0:
            raise PlanError(f"algorithm.round_timeout: must be > 0, got {plan.round_timeout}")
        return plan


def _section(config: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise PlanError(f"{prefix}{key}: expected a map, got {type(value).__name__}")
    return value


def _int(section: Mapping[str, Any], key: str, default: int, prefix: str) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{prefix}{key}: must be an integer ≥ 1, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
