"""Job specs: what a job needs, apart from where it runs (Flame's job/role model).

A job spec names the model, the data and the compute it needs, the algorithm (FedBuff, Nguyen et
al. 2022, or synchronous FedAvg rounds) and when to stop; the planner then finds the agents.
It is written in YAML and documented field by field in ``docs/job-spec.md``.

:func:`parse_spec` turns a plain mapping into a frozen :class:`JobSpec`, filling in defaults,
and raises :class:`SpecError` for the first thing wrong, naming the field:
``algorithm.buffer_size: must be ≥ 1, got 0``. :meth:`JobSpec.to_dict` gives the normalised
mapping back (every default filled in); parsing that again gives an equal spec, so the CLI, the
coordinator and the bundles all see the same thing.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from agent.learning.hierarchy import Kind as TopologyKind
from agent.learning.hierarchy import Topology as TopologySpec

T = TypeVar("T")

MODES = ("async", "sync")
BACKENDS = ("onnxruntime", "torch", "auto")
"""``auto``: each trainer trains with torch where its agent has torch and allows code, with
onnxruntime elsewhere (one job over a mixed fleet)."""
LOSSES = ("cross_entropy", "mse")
STALENESS_WEIGHTS = ("sqrt", "constant")
SELECTIONS = ("random", "oort")
PARTIAL_WORK = ("keep", "drop")
TOPOLOGIES = ("two_tier", "hierarchical", "hybrid")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "feddyn")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
"""Architecture names as ``platform.machine()`` reports them, and their synonyms."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


class SpecError(ValueError):
    """A job spec is invalid; ``str(error)`` is one line naming the field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


# -- the spec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxFiles:
    """The files of an exported model: train-step and eval graphs, initial parameters."""

    train_step: str
    eval: str
    initial: str
    inference: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one of ``torch`` (``file.py:Class``) or ``onnx`` (exported files)."""

    torch: str | None = None
    onnx: OnnxFiles | None = None
    input_shape: tuple[int, ...] | None = None
    """Shape of one example (no batch axis), needed to export a torch model."""
    loss: str = "cross_entropy"

    @property
    def torch_file(self) -> str:
        assert self.torch is not None
        return self.torch.rpartition(":")[0]

    @property
    def torch_class(self) -> str:
        assert self.torch is not None
        return self.torch.rpartition(":")[2]


@dataclass(frozen=True)
class DataSpec:
    """Which local datasets qualify an agent as a trainer: by name and/or tags."""

    dataset: str | None = None
    tags: tuple[str, ...] = ()
    min_samples: int = 1
    eval_dataset: str | None = None
    """A held-out dataset on the aggregator's agent, to evaluate every model version on."""

    def matches(self, name: str, tags: tuple[str, ...] | list[str]) -> bool:
        return (self.dataset is None or name == self.dataset) and set(self.tags) <= set(tags)

    def describe(self) -> str:
        parts = [f"dataset {self.dataset}"] if self.dataset else []
        if self.tags:
            parts.append("tags " + ", ".join(self.tags))
        return " with ".join(parts)


@dataclass(frozen=True)
class ComputeSpec:
    """What a trainer's device must have."""

    min_memory_mb: int = 0
    arch: tuple[str, ...] = ()
    """Accepted CPU architectures (normalised: ``x86_64``, ``aarch64``, ...); empty = any."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels the agent must carry, e.g. ``{site: lab}``."""


@dataclass(frozen=True)
class StalenessSpec:
    """FedBuff's staleness weighting s(τ) and the optional cut-off."""

    weight: str = "sqrt"
    max: int | None = None


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """Server optimizer (Reddi et al. 2021): FedAvg, FedAvgM, FedAdam, FedYogi, FedAdaGrad."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None


@dataclass(frozen=True)
class ClientSpec:
    """Local training on each trainer: SGD as torch.optim.SGD, FedProx's μ or FedDyn's α."""

    local_steps: int = 20
    local_epochs: float | None = None
    batch_size: int = 32
    lr: float = 0.05
    proximal_mu: float = 0.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    feddyn_alpha: float | None = None


@dataclass(frozen=True)
class OortSpec:
    """Oort's knobs (Lai et al., OSDI 2021): preferred round duration T, blacklist threshold."""

    preferred_duration: float | None = None
    blacklist_rounds: int | None = None


