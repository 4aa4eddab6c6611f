"""What every training backend shares: the model description, hyper-parameters, batching.

A job's model reaches a device as an :class:`ExportedModel`: three ONNX graphs exported once
where torch is installed (:mod:`coordinator.export`) plus the initial weights as a tensor-codec
blob. The graphs carry a :class:`ModelSpec` in their ONNX ``metadata_props`` (parameter names,
shapes and dtypes, the loss, the per-sample input and output shapes), so a device needs nothing
else to train. Backends (:mod:`agent.learning.onnx_backend`, :mod:`agent.learning.torch_backend`)
implement :class:`TrainingBackend`; given the same parameters, data and :class:`HyperParams` they
draw the same batches (:func:`batch_indices`) and return the same deltas.

The local objective of one training run, with ``w`` the parameters, ``anchor`` the global weights
the run started from and ``correction`` a per-parameter tensor ``h``::

    L(w) + (mu / 2) * ||w - anchor||^2 - <correction, w>

With ``correction = 0`` this is FedProx (Li et al., MLSys 2020, arXiv 1812.06127; ``mu = 0`` is
plain SGD); with ``mu = alpha`` and ``correction`` the client's state ∇L_k(θ_k^{t-1}) it is the
client objective of FedDyn (Acar et al., ICLR 2021, arXiv 2111.04263). The optimizer is SGD with
momentum and weight decay exactly as ``torch.optim.SGD`` applies them.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from agent.protocol.codec import TensorMap, decode_tensors, encode_tensors

Array = npt.NDArray[Any]
LossKind = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = get_args(LossKind)
GraphKind = Literal["train_step", "eval", "inference"]

FORMAT_VERSION = 1
"""Version of the graphs' input/output convention and metadata keys below."""

META_PREFIX = "ember."
# Graph input and output names. Parameter names are the module's ``named_parameters`` keys
# (``fc1.weight``), kept verbatim after the prefix.
PARAM = "param."
MOMENTUM_BUFFER = "momentum_buffer."
ANCHOR = "anchor."
CORRECTION = "correction."
NEW_PARAM = "new_param."
NEW_MOMENTUM_BUFFER = "new_momentum_buffer."
LOSS_SQ_SUM = "loss_sq_sum"
"""Optional train-step output: Σ over the batch of each sample's data loss squared (Oort)."""
SCALARS = ("lr", "momentum", "weight_decay", "mu")
"""Scalar (0-d float32) inputs of the train-step graph, in this order after ``x`` and ``y``."""

ARTIFACTS: dict[GraphKind | Literal["initial"], str] = {
    "train_step": "train_step.onnx",
    "eval": "eval.onnx",
    "inference": "inference.onnx",
    "initial": "initial.tensors",
}
"""File (and bundle artifact) name of each part of an :class:`ExportedModel`."""
REQUIRED: tuple[GraphKind | Literal["initial"], ...] = ("train_step", "eval", "initial")
"""The parts a trainer needs; the inference graph is optional."""


