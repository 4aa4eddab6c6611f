"""What every aggregator shares, written once: the checks an offered update must pass, the
ledger of applied update ids, the preallocated delta buffer, outcomes and counters, and the
model/version/optimizer core with its checkpoint.

:class:`~agent.learning.fedbuff.FedBuffAggregator` (asynchronous, Nguyen et al. 2022) and
:class:`~agent.learning.fedavg.SyncFedAvg` (synchronous rounds, McMahan et al. 2017) are built on
:class:`BaseAggregator`; they differ only in when an update counts and when a version is made.
Pure numpy: no transport, no clock, no threads (one caller at a time).
"""

from __future__ import annotations

import enum
import math
import types
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.learning.arrays import (
    Array,
    State,
    Weights,
    decode_strings,
    frozen,
    new_scratch,
    owned,
    prefixed,
    read_float,
    read_int,
    scalar,
    scaled_add,
    unprefixed,
)
from agent.learning.clipping import Measured, Rejection, UpdateGuard, norm_guards, screen
from agent.learning.optimizers import ServerOptimizer
from agent.protocol.codec import all_finite

MAX_UPDATE_ID_LENGTH = 256
"""Longest update id accepted (the protocol's message ids are 32 characters)."""


class Status(str, enum.Enum):
    """What became of an offered update."""

    APPLIED = "applied"
    """Added to the buffer (or the round); it will be part of the next model version."""
    STALE = "stale"
    """FedBuff: staleness above the bound; dropped and counted."""
    LATE = "late"
    """Synchronous rounds: for a round already closed; dropped and counted."""
    DUPLICATE = "duplicate"
    """Its update id was applied before: each id is applied at most once."""
    REJECTED = "rejected"
    """Malformed, or failed a check; ``reason`` says which."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one offered update (FedBuff, Nguyen et al. 2022, or a synchronous
    FedAvg round, McMahan et al. 2017)."""

    status: Status
    update_id: str
    reason: str = ""
    """Why it was not applied, naming the tensor or field at fault."""
    code: str = ""
    """With ``REJECTED``: a short category to count rejections by (``shape``, ``dtype``,
    ``non_finite``, ``norm``, ...)."""
    staleness: int | None = None
    """τ = t − t_i where known."""
    weight: float = 0.0
    """The factor the delta entered the buffer with (0 when not applied)."""
    version: int | None = None
    """The new model version this update completed, if it completed one."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """With ``version``: the sample-weighted mean of the metrics its updates reported."""

    @property
    def applied(self) -> bool:
        """True when the update went into the aggregate."""
        return self.status is Status.APPLIED


@dataclass(slots=True)
class Counters:
    """Totals since the aggregator was created (kept across checkpoints): FedBuff's "drop and
    count" of stale updates (Nguyen et al. 2022) and the rest. Every offer counts in
    ``received`` and in exactly one of the other five update counters."""

    received: int = 0
    applied: int = 0
    stale_dropped: int = 0
    late: int = 0
    duplicates: int = 0
    rejected: int = 0
    versions: int = 0
    """Model versions produced."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name (for metrics and the job's state topic)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- what a model is, and what an update must look like ------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of one model tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]


