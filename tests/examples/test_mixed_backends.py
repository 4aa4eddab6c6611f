"""examples/mixed_backends: one job, trainers on torch and on onnxruntime, as its README says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.demo.run import DemoOptions
from coordinator.spec import load_spec
from tests.examples.conftest import REPO, assert_is_demo_job, run_example

JOB = REPO / "examples" / "mixed_backends" / "job.yaml"


def test_the_example_is_the_demo_job_with_backend_auto() -> None:
    assert load_spec(JOB).backend == "auto"
    assert_is_demo_job(JOB, DemoOptions(backend="auto"))


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