class ModelFormatError(ValueError):
    """Graphs or weights that do not describe a model Ember can train; says what is wrong."""


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter: its name (a ``named_parameters`` key), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything a device needs to feed a model's graphs; carried in their metadata.

    ``input_shape`` and ``output_shape`` are per sample (no batch axis). Labels are class
    indices (int64, shape ``()`` per sample) for cross-entropy, targets of the output's shape
    (float32) for MSE.
    """

    params: tuple[ParamSpec, ...]
    loss: LossKind
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ModelFormatError(f"loss: must be one of {list(LOSSES)}, got {self.loss!r}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ModelFormatError(f"params: duplicate names in {names}")
        if not self.params:
            raise ModelFormatError("params: a model needs at least one parameter")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def dtype_of(self, name: str) -> np.dtype[Any]:
        return np.dtype(self.params[self.names.index(name)].dtype)

    @property
    def num_parameters(self) -> int:
        return sum(p.size for p in self.params)

    @property
    def label_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int64) if self.loss == "cross_entropy" else np.dtype(np.float32)

    @property
    def label_shape(self) -> tuple[int, ...]:
        return () if self.loss == "cross_entropy" else self.output_shape

    def to_metadata(self, graph: GraphKind) -> dict[str, str]:
        """The ONNX ``metadata_props`` of one of this model's graphs."""
        return {
            f"{META_PREFIX}format": str(FORMAT_VERSION),
            f"{META_PREFIX}graph": graph,
            f"{META_PREFIX}params": json.dumps(
                [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.params]
            ),
            f"{META_PREFIX}loss": self.loss,
            f"{META_PREFIX}input_shape": json.dumps(list(self.input_shape)),
            f"{META_PREFIX}output_shape": json.dumps(list(self.output_shape)),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, graph: GraphKind | None = None) -> ModelSpec:
        """Inverse of :meth:`to_metadata`; checks the format version and, if given, the graph."""

        def get(key: str) -> str:
            value = meta.get(META_PREFIX + key)
            if value is None:
                raise ModelFormatError(
                    f"graph metadata: no {META_PREFIX}{key} (not an Ember graph)"
                )
            return value

        if get("format") != str(FORMAT_VERSION):
            raise ModelFormatError(
                f"graph metadata: format {get('format')!r}, this agent reads {FORMAT_VERSION}"
            )
        if graph is not None and get("graph") != graph:
            raise ModelFormatError(f"graph metadata: a {get('graph')} graph, not the {graph} graph")
        try:
            params = tuple(
                ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]))
                for p in json.loads(get("params"))
            )
            input_shape = tuple(int(d) for d in json.loads(get("input_shape")))
            output_shape = tuple(int(d) for d in json.loads(get("output_shape")))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelFormatError(f"graph metadata: malformed ({exc})") from None
        loss = get("loss")
        if loss not in LOSSES:
            raise ModelFormatError(f"graph metadata: unknown loss {loss!r}")
        return cls(
            params=params,
            loss=loss,  # type: ignore[arg-type]  # checked just above
            input_shape=input_shape,
            output_shape=output_shape,
        )

    def check_params(self, params: Mapping[str, Array], what: str = "params") -> None:
        """Refuse a parameter map whose names, shapes or dtypes differ from the spec."""
        if set(params) != set(self.names):
            missing = sorted(set(self.names) - set(params))
            extra = sorted(set(params) - set(self.names))
            raise ModelFormatError(f"{what}: missing {missing}, unexpected {extra}")
        for p in self.params:
            arr = params[p.name]
            if tuple(arr.shape) != p.shape or arr.dtype != np.dtype(p.dtype):
                raise ModelFormatError(
                    f"{what}.{p.name}: expected {p.dtype}{list(p.shape)}, "
                    f"got {arr.dtype}{list(arr.shape)}"
                )


def read_graph_spec(graph: bytes, kind: GraphKind) -> ModelSpec:
    """The :class:`ModelSpec` in an ONNX graph's metadata, read with onnxruntime alone."""
    import onnxruntime as ort  # only readers of graphs need it; importing it costs ~0.1 s

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own hierarchy for bad bytes
        raise ModelFormatError(f"{kind} graph: not a loadable ONNX model ({exc})") from None
    meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    return ModelSpec.from_metadata(meta, graph=kind)