class ModelSpec:
    """Names, shapes and dtypes of a model's tensors, and the one check an incoming delta must
    pass before anything adds it (DESIGN.md: shapes, dtypes, finite values, norm bounds; FedBuff's
    Δ_i = y_Q − y_0 has the model's own structure, Nguyen et al. 2022)."""

    def __init__(self, tensors: Mapping[str, TensorSpec]) -> None:
        if not tensors:
            raise ValueError("a model needs at least one tensor")
        for name, spec in tensors.items():
            if spec.dtype.kind != "f":
                raise ValueError(
                    f"tensor {name!r} has dtype {spec.dtype}: only floating tensors can be "
                    "aggregated (leave integer buffers out of the trained tensors)"
                )
        self._tensors = dict(tensors)

    @classmethod
    def of(cls, weights: Mapping[str, npt.ArrayLike]) -> ModelSpec:
        """The spec of ``weights``."""
        specs = {}
        for name, value in weights.items():
            array = np.asarray(value)
            specs[name] = TensorSpec(array.shape, np.dtype(array.dtype.name))
        return cls(specs)

    def __getitem__(self, name: str) -> TensorSpec:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def items(self) -> Iterable[tuple[str, TensorSpec]]:
        """(name, spec) pairs in the model's order."""
        return self._tensors.items()

    @property
    def size(self) -> int:
        """Total number of elements."""
        return sum(math.prod(spec.shape) for spec in self._tensors.values())

    def problem(self, delta: Mapping[str, Any], *, max_norm: float | None = None) -> str | None:
        """Why ``delta`` cannot be aggregated into this model, or ``None`` when it can
        (:meth:`examine`, then with ``max_norm`` the bound on the delta's global L2 norm)."""
        measured = self.examine(delta)
        if isinstance(measured, Rejection):
            return measured.reason
        verdict = screen(norm_guards(max_norm=max_norm), measured)
        return verdict.reason if isinstance(verdict, Rejection) else None

    def examine(self, delta: Mapping[str, Any]) -> Measured | Rejection:
        """Check ``delta`` against the model and measure it.

        Checks, cheapest first: the names (none missing, none extra), each tensor's type, dtype
        and shape, then in one pass over the data that every value is finite, measuring the
        delta's global L2 norm on the way.
        """
        if not isinstance(delta, Mapping):
            return Rejection(
                "structure", f"expected a map of tensor names to arrays, got {type(delta).__name__}"
            )
        missing = [name for name in self._tensors if name not in delta]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return Rejection("names", f"tensor {missing[0]!r} is missing from the update{more}")
        extra = [name for name in delta if name not in self._tensors]
        if extra:
            return Rejection("names", f"tensor {str(extra[0])[:100]!r} is not in the model")
        for name, spec in self._tensors.items():
            array = delta[name]
            if not isinstance(array, np.ndarray):
                return Rejection(
                    "structure",
                    f"tensor {name!r}: expected a numpy array, got {type(array).__name__}",
                )
            if array.dtype.name != spec.dtype.name:
                return Rejection(
                    "dtype",
                    f"tensor {name!r}: dtype {array.dtype.name}, the model has {spec.dtype}",
                )
            if array.shape != spec.shape:
                return Rejection(
                    "shape", f"tensor {name!r}: shape {array.shape}, the model has {spec.shape}"
                )
        total = 0.0
        largest, largest_sq = "", -1.0
        for name in self._tensors:
            array = delta[name]
            squares = _squared_norm(array)
            if not math.isfinite(squares):
                if not all_finite(array):
                    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
                    return Rejection("non_finite", f"tensor {name!r} has {bad} non-finite values")
                squares = float(np.sum(np.square(array, dtype=np.float64)))
            total += squares
            if squares > largest_sq:
                largest, largest_sq = name, squares
        return Measured(math.sqrt(total), largest, math.sqrt(max(largest_sq, 0.0)))

    def check_weights(self, weights: Mapping[str, Array], what: str) -> None:
        """``ValueError`` if ``weights`` (called ``what``) does not have this spec exactly."""
        if set(weights) != set(self._tensors):
            raise ValueError(
                f"{what}: tensors {sorted(weights)} do not match the model's {sorted(self)}"
            )
        for name, spec in self._tensors.items():
            array = weights[name]
            if array.shape != spec.shape or array.dtype.name != spec.dtype.name:
                raise ValueError(
                    f"{what}: tensor {name!r} is {array.dtype} {array.shape}, "
                    f"the model has {spec.dtype} {spec.shape}"
                )


def _squared_norm(array: Array) -> float:
    """Σx² in one BLAS pass (non-finite when any x is, or when the sum overflows)."""
    flat = array.reshape(-1)
    if flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(flat, flat))


