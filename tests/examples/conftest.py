"""Run an example's command as its README gives it, in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from coordinator.demo.run import DemoOptions, job_spec
from coordinator.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def run_example(tmp_path: Path, *args: str, timeout: float = 400) -> str:
    """``python <args>`` (a script under examples/ or ``-m coordinator.cli ...``) from
    ``tmp_path``; its stdout. Fails with the end of stderr if the command fails."""
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_is_demo_job(path: Path, options: DemoOptions) -> None:
    """The job file is the job ``ember demo`` runs with ``options``; model files are named
    relative to the job file in one and absolute in the other."""
    example = load_spec(path).to_dict()
    demo = parse_spec(job_spec(options)).to_dict()
    assert {k: v for k, v in example.items() if k != "model"} == {
        k: v for k, v in demo.items() if k != "model"
    }

    def files(model: dict[str, object]) -> object:
        if "onnx" in model:
            return {kind: (path.parent / f).resolve() for kind, f in model["onnx"].items()}  # type: ignore[attr-defined]
        source, _, cls = str(model["torch"]).rpartition(":")
        return (path.parent / source).resolve(), cls

    assert files(example["model"]) == files(demo["model"])