@dataclass(frozen=True)
class AlgorithmSpec:
    """FedBuff (``async``) or FedAvg rounds (``sync``) and their parameters."""

    mode: str = "async"
    buffer_size: int = 10
    concurrency: int = 10
    min_trainers: int = 1
    selection: str = "random"
    clients_per_round: int | None = None
    round_timeout: float = 60.0
    oort: OortSpec = field(default_factory=OortSpec)
    max_norm: float | None = None
    clip_norm: float | None = None
    partial_work: str = "keep"
    shards: int = 1
    staleness: StalenessSpec = field(default_factory=StalenessSpec)
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)
    client: ClientSpec = field(default_factory=ClientSpec)

    @property
    def active_trainers(self) -> float:
        """How many trainers get roles at once: FedBuff's C with random selection (the other
        eligible agents stand by); every eligible agent (``inf``) in sync rounds, and with Oort
        in async mode, where the aggregator picks which C of them train next."""
        if self.mode == "async" and self.selection != "oort":
            return self.concurrency
        return math.inf


@dataclass(frozen=True)
class StopSpec:
    """When the job is done: the first rule reached ends it."""

    target_accuracy: float | None = None
    max_updates: int | None = None
    max_versions: int | None = None
    max_minutes: float | None = None


@dataclass(frozen=True)
class AggregatorSpec:
    """Where the top aggregator may run: agents carrying these labels."""

    labels: dict[str, str] = field(default_factory=lambda: {"role": "aggregator"})


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec (see ``docs/job-spec.md``)."""

    name: str
    model: ModelSpec
    data: DataSpec
    description: str = ""
    backend: str = "onnxruntime"
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    stop: StopSpec = field(default_factory=StopSpec)
    aggregator: AggregatorSpec = field(default_factory=AggregatorSpec)
    topology: TopologySpec = field(default_factory=TopologySpec)

    def to_dict(self) -> dict[str, Any]:
        """The normalised spec as plain data (JSON- and msgpack-safe), every default filled in."""
        model: dict[str, Any] = {"loss": self.model.loss}
        if self.model.torch is not None:
            model["torch"] = self.model.torch
        if self.model.onnx is not None:
            onnx = self.model.onnx
            model["onnx"] = {
                "train_step": onnx.train_step,
                "eval": onnx.eval,
                "initial": onnx.initial,
                **({"inference": onnx.inference} if onnx.inference else {}),
            }
        if self.model.input_shape is not None:
            model["input_shape"] = list(self.model.input_shape)
        algo = self.algorithm
        opt = algo.server_optimizer
        optimizer: dict[str, Any] = {"name": opt.name, "lr": opt.lr}
        for key in ("momentum", "beta1", "beta2", "tau"):
            if getattr(opt, key) is not None:
                optimizer[key] = getattr(opt, key)
        data: dict[str, Any] = {"min_samples": self.data.min_samples}
        if self.data.dataset is not None:
            data["dataset"] = self.data.dataset
        if self.data.tags:
            data["tags"] = list(self.data.tags)
        if self.data.eval_dataset is not None:
            data["eval_dataset"] = self.data.eval_dataset
        stop = {k: v for k, v in vars(self.stop).items() if v is not None}
        return {
            "name": self.name,
            "description": self.description,
            "model": model,
            "backend": self.backend,
            "data": data,
            "compute": {
                "min_memory_mb": self.compute.min_memory_mb,
                "arch": list(self.compute.arch),
                "labels": dict(self.compute.labels),
            },
            "algorithm": {
                "mode": algo.mode,
                "buffer_size": algo.buffer_size,
                "concurrency": algo.concurrency,
                "min_trainers": algo.min_trainers,
                "selection": algo.selection,
                "clients_per_round": algo.clients_per_round,
                "round_timeout": algo.round_timeout,
                "oort": dict(vars(algo.oort)),
                "max_norm": algo.max_norm,
                "clip_norm": algo.clip_norm,
                "partial_work": algo.partial_work,
                "shards": algo.shards,
                "staleness": {"weight": algo.staleness.weight, "max": algo.staleness.max},
                "server_optimizer": optimizer,
                "client": dict(vars(algo.client)),
            },
            "stop": stop,
            "aggregator": {"labels": dict(self.aggregator.labels)},
            "topology": {
                "kind": self.topology.kind,
                "group_by": self.topology.group_by,
                "buffer_size": self.topology.buffer_size,
                "min_groups": self.topology.min_groups,
            },
        }


# -- loading -------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise SpecError(str(key), f"duplicate key (line {line})")
        seen.add(key)
    return dict(loader.construct_pairs(node))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no object construction); syntax errors become a one-line SpecError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise SpecError("", f"{where}{problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError("", " ".join(str(exc).split())) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError("", f"{path} is not UTF-8 text") from None
    return parse_spec(load_yaml(text))


# -- validation ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return {dict: "a mapping", list: "a list"}[type(value)]
    return str(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


class _Fields:
    """One mapping being validated: takes fields out and complains about what is left over."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            raise SpecError(path or "job spec", f"must be a mapping, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                raise SpecError(_join(path, str(key)), "keys must be strings")
        self.raw: dict[str, Any] = dict(value)
        self.path = path
        self.known: list[str] = []

    def where(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def take(self, key: str, check: Callable[[Any, str], T], default: T) -> T:
        self.known.append(key)
        value = self.raw.get(key)
        return default if value is None else check(value, self.where(key))

    def need(self, key: str, check: Callable[[Any, str], T]) -> T:
        self.known.append(key)
        value = self.raw.get(key)
        if value is None:
            raise SpecError(self.where(key), "required")
        return check(value, self.where(key))

    def done(self) -> None:
        for key in self.raw:
            if key not in self.known:
                close = difflib.get_close_matches(key, self.known, n=1)
                hint = (
                    f" (did you mean {close[0]}?)"
                    if close
                    else (f" (expected one of {', '.join(self.known)})")
                )
                raise SpecError(self.where(key), f"unknown field{hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any, str], int]:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(where, f"must be an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise SpecError(where, f"must be ≥ {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SpecError(where, f"must be ≤ {maximum}, got {value}")
        return value

    return check


def _float(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_min: bool = False,
) -> Callable[[Any, str], float]:
    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(where, f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            raise SpecError(where, f"must be finite, got {value}")
        if minimum is not None:
            if exclusive_min and value <= minimum:
                raise SpecError(where, f"must be > {_num(minimum)}, got {_num(value)}")
            if not exclusive_min and value < minimum:
                raise SpecError(where, f"must be ≥ {_num(minimum)}, got {_num(value)}")
        if maximum is not None and value > maximum:
            raise SpecError(where, f"must be ≤ {_num(maximum)}, got {_num(value)}")
        return float(value)

    return check


def _str(pattern: re.Pattern[str] | None = None, what: str = "") -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise SpecError(where, f"must be a non-empty string, got {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise SpecError(where, f"must be {what}, got {_show(value)}")
        return value

    return check


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(where, f"must be a string, got {_show(value)}")
    if len(value) > 4096:
        raise SpecError(where, f"must be at most 4096 characters, got {len(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in options:
            raise SpecError(where, f"must be one of {', '.join(options)}, got {_show(value)}")
        return str(value)

    return check


def _str_list(item: Callable[[Any, str], str]) -> Callable[[Any, str], tuple[str, ...]]:
    def check(value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise SpecError(where, f"must be a list of strings, got {_show(value)}")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def _labels(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise SpecError(where, f"must be a mapping of label: value, got {_show(value)}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL.fullmatch(key):
            raise SpecError(_join(where, str(key)), "label names are letters, digits, ._/-")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise SpecError(_join(where, key), f"must be a string, got {_show(val)}")
        out[key] = str(val)
    return out


_NO_STRINGS: tuple[str, ...] = ()
_NAME_TEXT = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def parse_spec(raw: Any) -> JobSpec:
    """Validate a job spec mapping (from YAML or JSON) into a :class:`JobSpec`."""
    top = _Fields(raw, "")
    name = top.need("name", _str(_NAME, _NAME_TEXT))
    description = top.take("description", _text, "")
    model = top.need("model", _model)
    backend = top.take("backend", _choice(BACKENDS), "onnxruntime")
    data = top.need("data", _data)
    compute = top.take("compute", _compute, ComputeSpec())
    algorithm = top.take("algorithm", _algorithm, AlgorithmSpec())
    stop = top.need("stop", _stop)
    aggregator = top.take("aggregator", _aggregator, AggregatorSpec())
    topology = top.take("topology", _topology, TopologySpec())
    top.done()
    if topology.grouped:
        if algorithm.shards > 1:
            raise SpecError("algorithm.shards", f"{topology.kind} jobs run with one aggregator")
        if algorithm.server_optimizer.name == "feddyn":
            raise SpecError("topology.kind", f"{topology.kind} jobs do not support feddyn")
        if topology.kind == "hybrid" and algorithm.mode != "async":
            raise SpecError("topology.kind", "hybrid jobs run with algorithm.mode: async")
    if backend in ("torch", "auto") and model.torch is None:
        raise SpecError("backend", f"{backend} needs model.torch (a file.py:Class), not ONNX files")
    return JobSpec(
        name=name,
        description=description,
        model=model,
        backend=backend,
        data=data,
        compute=compute,
        algorithm=algorithm,
        stop=stop,
        aggregator=aggregator,
        topology=topology,
    )


def _model(value: Any, where: str) -> ModelSpec:
    f = _Fields(value, where)
    torch = f.take("torch", _torch_ref, None)
    onnx = f.take("onnx", _onnx, None)
    input_shape = f.take("input_shape", _shape, None)
    loss = f.take("loss", _choice(LOSSES), "cross_entropy")
    f.done()
    if torch is None and onnx is None:
        raise SpecError(where, "needs torch: file.py:Class or onnx: files")
    if torch is not None and onnx is not None:
        raise SpecError(where, "give either torch or onnx, not both")
    return ModelSpec(torch=torch, onnx=onnx, input_shape=input_shape, loss=loss)


def _torch_ref(value: Any, where: str) -> str:
    text = _str()(value, where)
    file, sep, cls = text.rpartition(":")
    if not sep or not file.endswith(".py") or not cls.isidentifier():
        raise SpecError(where, f"must be file.py:ClassName, got {_show(text)}")
    return text


def _onnx(value: Any, where: str) -> OnnxFiles:
    if isinstance(value, str):
        # Shorthand: the train-step graph; the other files sit beside it with standard names.
        train_step = _str()(value, where)
        folder = train_step.rpartition("/")[0]
        beside = (folder + "/") if folder else ""
        return OnnxFiles(
            train_step=train_step,
            eval=beside + "eval.onnx",
            initial=beside + "initial.tensors",
        )
    f = _Fields(value, where)
    files = OnnxFiles(
        train_step=f.need("train_step", _str()),
        eval=f.need("eval", _str()),
        initial=f.need("initial", _str()),
        inference=f.take("inference", _str(), None),
    )
    f.done()
    return files


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(where, f"must be a non-empty list of sizes, got {_show(value)}")
    return tuple(_int(1)(v, f"{where}[{i}]") for i, v in enumerate(value))


def _data(value: Any, where: str) -> DataSpec:
    f = _Fields(value, where)
    dataset = f.take("dataset", _str(_NAME, _NAME_TEXT), None)
    tags = f.take("tags", _str_list(_str()), _NO_STRINGS)
    min_samples = f.take("min_samples", _int(1), 1)
    eval_dataset = f.take("eval_dataset", _str(_NAME, _NAME_TEXT), None)
    f.done()
    if dataset is None and not tags:
        raise SpecError(where, "needs a dataset name, tags, or both")
    return DataSpec(dataset=dataset, tags=tags, min_samples=min_samples, eval_dataset=eval_dataset)


def _arch(value: Any, where: str) -> str:
    text = _str()(value, where)
    norm = ARCHES.get(text.lower())
    if norm is None:
        known = ", ".join(sorted(set(ARCHES.values())))
        raise SpecError(where, f"must be a CPU architecture ({known}), got {_show(text)}")
    return norm


def _compute(value: Any, where: str) -> ComputeSpec:
    f = _Fields(value, where)
    spec = ComputeSpec(
        min_memory_mb=f.take("min_memory_mb", _int(0), 0),
        arch=tuple(dict.fromkeys(f.take("arch", _str_list(_arch), _NO_STRINGS))),
        labels=f.take("labels", _labels, {}),
    )
    f.done()
    return spec


def _oort(value: Any, where: str) -> OortSpec:
    f = _Fields(value, where)
    spec = OortSpec(
        preferred_duration=f.take("preferred_duration", _float(0.0, exclusive_min=True), None),
        blacklist_rounds=f.take("blacklist_rounds", _int(1), None),
    )
    f.done()
    return spec


def _algorithm(value: Any, where: str) -> AlgorithmSpec:
    f = _Fields(value, where)
    spec = AlgorithmSpec(
        mode=f.take("mode", _choice(MODES), "async"),
        buffer_size=f.take("buffer_size", _int(1), 10),
        concurrency=f.take("concurrency", _int(1), 10),
        min_trainers=f.take("min_trainers", _int(1), 1),
        selection=f.take("selection", _choice(SELECTIONS), "random"),
        clients_per_round=f.take("clients_per_round", _int(1), None),
        round_timeout=f.take("round_timeout", _float(0.0, exclusive_min=True), 60.0),
        oort=f.take("oort", _oort, OortSpec()),
        max_norm=f.take("max_norm", _float(0.0, exclusive_min=True), None),
        clip_norm=f.take("clip_norm", _float(0.0, exclusive_min=True), None),
        partial_work=f.take("partial_work", _choice(PARTIAL_WORK), "keep"),
        shards=f.take("shards", _int(1), 1),
        staleness=f.take("staleness", _staleness, StalenessSpec()),
        server_optimizer=f.take("server_optimizer", _server_optimizer, ServerOptimizerSpec()),
        client=f.take("client", _client, ClientSpec()),
    )
    f.done()
    if spec.server_optimizer.name == "feddyn":
        if spec.mode != "sync":
            raise SpecError(f.where("server_optimizer") + ".name", "feddyn needs mode: sync")
        if spec.client.feddyn_alpha is None:
            raise SpecError(
                f.where("client") + ".feddyn_alpha", "required by server_optimizer feddyn"
            )
    elif spec.client.feddyn_alpha is not None:
        raise SpecError(
            f.where("client") + ".feddyn_alpha", "only used with server_optimizer: { name: feddyn }"
        )
    if spec.shards > 1:
        _check_sharded(spec, f)
    if spec.min_trainers > spec.concurrency and spec.mode == "async":
        raise SpecError(
            f.where("min_trainers"),
            f"must be ≤ algorithm.concurrency ({spec.concurrency}), got {spec.min_trainers}",
        )
    return spec


def _check_sharded(spec: AlgorithmSpec, f: _Fields) -> None:
    """Sharded aggregation is FedBuff's (Nguyen et al. 2022) over slices of the parameters: what
    needs the whole delta in one place, or synchronous rounds, is refused by name."""
    where = f.where("shards")
    if spec.mode != "async":
        raise SpecError(where, "sharded aggregation runs with mode: async")
    if spec.max_norm is not None or spec.clip_norm is not None:
        raise SpecError(where, "max_norm and clip_norm need the whole delta: not with shards > 1")
    if spec.selection != "random":
        raise SpecError(where, "oort selection is not available with shards > 1")
    if spec.partial_work != "keep":
        raise SpecError(where, "partial_work: drop is not available with shards > 1")


def _staleness(value: Any, where: str) -> StalenessSpec:
    f = _Fields(value, where)
    spec = StalenessSpec(
        weight=f.take("weight", _choice(STALENESS_WEIGHTS), "sqrt"),
        max=f.take("max", _int(0), None),
    )
    f.done()
    return spec


def _server_optimizer(value: Any, where: str) -> ServerOptimizerSpec:
    f = _Fields(value, where)
    name = f.take("name", _choice(SERVER_OPTIMIZERS), "fedavg")
    lr = f.take(
        "lr", _float(0.0, exclusive_min=True), 1.0 if name in ("fedavg", "fedavgm") else 0.01
    )
    momentum = f.take("momentum", _float(0.0, 1.0), None)
    beta1 = f.take("beta1", _float(0.0, 1.0), None)
    beta2 = f.take("beta2", _float(0.0, 1.0), None)
    tau = f.take("tau", _float(0.0, exclusive_min=True), None)
    f.done()
    allowed = {"fedavg": (), "fedavgm": ("momentum",), "feddyn": ()}.get(
        name, ("beta1", "beta2", "tau")
    )
    given = {"momentum": momentum, "beta1": beta1, "beta2": beta2, "tau": tau}
    for key, val in given.items():
        if val is not None and key not in allowed:
            raise SpecError(f.where(key), f"not used by {name}")
    if name == "fedavgm" and momentum is None:
        momentum = 0.9
    if name in ADAPTIVE:
        beta1 = 0.9 if beta1 is None else beta1
        beta2 = 0.99 if beta2 is None else beta2
        tau = 1e-3 if tau is None else tau
    return ServerOptimizerSpec(name, lr, momentum, beta1, beta2, tau)


def _client(value: Any, where: str) -> ClientSpec:
    f = _Fields(value, where)
    spec = ClientSpec(
        local_steps=f.take("local_steps", _int(1), 20),
        local_epochs=f.take("local_epochs", _float(0.0, exclusive_min=True), None),
        batch_size=f.take("batch_size", _int(1), 32),
        lr=f.take("lr", _float(0.0, exclusive_min=True), 0.05),
        proximal_mu=f.take("proximal_mu", _float(0.0), 0.0),
        momentum=f.take("momentum", _float(0.0, 0.999), 0.0),
        weight_decay=f.take("weight_decay", _float(0.0), 0.0),
        feddyn_alpha=f.take("feddyn_alpha", _float(0.0, exclusive_min=True), None),
    )
    f.done()
    return spec


def _stop(value: Any, where: str) -> StopSpec:
    f = _Fields(value, where)
    spec = StopSpec(
        target_accuracy=f.take("target_accuracy", _float(0.0, 1.0, exclusive_min=True), None),
        max_updates=f.take("max_updates", _int(1), None),
        max_versions=f.take("max_versions", _int(1), None),
        max_minutes=f.take("max_minutes", _float(0.0, exclusive_min=True), None),
    )
    f.done()
    if all(v is None for v in vars(spec).values()):
        raise SpecError(
            where, "needs at least one of target_accuracy, max_updates, max_versions, max_minutes"
        )
    return spec


def _aggregator(value: Any, where: str) -> AggregatorSpec:
    f = _Fields(value, where)
    spec = AggregatorSpec(labels=f.take("labels", _labels, {"role": "aggregator"}))
    f.done()
    return spec


def _topology(value: Any, where: str) -> TopologySpec:
    f = _Fields(value, where)
    spec = TopologySpec(
        kind=cast(TopologyKind, f.take("kind", _choice(TOPOLOGIES), "two_tier")),
        group_by=f.take("group_by", _str(_LABEL, "a label name"), None),
        buffer_size=f.take("buffer_size", _int(1), 2),
        min_groups=f.take("min_groups", _int(1), 1),
    )
    f.done()
    if spec.grouped and spec.group_by is None:
        raise SpecError(f.where("group_by"), f"required by kind: {spec.kind} (e.g. site)")
    if not spec.grouped and spec.group_by is not None:
        raise SpecError(f.where("group_by"), "only used by hierarchical and hybrid jobs")
    return spec


def normalise_arch(arch: str) -> str:
    """``arm64`` → ``aarch64``, ``AMD64`` → ``x86_64``; unknown names lower-cased as they are."""
    return ARCHES.get(arch.lower(), arch.lower())
