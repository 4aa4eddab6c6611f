"""Synchronous federated averaging in rounds (McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017).

Round r trains from model version r: the caller samples clients (e.g. with
:func:`agent.learning.selection.sample_clients`), calls :meth:`SyncFedAvg.start_round`, publishes
version r naming them, and offers their deltas as they arrive. The round closes by itself when
every sampled client has reported, or when the caller declares a timeout with
:meth:`SyncFedAvg.close` (the class has no clock). Closing applies the mean delta, weighted by
sample count, Σ n_k·Δ_k / Σ n_k, through the server optimizer and makes version r + 1 (the same
weights when nobody reported). Updates for an older round are late: counted and dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.learning.aggregation import BaseAggregator, Outcome, Status
from agent.learning.arrays import (
    State,
    Weights,
    decode_strings,
    encode_strings,
    prefixed,
    read_int,
    scalar,
    unprefixed,
)
from agent.learning.clipping import UpdateGuard
from agent.learning.optimizers import FedAvg, ServerOptimizer

Weighting = Literal["samples", "uniform"]


@dataclass(frozen=True)
class SyncRound:
    """One synchronous FedAvg round (McMahan et al. 2017): it trains from model version
    ``number`` and waits for the sampled ``participants``."""

    number: int
    participants: frozenset[str]
    reported: frozenset[str] = frozenset()
    excused: frozenset[str] = frozenset()
    """Participants the round no longer waits for, though they contribute nothing."""

    @property
    def missing(self) -> frozenset[str]:
        """Participants that have neither reported nor been excused yet."""
        return self.participants - self.reported - self.excused

    @property
    def complete(self) -> bool:
        """True when every participant has reported or been excused."""
        return not self.missing


@dataclass(frozen=True)
class RoundResult:
    """How a synchronous FedAvg round (McMahan et al. 2017) ended."""

    round: int
    """The round's number (the version it trained from)."""
    version: int
    """The model version its close produced."""
    reason: str
    """``"all participants reported"`` or the caller's reason (e.g. ``"timeout"``)."""
    reported: frozenset[str]
    missing: frozenset[str]
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Sample-weighted mean of the metrics the round's updates reported."""
    excused: frozenset[str] = frozenset()
    """Participants that took part but contributed nothing (:meth:`SyncFedAvg.excuse`)."""

    @property
    def applied(self) -> int:
        """How many updates went into the new version."""
        return len(self.reported)


