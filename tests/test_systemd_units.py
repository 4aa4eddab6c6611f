"""Every unit in systemd/ passes systemd-analyze verify and rates an exposure of at most 2.5."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.systemd_units import UNITS, assert_verifies, exposure, needs_analyze

ALL = sorted(UNITS.glob("*.service"))


def test_both_units_are_there() -> None:
    assert [u.name for u in ALL] == ["ember-agent.service", "ember-coordinator.service"]


@needs_analyze
@pytest.mark.parametrize("unit", ALL, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit: Path) -> None:
    assert_verifies(unit)


@needs_analyze
@pytest.mark.parametrize("unit", ALL, ids=lambda u: u.name)
def test_security_exposure_at_most_2_5(unit: Path) -> None:
    assert exposure(unit) <= 2.5
