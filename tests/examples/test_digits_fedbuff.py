"""examples/digits_fedbuff/job.yaml is the job `ember demo` runs."""

from __future__ import annotations

from pathlib import Path

from coordinator.bundles import model_artifacts
from coordinator.demo.run import DemoOptions, job_spec
from coordinator.spec import load_spec, parse_spec

JOB = Path(__file__).resolve().parents[2] / "examples" / "digits_fedbuff" / "job.yaml"


def test_the_example_is_the_demo_job() -> None:
    example = load_spec(JOB).to_dict()
    demo = parse_spec(job_spec(DemoOptions())).to_dict()
    # Model files are named relative to the job file in one, absolute in the other.
    assert {k: v for k, v in example.items() if k != "model"} == {
        k: v for k, v in demo.items() if k != "model"
    }
    paths = {kind: Path(path).name for kind, path in example["model"]["onnx"].items()}
    assert paths == {kind: Path(path).name for kind, path in demo["model"]["onnx"].items()}


def test_the_example_model_files_are_found_from_the_job_directory() -> None:
    artifacts = model_artifacts(load_spec(JOB), JOB.parent)
    assert set(artifacts.artifacts) == {
        "train_step.onnx",
        "eval.onnx",
        "inference.onnx",
        "initial.tensors",
    }
