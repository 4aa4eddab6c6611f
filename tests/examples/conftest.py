"""Run an example's command as its README gives it, in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
