"""Job specs: the issue's example parses, defaults fill in, and every mistake is one line that
names the field."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.learning.plan import TrainingPlan
from coordinator.spec import JobSpec, SpecError, load_spec, load_yaml, parse_spec

EXAMPLE = """
name: digits-fedbuff
model: { torch: examples/digits/model.py:Net }   # or { onnx: path/to/train_step.onnx, ... }
backend: onnxruntime                             # or torch
data: { dataset: digits, min_samples: 50 }       # dataset name and/or tags
compute: { min_memory_mb: 256, arch: [aarch64, x86_64] }
algorithm:
  mode: async                                    # async (FedBuff) | sync (FedAvg rounds)
  buffer_size: 10
  concurrency: 20
  staleness: { weight: sqrt, max: 20 }
  server_optimizer: { name: fedadam, lr: 0.01 }
  client: { local_steps: 20, batch_size: 32, lr: 0.05 }
stop: { target_accuracy: 0.95, max_updates: 5000, max_minutes: 30 }
"""


def example() -> dict[str, Any]:
    raw = load_yaml(EXAMPLE)
    assert isinstance(raw, dict)
    return raw


def test_the_issue_example_parses() -> None:
    spec = parse_spec(example())
    assert spec.name == "digits-fedbuff"
    assert spec.model.torch == "examples/digits/model.py:Net"
    assert (spec.model.torch_file, spec.model.torch_class) == ("examples/digits/model.py", "Net")
    assert spec.backend == "onnxruntime"
    assert spec.data.dataset == "digits"
    assert spec.data.min_samples == 50
    assert spec.compute.arch == ("aarch64", "x86_64")
    assert spec.algorithm.mode == "async"
    assert spec.algorithm.buffer_size == 10
    assert spec.algorithm.concurrency == 20
    assert spec.algorithm.staleness.weight == "sqrt"
    assert spec.algorithm.staleness.max == 20
    opt = spec.algorithm.server_optimizer
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.tau) == ("fedadam", 0.01, 0.9, 0.99, 1e-3)
    assert spec.algorithm.client.local_steps == 20
    assert spec.stop.max_minutes == 30.0


def test_defaults_and_round_trip() -> None:
    spec = parse_spec(
        {
            "name": "j",
            "model": {"onnx": "out/train_step.onnx"},
            "data": {"tags": ["vision"], "eval_dataset": "holdout"},
            "stop": {"max_updates": 10},
        }
    )
    assert spec.model.onnx is not None
    assert spec.model.onnx.eval == "out/eval.onnx"
    assert spec.model.onnx.initial == "out/initial.tensors"
    assert spec.algorithm.server_optimizer.lr == 1.0
    assert spec.aggregator.labels == {"role": "aggregator"}
    assert spec.data.eval_dataset == "holdout"
    assert parse_spec(spec.to_dict()) == spec
    full = parse_spec(example())
    assert parse_spec(full.to_dict()) == full
    assert parse_spec(copy.deepcopy(full.to_dict())).to_dict() == full.to_dict()


def test_epochs_and_partial_work_reach_the_trainers_plan() -> None:
    raw = example()
    raw["algorithm"]["partial_work"] = "drop"
    raw["algorithm"]["client"]["local_epochs"] = 20
    spec = parse_spec(raw)
    assert spec.algorithm.partial_work == "drop"
    plan = TrainingPlan.from_config(spec.to_dict())
    assert plan.partial_work == "drop"
    assert plan.client.steps_for(95) == 20 * 95 // plan.client.batch_size + 1
    assert parse_spec(example()).algorithm.partial_work == "keep"


def test_arch_synonyms_are_normalised() -> None:
    raw = example()
    raw["compute"]["arch"] = ["arm64", "AMD64", "aarch64"]
    assert parse_spec(raw).compute.arch == ("aarch64", "x86_64")


def with_change(path: str, value: Any) -> dict[str, Any]:
    raw = example()
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


DELETE = object()
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"

BAD: list[tuple[str, Any, str]] = [
    ("algorithm.buffer_size", 0, "algorithm.buffer_size: must be ≥ 1, got 0"),
    ("algorithm.buffer_size", "ten", "algorithm.buffer_size: must be an integer, got 'ten'"),
    ("algorithm.buffer_size", True, "algorithm.buffer_size: must be an integer, got True"),
    ("algorithm.buffer_size", 2.5, "algorithm.buffer_size: must be an integer, got 2.5"),
    ("algorithm.concurrency", -3, "algorithm.concurrency: must be ≥ 1, got -3"),
    ("algorithm.mode", "semi", "algorithm.mode: must be one of async, sync, got 'semi'"),
    ("algorithm.bufer_size", 3, "algorithm.bufer_size: unknown field (did you mean buffer_size?)"),
    (
        "algorithm.staleness.weight",
        "linear",
        "algorithm.staleness.weight: must be one of sqrt, constant, got 'linear'",
    ),
    ("algorithm.staleness.max", -1, "algorithm.staleness.max: must be ≥ 0, got -1"),
    (
        "algorithm.server_optimizer.name",
        "sgd",
        "algorithm.server_optimizer.name: must be one of fedavg, fedavgm, fedadam, fedyogi, "
        "fedadagrad, feddyn, got 'sgd'",
    ),
    ("algorithm.server_optimizer.lr", 0, "algorithm.server_optimizer.lr: must be > 0, got 0"),
    (
        "algorithm.server_optimizer.momentum",
        0.9,
        "algorithm.server_optimizer.momentum: not used by fedadam",
    ),
    (
        "algorithm.server_optimizer.beta1",
        1.5,
        "algorithm.server_optimizer.beta1: must be ≤ 1, got 1.5",
    ),
    ("algorithm.client.lr", -0.1, "algorithm.client.lr: must be > 0, got -0.1"),
    ("algorithm.client.lr", float("nan"), "algorithm.client.lr: must be finite, got nan"),
    ("algorithm.client.batch_size", 0, "algorithm.client.batch_size: must be ≥ 1, got 0"),
    ("algorithm.client.proximal_mu", -1, "algorithm.client.proximal_mu: must be ≥ 0, got -1"),
    ("algorithm.client.local_epochs", 0, "algorithm.client.local_epochs: must be > 0, got 0"),
    (
        "algorithm.partial_work",
        "maybe",
        "algorithm.partial_work: must be one of keep, drop, got 'maybe'",
    ),
    (
        "algorithm.min_trainers",
        50,
        "algorithm.min_trainers: must be ≤ algorithm.concurrency (20), got 50",
    ),
    ("algorithm", [1, 2], "algorithm: must be a mapping, got a list"),
    ("data.min_samples", 0, "data.min_samples: must be ≥ 1, got 0"),
    (
        "data.dataset",
        "my data",
        f"data.dataset: must be {NAME_RULE}, got 'my data'",
    ),
    ("data", {"min_samples": 5}, "data: needs a dataset name, tags, or both"),
    ("data.tags", [1], "data.tags[0]: must be a non-empty string, got 1"),
    ("data", DELETE, "data: required"),
    ("compute.min_memory_mb", -1, "compute.min_memory_mb: must be ≥ 0, got -1"),
    (
        "compute.arch",
        ["sparc"],
        "compute.arch[0]: must be a CPU architecture (aarch64, x86_64), got 'sparc'",
    ),
    ("compute.labels", ["a"], "compute.labels: must be a mapping of label: value, got a list"),
    (
        "compute.gpu",
        True,
        "compute.gpu: unknown field (expected one of min_memory_mb, arch, labels)",
    ),
    ("stop.target_accuracy", 1.5, "stop.target_accuracy: must be ≤ 1, got 1.5"),
    ("stop.target_accuracy", 0, "stop.target_accuracy: must be > 0, got 0"),
    ("stop.max_minutes", "soon", "stop.max_minutes: must be a number, got 'soon'"),
    (
        "stop",
        {},
        "stop: needs at least one of target_accuracy, max_updates, max_versions, max_minutes",
    ),
    ("stop", DELETE, "stop: required"),
    ("name", "", "name: must be a non-empty string, got ''"),
    (
        "name",
        "a/b",
        f"name: must be {NAME_RULE}, got 'a/b'",
    ),
    ("name", DELETE, "name: required"),
    ("backend", "tensorflow", "backend: must be one of onnxruntime, torch, auto, got 'tensorflow'"),
    ("model", {}, "model: needs torch: file.py:Class or onnx: files"),
    ("model", {"torch": "model.py"}, "model.torch: must be file.py:ClassName, got 'model.py'"),
    (
        "model",
        {"torch": "m.py:Net", "onnx": "x.onnx"},
        "model: give either torch or onnx, not both",
    ),
    (
        "model",
        {"torch": "m.py:Net", "input_shape": [0]},
        "model.input_shape[0]: must be ≥ 1, got 0",
    ),
    (
        "model",
        {"torch": "m.py:Net", "loss": "hinge"},
        "model.loss: must be one of cross_entropy, mse, got 'hinge'",
    ),
    ("model", {"onnx": {"train_step": "t.onnx"}}, "model.onnx.eval: required"),
    (
        "extra",
        1,
        "extra: unknown field (expected one of name, description, model, backend, data, "
        "compute, algorithm, stop, aggregator, topology)",
    ),
    ("aggregator.labels", {"role": [1]}, "aggregator.labels.role: must be a string, got a list"),
    (
        "algorithm.server_optimizer",
        {"name": "feddyn"},
        "algorithm.server_optimizer.name: feddyn needs mode: sync",
    ),
    (
        "algorithm.client.feddyn_alpha",
        0.01,
        "algorithm.client.feddyn_alpha: only used with server_optimizer: { name: feddyn }",
    ),
    ("algorithm.client.momentum", 1.5, "algorithm.client.momentum: must be ≤ 0.999, got 1.5"),
    ("algorithm.round_timeout", 0, "algorithm.round_timeout: must be > 0, got 0"),
    ("algorithm.clients_per_round", 0, "algorithm.clients_per_round: must be ≥ 1, got 0"),
    (
        "algorithm.oort",
        {"preferred_duration": 0},
        "algorithm.oort.preferred_duration: must be > 0, got 0",
    ),
    (
        "algorithm.oort",
        {"blacklist": 3},
        "algorithm.oort.blacklist: unknown field (did you mean blacklist_rounds?)",
    ),
    (
        "topology.kind",
        "mesh",
        "topology.kind: must be one of two_tier, hierarchical, hybrid, got 'mesh'",
    ),
    (
        "topology",
        {"kind": "hierarchical"},
        "topology.group_by: required by kind: hierarchical (e.g. site)",
    ),
    (
        "topology",
        {"group_by": "site"},
        "topology.group_by: only used by hierarchical and hybrid jobs",
    ),
    ("topology.buffer_size", 0, "topology.buffer_size: must be ≥ 1, got 0"),
]


def test_oort_settings_reach_the_roles_plan() -> None:
    from agent.learning.plan import TrainingPlan

    raw = with_change("algorithm.selection", "oort")
    raw["algorithm"]["oort"] = {"preferred_duration": 12.5, "blacklist_rounds": 8}
    plan = TrainingPlan.from_config(parse_spec(raw).to_dict())
    assert (plan.selection, plan.oort_preferred_duration) == ("oort", 12.5)
    assert plan.oort_blacklist_rounds == 8
    default = TrainingPlan.from_config(parse_spec(example()).to_dict())
    assert (default.oort_preferred_duration, default.oort_blacklist_rounds) == (None, None)


def test_topologies_parse_and_round_trip() -> None:
    raw = with_change("topology", {"kind": "hierarchical", "group_by": "site", "buffer_size": 3})
    spec = parse_spec(raw)
    assert spec.topology.grouped
    assert spec.to_dict()["topology"] == {
        "kind": "hierarchical",
        "group_by": "site",
        "buffer_size": 3,
        "min_groups": 1,
    }
    assert parse_spec(spec.to_dict()) == spec
    assert parse_spec(example()).to_dict()["topology"]["kind"] == "two_tier"
    hybrid = with_change("topology", {"kind": "hybrid", "group_by": "site"})
    hybrid["algorithm"]["mode"] = "sync"
    with pytest.raises(SpecError, match=r"hybrid jobs run with algorithm\.mode: async"):
        parse_spec(hybrid)


def test_shards_reach_the_roles_plan_and_refuse_what_needs_the_whole_delta() -> None:
    plan = TrainingPlan.from_config(parse_spec(with_change("algorithm.shards", 2)).to_dict())
    assert plan.shards == 2
    assert parse_spec(example()).to_dict()["algorithm"]["shards"] == 1
    refused = {
        "algorithm.mode": ("sync", r"algorithm\.shards: sharded aggregation runs with mode: async"),
        "algorithm.max_norm": (5.0, r"algorithm\.shards: max_norm and clip_norm need the whole"),
        "algorithm.selection": ("oort", r"algorithm\.shards: oort selection"),
        "topology": (
            {"kind": "hierarchical", "group_by": "site"},
            r"algorithm\.shards: hierarchical jobs run with one aggregator",
        ),
    }
    for path, (value, message) in refused.items():
        raw = with_change(path, value)
        raw["algorithm"]["shards"] = 2
        with pytest.raises(SpecError, match=message):
            parse_spec(raw)
    with pytest.raises(SpecError, match=r"algorithm\.shards: must be ≥ 1"):
        parse_spec(with_change("algorithm.shards", 0))


def test_feddyn_needs_sync_rounds_and_its_alpha() -> None:
    raw = with_change("algorithm.mode", "sync")
    raw["algorithm"]["server_optimizer"] = {"name": "feddyn"}
    with pytest.raises(SpecError, match=r"algorithm\.client\.feddyn_alpha: required"):
        parse_spec(raw)
    raw["algorithm"]["client"]["feddyn_alpha"] = 0.01
    spec = parse_spec(raw)
    assert spec.to_dict()["algorithm"]["client"]["feddyn_alpha"] == 0.01
    assert spec.to_dict()["algorithm"]["round_timeout"] == 60.0


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_specs_name_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(with_change(path, value))
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_torch_backend_needs_a_torch_model() -> None:
    raw = with_change("model", {"onnx": "a/train_step.onnx"})
    raw["backend"] = "torch"
    with pytest.raises(SpecError, match=r"^backend: torch needs model.torch"):
        parse_spec(raw)
    raw["backend"] = "auto"
    with pytest.raises(SpecError, match=r"^backend: auto needs model.torch"):
        parse_spec(raw)


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match=r"^job spec: must be a mapping, got a list$"):
        parse_spec([1])


def test_yaml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\nmodel: {torch: a.py:B\n")
    with pytest.raises(SpecError) as caught:
        load_spec(bad)
    assert str(caught.value).startswith("line 3, column 1: ")
    assert "\n" not in str(caught.value)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text(EXAMPLE + "\nname: again\n")
    with pytest.raises(SpecError, match=r"^name: duplicate key \(line 16\)$"):
        load_spec(bad)


def test_yaml_tags_cannot_build_objects(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError, match="could not determine a constructor"):
        load_spec(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_load_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(EXAMPLE))
    assert isinstance(load_spec(path), JobSpec)
