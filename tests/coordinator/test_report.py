"""coordinator.report: a job's numbers, CSV and summary from the coordinator's record (the CLI
end to end is tests/coordinator/test_jobs_report.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.report import JobReport, write_markdown

STARTED = 1_800_000_000.0


def detail(**more: Any) -> dict[str, Any]:
    versions = [
        (0, 0.0, {"accuracy": 0.1, "loss": 2.3}),
        (1, 2.0, {"accuracy": 0.62, "loss": 1.1, "train_loss": 1.4, "rounds": 1}),
        (2, 4.5, {"accuracy": 0.91, "loss": 0.35, "train_loss": 0.5}),
        (3, 7.0, {"accuracy": 0.95, "loss": 0.38, "train_loss": 0.3}),
    ]
    return {
        "job": "j-1",
        "name": "digits",
        "phase": "completed",
        "reason": "target accuracy",
        "submitted": STARTED - 1,
        "started": STARTED,
        "finished": STARTED + 8,
        "model_version": 3,
        "updates_applied": 30,
        "stop": {"target_accuracy": 0.9},
        "rejected": {"count": 2, "by_code": {"non_finite": 2}},
        "assignments": [
            {"agent": "gw", "role": "aggregator", "state": "finished"},
            {"agent": "pi", "role": "trainer", "state": "finished", "dataset": "d", "samples": 9},
        ],
        "model_versions": [
            {"version": v, "ts": STARTED + s, "updates_applied": 10 * v, "metrics": m}
            for v, s, m in versions
        ],
        **more,
    }


def test_summary_finds_the_peak_the_lowest_loss_and_the_first_version_at_the_target() -> None:
    summary = JobReport(detail()).summary()
    assert summary["best_accuracy"] == {"value": 0.95, "version": 3, "seconds": 7.0}
    assert summary["lowest_loss"] == {"value": 0.35, "version": 2, "seconds": 4.5}
    assert summary["target_reached"] == {"value": 0.91, "version": 2, "seconds": 4.5}
    assert summary["duration_s"] == 8.0
    assert summary["agents"] == {"aggregator": {"finished": 1}, "trainer": {"finished": 1}}
    assert summary["refused"] == {"count": 2, "by_code": {"non_finite": 2}}
    assert summary["final_metrics"] == {"accuracy": 0.95, "loss": 0.38, "train_loss": 0.3}


def test_csv_has_every_metric_with_blanks_where_a_version_lacks_one() -> None:
    lines = JobReport(detail()).csv_text().splitlines()
    assert lines[0] == "version,seconds,time,updates_applied,accuracy,loss,train_loss,rounds"
    assert lines[1].startswith("0,0.0,")
    assert lines[1].endswith(",0,0.1,2.3,,")
    assert lines[2].endswith(",10,0.62,1.1,1.4,1")


def test_markdown_says_when_the_target_was_reached_and_what_was_refused(tmp_path: Path) -> None:
    report = JobReport(detail())
    files = {"versions.csv": "4 model versions, one row each"}
    text = write_markdown(report, tmp_path, files).read_text()
    assert "* Target accuracy 0.9: reached at version 2, 4.5 s in" in text
    assert "* Updates refused: 2 (non_finite 2)" in text
    assert "; ran 8.0 s" in text
    assert "| pi | trainer | finished | d | 9 |" in text
    assert files["report.md"] == "this summary"

    missed = JobReport(detail(stop={"target_accuracy": 0.99})).markdown({})
    assert "* Target accuracy 0.99: not reached" in missed


def test_without_matplotlib_the_report_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a gateway without the extra
    files = JobReport(detail()).write(tmp_path)
    assert files["plots"] == "not drawn: plots need matplotlib: pip install 'ember-fl[plots]'"
    assert (tmp_path / "versions.csv").exists()
    assert not (tmp_path / "accuracy.png").exists()


def test_versions_without_accuracy_or_loss_draw_nothing(tmp_path: Path) -> None:
    bare = detail()
    for row in bare["model_versions"]:
        row["metrics"] = {"rounds": 1}
    files = JobReport(bare).write(tmp_path)
    assert files["plots"] == "not drawn: no version reported an accuracy or a loss"
    assert JobReport(bare).summary()["best_accuracy"] is None
