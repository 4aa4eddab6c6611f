"""The coordinator's systemd unit keeps what `ember serve` and the backups need
(tests/test_systemd_units.py runs systemd-analyze on it)."""

from __future__ import annotations

from tests.systemd_units import UNITS, directives

UNIT = UNITS / "ember-coordinator.service"


def test_the_unit_runs_ember_serve_on_its_state_directory() -> None:
    unit = directives(UNIT)
    assert unit["ExecStart"] == ["/usr/bin/env ember serve"]
    assert unit["StateDirectory"] == ["ember"]
    assert "EMBER_STATE_DIR=/var/lib/ember" in unit["Environment"]  # docs/operations.md backs it up
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]
