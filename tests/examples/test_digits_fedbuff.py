"""examples/digits_fedbuff/job.yaml is the job `ember demo` runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.bundles import model_artifacts
from coordinator.demo.run import DemoOptions
from coordinator.spec import load_spec
from tests.examples.conftest import assert_is_demo_job, run_example

JOB = Path(__file__).resolve().parents[2] / "examples" / "digits_fedbuff" / "job.yaml"


def test_the_example_is_the_demo_job() -> None:
    assert_is_demo_job(JOB, DemoOptions())


def test_the_example_model_files_are_found_from_the_job_directory() -> None:
    artifacts = model_artifacts(load_spec(JOB), JOB.parent)
    assert set(artifacts.artifacts) == {
        "train_step.onnx",
        "eval.onnx",
        "inference.onnx",
        "initial.tensors",
    }


@pytest.mark.slow
def test_ember_demo_prints_the_summary_the_readme_shows(tmp_path: Path) -> None:
    out = run_example(
        tmp_path, "-m", "coordinator.cli", "demo", "--agents", "3", "--target-accuracy", "0.9"
    )
    for row in ("final accuracy (held-out)", "model versions", "updates applied", "training time"):
        assert row in out
    assert re.search(r"final accuracy \(held-out\) │ 0\.9\d+", out), out
    for name in ("accuracy.png", "model.onnx", "summary.json"):
        assert (tmp_path / "ember-demo" / name).exists()