def id_problem(update_id: object) -> str | None:
    """Why ``update_id`` is not a usable update id, or ``None``."""
    if not isinstance(update_id, str) or not update_id:
        return f"update id must be a non-empty string, got {update_id!r:.60}"
    if len(update_id) > MAX_UPDATE_ID_LENGTH or "\n" in update_id:
        return (
            f"update id {update_id[:60]!r} is longer than {MAX_UPDATE_ID_LENGTH} or has a newline"
        )
    return None


# -- applied update ids --------------------------------------------------------------------------


class AppliedIds:
    """The ids of applied updates, so a redelivered one (MQTT QoS 1) is applied at most once
    (DESIGN.md: every state-changing message carries an id; FedBuff, Nguyen et al. 2022, and
    FedAvg, McMahan et al. 2017, both assume each client update counts once).

    Bounded: beyond ``capacity`` ids the oldest are forgotten first. Size it above the number of
    updates that can still be redelivered; with a max staleness, an update old enough to have
    been forgotten is dropped as stale anyway. :meth:`export` gives the ids oldest first, and
    :meth:`packed` the same as :func:`~agent.learning.arrays.encode_strings` would, for a
    checkpoint: kept up to date id by id, because encoding all of them again for every
    checkpoint cost 16 ms at 100,000 ids, and an aggregator checkpoints before every receipt.
    :meth:`mark` and :meth:`packed_split` cut the same bytes in two at a point in time, so a
    checkpoint writes the ids older than the cut once and only the newer ones with every commit
    (3.3 MB at 100,000 ids, against a 1M model's 4 MB buffer).
    """

    def __init__(self, capacity: int = 100_000, ids: Iterable[str] = ()) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"remember_ids: expected an integer ≥ 1, got {capacity!r}")
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._packed: bytearray | None = bytearray()
        """The ids in order, each UTF-8 and followed by a newline, from ``_head`` on; ``None``
        after an id was added again (moved to the end), until :meth:`packed` rebuilds it."""
        self._head = 0
        self._start = 0
        """Bytes dropped from the front of ``_packed`` so far: marks count from the first id."""
        self._rebuilds = 0
        """How often ``_packed`` was rebuilt (which makes earlier marks meaningless)."""
        for update_id in ids:
            self.add(update_id)

    @property
    def capacity(self) -> int:
        """How many ids are remembered at most."""
        return self._capacity

    def __contains__(self, update_id: object) -> bool:
        return update_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, update_id: str) -> None:
        """Remember ``update_id``, forgetting the oldest id if full."""
        if "\n" in update_id:
            raise ValueError(f"cannot remember {update_id!r}: it contains a newline")
        if update_id in self._ids:
            self._ids.move_to_end(update_id)
            self._packed = None
            return
        self._ids[update_id] = None
        if self._packed is not None:
            self._packed += update_id.encode()
            self._packed += b"\n"
        if len(self._ids) > self._capacity:
            oldest, _ = self._ids.popitem(last=False)
            if self._packed is not None:
                self._head += len(oldest.encode()) + 1
                if self._head > len(self._packed) // 2:
                    del self._packed[: self._head]
                    self._start += self._head
                    self._head = 0

    def export(self) -> list[str]:
        """The remembered ids, oldest first."""
        return list(self._ids)

    def packed(self) -> npt.NDArray[np.uint8]:
        """``encode_strings(self.export())``, without encoding every id again."""
        packed = self._packed_now()
        return _strings(packed[self._head :])

    def mark(self) -> tuple[int, int] | None:
        """The point between the ids remembered so far and those added later."""
        if self._packed is None:
            return None
        return self._rebuilds, self._start + len(self._packed)

    def packed_split(
        self, mark: tuple[int, int] | None
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """:meth:`packed` cut at ``mark``: (the ids added before it, those added after), each
        as :func:`~agent.learning.arrays.encode_strings` would encode it. Every id is in the
        second part when the mark no longer applies (an id added again reorders them all)."""
        at = self._cut_at(mark)
        if at is None:
            return np.zeros(0, np.uint8), self.packed()
        packed = self._packed_now()
        return _strings(packed[self._head : at]), _strings(packed[at:])

    def packed_since(self, mark: tuple[int, int] | None) -> npt.NDArray[np.uint8]:
        """The second part of :meth:`packed_split` alone (the first is not copied)."""
        at = self._cut_at(mark)
        return self.packed() if at is None else _strings(self._packed_now()[at:])

    def _cut_at(self, mark: tuple[int, int] | None) -> int | None:
        """Where ``mark`` cuts the packed ids now, or ``None`` if it no longer applies."""
        self._packed_now()  # a rebuild makes every earlier mark meaningless
        if mark is None or mark[0] != self._rebuilds:
            return None
        return max(self._head, mark[1] - self._start)

    def _packed_now(self) -> bytearray:
        if self._packed is None:
            self._packed = bytearray(b"".join(i.encode() + b"\n" for i in self._ids))
            self._start, self._head = 0, 0
            self._rebuilds += 1
        return self._packed


def _strings(lines: bytearray) -> npt.NDArray[np.uint8]:
    """Newline-terminated ids as :func:`~agent.learning.arrays.encode_strings` joins them."""
    return np.frombuffer(lines[:-1], np.uint8) if lines else np.zeros(0, np.uint8)


# -- accumulation --------------------------------------------------------------------------------


class DeltaBuffer:
    """Preallocated per-tensor sums of weighted deltas, accumulated in place: FedBuff's buffer
    of s(τ)·Δ_i (Nguyen et al., AISTATS 2022) or a round's Σ n_k·Δ_k (McMahan et al. 2017).

    Adding a delta allocates nothing of model size (see :func:`~agent.learning.arrays.scaled_add`).
    The sums are in ``dtype`` (float32 by default; float64 for more headroom), promoted to the
    tensor's own dtype if that is wider.
    """

    def __init__(self, spec: ModelSpec, dtype: npt.DTypeLike = np.float32) -> None:
        base = np.dtype(dtype)
        if base.kind != "f":
            raise ValueError(f"accumulate_dtype must be floating, got {base}")
        self._sums = {
            name: np.zeros(s.shape, dtype=np.promote_types(s.dtype, base))
            for name, s in spec.items()
        }
        self._scratch = {
            dt: new_scratch(dt) for dt in {array.dtype for array in self._sums.values()}
        }
        self.count = 0
        """Deltas added since the last reset (FedBuff's k)."""
        self.total_weight = 0.0
        """Sum of the weights they were added with."""

    def add(self, delta: Weights, weight: float, scale: float = 1.0) -> None:
        """sums += weight·scale·delta (delta already checked against the spec; never written).
        ``scale`` shrinks the delta itself (clipping) and so does not count in the total
        weight a round's mean divides by."""
        for name, acc in self._sums.items():
            scaled_add(acc, weight * scale, delta[name], self._scratch[acc.dtype])
        self.count += 1
        self.total_weight += weight

    def divide(self, divisor: float) -> dict[str, Array]:
        """The sums divided by ``divisor``, in place: views valid until :meth:`reset`."""
        for acc in self._sums.values():
            np.divide(acc, divisor, out=acc)
        return dict(self._sums)

    def reset(self) -> None:
        """Back to zero."""
        for acc in self._sums.values():
            acc.fill(0)
        self.count = 0
        self.total_weight = 0.0

    def state_dict(self) -> State:
        """``count``, ``total_weight`` and ``sums/<tensor>`` (the live arrays, not copies)."""
        return {
            "count": scalar(self.count, np.int64),
            "total_weight": scalar(self.total_weight, np.float64),
            **prefixed("sums", self._sums),
        }

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore :meth:`state_dict`'s output (copied into the preallocated sums)."""
        count = read_int(state, "count")
        total = read_float(state, "total_weight")
        sums = unprefixed("sums", state)
        if sums.keys() != self._sums.keys():
            raise ValueError(
                f"buffer holds tensors {sorted(sums)}, the model has {sorted(self._sums)}"
            )
        for name, acc in self._sums.items():
            if sums[name].shape != acc.shape or sums[name].dtype.kind != "f":
                raise ValueError(f"buffer tensor {name!r}: {sums[name].dtype} {sums[name].shape}")
        if count < 0 or not math.isfinite(total):
            raise ValueError(f"buffer count {count} / total weight {total} is not valid")
        for name, acc in self._sums.items():
            np.copyto(acc, sums[name], casting="same_kind")
        self.count = count
        self.total_weight = total


class MetricsMean:
    """Sample-weighted means of the metrics updates report (loss, accuracy, ...) over one model
    version. Non-finite values are skipped, never averaged in."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, metrics: Mapping[str, float] | None, weight: float) -> None:
        """Add one update's metrics with weight ``weight`` (its sample count)."""
        for name, value in (metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                pair = self._sums.setdefault(str(name), [0.0, 0.0])
                pair[0] += weight * float(value)
                pair[1] += weight

    def result(self) -> dict[str, float]:
        """The means so far."""
        return {name: s / w for name, (s, w) in self._sums.items() if w > 0}

    def reset(self) -> None:
        """Forget everything."""
        self._sums.clear()

    def state_dict(self) -> State:
        """``<metric>`` → float64 array ``[weighted sum, weight]``."""
        return {name: np.array(pair, dtype=np.float64) for name, pair in self._sums.items()}

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore :meth:`state_dict`'s output."""
        sums: dict[str, list[float]] = {}
        for name, value in state.items():
            if np.shape(value) != (2,):
                raise ValueError(f"metric {name!r}: expected [sum, weight], got {value!r:.60}")
            sums[name] = [float(value[0]), float(value[1])]
        self._sums = sums


# -- the core every aggregator builds on ---------------------------------------------------------


class BaseAggregator:
    """The global model, its version, the server update rule, and the shared path of an update:
    screen (id, sample count, duplicate) → check (structure, finiteness, norm) → accumulate →
    make a version. Subclasses decide when an update counts and when a version is made: FedBuff
    (Nguyen et al., AISTATS 2022) and synchronous FedAvg (McMahan et al., AISTATS 2017).

    ``weights`` (the initial model) is copied once; every version's tensors are fresh arrays,
    read-only, so a version handed to the transport never changes under it.
    """

    def __init__(
        self,
        weights: Mapping[str, npt.ArrayLike],
        *,
        optimizer: ServerOptimizer,
        max_norm: float | None,
        accumulate_dtype: npt.DTypeLike,
        remember_ids: int,
        version: int,
        guards: Sequence[UpdateGuard] = (),
    ) -> None:
        self._spec = ModelSpec.of(weights)
        self._weights: dict[str, Array] = {
            name: frozen(owned(value)) for name, value in weights.items()
        }
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version: expected an integer ≥ 0, got {version!r}")
        self._version = version
        self._optimizer = optimizer
        self._guards: tuple[UpdateGuard, ...] = (*norm_guards(max_norm=max_norm), *guards)
        self._buffer = DeltaBuffer(self._spec, accumulate_dtype)
        self._metrics = MetricsMean()
        self._ids = AppliedIds(remember_ids)
        self._ids_cut = self._ids.mark()
        """Where the ids of :meth:`state_dict`'s ``applied_ids`` begin (those before are its
        ``older_ids``): moved when a version is made or followed."""
        self._ids_generation = 0
        """Counts the moves of the cut, over resumes: names the older ids' part on disk."""
        self._counters = Counters()

    # -- what callers read

    @property
    def weights(self) -> Mapping[str, Array]:
        """The current global model: read-only arrays, never modified afterwards."""
        return types.MappingProxyType(self._weights)

    @property
    def version(self) -> int:
        """The current model version t."""
        return self._version

    @property
    def spec(self) -> ModelSpec:
        """The model's tensor names, shapes and dtypes."""
        return self._spec

    @property
    def counters(self) -> Counters:
        """A snapshot of the counters."""
        return Counters(**self._counters.as_dict())

    @property
    def applied_ids(self) -> AppliedIds:
        """The ledger of applied update ids."""
        return self._ids

    @property
    def optimizer(self) -> ServerOptimizer:
        """The server update rule."""
        return self._optimizer

    # -- the shared path of an update

    def _screen(self, update_id: str, base_version: int, num_samples: int) -> Outcome | None:
        """Count the offer; a rejection or duplicate verdict, or ``None`` to go on."""
        self._counters.received += 1
        reason = id_problem(update_id)
        if reason is not None:
            return self._reject(str(update_id)[:MAX_UPDATE_ID_LENGTH], reason, "id")
        if update_id in self._ids:
            self._counters.duplicates += 1
            return Outcome(Status.DUPLICATE, update_id, reason="update id already applied")
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, (int, np.integer))
            or num_samples < 1
        ):
            return self._reject(
                update_id, f"num_samples must be an integer ≥ 1, got {num_samples!r}", "num_samples"
            )
        if isinstance(base_version, bool) or not isinstance(base_version, (int, np.integer)):
            return self._reject(
                update_id, f"base version must be an integer, got {base_version!r}", "version"
            )
        return None

    def _check(self, update_id: str, delta: Weights) -> Outcome | float:
        """A rejection if ``delta`` does not fit the model or a guard refuses it, else the
        factor the guards scale it by (1.0 when no guard clips it)."""
        measured = self._spec.examine(delta)
        verdict = measured if isinstance(measured, Rejection) else screen(self._guards, measured)
        if isinstance(verdict, Rejection):
            return self._reject(update_id, verdict.reason, verdict.code)
        return verdict

    def _reject(self, update_id: str, reason: str, code: str) -> Outcome:
        self._counters.rejected += 1
        return Outcome(Status.REJECTED, update_id, reason=reason, code=code)

    def _accept(
        self,
        update_id: str,
        delta: Weights,
        weight: float,
        num_samples: int,
        metrics: Mapping[str, float] | None,
        scale: float = 1.0,
    ) -> None:
        """Add ``weight``·``scale``·``delta`` to the buffer and remember the id."""
        self._buffer.add(delta, weight, scale)
        self._metrics.add(metrics, float(num_samples))
        self._ids.add(update_id)
        self._counters.applied += 1

    def _apply_rule(self, mean: Weights, count: int) -> dict[str, Array]:
        """The server update: new weights from ``mean``, the aggregated delta of ``count``
        updates."""
        return self._optimizer.step(self._weights, mean, participants=count)

    def _advance(self, divisor: float) -> tuple[int, dict[str, float]]:
        """Δ̄ = buffer / ``divisor``, apply the update rule, t += 1, reset. Returns the new
        version and the mean metrics of its updates. An empty buffer keeps the weights."""
        count = self._buffer.count
        if count:
            mean = self._buffer.divide(divisor)
            new = self._apply_rule(mean, count)
            self._weights = {name: frozen(new[name]) for name in self._spec}
        metrics = self._metrics.result()
        self._buffer.reset()
        self._metrics.reset()
        self._version += 1
        self._cut_ids()
        self._counters.versions += 1
        return self._version, metrics

    # -- following an upper tier

    def follow(self, weights: Mapping[str, npt.ArrayLike], version: int) -> None:
        """Adopt a model version made elsewhere: a middle aggregator's model is always the
        newest global version it relays (Liu et al. 2020, edge aggregation with κ2 = 1), so
        staleness is counted in global versions. Deltas already buffered stay (each was taken
        against the version it names). ``ValueError`` if ``weights`` is not this model."""
        arrays = {name: np.asarray(value) for name, value in weights.items()}
        self._spec.check_weights(arrays, "followed weights")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version: expected an integer ≥ 0, got {version!r}")
        self._weights = {name: frozen(owned(arrays[name])) for name in self._spec}
        self._version = version
        self._cut_ids()

    # -- checkpoint

    @property
    def ids_generation(self) -> int:
        """Which cut of the applied ids :meth:`state_dict` gives: its ``older_ids`` are the
        same for as long as this number is (a checkpoint writes them once per generation).
        A cut is made exactly where the model changes (a version made or followed), so the
        number also tells the models of one version apart (a checkpoint names its model file
        by both)."""
        return self._ids_generation

    def _cut_ids(self) -> None:
        self._ids_cut = self._ids.mark()
        self._ids_generation += 1

    def state_dict(self, *, older_ids: bool = True) -> State:
        """Everything needed to resume: ``version``, ``weights/…``, ``buffer/…``, ``optimizer/…``
        (the server optimizer's state), ``counters/…``, ``metrics/…``, and the applied update
        ids (UTF-8, newline-separated) in two parts: ``older_ids``, those applied before the
        last version was made or followed, the same for as long as ``ids_generation`` is (a
        checkpoint writes them once per generation, :mod:`agent.roles.checkpoints`), and
        ``applied_ids``, those applied since. All numpy arrays: write them with
        :func:`agent.protocol.codec.encode_tensors`, so that model, buffer and applied ids can
        never disagree after a crash. Arrays are live views: encode before the next offer.

        With ``older_ids=False`` the first part is left out: a checkpoint whose generation's
        file is on disk already would copy up to 3.3 MB of ids on every commit for nothing.
        """
        if older_ids:
            before, since = self._ids.packed_split(self._ids_cut)
            ids = {"older_ids": before, "applied_ids": since}
        else:
            ids = {"applied_ids": self._ids.packed_since(self._ids_cut)}
        return {
            "version": scalar(self._version, np.int64),
            **prefixed("weights", self._weights),
            **prefixed("buffer", self._buffer.state_dict()),
            **prefixed("optimizer", self._optimizer.state_dict()),
            **prefixed(
                "counters", {k: scalar(v, np.int64) for k, v in self.counters.as_dict().items()}
            ),
            **prefixed("metrics", self._metrics.state_dict()),
            "ids_generation": scalar(self._ids_generation, np.int64),
            **ids,
        }

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """Resume from :meth:`state_dict`'s output (e.g. ``decode_tensors`` of a checkpoint;
        read-only views are copied). The model's structure must match the one this aggregator
        was built with; ``ValueError`` says what does not."""
        arrays = {key: np.asarray(value) for key, value in state.items()}
        version = read_int(arrays, "version")
        if version < 0:
            raise ValueError(f"state 'version': expected ≥ 0, got {version}")
        weights = unprefixed("weights", arrays)
        self._spec.check_weights(weights, "checkpoint weights")
        counters = unprefixed("counters", arrays)
        values = {f.name: read_int(counters, f.name) for f in fields(Counters)}
        older, ids = _stored_id_parts(arrays)
        generation = read_int(arrays, "ids_generation") if "ids_generation" in arrays else 0
        # Everything checked that can be: now the parts that validate themselves.
        self._buffer.load_state_dict(unprefixed("buffer", arrays))
        self._optimizer.load_state_dict(unprefixed("optimizer", arrays))
        self._metrics.load_state_dict(unprefixed("metrics", arrays))
        self._weights = {name: frozen(owned(weights[name])) for name in self._spec}
        self._version = version
        self._counters = Counters(**values)
        self._ids = AppliedIds(self._ids.capacity, older)
        self._ids_cut = self._ids.mark()
        self._ids_generation = generation
        for update_id in ids:
            self._ids.add(update_id)


def stored_applied_ids(state: Mapping[str, npt.ArrayLike]) -> list[str]:
    """The applied update ids a :meth:`BaseAggregator.state_dict` (or a checkpoint of it)
    holds, oldest first, as the aggregator that resumes from it remembers them."""
    older, newer = _stored_id_parts({k: np.asarray(v) for k, v in state.items()})
    # The ledger's own rule for an id met again (it moves to the end), with room for all.
    return AppliedIds(max(1, len(older) + len(newer)), [*older, *newer]).export()


def _stored_id_parts(arrays: Mapping[str, Array]) -> tuple[list[str], list[str]]:
    """(``older_ids``, ``applied_ids``) decoded; checkpoints from before the ids were split
    keep every id in ``applied_ids``."""
    if "applied_ids" not in arrays:
        raise ValueError("state lacks 'applied_ids'")
    older = arrays.get("older_ids")
    return (
        [] if older is None else decode_strings(older),
        decode_strings(arrays["applied_ids"]),
    )