class SyncFedAvg(BaseAggregator):
    """Synchronous FedAvg rounds (McMahan et al., AISTATS 2017), the server optimizer applying the
    round's mean delta (Reddi et al., ICLR 2021; FedDyn, Acar et al., ICLR 2021, through
    :class:`~agent.learning.feddyn.FedDynServer`).

    * ``optimizer``: default :class:`FedAvg` with η = 1 (w ← w + Σ n_k·Δ_k / Σ n_k).
    * ``weighting``: ``"samples"`` (FedAvg's n_k / n) or ``"uniform"`` (plain mean, what FedDyn's
      formula uses; the default for rules that ask for it).
    * ``max_norm``, ``guards``, ``accumulate_dtype``, ``remember_ids``, ``version``: as in
      :class:`~agent.learning.fedbuff.FedBuffAggregator`.

    Duplicates and rejections follow the same rules as FedBuff (one shared check); in addition
    a client not sampled for the round, or reporting twice, is rejected. Not thread-safe.
    """

    def __init__(
        self,
        weights: Mapping[str, npt.ArrayLike],
        *,
        optimizer: ServerOptimizer | None = None,
        weighting: Weighting | None = None,
        max_norm: float | None = None,
        accumulate_dtype: npt.DTypeLike = np.float32,
        remember_ids: int = 100_000,
        version: int = 0,
        guards: Sequence[UpdateGuard] = (),
    ) -> None:
        rule = optimizer if optimizer is not None else FedAvg()
        if weighting is None:
            weighting = "uniform" if rule.synchronous else "samples"
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting: expected 'samples' or 'uniform', got {weighting!r}")
        if rule.synchronous and weighting != "uniform":
            raise ValueError(f"{type(rule).__name__} averages deltas uniformly: use 'uniform'")
        super().__init__(
            weights,
            optimizer=rule,
            max_norm=max_norm,
            accumulate_dtype=accumulate_dtype,
            remember_ids=remember_ids,
            version=version,
            guards=guards,
        )
        self._weighting: Weighting = weighting
        self._round: SyncRound | None = None
        self._last: RoundResult | None = None

    @property
    def weighting(self) -> Weighting:
        """How deltas are weighted in the round's mean."""
        return self._weighting

    @property
    def current_round(self) -> SyncRound | None:
        """The open round, or ``None`` between rounds."""
        return self._round

    @property
    def last_result(self) -> RoundResult | None:
        """How the last closed round ended (kept until the next one closes)."""
        return self._last

    def start_round(self, participants: Iterable[str]) -> SyncRound:
        """Open round r = the current version for ``participants`` (the sampled clients)."""
        if self._round is not None:
            raise RuntimeError(f"round {self._round.number} is still open: close it first")
        chosen = frozenset(participants)
        if not chosen:
            raise ValueError("a round needs at least one participant")
        bad = [p for p in chosen if not isinstance(p, str) or not p or "\n" in p]
        if bad:
            raise ValueError(f"participants must be non-empty strings without newlines: {bad!r}")
        self._round = SyncRound(self._version, chosen)
        return self._round

    def offer(
        self,
        update_id: str,
        base_version: int,
        delta: Weights,
        num_samples: int = 1,
        metrics: Mapping[str, float] | None = None,
        *,
        client: str,
    ) -> Outcome:
        """Offer ``client``'s delta against version ``base_version`` (the round it trained in).

        Checks, in order: id (duplicate?), ``num_samples``, the round (older: late; newer or none
        open: rejected), the client (sampled, first report), the delta against the model. The
        last participant's update closes the round: the outcome's ``version`` is the new one.
        """
        verdict = self._screen(update_id, base_version, num_samples)
        if verdict is not None:
            return verdict
        if base_version < self._version:
            self._counters.late += 1
            return Outcome(
                Status.LATE,
                update_id,
                reason=f"round {base_version} is closed; the current round is {self._version}",
                staleness=self._version - int(base_version),
            )
        if base_version > self._version:
            return self._reject(
                update_id,
                f"base version {base_version} is ahead of the current {self._version}",
                "version",
            )
        current = self._round
        if current is None:
            return self._reject(update_id, f"no round is open for version {self._version}", "round")
        if client not in current.participants:
            return self._reject(
                update_id,
                f"client {str(client)[:100]!r} was not sampled for round {current.number}",
                "round",
            )
        if client in current.reported or client in current.excused:
            return self._reject(
                update_id, f"client {client!r} already reported for round {current.number}", "round"
            )
        factor = self._check(update_id, delta)
        if isinstance(factor, Outcome):
            return factor
        weight = float(num_samples) if self._weighting == "samples" else 1.0
        self._accept(update_id, delta, weight, int(num_samples), metrics, scale=factor)
        self._round = dataclasses.replace(current, reported=current.reported | {client})
        if not self._round.complete:
            return Outcome(Status.APPLIED, update_id, staleness=0, weight=weight)
        result = self._finish("all participants reported")
        return Outcome(
            Status.APPLIED,
            update_id,
            staleness=0,
            weight=weight,
            version=result.version,
            metrics=result.metrics,
        )

    def excuse(self, client: str, round_number: int) -> RoundResult | None:
        """Stop waiting for ``client`` in round ``round_number``: it took part but contributes
        nothing (FedAvg drops stragglers that could not finish their local work, as Li et al.
        2020 run it). Returns the round's result when that completes it, else ``None``; a
        closed round, a client not sampled or one already heard from changes nothing."""
        current = self._round
        if current is None or current.number != round_number or client not in current.missing:
            return None
        self._round = dataclasses.replace(current, excused=current.excused | {client})
        return self._finish("all participants reported") if self._round.complete else None

    def close(
        self, reason: str = "timeout", *, round_number: int | None = None
    ) -> RoundResult | None:
        """Close the open round now (the caller's timeout): apply what arrived, make the next
        version. Returns ``None`` when there is nothing to close: no round open, or
        ``round_number`` given and not the open round's (a timer that fired after its round
        had closed by itself)."""
        if self._round is None or (round_number is not None and round_number != self._round.number):
            return None
        return self._finish(reason)

    def follow(self, weights: Mapping[str, npt.ArrayLike], version: int) -> None:
        """:meth:`BaseAggregator.follow`; a round still open trained on an older version and
        is abandoned with what it had gathered (its updates would be late upstream)."""
        super().follow(weights, version)
        if self._round is not None and self._round.number != version:
            self._buffer.reset()
            self._metrics.reset()
            self._round = None

    def _finish(self, reason: str) -> RoundResult:
        assert self._round is not None
        current = self._round
        version, metrics = self._advance(self._buffer.total_weight)
        self._round = None
        self._last = RoundResult(
            round=current.number,
            version=version,
            reason=reason,
            reported=current.reported,
            missing=current.missing,
            metrics=metrics,
            excused=current.excused,
        )
        return self._last

    def state_dict(self, *, older_ids: bool = True) -> State:
        """:meth:`BaseAggregator.state_dict` plus the open round (``round/open``,
        ``round/participants``, ``round/reported``, ``round/excused``)."""
        current = self._round
        return {
            **super().state_dict(older_ids=older_ids),
            **prefixed(
                "round",
                {
                    "open": scalar(int(current is not None), np.int64),
                    "participants": encode_strings(sorted(current.participants) if current else []),
                    "reported": encode_strings(sorted(current.reported) if current else []),
                    "excused": encode_strings(sorted(current.excused) if current else []),
                },
            ),
        }

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """Resume from :meth:`state_dict`'s output, the open round included."""
        arrays = {key: np.asarray(value) for key, value in state.items()}
        saved = unprefixed("round", arrays)
        is_open = read_int(saved, "open")
        if "participants" not in saved or "reported" not in saved:
            raise ValueError("state lacks the round's participants or reported clients")
        participants = frozenset(decode_strings(saved["participants"]))
        reported = frozenset(decode_strings(saved["reported"]))
        # Checkpoints written before excused participants existed have none.
        excused = frozenset(decode_strings(saved["excused"])) if "excused" in saved else frozenset()
        if is_open and (not participants or not (reported | excused) <= participants):
            raise ValueError("state's open round: reported clients are not among participants")
        super().load_state_dict(arrays)
        self._round = SyncRound(self._version, participants, reported, excused) if is_open else None