@dataclass(frozen=True, kw_only=True, eq=False)
class ExportedModel:
    """A model as devices train it: train-step, eval and inference ONNX graphs, its spec and
    its initial weights. Made by :func:`coordinator.export.export_model`; travels in role
    bundles as :meth:`to_artifacts` (graphs as ONNX bytes, weights in the tensor codec).
    ``inference`` is ``None`` where it was left out (trainers do not receive it)."""

    spec: ModelSpec
    train_step: bytes
    eval_step: bytes
    inference: bytes | None
    initial_params: TensorMap = field(repr=False)

    def __post_init__(self) -> None:
        self.spec.check_params(self.initial_params, "initial_params")

    def to_artifacts(self) -> dict[str, bytes]:
        """The model as named blobs (bundle artifacts, or files in a directory)."""
        ordered = {name: self.initial_params[name] for name in self.spec.names}
        blobs = {
            ARTIFACTS["train_step"]: self.train_step,
            ARTIFACTS["eval"]: self.eval_step,
            ARTIFACTS["inference"]: self.inference,
            ARTIFACTS["initial"]: encode_tensors(ordered),
        }
        return {name: blob for name, blob in blobs.items() if blob is not None}

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, bytes]) -> ExportedModel:
        """Inverse of :meth:`to_artifacts`; other artifacts are ignored and the inference graph
        may be absent. The spec comes from the train-step graph's metadata; the other graphs
        must carry the same one."""
        missing = [ARTIFACTS[kind] for kind in REQUIRED if ARTIFACTS[kind] not in artifacts]
        if missing:
            raise ModelFormatError(f"model artifacts: missing {missing}")
        spec = read_graph_spec(artifacts[ARTIFACTS["train_step"]], "train_step")
        inference = artifacts.get(ARTIFACTS["inference"])
        kinds: tuple[GraphKind, ...] = ("eval",) if inference is None else ("eval", "inference")
        for kind in kinds:
            if read_graph_spec(artifacts[ARTIFACTS[kind]], kind) != spec:
                raise ModelFormatError(f"{kind} graph: its metadata differs from the train step's")
        try:
            initial = decode_tensors(artifacts[ARTIFACTS["initial"]])
        except ValueError as exc:
            raise ModelFormatError(f"initial weights: {exc}") from None
        return cls(
            spec=spec,
            train_step=bytes(artifacts[ARTIFACTS["train_step"]]),
            eval_step=bytes(artifacts[ARTIFACTS["eval"]]),
            inference=None if inference is None else bytes(inference),
            initial_params=initial,
        )

    def write(self, directory: Path) -> list[Path]:
        """Write :meth:`to_artifacts` as files in ``directory`` (created if needed)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, blob in self.to_artifacts().items():
            path = directory / name
            path.write_bytes(blob)
            paths.append(path)
        return paths

    @classmethod
    def read(cls, directory: Path) -> ExportedModel:
        """Inverse of :meth:`write`."""
        names = [n for n in ARTIFACTS.values() if (directory / n).exists()]
        return cls.from_artifacts({n: (directory / n).read_bytes() for n in names})


@dataclass(frozen=True, kw_only=True)
class HyperParams:
    """Client hyper-parameters of one local training run (SGD as ``torch.optim.SGD``).

    ``mu`` is FedProx's μ or FedDyn's α. The run takes ``local_steps`` steps of ``batch_size``
    samples, or ``ceil(local_epochs * n / batch_size)`` steps when ``local_epochs`` is set.
    ``seed`` fixes the shuffle, so two backends given the same seed see the same batches.
    """

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0
    local_steps: int = 10
    local_epochs: float | None = None
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "mu": self.mu >= 0,
            "local_steps": self.local_steps >= 1,
            "local_epochs": self.local_epochs is None or self.local_epochs > 0,
            "batch_size": self.batch_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"hyper-parameter {name}: out of range ({getattr(self, name)})")

    def steps_for(self, samples: int) -> int:
        """Number of SGD steps a run over ``samples`` local samples takes."""
        if self.local_epochs is None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * samples / min(self.batch_size, samples)))


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local training run: the new parameters (the delta is ``params - start``),
    the mean data loss over its steps, the number of steps and of samples processed, and the
    sum over every sample processed of its data loss squared (``None`` from a train-step graph
    exported without that output), from which Oort's statistical utility is computed."""

    params: TensorMap
    loss: float
    steps: int
    samples: int
    loss_sq_sum: float | None = None


@dataclass(frozen=True)
class EvalResult:
    """Mean loss over the samples, accuracy (``None`` for regression) and sample count."""

    loss: float
    accuracy: float | None
    samples: int


class TrainingBackend(Protocol):
    """A way to run local training and evaluation on one device; all arrays are numpy."""

    spec: ModelSpec

    def train(
        self,
        params: Mapping[str, Array],
        x: Array,
        y: Array,
        hyper: HyperParams,
        *,
        anchor: Mapping[str, Array] | None = None,
        correction: Mapping[str, Array] | None = None,
    ) -> TrainResult:
        """Train from ``params`` on ``(x, y)``. ``anchor`` (the proximal centre) defaults to
        ``params``, ``correction`` (FedDyn's h) to zeros."""
        ...

    def evaluate(
        self, params: Mapping[str, Array], x: Array, y: Array, *, batch_size: int = 1024
    ) -> EvalResult:
        """Loss and accuracy of ``params`` on ``(x, y)``."""
        ...


def batch_indices(samples: int, hyper: HyperParams) -> Iterator[npt.NDArray[np.intp]]:
    """The sample indices of each step of a run: consecutive slices of a stream of seeded
    random permutations of ``range(samples)``, every batch full (``min(batch_size, samples)``),
    so every sample is seen once per epoch and epochs run into each other."""
    if samples < 1:
        raise ValueError("training needs at least one sample")
    size = min(hyper.batch_size, samples)
    steps = hyper.steps_for(samples)
    rng = np.random.default_rng(hyper.seed)
    epochs = math.ceil(steps * size / samples)
    stream = np.concatenate([rng.permutation(samples) for _ in range(epochs)])
    yield from stream[: steps * size].reshape(steps, size)


