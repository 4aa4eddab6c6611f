"""The agent's systemd unit, checked by systemd-analyze (no running systemd needed).

The unit's ExecStart is ``/usr/bin/env ember-agent ...`` so that it works wherever the console
script was installed (its PATH lists /opt/ember-agent/bin, /usr/local/bin and /usr/bin);
``systemd-analyze verify`` therefore checks the unit as shipped, unmodified.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ember-agent.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_keeps_what_the_agent_needs() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert "WatchdogSec" in unit
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["StateDirectory"] == ["ember-agent"]
    assert unit["DynamicUser"] == ["yes"]
    assert "ProcSubset" not in unit  # ProcSubset=pid hides /proc/stat and /proc/meminfo
    assert unit.get("PrivateDevices", ["no"]) == ["no"]  # would hide GPUs
    allowed = " ".join(unit["DeviceAllow"])
    for group in ("char-nvidia*", "char-drm", "char-vchiq"):
        assert group in allowed


@needs_analyze
def test_systemd_analyze_verify() -> None:
    done = subprocess.run(
        [str(ANALYZE), "verify", str(UNIT)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ember-agent.service" not in done.stderr, done.stderr  # no warnings about the unit


@needs_analyze
def test_security_exposure_at_most_2_5() -> None:
    done = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for ember-agent\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.5, done.stdout
