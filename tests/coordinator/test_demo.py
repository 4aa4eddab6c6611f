"""`ember demo` end to end, as a new user runs it: real processes, embedded broker, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from coordinator.demo.data import holdout_split, load_digits_scaled


def run_demo(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--json", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedavg"])
def test_demo_trains_digits_to_target_accuracy(tmp_path: Path, algorithm: str) -> None:
    summary = run_demo(
        tmp_path, "--agents", "4", "--algorithm", algorithm, "--target-accuracy", "0.93"
    )
    assert summary["phase"] == "completed"
    assert float(summary["final_accuracy"]) >= 0.93  # type: ignore[arg-type]
    assert int(summary["model_versions"]) >= 1  # type: ignore[call-overload]
    assert float(summary["seconds"]) < 120  # type: ignore[arg-type]
    out = tmp_path / "out"
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text()) == summary
    # The exported model is the final global model: it scores what the aggregator reported.
    x, y = load_digits_scaled()
    _, test = holdout_split(x, y, 0.2, seed=0)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": test.x})
    accuracy = float(np.mean(np.argmax(logits, axis=1) == test.y))
    assert accuracy == pytest.approx(float(summary["final_accuracy"]), abs=1e-3)  # type: ignore[arg-type]


def test_demo_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--agents", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--agents" in done.stderr
