"""Checks of Ember's systemd units with systemd-analyze (no running systemd needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, by key, in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def assert_verifies(unit: Path) -> None:
    """``systemd-analyze verify`` passes without a warning about the unit."""
    done = subprocess.run(
        [str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert unit.name not in done.stderr, done.stderr


def exposure(unit: Path) -> float:
    """``systemd-analyze security --offline=true``'s overall exposure level (0 best, 10 worst)."""
    done = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", done.stdout
    )
    assert match, done.stdout + done.stderr
    return float(match.group(1))