def prepare_data(spec: ModelSpec, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[Array, Array]:
    """``x`` as C-contiguous float32 of shape ``(n, *input_shape)`` (reshaped when only the
    per-sample layout differs, e.g. digits' 64 features for a 1×8×8 CNN) and ``y`` as the
    labels the loss expects. Raises :class:`ValueError` naming the mismatch."""
    xa = np.asarray(x)
    ya = np.asarray(y)
    n = xa.shape[0] if xa.ndim else 0
    if xa.ndim == 0 or math.prod(xa.shape[1:]) != math.prod(spec.input_shape):
        raise ValueError(
            f"x: expected (n, {', '.join(map(str, spec.input_shape))}), got {xa.shape}"
        )
    xa = np.ascontiguousarray(xa.reshape(n, *spec.input_shape), dtype=np.float32)
    if ya.shape[:1] != (n,) or math.prod(ya.shape[1:]) != math.prod(spec.label_shape):
        raise ValueError(f"y: expected {n} labels of shape {spec.label_shape}, got {ya.shape}")
    if spec.loss == "cross_entropy" and not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"y: cross-entropy needs integer class labels, got {ya.dtype}")
    ya = np.ascontiguousarray(ya.reshape(n, *spec.label_shape), dtype=spec.label_dtype)
    if spec.loss == "cross_entropy" and n and (ya.min() < 0 or ya.max() >= spec.output_shape[0]):
        raise ValueError(
            f"y: class labels must be in [0, {spec.output_shape[0]}), got {ya.min()}..{ya.max()}"
        )
    return xa, ya


def as_param_map(spec: ModelSpec, params: Mapping[str, npt.ArrayLike], what: str) -> TensorMap:
    """``params`` in spec order, checked against the spec's names and shapes; floating arrays
    of another precision (an aggregator's float64 state) are cast to the spec's dtype."""
    arrays = {}
    for name, value in params.items():
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(spec.dtype_of(name) if name in spec.names else arr.dtype, copy=False)
        arrays[name] = arr
    spec.check_params(arrays, what)
    return {name: arrays[name] for name in spec.names}


@dataclass(frozen=True)
class TrainInputs:
    """A training run's inputs as every backend takes them (see :func:`train_inputs`)."""

    start: TensorMap
    xs: Array
    ys: Array
    anchor: TensorMap
    correction: TensorMap | None


def train_inputs(
    spec: ModelSpec,
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    anchor: Mapping[str, Array] | None,
    correction: Mapping[str, Array] | None,
) -> TrainInputs:
    """The checked inputs of :meth:`TrainingBackend.train`: ``params`` as the start map, the
    data through :func:`prepare_data`, ``anchor`` defaulting to the start and ``correction``
    checked when given (``None`` stands for zeros; each backend applies that its own way)."""
    start = as_param_map(spec, params, "params")
    xs, ys = prepare_data(spec, x, y)
    centre = start if anchor is None else as_param_map(spec, anchor, "anchor")
    h = None if correction is None else as_param_map(spec, correction, "correction")
    return TrainInputs(start=start, xs=xs, ys=ys, anchor=centre, correction=h)


def eval_inputs(
    spec: ModelSpec, params: Mapping[str, Array], x: Array, y: Array
) -> tuple[TensorMap, Array, Array]:
    """The checked inputs of :meth:`TrainingBackend.evaluate`: the weights in spec order and
    the prepared data, which must hold at least one sample."""
    weights = as_param_map(spec, params, "params")
    xs, ys = prepare_data(spec, x, y)
    if len(xs) == 0:
        raise ValueError("evaluation needs at least one sample")
    return weights, xs, ys


def eval_result(spec: ModelSpec, loss_sum: float, correct: int, samples: int) -> EvalResult:
    """The :class:`EvalResult` of an evaluation over ``samples`` samples: the mean loss and,
    for classification, the share of ``correct`` predictions."""
    accuracy = correct / samples if spec.loss == "cross_entropy" else None
    return EvalResult(loss=loss_sum / samples, accuracy=accuracy, samples=samples)
