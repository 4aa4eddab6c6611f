"""examples/stragglers: its command prints both times to the target and writes the plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.demo.run import DemoOptions
from tests.examples.conftest import REPO, assert_is_demo_job, run_example


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedavg"])
def test_the_job_files_are_the_jobs_the_example_runs(algorithm: str) -> None:
    options = DemoOptions(agents=8, algorithm=algorithm, target_accuracy=0.93)  # type: ignore[arg-type]
    assert_is_demo_job(REPO / "examples" / "stragglers" / f"{algorithm}.yaml", options)


@pytest.mark.slow
def test_the_example_prints_both_times_to_target_and_a_plot(tmp_path: Path) -> None:
    out = run_example(
        tmp_path,
        str(REPO / "examples" / "stragglers" / "run.py"),
        *("--agents", "4", "--target", "0.85", "--out", "out"),
    )
    for name in ("fedbuff", "fedavg"):
        line = next(row for row in out.splitlines() if row.startswith(name))
        assert re.fullmatch(rf"{name}\s+time to 0\.85: [0-9.]+ s  \(final 0\.\d+\)", line), line
    assert "plot: out/stragglers.png" in out
    assert (tmp_path / "out" / "stragglers.png").stat().st_size > 10_000
