"""examples/mixed_backends: one job, trainers on torch and on onnxruntime, as its README says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.demo.run import DemoOptions, job_spec
from coordinator.spec import load_spec, parse_spec
from tests.examples.conftest import REPO, run_example

JOB = REPO / "examples" / "mixed_backends" / "job.yaml"


def test_the_example_is_the_demo_job_with_backend_auto() -> None:
    example = load_spec(JOB).to_dict()
    demo = parse_spec(job_spec(DemoOptions(backend="auto"))).to_dict()
    assert example["backend"] == "auto"
    # The model file is named relative to the job file in one, absolute in the other.
    assert {k: v for k, v in example.items() if k != "model"} == {
        k: v for k, v in demo.items() if k != "model"
    }
    assert (JOB.parent / example["model"]["torch"].split(":")[0]).resolve() == Path(
        demo["model"]["torch"].split(":")[0]
    )


@pytest.mark.slow
def test_ember_demo_backend_auto_trains_with_both_backends(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = run_example(
        tmp_path,
        *("-m", "coordinator.cli", "demo", "--backend", "auto", "--agents", "4"),
        *("--target-accuracy", "0.9", "--json"),
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["phase"] == "completed"
    assert summary["final_accuracy"] >= 0.9
    assert summary["backend"] == "auto"
    assert sorted(summary["backends"].values()) == ["onnxruntime"] * 2 + ["torch"] * 2
    assert (tmp_path / "ember-demo" / "model.onnx").exists()
