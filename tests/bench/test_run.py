"""The benchmark parts run end to end at tiny sizes (``bench/run.py --quick``, Flower skipped)
and the summary is generated from what they wrote. Their figures are not checked: speed is
what bench/ measures, not what tests assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("ceiling", "aggregate", "latency", "fleet")


def test_parts_run_and_the_summary_is_generated(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            *PARTS,
            "--quick",
            "--no-flower",
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {part: json.loads((tmp_path / f"{part}.json").read_text()) for part in PARTS}
    assert all(r["quick"] for r in results.values())
    assert results["aggregate"]["10k_2_updates_s"] > 0
    # The ratio divides by a ceiling measured alternately with the ingest runs, in this part.
    ceiling = results["aggregate"]["10k_paired_ceiling_mb_s"]
    assert results["aggregate"]["10k_2_ceiling_mb_s"] == ceiling > 0
    assert "10k_2_vs_ceiling" in results["aggregate"]
    assert 0 < results["latency"]["fedbuff_k1_p50_ms"] < results["latency"]["fedbuff_k1_p99_ms"] + 1
    assert results["fleet"]["dispatch_20_trainers"] == 20
    summary = (tmp_path / "SUMMARY.md").read_text()
    for part in PARTS:
        assert f"## {part}" in summary
    assert "--quick sizes" in summary
