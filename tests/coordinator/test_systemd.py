"""The coordinator's systemd unit, checked by systemd-analyze (no running systemd needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ember-coordinator.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_runs_ember_serve_on_its_state_directory() -> None:
    unit = directives()
    assert unit["ExecStart"] == ["/usr/bin/env ember serve"]
    assert unit["StateDirectory"] == ["ember"]
    assert (
        "EMBER_STATE_DIR=/var/lib/ember" in unit["Environment"]
    )  # what docs/operations.md backs up
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]


@needs_analyze
def test_systemd_analyze_verify() -> None:
    done = subprocess.run(
        [str(ANALYZE), "verify", str(UNIT)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ember-coordinator.service" not in done.stderr, done.stderr


@needs_analyze
def test_security_exposure_at_most_2_5() -> None:
    done = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(
        r"Overall exposure level for ember-coordinator\.service: (\d+\.\d+)", done.stdout
    )
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.5, done.stdout
